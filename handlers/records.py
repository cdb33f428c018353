"""Typed records the sync domain works with: accounts, event versions, links, delta pages."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contract.statuses import PAUSED_STATUSES


@dataclass(frozen=True)
class Account:
    """An account as stored: what the handlers and the subscription manager decide from
    (nothing decrypted; its Microsoft identity stays sealed until asked for)."""

    account_id: str
    status: str | None
    status_reason: str = ""
    user_hash: str | None = None
    tenant_hash: str | None = None
    #: The identity's ciphertext (user, tenant), opened only by the accounts' store.
    sealed_identity: tuple[Any, Any] | None = None

    @property
    def bound(self) -> bool:
        """Whether a Microsoft 365 user is bound to the account (it finished connecting)."""
        return self.sealed_identity is not None

    @property
    def paused(self) -> bool:
        """No Graph calls for this account now: paused by its status, or not bound yet."""
        return self.status in PAUSED_STATUSES or not self.bound


#: The event fields the service keeps (and asks Graph for with ``$select``).
KEPT_FIELDS: tuple[str, ...] = (
    "subject",
    "body",
    "start",
    "end",
    "isAllDay",
    "location",
    "attendees",
    "organizer",
    "showAs",
    "sensitivity",
    "recurrence",
    "type",
    "seriesMasterId",
    "iCalUId",
    "lastModifiedDateTime",
    "changeKey",
    "webLink",
    "isCancelled",
    "isOrganizer",
)

#: Kept fields the service decides from (versions, flags) but does not hand out.
SYNC_ONLY_FIELDS: frozenset[str] = frozenset({"changeKey", "isCancelled", "isOrganizer"})

#: The event fields ``GET /api/v1/accounts/{id}/events`` returns besides ``event_key`` and
#: ``relation_event_id`` (docs/contract.md §3, docs/openapi.yaml's ``Event``).
CONTRACT_EVENT_FIELDS: tuple[str, ...] = tuple(
    name for name in KEPT_FIELDS if name not in SYNC_ONLY_FIELDS
)


#: A stored event's version: (``lm``, keyed hash of the changeKey, sequence of its last
#: announcement), as read back.
StoredVersion = tuple[datetime | None, str | None, int]


@dataclass(frozen=True)
class Change:
    """A real change written to the database, waiting to be announced to 1Relation."""

    account_id: str
    event_key: str
    change: str  # "upserted" | "deleted"
    last_modified: datetime | None
    seq: int
    relation_event_id: str | None = None
    #: ``lastModifiedDateTime`` as Graph wrote it (full precision; BSON keeps milliseconds).
    last_modified_text: str | None = None


def next_sequence(previous: Any) -> int:
    """An announcement sequence above ``previous`` (time-based, so that announcements made
    by different processes for one event still order by when they were made)."""
    last = previous if isinstance(previous, int) else 0
    return max(time.time_ns(), last + 1)


@dataclass
class Link:
    """A decrypted view of one link."""

    link_id: str
    account_id: str
    relation_event_id: str
    applied_revision: int
    graph_id: str | None
    event_key: str | None
    state: dict[str, Any]
    base_lm: datetime | None
    deleted: bool
    deleted_revision: int
    generation: int


@dataclass(frozen=True)
class DeltaPage:
    """One page of a calendarView delta round; the last page carries the next ``delta_link``."""

    items: list[dict[str, Any]]
    removed_ids: list[str]
    delta_link: str | None

"""Typed records the sync domain works with: accounts, event versions, links, delta pages."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contract.statuses import PAUSED_STATUSES
from handlers.timezones import event_time_to_utc


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


def comparable(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Field values normalised so that what we sent equals what Graph returns for it."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("start", "end"):
            out[name] = event_time_to_utc(value) if value is not None else None
        elif name == "body":
            out[name] = (value or {}).get("content", "").strip() if value else None
        elif name == "attendees":
            out[name] = sorted(
                ((a.get("emailAddress") or {}).get("address", "").lower(), a.get("type"))
                for a in value or []
            )
        elif name == "location":
            out[name] = (value or {}).get("displayName", "") if value else ""
        elif name == "categories":
            out[name] = sorted(value or [])
        elif name == "recurrence":
            out[name] = _recurrence(value)
        else:
            out[name] = value
    return out


def _recurrence(value: Any) -> tuple[Any, ...] | None:
    """A recurrence as a comparable tuple: Graph answers with every default filled in
    (``firstDayOfWeek``, ``index``, ``endDate`` ``0001-01-01`` for other range types, ...)."""
    if not isinstance(value, Mapping):
        return None
    pattern = value.get("pattern") or {}
    rng = value.get("range") or {}
    rtype = rng.get("type")
    return (
        pattern.get("type"),
        pattern.get("interval") or 1,
        pattern.get("month") or 0,
        pattern.get("dayOfMonth") or 0,
        tuple(sorted(str(d).lower() for d in pattern.get("daysOfWeek") or [])),
        str(pattern.get("firstDayOfWeek") or "sunday").lower(),
        str(pattern.get("index") or "first").lower(),
        rtype,
        rng.get("startDate"),
        rng.get("endDate") if rtype == "endDate" else None,
        rng.get("numberOfOccurrences") if rtype == "numbered" else None,
    )


@dataclass(frozen=True)
class DeltaPage:
    """One page of a calendarView delta round; the last page carries the next ``delta_link``."""

    items: list[dict[str, Any]]
    removed_ids: list[str]
    delta_link: str | None

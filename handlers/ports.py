"""Ports the sync handlers work through: Protocols the runtime (``processor/``) implements.

The Protocols are structural: the runtime's stores, Graph client and publisher satisfy them
without inheriting, and unit tests hand the handlers in-memory fakes of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from crypto import DataCipher, KeyCheck
from handlers.outcome import Outcome
from handlers.records import Account, Change, DeltaPage, Link, StoredVersion

#: A stored document as the repositories hand it over (read-only to the handlers).
Document = Mapping[str, Any]


# ---- messages -------------------------------------------------------------------------------


class IncomingMessage(Protocol):
    """What a handler may read of the broker's message besides its parsed body."""

    @property
    def body(self) -> bytes: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def correlation_id(self) -> str | None: ...


class Delivery(Protocol):
    """One parsed message of a batch; the handler sets its ``outcome``."""

    outcome: Outcome | None

    @property
    def message(self) -> IncomingMessage: ...

    @property
    def body(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class OutgoingMessage:
    """A message the service publishes: persistent, JSON, with a unique message id."""

    exchange: str
    routing_key: str
    body: Mapping[str, Any]
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    correlation_id: str | None = None
    #: Milliseconds until a retry-queue message dead-letters back (None: no expiry).
    expiration_ms: int | None = None


class Publisher(Protocol):
    """Publishes with broker confirms; returns only once every message is confirmed."""

    async def publish(self, message: OutgoingMessage, *, timeout_s: float) -> None:
        """Publish one message; raises :class:`PublishError` unless it was confirmed and routed."""

    async def publish_many(self, messages: list[OutgoingMessage], *, timeout_s: float) -> None:
        """Publish concurrently; raises :class:`PublishError` unless every one was confirmed."""


# ---- subscriptions -------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionRecord:
    """What the receiver needs to check a notification: all lookups are keyed hashes."""

    subscription_hash: str
    account_id: str
    client_state_hash: str
    tenant_hash: str
    user_hash: str
    expires_at: datetime
    #: The record's sealed subscription id: written under the account's data key of the
    #: connection that created it, so it proves a cached key current (None in old tests).
    key_check: KeyCheck | None = field(default=None, repr=False, compare=False)


class SubscriptionLookup(Protocol):
    """Finds our subscription records by the keyed hash of Graph's subscription id."""

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        """The record, or None when the subscription is not one of ours."""
        ...


# ---- accounts -------------------------------------------------------------------------------


class Identity(Protocol):
    """The Microsoft identity an account is bound to."""

    @property
    def user_id(self) -> str: ...


class Accounts(Protocol):
    """The accounts, their data keys and identities."""

    async def cipher_for(self, account_id: str, account: Account | None = None) -> DataCipher:
        """The account's data cipher; raises ``AccountUnavailable`` once it is erased.

        With the ``account`` just read, a key this process cached before the account was
        erased and connected again (in another process) is noticed and replaced.
        """
        ...

    async def account(self, account_id: str) -> Account | None:
        """The account's record, or None when there is no such account."""
        ...

    async def identity(self, account_id: str) -> Identity:
        """The decrypted user id; raises ``AccountUnavailable`` when it is not bound."""
        ...

    async def fenced(self, account_id: str, cipher: DataCipher | None = None) -> bool:
        """Whether writes for the account must stop: it is erased or being erased, or (given
        the ``cipher`` the writer holds) erased and connected again under a new key."""
        ...


class AccountStatus(Protocol):
    """Sets account statuses (telling 1Relation) and notes finished sync steps."""

    async def set(self, account_id: str, status: str, reason: str | None = None) -> bool:
        """Set the status; returns whether it changed."""
        ...

    async def record_sync(self, account_id: str, *, error: str | None = None) -> None:
        """Note a finished sync step (``error``: what stopped it)."""
        ...


class Announcer(Protocol):
    """Announces written changes to 1Relation (and the account's outbox, when asked)."""

    async def flush(
        self, account_id: str, changes: Sequence[Change], *, sweep_outbox: bool = False
    ) -> int:
        """Announce ``changes``; returns how many went out."""
        ...


# ---- events and links -----------------------------------------------------------------------


class Events(Protocol):
    """The synced events: version-guarded writes, tombstones, reads for reconciliation."""

    def event_key(self, account_id: str, graph_id: str) -> str:
        """The service's stable identifier of a synced event."""
        ...

    async def upsert_version(
        self,
        account_id: str,
        event: Mapping[str, Any],
        *,
        cipher: DataCipher,
        announce: bool = True,
        relation_event_id: str | None = None,
        known: dict[str, StoredVersion] | None = None,
    ) -> Change | None:
        """Store ``event`` unless the stored version is the same or newer; None when stale."""
        ...

    async def mark_deleted(
        self, account_id: str, event_key: str, *, announce: bool = True
    ) -> Change | None:
        """Turn a live event into a tombstone; None if absent or already deleted."""
        ...

    async def stored_version(self, account_id: str, event_key: str) -> tuple[str | None, bool]:
        """The stored change key hash and whether it is a tombstone."""
        ...

    async def stored_versions(self, account_id: str) -> dict[str, StoredVersion]:
        """The stored version of every event of the account, tombstones included."""
        ...

    async def series_instance_keys(self, account_id: str, series_key: str) -> set[str]:
        """Keys of the live stored occurrences and exceptions of a series."""
        ...

    async def count_live(self, account_id: str) -> int:
        """How many live events the account has."""
        ...

    async def live_docs(
        self, account_id: str, keys: Sequence[str] | None = None
    ) -> Mapping[str, Document]:
        """The account's live events (only those of ``keys`` when given): extent and series."""
        ...

    def graph_id_of(self, account_id: str, doc: Document, cipher: DataCipher) -> str:
        """Graph's id of a stored event of the account (a document of :meth:`live_docs`)."""
        ...

    async def live_state(
        self, event_key: str, cipher: DataCipher
    ) -> tuple[dict[str, Any], datetime | None] | None:
        """The kept fields and ``lastModified`` of a live stored event; None if absent."""
        ...


class LinkReader(Protocol):
    """What the inbound side reads of the links between 1Relation's events and Graph's."""

    async def indexed_keys(self, account_id: str) -> set[str]:
        """Every link-index key of the account (event keys and create transactions)."""
        ...

    def transaction_key(self, account_id: str, transaction_id: str) -> str:
        """The link-index key of a create's ``transactionId``."""
        ...

    async def doc_for(
        self, account_id: str, event_key: str, transaction_id: str | None = None
    ) -> Document | None:
        """The link of a synced event, by event key or by its create's ``transactionId``."""
        ...

    def deleted_by_us(self, doc: Document | None, event_key: str) -> bool:
        """Whether the service deleted (or is deleting) this event for 1Relation."""
        ...

    async def echo_of(
        self, account_id: str, event_key: str, event: Mapping[str, Any], cipher: DataCipher
    ) -> tuple[bool, str | None]:
        """Whether ``event`` is the service's own write, and the linked 1Relation id."""
        ...

    def echo_hashes(self, doc: Document | None) -> set[str]:
        """Hashes of the change keys of the service's own writes to this event."""
        ...

    def written(
        self, doc: Document | None, account_id: str, cipher: DataCipher
    ) -> tuple[str, dict[str, Any]] | None:
        """The service's last write to the event as Graph answered it, with its change key hash."""
        ...


class Links(Protocol):
    """What the outbound side reads and writes of the links, and its parked messages."""

    async def get(self, account_id: str, relation_event_id: str, cipher: DataCipher) -> Link:
        """The link, or a fresh empty one (not yet stored)."""
        ...

    async def record_intent(
        self,
        link: Link,
        *,
        revision: int,
        intended: Mapping[str, Any],
        cipher: DataCipher,
        op: str = "upsert",
        transaction_id: str | None = None,
    ) -> None:
        """Before a Graph write: remember what is about to be written."""
        ...

    async def record_written(
        self,
        link: Link,
        *,
        revision: int,
        graph_id: str,
        event_key: str,
        state: Mapping[str, Any],
        change_key: str | None,
        last_modified: datetime | None,
        cipher: DataCipher,
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        """After a Graph write: the mapping, the new base state and Graph's answer."""
        ...

    async def record_deleted(
        self, link: Link, revision: int, *, tombstone_ttl_s: float, by_us: bool = True
    ) -> None:
        """The event is gone: keep a tombstone so an older upsert cannot resurrect it."""
        ...

    async def record_revision(self, link: Link, revision: int) -> None:
        """A revision that needed no Graph write is still applied."""
        ...

    async def park(
        self, account_id: str, relation_event_id: str, revision: int, body: Mapping[str, Any]
    ) -> None:
        """Keep a message of an account that cannot write; replayed in order on reconnect."""
        ...

    async def parked_for(self, account_id: str) -> Sequence[Document]:
        """The account's parked messages, oldest first."""
        ...

    async def unpark(self, parked_id: str) -> None:
        """Remove a parked message once it has been applied."""
        ...

    async def count_parked(self, account_id: str) -> int:
        """How many of the account's messages wait."""
        ...

    async def take_expired_parked(
        self, account_id: str, parked_before: datetime
    ) -> Sequence[Document]:
        """Remove and return the account's messages parked before ``parked_before``."""
        ...


class DeltaLinks(Protocol):
    """Where an account's calendarView delta link is kept (encrypted)."""

    async def load(self, account_id: str, cipher: DataCipher) -> tuple[str, datetime | None] | None:
        """The decrypted link and the start of its window; None when there is none.

        Raises ``crypto.DecryptionError`` when the stored link cannot be read.
        """
        ...

    async def save(
        self,
        account_id: str,
        cipher: DataCipher,
        link: str,
        *,
        start: datetime,
        end: datetime,
        at: datetime,
    ) -> None:
        """Keep the link of a round over ``[start, end)``, finished ``at``."""
        ...

    async def clear(self, account_id: str) -> None:
        """Forget the link: the next pass is a full round."""
        ...


# ---- Microsoft Graph ------------------------------------------------------------------------


class CalendarGraph(Protocol):
    """The calendar calls of Microsoft Graph the handlers make."""

    async def get_event(
        self, account_id: str, user_id: str, event_id: str, *, select: Sequence[str]
    ) -> dict[str, Any] | None:
        """The event's current state, or None when it is deleted."""
        ...

    async def list_instances(
        self,
        account_id: str,
        user_id: str,
        series_master_id: str,
        start: datetime,
        end: datetime,
        *,
        select: Sequence[str],
    ) -> list[dict[str, Any]]:
        """The occurrences and exceptions of a series in ``[start, end)``."""
        ...

    def calendar_view_delta(
        self,
        account_id: str,
        user_id: str,
        *,
        delta_link: str | None,
        start: datetime,
        end: datetime,
        page_size: int = 100,
    ) -> AsyncIterator[DeltaPage]:
        """One delta round: pages until the one that carries the next ``delta_link``."""
        ...

    async def create_event(
        self, account_id: str, user_id: str, body: Mapping[str, Any], *, transaction_id: str
    ) -> dict[str, Any]:
        """Create an event; ``transaction_id`` makes Graph drop a retried duplicate."""
        ...

    async def update_event(
        self, account_id: str, user_id: str, event_id: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """PATCH an event and return its new state, or None when it is deleted."""
        ...

    async def delete_event(self, account_id: str, user_id: str, event_id: str) -> bool:
        """Delete an event; False when it was already gone."""
        ...


# ---- metrics --------------------------------------------------------------------------------


class Count(Protocol):
    """A counter (or one labelled child of it)."""

    def inc(self, amount: float = 1) -> None: ...


class LabelledCount(Protocol):
    """A counter with labels."""

    def labels(self, **labels: str) -> Count: ...


class SyncMetrics(Protocol):
    """The counters the sync handlers move."""

    @property
    def events_reconciled(self) -> LabelledCount: ...

    @property
    def echoes_suppressed(self) -> Count: ...

    @property
    def fetches_skipped(self) -> Count: ...

    @property
    def burst_passes(self) -> Count: ...

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Any:
        """A counter registered under ``name`` (labelled when ``labelnames`` are given)."""
        ...

"""In-memory fakes of the ports in :mod:`handlers.ports`, for handler unit tests.

They keep just enough state to answer what the handlers ask, and record what the handlers
did (Graph calls, statuses, announcements, publishes) for the tests to check.
"""

from __future__ import annotations

import itertools
from collections import Counter as Tally
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from crypto import DataCipher
from handlers.errors import AccountUnavailable
from handlers.messages import b64
from handlers.outcome import Outcome
from handlers.records import Account, Change, DeltaPage, Link, StoredVersion
from handlers.timeutil import parse_graph_datetime

ACCOUNT = "acct-1"
USER = "user-1"
NOW = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


@dataclass
class FakeMessage:
    """The broker message a delivery came in (only what handlers read)."""

    body: bytes = b"{}"
    message_id: str | None = "m-1"
    correlation_id: str | None = None


@dataclass
class FakeDelivery:
    """A parsed delivery; the handler sets ``outcome``."""

    body: dict[str, Any]
    message: FakeMessage = field(default_factory=FakeMessage)
    outcome: Outcome | None = None


class FakeCount:
    """A counter and its labelled children."""

    def __init__(self) -> None:
        self.value = 0.0
        self.children: dict[tuple[tuple[str, str], ...], FakeCount] = {}

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def labels(self, **labels: str) -> FakeCount:
        return self.children.setdefault(tuple(sorted(labels.items())), FakeCount())


class FakeMetrics:
    """The sync handlers' counters."""

    def __init__(self) -> None:
        self.events_reconciled = FakeCount()
        self.echoes_suppressed = FakeCount()
        self.fetches_skipped = FakeCount()
        self.burst_passes = FakeCount()
        self.registered: dict[str, FakeCount] = {}

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> FakeCount:
        return self.registered.setdefault(name, FakeCount())


@dataclass
class FakeIdentity:
    user_id: str


class FakeAccounts:
    """Accounts with their ciphers; an erased account raises ``AccountUnavailable``."""

    def __init__(self, *, status: str = "connected", bound: bool = True) -> None:
        self.cipher = DataCipher(b"\x07" * 32)
        sealed = (b"user", b"tenant") if bound else None
        self.accounts = {ACCOUNT: Account(ACCOUNT, status, sealed_identity=sealed)}
        self.erased: set[str] = set()

    async def cipher_for(self, account_id: str, account: Account | None = None) -> DataCipher:
        if account_id in self.erased:
            raise AccountUnavailable(account_id, "erased")
        return self.cipher

    async def account(self, account_id: str) -> Account | None:
        return self.accounts.get(account_id)

    async def identity(self, account_id: str) -> FakeIdentity:
        return FakeIdentity(USER)

    async def fenced(self, account_id: str, cipher: DataCipher | None = None) -> bool:
        # A cipher other than the account's is an erased connection's (connected again).
        return account_id in self.erased or (cipher is not None and cipher is not self.cipher)


class FakeStatuses:
    """Records status changes and finished sync steps."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, str, str | None]] = []
        self.syncs: list[tuple[str, str | None]] = []

    async def set(self, account_id: str, status: str, reason: str | None = None) -> bool:
        self.statuses.append((account_id, status, reason))
        return True

    async def record_sync(self, account_id: str, *, error: str | None = None) -> None:
        self.syncs.append((account_id, error))


class FakeAnnouncer:
    """Records what would have been announced to 1Relation."""

    def __init__(self) -> None:
        self.announced: list[Change] = []
        self.sweeps = 0

    async def flush(
        self, account_id: str, changes: Sequence[Change], *, sweep_outbox: bool = False
    ) -> int:
        self.announced += list(changes)
        self.sweeps += int(sweep_outbox)
        return len(changes)


def _lm(event: Mapping[str, Any]) -> datetime | None:
    value = event.get("lastModifiedDateTime")
    return parse_graph_datetime(str(value)) if value else None


def ck_hash(change_key: str) -> str:
    """The fake's keyed hash of a change key (what notifications carry as ``etag_hash``)."""
    return f"ck:{change_key}"


class FakeEvents:
    """Synced events in a dict, with the version guard of the real store (newer wins)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self._seq = itertools.count(1)
        self.silent: list[str] = []  # keys written with announce=False

    def event_key(self, account_id: str, graph_id: str) -> str:
        return f"{account_id}/{graph_id}"

    def put(self, account_id: str, event: Mapping[str, Any]) -> str:
        """Store ``event`` as if an earlier sync had written it."""
        key = self.event_key(account_id, str(event["id"]))
        self.docs[key] = self._doc(account_id, key, event)
        return key

    def _doc(self, account_id: str, key: str, event: Mapping[str, Any]) -> dict[str, Any]:
        start = event.get("start") or {}
        end = event.get("end") or {}
        master = event.get("seriesMasterId")
        return {
            "_id": key,
            "account_id": account_id,
            "graph_id": str(event["id"]),
            "fields": {k: v for k, v in event.items() if k not in ("id",)},
            "ck": ck_hash(str(event.get("changeKey", ""))),
            "lm": _lm(event),
            "deleted": False,
            "seq": next(self._seq),
            "type": event.get("type"),
            "series": self.event_key(account_id, str(master)) if master else None,
            "start": parse_graph_datetime(start["dateTime"]) if "dateTime" in start else None,
            "end": parse_graph_datetime(end["dateTime"]) if "dateTime" in end else None,
        }

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
        key = self.event_key(account_id, str(event["id"]))
        stored = self.docs.get(key)
        lm = _lm(event)
        if stored is not None and not stored["deleted"]:
            if stored["ck"] == ck_hash(str(event.get("changeKey", ""))):
                return None
            if stored["lm"] is not None and lm is not None and lm <= stored["lm"]:
                return None
        doc = self._doc(account_id, key, event)
        self.docs[key] = doc
        if not announce:
            self.silent.append(key)
            return None
        return Change(account_id, key, "upserted", lm, doc["seq"], relation_event_id)

    async def mark_deleted(
        self, account_id: str, event_key: str, *, announce: bool = True
    ) -> Change | None:
        doc = self.docs.get(event_key)
        if doc is None or doc["deleted"]:
            return None
        doc["deleted"] = True
        doc["fields"] = {}
        if not announce:
            self.silent.append(event_key)
            return None
        return Change(account_id, event_key, "deleted", None, next(self._seq))

    async def stored_version(self, account_id: str, event_key: str) -> tuple[str | None, bool]:
        doc = self.docs.get(event_key)
        return (None, False) if doc is None else (doc["ck"], doc["deleted"])

    async def stored_versions(self, account_id: str) -> dict[str, StoredVersion]:
        return {
            k: (d["lm"], d["ck"], d["seq"])
            for k, d in self.docs.items()
            if d["account_id"] == account_id
        }

    async def series_instance_keys(self, account_id: str, series_key: str) -> set[str]:
        return {k for k, d in self.docs.items() if d["series"] == series_key and not d["deleted"]}

    async def count_live(self, account_id: str) -> int:
        return sum(1 for d in self.docs.values() if not d["deleted"])

    async def live_docs(
        self, account_id: str, keys: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        wanted = set(self.docs) if keys is None else set(keys)
        return {
            k: d
            for k, d in self.docs.items()
            if k in wanted and d["account_id"] == account_id and not d["deleted"]
        }

    def graph_id_of(self, account_id: str, doc: Mapping[str, Any], cipher: DataCipher) -> str:
        return str(self.docs[str(doc["_id"])]["graph_id"])

    async def live_state(
        self, event_key: str, cipher: DataCipher
    ) -> tuple[dict[str, Any], datetime | None] | None:
        doc = self.docs.get(event_key)
        if doc is None or doc["deleted"]:
            return None
        return dict(doc["fields"]), doc["lm"]

    def live(self) -> set[str]:
        """Keys of the live events."""
        return {k for k, d in self.docs.items() if not d["deleted"]}


class FakeGraph:
    """A mailbox's calendar: events by Graph id, every call recorded; ``fail`` raises once."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail: BaseException | None = None
        self._ids = itertools.count(1)
        self._clock = NOW

    def add(self, **fields: Any) -> dict[str, Any]:
        """A new event in the mailbox (with an id, a change key and a modification time)."""
        graph_id = fields.pop("id", None) or f"g{next(self._ids)}"
        event = {"id": graph_id, **fields}
        self._touch(event)
        self.events[graph_id] = event
        return dict(event)

    def _touch(self, event: dict[str, Any]) -> None:
        self._clock += timedelta(seconds=1)
        event["changeKey"] = f"ck{next(self._ids)}"
        event["lastModifiedDateTime"] = self._clock.strftime("%Y-%m-%dT%H:%M:%S.0000000Z")

    def _check(self) -> None:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc

    async def get_event(
        self, account_id: str, user_id: str, event_id: str, *, select: Sequence[str]
    ) -> dict[str, Any] | None:
        self.calls.append(("get", event_id))
        self._check()
        event = self.events.get(event_id)
        return dict(event) if event is not None else None

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
        self.calls.append(("instances", series_master_id))
        return []

    async def calendar_view_delta(
        self,
        account_id: str,
        user_id: str,
        *,
        delta_link: str | None,
        start: datetime,
        end: datetime,
        page_size: int = 100,
    ) -> AsyncIterator[DeltaPage]:
        self.calls.append(("delta", delta_link))
        self._check()
        yield DeltaPage(
            items=[dict(e) for e in self.events.values()],
            removed_ids=[],
            delta_link=f"https://graph.test/delta?n={len(self.calls)}",
        )

    async def create_event(
        self, account_id: str, user_id: str, body: Mapping[str, Any], *, transaction_id: str
    ) -> dict[str, Any]:
        self.calls.append(("create", dict(body)))
        self._check()
        return self.add(**dict(body.items()), transactionId=transaction_id)

    async def update_event(
        self, account_id: str, user_id: str, event_id: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        self.calls.append(("patch", dict(patch)))
        self._check()
        event = self.events.get(event_id)
        if event is None:
            return None
        event.update(patch)
        self._touch(event)
        return dict(event)

    async def delete_event(self, account_id: str, user_id: str, event_id: str) -> bool:
        self.calls.append(("delete", event_id))
        self._check()
        return self.events.pop(event_id, None) is not None

    def patches(self) -> list[dict[str, Any]]:
        """The bodies of every PATCH, in order."""
        return [body for kind, body in self.calls if kind == "patch"]


class FakeLinks:
    """Links between 1Relation's events and Graph's, and parked messages."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self.intents: list[tuple[int, dict[str, Any], str]] = []
        self.parked: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    async def get(self, account_id: str, relation_event_id: str, cipher: DataCipher) -> Link:
        link = self.links.get(relation_event_id)
        if link is None:
            link = Link(
                link_id=f"link-{relation_event_id}",
                account_id=account_id,
                relation_event_id=relation_event_id,
                applied_revision=0,
                graph_id=None,
                event_key=None,
                state={},
                base_lm=None,
                deleted=False,
                deleted_revision=0,
                generation=0,
            )
        return link

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
        self.intents.append((revision, dict(intended), op))

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
        link.applied_revision = revision
        link.graph_id = graph_id
        link.event_key = event_key
        link.state = dict(state)
        link.base_lm = last_modified
        link.deleted = False
        self.links[link.relation_event_id] = link

    async def record_deleted(
        self, link: Link, revision: int, *, tombstone_ttl_s: float, by_us: bool = True
    ) -> None:
        link.deleted = True
        link.deleted_revision = revision
        link.applied_revision = revision
        self.links[link.relation_event_id] = link

    async def record_revision(self, link: Link, revision: int) -> None:
        link.applied_revision = revision
        self.links[link.relation_event_id] = link

    async def park(
        self, account_id: str, relation_event_id: str, revision: int, body: Mapping[str, Any]
    ) -> None:
        parked_id = f"p{next(self._ids)}"
        self.parked[parked_id] = {
            "_id": parked_id,
            "relation_event_id": relation_event_id,
            "revision": revision,
            "body": dict(body),
            "parked_at": NOW,
        }

    async def parked_for(self, account_id: str) -> list[dict[str, Any]]:
        return list(self.parked.values())

    async def unpark(self, parked_id: str) -> None:
        self.parked.pop(parked_id, None)

    async def count_parked(self, account_id: str) -> int:
        return len(self.parked)

    async def take_expired_parked(
        self, account_id: str, parked_before: datetime
    ) -> list[dict[str, Any]]:
        expired = [d for d in self.parked.values() if d["parked_at"] < parked_before]
        for doc in expired:
            del self.parked[doc["_id"]]
        return expired


class FakeDeltaLinks:
    """An account's delta link, kept in clear."""

    def __init__(self) -> None:
        self.links: dict[str, tuple[str, datetime | None]] = {}

    async def load(self, account_id: str, cipher: DataCipher) -> tuple[str, datetime | None] | None:
        return self.links.get(account_id)

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
        self.links[account_id] = (link, start)

    async def clear(self, account_id: str) -> None:
        self.links.pop(account_id, None)


class FakePublisher:
    """Confirms every publish and keeps the messages (``fail`` raises instead)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.fail: BaseException | None = None

    async def publish(self, message: Any, *, timeout_s: float) -> None:
        if self.fail is not None:
            raise self.fail
        self.messages.append(message)

    async def publish_many(self, messages: list[Any], *, timeout_s: float) -> None:
        for message in messages:
            await self.publish(message, timeout_s=timeout_s)

    def routing_keys(self) -> Tally[str]:
        return Tally(m.routing_key for m in self.messages)


def event_ref(cipher: DataCipher, account_id: str, graph_id: str) -> str:
    """The encrypted Graph id a change notification carries."""
    return b64(cipher.encrypt_str(graph_id, f"inbound|{account_id}|event_ref".encode()))

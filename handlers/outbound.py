"""Outbound: 1Relation's changes written to Microsoft 365, in order, once, without echo.

Two consumers. The *intake* takes ``onerelation.outbound``, validates each message
(``validate_message``: the published schema, then what a schema cannot say), turns an
invalid one into a dead letter plus ``event.rejected``, encrypts a valid one under the
account's key and routes it to the account's outbound shard. The *applier* is the single
active consumer of that shard: it applies one account's changes in revision order.

Rules (README "Outbound"): a revision at or below the applied one is a no-op; a create
carries a ``transactionId`` derived from account and 1Relation id, so a retry after a crash
cannot create a second event; an update PATCHes only the fields that differ from what
Outlook has; a field group changed on both sides since the last sync goes to the newer
change, and a lost 1Relation change is reported as ``event.conflict``; a meeting the
account does not organise is not written; Graph's 404 on PATCH means the user deleted it
in Outlook: it is not recreated, and 1Relation hears ``event.deleted`` from Microsoft.

What to PATCH is decided by the pure functions of :mod:`handlers.decisions`; the PATCH
itself is ``graph.update_event``, in the runtime :class:`processor.graph.GraphClient`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from contract import load_schema, validator_for
from contract.reasons import first_reason, show
from crypto import SEAL_FIELD, DataCipher, DecryptionError, seal_message, seal_valid
from handlers.decisions import FIELD_GROUPS, comparable, outlook_view, plan_update
from handlers.errors import (
    AccountUnavailable,
    KeyUnreadable,
    PermanentError,
    PublishError,
    ReauthorizationRequired,
    TransientError,
)
from handlers.messages import OUTBOUND_SEAL, b64, unb64
from handlers.outcome import Outcome, outcome_for
from handlers.parking import Parking
from handlers.ports import (
    Accounts,
    AccountStatus,
    CalendarGraph,
    Delivery,
    Events,
    Links,
    OutgoingMessage,
    Publisher,
    SyncMetrics,
)
from handlers.records import Link
from handlers.reports import Reporter
from handlers.routing import OUTBOUND_EXCHANGE, shard_routing_key
from handlers.timeutil import isoformat_z, parse_graph_datetime
from handlers.timezones import event_time_to_utc, windows_name, zone_for

log = structlog.get_logger(__name__)

OUTBOUND_SCHEMA = "m365sync.outbound.v1"
#: Marks events the service created in Outlook (a single-value extended property).
ORIGIN_PROPERTY_ID = "String {7d3f3b4e-6f1c-4c55-9a0e-2b8f6a1d9c21} Name m365syncOrigin"
TRANSACTION_NAMESPACE = uuid.UUID("0f8d4c1e-9a57-4b7e-8f2d-3c6b5a4e1d90")

#: How a cleared (null) field is written to Graph.
_CLEARED: Mapping[str, Any] = {
    "subject": "",
    "body": {"contentType": "text", "content": ""},
    "location": {"displayName": ""},
    "attendees": [],
    "categories": [],
    "recurrence": None,
    "showAs": "busy",
    "sensitivity": "normal",
}


SCHEMA = "onerelation.event.v1"
MAX_MESSAGE_BYTES = 1_048_576

_DOCUMENT = load_schema(SCHEMA)
_FIELDS: Mapping[str, Any] = _DOCUMENT["$defs"]["event"]["properties"]
MAX_SUBJECT: int = _FIELDS["subject"]["maxLength"]
MAX_ATTENDEES: int = _FIELDS["attendees"]["maxItems"]


class InvalidMessage(ValueError):
    """The message breaks ``onerelation.event.v1``; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OutboundChange:
    """A validated outbound change; ``event`` holds only the fields 1Relation sent."""

    account_id: str
    relation_event_id: str
    revision: int
    op: str
    occurred_at: datetime
    event: dict[str, Any] | None


class UnauthenticatedMessage(Exception):
    """A shard message whose fields are not authenticated under the account's key."""


def _aad(account_id: str, relation_event_id: str, revision: int) -> bytes:
    return f"outbound|{account_id}|{relation_event_id}|{revision}|event".encode()


def transaction_id(account_id: str, relation_event_id: str, generation: int) -> str:
    """The create's ``transactionId``: the same for every retry of one creation."""
    return str(
        uuid.uuid5(TRANSACTION_NAMESPACE, f"{account_id}\x00{relation_event_id}\x00{generation}")
    )


def to_graph(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The Graph body for ``fields`` (null means cleared)."""
    return {
        name: (_CLEARED.get(name) if value is None else value) for name, value in fields.items()
    }


# ---- parsing 1Relation's message --------------------------------------------------------


def validate_message(body: Any) -> OutboundChange:
    """Validate a decoded message; raises :class:`InvalidMessage` with the first problem."""
    errors = list(validator_for(SCHEMA).iter_errors(body))
    if errors:
        raise InvalidMessage(first_reason(errors, _DOCUMENT, nested="event"))
    occurred_at = _aware_timestamp(body["occurred_at"])
    event = _graph_ready(body["event"]) if body["op"] == "upsert" else None
    return OutboundChange(
        body["account_id"],
        body["relation_event_id"],
        body["revision"],
        body["op"],
        occurred_at,
        event,
    )


def _aware_timestamp(text: str) -> datetime:
    try:
        return parse_graph_datetime(text)
    except (ValueError, OverflowError):
        raise InvalidMessage(
            f"occurred_at is not an ISO 8601 timestamp with a time zone: {show(text)}"
        ) from None


def _graph_ready(event: Mapping[str, Any]) -> dict[str, Any]:
    """The schema-valid event with its dates and zones checked, zones in Windows names and
    optional parts filled in as Graph expects them."""
    out: dict[str, Any] = {}
    for name, value in event.items():
        if value is None:
            out[name] = None
        elif name in ("start", "end"):
            out[name] = _time(name, value)
        elif name == "body":
            out[name] = {"contentType": value["contentType"], "content": value["content"]}
        elif name == "location":
            out[name] = {"displayName": value.get("displayName", "")}
        elif name == "attendees":
            out[name] = [
                {
                    "emailAddress": {
                        "address": a["emailAddress"]["address"],
                        "name": a["emailAddress"].get("name", ""),
                    },
                    "type": a.get("type", "required"),
                }
                for a in value
            ]
        elif isinstance(value, dict | list):
            out[name] = type(value)(value)
        else:
            out[name] = value
    if "start" in out:
        _check_times(out["start"], out["end"], bool(out.get("isAllDay")))
    return out


def _time(name: str, value: Mapping[str, str]) -> dict[str, str]:
    local = value["dateTime"]
    try:
        datetime.fromisoformat(local[:19])
    except ValueError:
        raise InvalidMessage(f"event.{name}.dateTime is not a real date") from None
    zone = value["timeZone"]
    windows = windows_name(zone)
    if windows is None or zone_for(windows) is None:
        raise InvalidMessage(f"event.{name}.timeZone is not a known time zone: {show(zone)}")
    return {"dateTime": local, "timeZone": windows}


def _check_times(start: Mapping[str, str], end: Mapping[str, str], all_day: bool) -> None:
    start_utc = event_time_to_utc(start)
    end_utc = event_time_to_utc(end)
    if start_utc is None or end_utc is None:
        raise InvalidMessage("event.start or event.end is outside the supported range of dates")
    if end_utc <= start_utc:
        raise InvalidMessage("event.end must be after event.start")
    if (end_utc - start_utc).days > 366 * 5:
        raise InvalidMessage("event lasts more than five years")
    if all_day:
        for name, value in (("start", start), ("end", end)):
            if not value["dateTime"][11:].startswith("00:00"):
                raise InvalidMessage(f"an all-day event's {name} must be at midnight")


# ---- the intake and the applier ---------------------------------------------------------


def validate_intake(body: dict[str, Any]) -> str | None:
    """Every JSON object goes to the intake handler, which validates it in full and answers
    a bad one with ``event.rejected`` (also when the account id itself is what is wrong)."""
    return None


def validate_shard(body: dict[str, Any]) -> str | None:
    """Shape of the service's own outbound shard messages."""
    if body.get("schema") != OUTBOUND_SCHEMA or not isinstance(body.get("account_id"), str):
        return "not an m365sync.outbound.v1 message"
    return None


class IntakeHandler:
    """Validates 1Relation's messages and routes valid ones, encrypted, to account shards."""

    def __init__(
        self,
        *,
        store: Accounts,
        publisher: Publisher,
        reporter: Reporter,
        shard_count: int,
        timeout_s: float,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._reporter = reporter
        self._shard_count = shard_count
        self._timeout_s = timeout_s

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Validate and route each delivery (the intake has no ordering duty)."""
        for delivery in deliveries:
            try:
                delivery.outcome = await self._one(delivery)
            except KeyUnreadable:
                raise  # the consumer parks the batch: every message waits for the key
            except TransientError as exc:
                delivery.outcome = outcome_for(exc)

    async def _one(self, delivery: Delivery) -> Outcome:
        body = delivery.body
        if len(delivery.message.body) > MAX_MESSAGE_BYTES:
            return await self._reject(
                body, f"message is larger than {MAX_MESSAGE_BYTES} bytes", "size"
            )
        try:
            change = validate_message(body)
        except InvalidMessage as exc:
            return await self._reject(body, exc.reason, "invalid")
        except Exception as exc:  # a validator bug must not requeue a poison message forever
            log.exception("outbound.validation_failed", error=type(exc).__name__)
            return await self._reject(
                body, f"the message could not be validated ({type(exc).__name__})", "invalid"
            )
        try:
            account = await self._store.account(change.account_id)
            cipher = await self._store.cipher_for(change.account_id, account)
        except AccountUnavailable:
            return await self._reject(
                body, "the account is not connected to Microsoft 365", "account"
            )
        routed = _shard_body(change, cipher)
        try:
            await self._publisher.publish(
                OutgoingMessage(
                    exchange=OUTBOUND_EXCHANGE,
                    routing_key=shard_routing_key(change.account_id, self._shard_count),
                    body=routed,
                    message_id=str(delivery.message.message_id or uuid.uuid4().hex),
                    correlation_id=delivery.message.correlation_id,
                ),
                timeout_s=self._timeout_s,
            )
        except PublishError as exc:
            return outcome_for(exc)
        return Outcome.ack()

    async def _reject(self, body: Mapping[str, Any], reason: str, kind: str) -> Outcome:
        account_id = body.get("account_id") if isinstance(body.get("account_id"), str) else None
        relation_id = body.get("relation_event_id")
        relation_id = (
            relation_id if isinstance(relation_id, str) and len(relation_id) <= 128 else None
        )
        await self._reporter.rejected_change(
            account_id, relation_id, body.get("revision"), reason, kind
        )
        return Outcome.dead_letter(reason)


@dataclass(frozen=True)
class _Pending:
    delivery: Delivery | None
    change: OutboundChange
    parked_id: str | None = None


class OutboundHandler:
    """Applies one account's outbound changes to Graph, in revision order."""

    def __init__(
        self,
        *,
        store: Accounts,
        events: Events,
        links: Links,
        graph: CalendarGraph,
        statuses: AccountStatus,
        reporter: Reporter,
        metrics: SyncMetrics,
        tombstone_ttl_s: float,
        parked_ttl_s: float = 14 * 86400.0,
        parked_max: int = 10_000,
    ) -> None:
        self._store = store
        self._events = events
        self._links = links
        self._graph = graph
        self._statuses = statuses
        self._reporter = reporter
        self._metrics = metrics
        self._tombstone_ttl_s = tombstone_ttl_s
        self._parking = Parking(
            links=links, reporter=reporter, ttl_s=parked_ttl_s, max_per_account=parked_max
        )
        self.writes = metrics.counter(
            "outbound_writes_total", "Graph writes made for 1Relation, by kind.", ("kind",)
        )

    def _decode(
        self, body: Mapping[str, Any], cipher: DataCipher, *, from_queue: bool = True
    ) -> OutboundChange:
        """The change a shard message carries; raises :class:`UnauthenticatedMessage`.

        A message from the queue must be sealed, or (queued before sealing, across a
        rolling deploy) be an upsert whose ``event_ct`` authenticates account, event and
        revision; an unsealed delete proves nothing and is refused. Parked bodies come
        from our own database and are trusted as they are.
        """
        if from_queue:
            if SEAL_FIELD in body:
                if not seal_valid(cipher, body, purpose=OUTBOUND_SEAL):
                    raise UnauthenticatedMessage("seal does not verify")
            elif body.get("op") != "upsert" or not body.get("event_ct"):
                raise UnauthenticatedMessage(
                    "unsealed delete (queued before an upgrade): 1Relation must send it again"
                )
        event = None
        if body.get("event_ct"):
            event = cipher.decrypt_json(
                unb64(str(body["event_ct"])),
                _aad(
                    str(body["account_id"]), str(body["relation_event_id"]), int(body["revision"])
                ),
            )
        return OutboundChange(
            account_id=str(body["account_id"]),
            relation_event_id=str(body["relation_event_id"]),
            revision=int(body["revision"]),
            op=str(body["op"]),
            occurred_at=parse_graph_datetime(str(body["occurred_at"])),
            event=event,
        )

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Apply parked changes first (after a reconnect), then this batch, in order."""
        try:
            account = await self._store.account(account_id)
            cipher = await self._store.cipher_for(account_id, account)
        except AccountUnavailable:
            for delivery in deliveries:  # erased: queued messages are dropped when reached
                delivery.outcome = Outcome.ack()
            return
        todo = self._changes_of(deliveries, cipher)
        if account is None or account.paused:
            if not todo:
                # A "replay" for an account still paused: sent because some of its parked
                # changes are past their age limit, which go now (each reported).
                await self._parking.drop_expired(account_id)
            for item in todo:
                await self._park(item, cipher)
            return
        await self._parking.drop_expired(account_id)
        parked = [
            _Pending(
                None,
                self._decode(doc["body"], cipher, from_queue=False),
                parked_id=str(doc["_id"]),
            )
            for doc in await self._links.parked_for(account_id)
        ]
        ordered = sorted(
            parked + todo, key=lambda p: (p.change.relation_event_id, p.change.revision)
        )
        await self._apply_in_order(account_id, ordered, cipher)

    def _changes_of(self, deliveries: Sequence[Delivery], cipher: DataCipher) -> list[_Pending]:
        """The changes a batch carries; a delivery that carries none is settled here."""
        todo: list[_Pending] = []
        for delivery in deliveries:
            if delivery.body.get("kind") != "change":
                delivery.outcome = Outcome.ack()  # "replay" only wakes the shard up
                continue
            try:
                todo.append(_Pending(delivery, self._decode(delivery.body, cipher)))
            except UnauthenticatedMessage as exc:
                delivery.outcome = Outcome.dead_letter(str(exc))
            except (DecryptionError, ValueError, KeyError) as exc:
                delivery.outcome = Outcome.dead_letter(
                    f"undecodable shard message: {type(exc).__name__}"
                )
        return todo

    async def _apply_in_order(
        self, account_id: str, ordered: Sequence[_Pending], cipher: DataCipher
    ) -> None:
        """Apply each change and settle it; a lost authorization parks the rest."""
        user_id = (await self._store.identity(account_id)).user_id
        for index, item in enumerate(ordered):
            try:
                await self._apply(item.change, cipher, user_id)
            except ReauthorizationRequired as exc:
                await self._statuses.set(account_id, "reauthorization_required", exc.reason)
                for rest in ordered[index:]:
                    await self._park(rest, cipher)
                return
            except TransientError as exc:
                self._settle(item, outcome_for(exc))
                continue
            except PermanentError as exc:
                await self._reporter.rejected_change(
                    account_id,
                    item.change.relation_event_id,
                    item.change.revision,
                    exc.reason,
                    "graph",
                )
                self._settle(item, outcome_for(exc))
            else:
                self._settle(item, Outcome.ack())
            if item.parked_id is not None:
                await self._links.unpark(item.parked_id)

    def _settle(self, item: _Pending, outcome: Outcome) -> None:
        if item.delivery is not None:
            item.delivery.outcome = outcome

    async def _park(self, item: _Pending, cipher: DataCipher) -> None:
        """Keep a delivered change for replay after reconnect (a parked one stays parked)."""
        if item.delivery is not None:
            change = item.change
            item.delivery.outcome = await self._parking.park(
                change.account_id,
                change.relation_event_id,
                change.revision,
                _shard_body(change, cipher),
            )

    async def _apply(self, change: OutboundChange, cipher: DataCipher, user_id: str) -> None:
        link = await self._links.get(change.account_id, change.relation_event_id, cipher)
        if change.revision <= link.applied_revision or (
            link.deleted and change.revision <= link.deleted_revision
        ):
            return  # redelivered or reordered: already applied or superseded
        if change.op == "delete":
            if link.graph_id is not None and not link.deleted:
                # Graph's notification of the deletion may be handled before DELETE returns.
                await self._links.record_intent(
                    link, revision=change.revision, intended={}, cipher=cipher, op="delete"
                )
                await self._graph.delete_event(change.account_id, user_id, link.graph_id)
                self.writes.labels(kind="delete").inc()
            await self._links.record_deleted(
                link, change.revision, tombstone_ttl_s=self._tombstone_ttl_s
            )
            return
        assert change.event is not None
        if link.graph_id is None or link.deleted:
            await self._create(link, change, cipher, user_id)
        else:
            await self._update(link, change, cipher, user_id)

    async def _create(
        self, link: Link, change: OutboundChange, cipher: DataCipher, user_id: str
    ) -> None:
        assert change.event is not None
        fields = {k: v for k, v in change.event.items() if v is not None}
        txn = transaction_id(change.account_id, change.relation_event_id, link.generation)
        await self._links.record_intent(
            link, revision=change.revision, intended=fields, cipher=cipher, transaction_id=txn
        )
        body = {
            **to_graph(fields),
            "singleValueExtendedProperties": [{"id": ORIGIN_PROPERTY_ID, "value": "1relation"}],
        }
        created = await self._graph.create_event(
            change.account_id, user_id, body, transaction_id=txn
        )
        self.writes.labels(kind="create").inc()
        await self._links.record_written(
            link,
            revision=change.revision,
            graph_id=str(created["id"]),
            event_key=self._events.event_key(change.account_id, str(created["id"])),
            state=fields,
            change_key=created.get("changeKey"),
            last_modified=_lm(created),
            cipher=cipher,
            answer=created,
        )

    async def _update(
        self, link: Link, change: OutboundChange, cipher: DataCipher, user_id: str
    ) -> None:
        assert change.event is not None
        assert link.graph_id is not None
        assert link.event_key is not None
        seen = await self._events.live_state(link.event_key, cipher)
        outlook = outlook_view(last_written=link.state, written_at=link.base_lm, seen=seen)
        if outlook.not_organiser:
            raise PermanentError(
                "the account does not organise this meeting, so the change is not written "
                "(it would fail or send attendees a misleading update)"
            )
        plan = plan_update(
            outlook=outlook.fields,
            last_written=link.state,
            wanted=change.event,
            outlook_changed_at=outlook.changed_at,
            wanted_at=change.occurred_at,
            groups=FIELD_GROUPS,
            normalise=comparable,
        )
        patch, lost = plan.patch, list(plan.lost_fields)
        if lost:
            await self._reporter.conflict(link, change.revision, lost, outlook.last_modified)
        if not patch:
            await self._links.record_revision(link, change.revision)
            return
        await self._links.record_intent(
            link, revision=change.revision, intended=patch, cipher=cipher
        )
        updated = await self._graph.update_event(
            change.account_id, user_id, link.graph_id, to_graph(patch)
        )
        self.writes.labels(kind="update").inc()
        if updated is None:
            # Deleted in Outlook: not recreated (the user meant it); 1Relation is told.
            await self._links.record_deleted(
                link, change.revision, tombstone_ttl_s=self._tombstone_ttl_s, by_us=False
            )
            await self._reporter.deleted_in_outlook(link)
            return
        await self._links.record_written(
            link,
            revision=change.revision,
            graph_id=link.graph_id,
            event_key=link.event_key,
            # Fields left out because Outlook already showed them are part of the base too.
            state={**link.state, **{n: v for n, v in change.event.items() if n not in lost}},
            change_key=updated.get("changeKey"),
            last_modified=_lm(updated),
            cipher=cipher,
            answer=updated,
        )


def _lm(event: Mapping[str, Any]) -> Any:
    value = event.get("lastModifiedDateTime")
    return parse_graph_datetime(str(value)) if value else None


def _shard_body(change: OutboundChange, cipher: DataCipher) -> dict[str, Any]:
    event_ct = (
        cipher.encrypt_json(
            change.event, _aad(change.account_id, change.relation_event_id, change.revision)
        )
        if change.event is not None
        else None
    )
    body = {
        "schema": OUTBOUND_SCHEMA,
        "kind": "change",
        "account_id": change.account_id,
        "relation_event_id": change.relation_event_id,
        "revision": change.revision,
        "op": change.op,
        "occurred_at": isoformat_z(change.occurred_at),
        "event_ct": b64(event_ct) if event_ct is not None else None,
    }
    # Sealed as a whole: op, revision and occurred_at are authenticated, deletes too.
    return seal_message(cipher, body, purpose=OUTBOUND_SEAL)

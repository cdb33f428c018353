"""Inbound: a notification is a hint to fetch the event's current state and reconcile it.

Deliveries for one account arrive here as a batch. Duplicates of the same event (Graph
sends several per edit) are coalesced into one fetch; distinct events are fetched
concurrently (the Graph client keeps the per-mailbox limit) and written one after another.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from crypto import SEAL_FIELD, DataCipher, DecryptionError, seal_valid
from handlers.errors import (
    AccountUnavailable,
    PermanentError,
    ReauthorizationRequired,
    TransientError,
)
from handlers.messages import (
    INBOUND_SCHEMA,
    INBOUND_SEAL,
    event_ref_aad,
    legacy_event_ref_aad,
    unb64,
)
from handlers.outcome import Action, Outcome, outcome_for
from handlers.ports import (
    Accounts,
    AccountStatus,
    Announcer,
    CalendarGraph,
    Delivery,
    Events,
    LinkReader,
    SyncMetrics,
)
from handlers.records import KEPT_FIELDS, Change
from handlers.timeutil import utcnow

log = structlog.get_logger(__name__)

#: ``transactionId`` names the create a new event came from (how an echo of the service's
#: own create is recognised before Graph's answer to it has been recorded).
SELECT = ("id", *KEPT_FIELDS, "transactionId")
#: This many distinct events to fetch in one batch take one delta pass instead
#: (``M365SYNC_BURST_MIN_EVENTS``).
BURST_MIN_EVENTS = 16
#: Events (and versions per event) whose notified versions the handler remembers.
SETTLED_EVENTS = 10_000
SETTLED_PER_EVENT = 4


def validate_inbound(body: dict[str, Any]) -> str | None:
    """Why an inbound message is malformed, or None if it is well-formed."""
    if body.get("schema") != INBOUND_SCHEMA:
        return f"unknown schema {str(body.get('schema'))[:64]!r}"
    if not isinstance(body.get("account_id"), str) or not body["account_id"]:
        return "account_id missing"
    kind = body.get("kind")
    if kind == "change":
        if not isinstance(body.get("event_hash"), str) or not isinstance(
            body.get("event_ref"), str
        ):
            return "change without event_hash/event_ref"
        return None
    if kind in ("resync", "announce"):
        return None
    return f"unknown kind {str(kind)[:32]!r}"


@dataclass(frozen=True)
class SyncWindow:
    """How far back and ahead the service keeps an account's calendar."""

    past_days: int
    future_days: int

    def bounds(self) -> tuple[Any, Any]:
        """The window's start and end, from now."""
        now = utcnow()
        return now - timedelta(days=self.past_days), now + timedelta(days=self.future_days)


DeltaRunner = Callable[[str, DataCipher, str, bool, str], Awaitable[list[Change]]]


class InboundHandler:
    """Handles one account's batch of inbound messages (changes, resyncs, outbox flushes)."""

    def __init__(
        self,
        *,
        store: Accounts,
        events: Events,
        graph: CalendarGraph,
        announcer: Announcer,
        statuses: AccountStatus,
        metrics: SyncMetrics,
        window: SyncWindow,
        links: LinkReader | None = None,
        run_delta: DeltaRunner | None = None,
        burst_min_events: int = BURST_MIN_EVENTS,
    ) -> None:
        self._links = links
        self._burst_min_events = burst_min_events
        # Versions (changeKey hashes) at or below what is stored, per event: a notification
        # copy naming one of them needs no fetch. Only an optimisation (lost on restart).
        self._settled: OrderedDict[str, set[str]] = OrderedDict()
        self._statuses = statuses
        self._store = store
        self._events = events
        self._graph = graph
        self._announcer = announcer
        self._metrics = metrics
        self._window = window
        self._run_delta = run_delta

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Reconcile every change of the batch, then announce what really changed."""
        try:
            account = await self._store.account(account_id)
            cipher = await self._store.cipher_for(account_id, account)
        except AccountUnavailable:
            # Erased: its messages still queued are dropped when reached (docs/contract.md §4).
            for delivery in deliveries:
                delivery.outcome = Outcome.ack()
            return
        if account is None or account.paused:
            # No Graph calls while paused; the resync that follows a reconnect repairs it.
            # Announcing what is already stored needs no Graph call, so the outbox still goes.
            sweep = any(d.body.get("kind") == "announce" for d in deliveries)
            if sweep and account is not None:
                await self._announcer.flush(account_id, [], sweep_outbox=True)
            for delivery in deliveries:
                delivery.outcome = Outcome.ack()
            return
        user_id = (await self._store.identity(account_id)).user_id
        changes: list[Change] = []
        reauthorization = False
        try:
            changes += await self._handle_changes(account_id, user_id, cipher, deliveries)
            for delivery in deliveries:
                if delivery.body.get("kind") == "resync" and delivery.outcome is None:
                    changes += await self._resync(account_id, user_id, cipher, delivery)
        except ReauthorizationRequired as exc:
            # Graph calls stop for this account; its messages are acked, not dead-lettered:
            # the resync that follows a reconnect repairs whatever they pointed at.
            try:
                await self._statuses.set(account_id, "reauthorization_required", exc.reason)
            except TransientError as publish_failure:
                for delivery in deliveries:
                    delivery.outcome = outcome_for(publish_failure)
                return
            for delivery in deliveries:
                if delivery.outcome is None:
                    delivery.outcome = outcome_for(exc)
            reauthorization = True
        if await self._store.fenced(account_id, cipher):
            # Erased while this batch ran: announce nothing and write no sync state (the
            # erasure's sweeps remove what the batch wrote before it saw the fence).
            for delivery in deliveries:
                if delivery.outcome is None:
                    delivery.outcome = Outcome.ack()
            return
        sweep_outbox = False
        for delivery in deliveries:
            if delivery.body.get("kind") == "announce" and delivery.outcome is None:
                delivery.outcome = Outcome.ack()
                sweep_outbox = True
        # Announce this batch's changes; an "announce" message also sweeps what an earlier
        # crash left in the outbox. A failed publish leaves the marks for the relay.
        await self._announcer.flush(account_id, changes, sweep_outbox=sweep_outbox)
        # Acked because the account stopped is no sync: last_error keeps what failed.
        if not reauthorization and any(
            d.outcome is not None and d.outcome.action is Action.ACK for d in deliveries
        ):
            await self._statuses.record_sync(account_id)

    async def _resync(
        self, account_id: str, user_id: str, cipher: DataCipher, delivery: Delivery
    ) -> list[Change]:
        if self._run_delta is None:
            delivery.outcome = Outcome.dead_letter("this worker cannot run resyncs")
            return []
        try:
            changes = await self._run_delta(
                account_id,
                cipher,
                user_id,
                bool(delivery.body.get("full")),
                str(delivery.body.get("reason", "")),
            )
        except (AccountUnavailable, TransientError, PermanentError) as exc:
            # AccountUnavailable: erased while the pass ran; it stopped at the fence.
            delivery.outcome = outcome_for(exc)
            return []
        delivery.outcome = Outcome.ack()
        return changes

    async def _handle_changes(
        self, account_id: str, user_id: str, cipher: DataCipher, deliveries: Sequence[Delivery]
    ) -> list[Change]:
        groups: dict[str, list[Delivery]] = {}
        event_ids: dict[str, str] = {}
        for delivery in deliveries:
            if delivery.body.get("kind") != "change":
                continue
            event_hash = str(delivery.body["event_hash"])
            # A sealed message is authenticated as a whole (change type, hash, times), and
            # its event_ref is bound to the event. An unsealed one is from before sealing
            # (queued across a rolling deploy): it is only a hint to fetch, and its
            # event_ref still has to decrypt under the account's key, so it is accepted.
            sealed = SEAL_FIELD in delivery.body
            if sealed and not seal_valid(cipher, delivery.body, purpose=INBOUND_SEAL):
                delivery.outcome = Outcome.dead_letter("seal does not verify")
                continue
            aad = (
                event_ref_aad(account_id, event_hash)
                if sealed
                else legacy_event_ref_aad(account_id)
            )
            try:
                event_id = cipher.decrypt_str(unb64(str(delivery.body["event_ref"])), aad)
            except (DecryptionError, ValueError):
                delivery.outcome = Outcome.dead_letter("event_ref does not decrypt")
                continue
            if sealed or event_hash not in event_ids:
                event_ids[event_hash] = event_id
            groups.setdefault(event_hash, []).append(delivery)
        if not groups:
            return []

        changes: list[Change] = []
        to_fetch: dict[str, list[Delivery]] = {}
        for event_hash, group in groups.items():
            known = await self._known_version(account_id, cipher, event_hash, group)
            if known is None:
                to_fetch[event_hash] = group
                continue
            changes += known
            for delivery in group:
                delivery.outcome = Outcome.ack()
        if not to_fetch:
            self._count(changes)
            return changes

        if self._run_delta is not None and len(to_fetch) >= self._burst_min_events:
            # Many distinct events of one mailbox at once: one delta pass of the window
            # costs a few requests where a GET each would cost one per event.
            log.info("inbound.burst_delta", account_id=account_id, events=len(to_fetch))
            self._metrics.burst_passes.inc()
            try:
                changes += await self._run_delta(account_id, cipher, user_id, False, "burst")
                outcome = Outcome.ack()
            except (TransientError, PermanentError) as exc:
                outcome = outcome_for(exc)
            for group in to_fetch.values():
                for delivery in group:
                    delivery.outcome = outcome
            return changes

        async def fetch(event_hash: str) -> dict[str, Any] | BaseException | None:
            try:
                return await self._graph.get_event(
                    account_id, user_id, event_ids[event_hash], select=SELECT
                )
            except (TransientError, PermanentError, ReauthorizationRequired) as exc:
                return exc

        results = await asyncio.gather(*(fetch(h) for h in to_fetch))
        for (event_hash, group), result in zip(to_fetch.items(), results, strict=True):
            if isinstance(result, ReauthorizationRequired):
                raise result
            if isinstance(result, BaseException):
                outcome = outcome_for(result)
            else:
                try:
                    changes += await self._reconcile(
                        account_id, user_id, cipher, event_hash, result
                    )
                    outcome = Outcome.ack()
                    if result is not None:
                        # Each notified version existed before this fetch, so the stored
                        # version is now at or above it.
                        self._remember(
                            event_hash,
                            {str(d.body["etag_hash"]) for d in group if d.body.get("etag_hash")},
                        )
                except (TransientError, PermanentError) as exc:
                    # ReauthorizationRequired is neither: it leaves the loop, and the batch
                    # sets the account's status.
                    outcome = outcome_for(exc)
            for delivery in group:
                delivery.outcome = outcome
        return changes

    async def _known_version(
        self, account_id: str, cipher: DataCipher, event_hash: str, group: Sequence[Delivery]
    ) -> list[Change] | None:
        """Settle a group of notifications without a fetch when the versions they name are
        known here; None when Graph must be asked.

        Every notification names the ``changeKey`` of the version that caused it. A version
        already stored needs nothing; a version the service itself wrote for 1Relation is
        stored from Graph's answer to that write and announced to no one; a deletion the
        service made is recorded without telling 1Relation.
        """
        deleted = any(d.body.get("change_type") == "deleted" for d in group)
        etags = {d.body.get("etag_hash") for d in group}
        if deleted:
            if self._links is not None and self._links.deleted_by_us(
                await self._links.doc_for(account_id, event_hash), event_hash
            ):
                self._metrics.echoes_suppressed.inc()
                await self._events.mark_deleted(account_id, event_hash, announce=False)
                for key in await self._events.series_instance_keys(account_id, event_hash):
                    await self._events.mark_deleted(account_id, key, announce=False)
                return []
            return None
        if None in etags:
            return None
        stored_ck, tombstone = await self._events.stored_version(account_id, event_hash)
        settled = {stored_ck} | self._settled.get(event_hash, set())
        if not tombstone and stored_ck is not None and etags <= settled:
            self._metrics.fetches_skipped.inc()
            return []
        if self._links is None:
            return None
        link = await self._links.doc_for(account_id, event_hash)
        if link is None:
            return None
        ours = self._links.echo_hashes(link)
        if not etags <= ours | ({stored_ck} if stored_ck and not tombstone else set()):
            return None
        written = self._links.written(link, account_id, cipher)
        if written is not None and written[1].get("type") == "seriesMaster":
            return None  # its occurrences are re-expanded on the fetch path
        if written is not None and written[0] in etags:
            await self._events.upsert_version(
                account_id,
                written[1],
                cipher=cipher,
                announce=False,
                relation_event_id=str(link["relation_event_id"]),
            )
        elif written is None:
            return None  # our write's answer is not stored: fetch what Graph has
        # else: an older write of ours, already superseded by the one whose answer is kept
        self._metrics.echoes_suppressed.inc()
        self._metrics.fetches_skipped.inc()
        return []

    def _remember(self, event_hash: str, etags: set[str]) -> None:
        known = self._settled.pop(event_hash, set()) | etags
        self._settled[event_hash] = set(list(known)[-SETTLED_PER_EVENT:])
        while len(self._settled) > SETTLED_EVENTS:
            self._settled.popitem(last=False)

    async def _reconcile(
        self,
        account_id: str,
        user_id: str,
        cipher: DataCipher,
        event_hash: str,
        event: dict[str, Any] | None,
    ) -> list[Change]:
        """Write the fetched state of one event (None: Graph says it is gone)."""
        if event is None:
            changes = []
            announce = True
            if self._links is not None and self._links.deleted_by_us(
                await self._links.doc_for(account_id, event_hash), event_hash
            ):
                # Deleted by the service for 1Relation: 1Relation made this change.
                self._metrics.echoes_suppressed.inc()
                announce = False
            deleted = await self._events.mark_deleted(account_id, event_hash, announce=announce)
            if deleted is not None:
                changes.append(deleted)
            # A deleted series master takes its occurrences and exceptions with it.
            for key in await self._events.series_instance_keys(account_id, event_hash):
                instance = await self._events.mark_deleted(account_id, key, announce=announce)
                if instance is not None:
                    changes.append(instance)
            self._count(changes)
            return changes
        changes = []
        echo, relation_event_id = False, None
        if self._links is not None:
            echo, relation_event_id = await self._links.echo_of(
                account_id, event_hash, event, cipher
            )
        if echo:
            # The notification about our own write for 1Relation: store Graph's version,
            # tell 1Relation nothing (it made the change).
            self._metrics.echoes_suppressed.inc()
        written = await self._events.upsert_version(
            account_id, event, cipher=cipher, announce=not echo, relation_event_id=relation_event_id
        )
        if written is not None:
            changes.append(written)
        if event.get("type") == "seriesMaster":
            changes += await self._refresh_series(account_id, user_id, cipher, event)
        self._count(changes)
        return changes

    async def _refresh_series(
        self, account_id: str, user_id: str, cipher: DataCipher, master: dict[str, Any]
    ) -> list[Change]:
        """Re-expand a series: Graph notifies only the master when one occurrence changes."""
        start, end = self._window.bounds()
        instances = await self._graph.list_instances(
            account_id, user_id, str(master["id"]), start, end, select=SELECT
        )
        changes: list[Change] = []
        seen: set[str] = set()
        for instance in instances:
            seen.add(self._events.event_key(account_id, str(instance["id"])))
            written = await self._events.upsert_version(account_id, instance, cipher=cipher)
            if written is not None:
                changes.append(written)
        series_key = self._events.event_key(account_id, str(master["id"]))
        for key in await self._events.series_instance_keys(account_id, series_key) - seen:
            gone = await self._events.mark_deleted(account_id, key)
            if gone is not None:
                changes.append(gone)
        return changes

    def _count(self, changes: list[Change]) -> None:
        for change in changes:
            self._metrics.events_reconciled.labels(change=change.change).inc()

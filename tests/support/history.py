"""A history checker for fault tests, in the spirit of Jepsen's total-queue check.

What goes in must come out. A fault test records what entered the system and was
acknowledged to its sender:

- every notification the simulated Graph got a 2xx for (read back from its delivery log:
  a 2xx is the service's promise that the notification is safe);
- every outbound message 1Relation published and the broker confirmed;

then, once the fault has healed and the system drained, :meth:`History.check` asserts:

- every 2xx'd notification has its effect: the event it names is stored, decrypted,
  exactly as Graph has it now, or is absent if Graph deleted it;
- the database equals the simulator's ground truth (:func:`processor.verify.diff_account`);
- the simulator holds exactly what 1Relation intended (the highest revision of each
  ``relation_event_id``, deletes absent, nothing created twice);
- nothing was dead-lettered and every work queue is empty.

It reports lost (must be 0), duplicates absorbed, retries (non-2xx webhook answers,
Graph 429/503 answers, broker redeliveries) and the time from heal to convergence, and
prints the report as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from pymongo import AsyncMongoClient

from crypto import CipherCache, Hasher, KeyRing
from graphsim.client import SimControl
from handlers.timeutil import isoformat_z
from processor.event_store import EventStore
from processor.repositories.base import Document
from processor.settings import Settings
from processor.store import Store
from processor.topology import DEAD_QUEUE, ONERELATION_INBOUND_QUEUE, ONERELATION_OUTBOUND
from processor.verify import Diff, diff_account, expected_events
from tests.support import published
from tests.support.cluster import RabbitCluster
from tests.support.nodes import RabbitNode

#: Queues that nobody in the service consumes: 1Relation's side and the parking lot.
UNCONSUMED_QUEUES = frozenset({ONERELATION_INBOUND_QUEUE, DEAD_QUEUE})


@dataclass
class Report:
    """The figures of one fault test."""

    label: str
    mutations: int = 0  # Outlook-side changes the test made
    notifications_2xx: int = 0  # change items Graph got a 2xx for
    webhook_non2xx: int = 0  # POST attempts answered otherwise (503, timeout, refused)
    outbound_published: int = 0  # confirmed 1Relation messages
    outbound_distinct: int = 0  # distinct (relation_event_id, revision)
    in_flight: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_detail: list[str] = field(default_factory=list)
    duplicates_absorbed: int = 0
    graph_429: int = 0
    graph_503: int = 0
    redeliveries: int = 0
    dead_lettered: int = 0
    recover_s: float | None = None
    converged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line JSON summary."""
        data = asdict(self)
        data["lost_detail"] = data["lost_detail"][:10]
        return json.dumps(data, separators=(",", ":"), default=str)


def _window() -> tuple[str, str]:
    now = datetime.now(UTC)
    return isoformat_z(now - timedelta(days=30)), isoformat_z(now + timedelta(days=365))


class History:
    """Records what went in during a fault test and checks that it all came out."""

    def __init__(
        self,
        label: str,
        *,
        control: SimControl,
        settings: Settings,
        accounts: Mapping[str, str],
        mongodb_url: str,
        node: RabbitNode | RabbitCluster | None = None,
        vhost: str | None = None,
    ) -> None:
        """``mongodb_url`` should reach the database directly (not through a test proxy)."""
        self.label = label
        self.control = control
        self.settings = settings
        self.accounts = accounts  # account_id -> mailbox user id (the Stack's, kept live)
        self.mongodb_url = mongodb_url
        self.node = node
        self.vhost = vhost
        self.mutated: Counter[str] = Counter()  # Graph event id -> Outlook-side changes
        self.outbound: list[dict[str, Any]] = []  # confirmed 1Relation messages
        self.in_flight: dict[str, int] = {}
        self.extra: dict[str, Any] = {}
        self._since = 0
        self._fault_at: float | None = None
        self._healed_at: float | None = None
        self._stack = AsyncExitStack()
        self._store: Store | None = None
        self._events: EventStore | None = None

    async def __aenter__(self) -> History:
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            self.mongodb_url, tz_aware=True, serverSelectionTimeoutMS=5000
        )
        self._stack.push_async_callback(client.close)
        db = client.get_default_database()
        hasher = Hasher(self.settings.hash_key)
        self._store = Store(
            db=db,
            keyring=KeyRing(self.settings.master_keys),
            hasher=hasher,
            cipher_cache=CipherCache(),
        )
        self._events = EventStore(
            db=db, hasher=hasher, tombstone_ttl_s=self.settings.tombstone_ttl_days * 86400
        )
        deliveries = await self.control.deliveries()
        self._since = deliveries[-1]["seq"] if deliveries else 0
        await self.control.reset_counters()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    # -- recording ------------------------------------------------------------------------------

    async def create_event(self, user_id: str, event: dict[str, Any]) -> dict[str, Any]:
        """Create an event in Outlook and remember the change."""
        created = await self.control.create_event(user_id, event, immutable=True)
        self.mutated[created["id"]] += 1
        return created

    async def update_event(self, user_id: str, event_id: str, patch: dict[str, Any]) -> None:
        """Edit an event in Outlook and remember the change."""
        await self.control.update_event(user_id, event_id, patch, immutable=True)
        self.mutated[event_id] += 1

    async def delete_event(self, user_id: str, event_id: str) -> None:
        """Delete an event in Outlook and remember the change."""
        await self.control.delete_event(user_id, event_id)
        self.mutated[event_id] += 1

    async def publish_outbound(self, amqp_url: str, bodies: Iterable[dict[str, Any]]) -> int:
        """Publish as 1Relation does (persistent, confirmed); records what was confirmed.

        Stops at the first unconfirmed message (as a publisher whose broker went away
        would) and returns how many were confirmed.
        """
        confirmed = 0
        try:
            connection = await aio_pika.connect(amqp_url, timeout=5)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(ONERELATION_OUTBOUND, ensure=False)
                for body in bodies:
                    key = "event.delete" if body.get("op") == "delete" else "event.upsert"
                    await exchange.publish(
                        aio_pika.Message(
                            json.dumps(body).encode(),
                            content_type="application/json",
                            message_id=uuid.uuid4().hex,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=key,
                        timeout=5,
                    )
                    self.outbound.append(body)
                    confirmed += 1
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError):
            pass
        return confirmed

    async def fault(self, **figures: int) -> None:
        """The fault starts now; ``figures`` (and the broker's queue totals) are in flight."""
        self._fault_at = time.monotonic()
        self.in_flight.update(figures)
        if self.node is not None and self.vhost is not None:
            ready, unacked = await self.queue_totals()
            self.in_flight.setdefault("messages_ready", ready)
            self.in_flight.setdefault("messages_unacked", unacked)
        delivered = await self._delivered_items()
        per_event = Counter(self._event_of(item) for item in delivered)
        self.in_flight.setdefault(
            "notifications_pending",
            sum(max(0, n - per_event.get(e, 0)) for e, n in self.mutated.items()),
        )

    def heal(self) -> None:
        """The fault is over now: recovery time is measured from here."""
        self._healed_at = time.monotonic()

    # -- observation ----------------------------------------------------------------------------

    async def queue_totals(self) -> tuple[int, int]:
        """(ready, unacknowledged) messages over the service's work queues."""
        assert self.node is not None
        assert self.vhost is not None
        queues = await self.node.queues(self.vhost)
        ready = unacked = 0
        for name, queue in queues.items():
            if name in UNCONSUMED_QUEUES:
                continue
            ready += int(queue.get("messages_ready") or 0)
            unacked += int(queue.get("messages_unacknowledged") or 0)
        return ready, unacked

    async def _delivered_items(self) -> list[dict[str, Any]]:
        log = await self.control.deliveries(since=self._since, kind="change")
        return [item for entry in log if entry["delivered"] for item in entry["items"]]

    @staticmethod
    def _event_of(item: Mapping[str, Any]) -> str:
        return str(item["resourceData"]["id"])

    async def _diffs(self) -> dict[str, tuple[Diff, dict[str, Any]]]:
        assert self._store is not None
        assert self._events is not None
        start, end = _window()
        diffs = {}
        for account_id, user_id in self.accounts.items():
            truth = expected_events(
                await self.control.events(user_id, immutable=True),
                await self.control.calendar_view(user_id, start, end, immutable=True),
            )
            diffs[account_id] = (
                await diff_account(self._store, self._events, account_id, truth),
                dict(truth),
            )
        return diffs

    async def _outbound_problems(self) -> list[str]:
        """Relation events whose state in Outlook is not what 1Relation intended last."""
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        subjects: dict[tuple[str, str], set[str]] = {}
        for body in self.outbound:
            key = (str(body["account_id"]), str(body["relation_event_id"]))
            if body.get("event"):
                subjects.setdefault(key, set()).add(str(body["event"]["subject"]))
            if key not in latest or int(body["revision"]) > int(latest[key]["revision"]):
                latest[key] = body
        problems: list[str] = []
        outlook: dict[str, Counter[str]] = {}
        for (account_id, relation_event_id), body in sorted(latest.items()):
            user_id = self.accounts[account_id]
            if user_id not in outlook:
                events = await self.control.events(user_id, immutable=True)
                outlook[user_id] = Counter(str(e.get("subject")) for e in events)
            present = {
                s: outlook[user_id][s]
                for s in subjects.get((account_id, relation_event_id), set())
                if outlook[user_id][s]
            }
            intended = str(body["event"]["subject"]) if body.get("op") != "delete" else None
            want = {intended: 1} if intended is not None else {}
            if present != want:
                problems.append(
                    f"outbound {relation_event_id} r{body['revision']}: want {want}, have {present}"
                )
        return problems

    # -- the check ------------------------------------------------------------------------------

    def _running_node(self) -> RabbitNode | None:
        """A broker node that is up now (of a cluster, any running member), or None."""
        if isinstance(self.node, RabbitCluster):
            return next((node for node in self.node.nodes if node.running), None)
        if self.node is not None and self.node.running:
            return self.node
        return None

    async def _snapshot(self) -> tuple[bool, Report]:
        report = Report(label=self.label, in_flight=dict(self.in_flight), extra=dict(self.extra))
        report.mutations = sum(self.mutated.values())
        delivered = await self._delivered_items()
        log = await self.control.deliveries(since=self._since, kind="change")
        report.notifications_2xx = len(delivered)
        report.webhook_non2xx = sum(1 for entry in log if not entry["delivered"])
        diffs = await self._diffs()
        by_user = {user: account for account, user in self.accounts.items()}
        lost_events: set[str] = set()
        for item in delivered:
            user_id = str(item["resource"]).split("/")[1]
            account_id = by_user.get(user_id)
            if account_id is None:
                continue
            diff, _ = diffs[account_id]
            event_id = self._event_of(item)
            wrong = {graph_id for graph_id, _ in diff.mismatched}
            if event_id in diff.missing or event_id in diff.unexpected or event_id in wrong:
                lost_events.add(event_id)
        report.lost_detail = [
            f"notified event {e[-12:]} not in its Graph state" for e in lost_events
        ]
        outbound_problems = await self._outbound_problems()
        report.lost_detail += outbound_problems
        report.lost = len(lost_events) + len(outbound_problems)
        report.outbound_published = len(self.outbound)
        distinct = {(b["account_id"], b["relation_event_id"], b["revision"]) for b in self.outbound}
        report.outbound_distinct = len(distinct)
        ours = [self._event_of(item) for item in delivered if self._event_of(item) in self.mutated]
        report.duplicates_absorbed = max(0, len(ours) - report.mutations) + (
            report.outbound_published - report.outbound_distinct
        )
        counters = await self.control.counters()
        report.graph_429 = int(counters.get("throttled_429", 0))
        report.graph_503 = int(counters.get("unavailable_503", 0))
        drained = True
        if self.node is not None and self.vhost is not None:
            queues = await self.node.queues(self.vhost)
            dead = queues.get(DEAD_QUEUE, {})
            report.dead_lettered = int(dead.get("messages") or 0)
            report.redeliveries = sum(
                int((q.get("message_stats") or {}).get("redeliver") or 0) for q in queues.values()
            )
            busy = {
                name: [
                    int(q.get("messages_ready") or 0),
                    int(q.get("messages_unacknowledged") or 0),
                ]
                for name, q in queues.items()
                if name not in UNCONSUMED_QUEUES and q.get("messages")
            }
            drained = not busy
            if busy:
                report.extra["busy_queues"] = busy
            report.duplicates_absorbed += report.redeliveries
        diffs_ok = all(diff.ok for diff, _ in diffs.values())
        idle = await self.control.is_idle()
        ok = idle and drained and diffs_ok and not outbound_problems
        if not diffs_ok:
            report.extra["diffs"] = {a: d.summary() for a, (d, _) in diffs.items() if not d.ok}
        report.extra["idle"] = idle
        report.extra["drained"] = drained
        report.extra["equal"] = diffs_ok and not outbound_problems
        return ok, report

    async def check(self, *, timeout_s: float = 60.0, interval_s: float = 0.25) -> Report:
        """Wait for the drain, then assert nothing was lost; prints and returns the report."""
        deadline = time.monotonic() + timeout_s
        converged_at: float | None = None
        start = self._healed_at or self._fault_at or time.monotonic()
        first: dict[str, float] = {}  # when each condition first held, after the heal
        while True:
            ok, report = await self._snapshot()
            for name in ("idle", "drained", "equal"):
                if report.extra[name] and name not in first:
                    first[name] = round(time.monotonic() - start, 2)
                    if name == "equal" and "busy_queues" in report.extra:
                        self.extra["busy_when_equal"] = report.extra["busy_queues"]
            if ok:
                converged_at = time.monotonic()
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(interval_s)
        report.converged = ok
        if converged_at is not None:
            report.recover_s = round(converged_at - start, 2)
        if report.converged:
            for name in ("idle", "drained", "equal"):
                report.extra.pop(name, None)
        report.extra["first_s"] = first
        reader = self._running_node()
        if reader is not None:
            # What every role published to 1Relation, child processes' included, is checked
            # against its schema (the autouse fixture reports any violation).
            report.extra["announcements_validated"] = await published.check_queued(
                reader.url(self.vhost or "/")
            )
        print(f"FAULT-HISTORY {report.line()}")
        assert report.lost == 0, f"lost {report.lost}: {report.lost_detail[:10]}"
        assert report.dead_lettered == 0, f"{report.dead_lettered} dead-lettered"
        assert report.converged, f"did not converge within {timeout_s} s: {report.line()}"
        return report

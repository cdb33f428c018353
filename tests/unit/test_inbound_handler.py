"""InboundHandler against in-memory fakes of its ports: no broker, no database, no Graph."""

from __future__ import annotations

from typing import Any

import pytest

from handlers.errors import ReauthorizationRequired, ThrottledError
from handlers.inbound import InboundHandler, SyncWindow
from handlers.messages import INBOUND_SCHEMA
from handlers.outcome import Action, Outcome
from tests.unit.fakes import (
    ACCOUNT,
    FakeAccounts,
    FakeAnnouncer,
    FakeDelivery,
    FakeEvents,
    FakeGraph,
    FakeMetrics,
    FakeStatuses,
    ck_hash,
    event_ref,
)


class World:
    """The handler and its fakes."""

    def __init__(self, *, status: str = "connected", bound: bool = True) -> None:
        self.accounts = FakeAccounts(status=status, bound=bound)
        self.events = FakeEvents()
        self.graph = FakeGraph()
        self.announcer = FakeAnnouncer()
        self.statuses = FakeStatuses()
        self.metrics = FakeMetrics()
        self.handler = InboundHandler(
            store=self.accounts,
            events=self.events,
            graph=self.graph,
            announcer=self.announcer,
            statuses=self.statuses,
            metrics=self.metrics,
            window=SyncWindow(30, 365),
        )

    def change(self, graph_id: str, **extra: Any) -> FakeDelivery:
        """A change notification for ``graph_id``."""
        return FakeDelivery(
            {
                "schema": INBOUND_SCHEMA,
                "kind": "change",
                "account_id": ACCOUNT,
                "event_hash": self.events.event_key(ACCOUNT, graph_id),
                "event_ref": event_ref(self.accounts.cipher, ACCOUNT, graph_id),
                **extra,
            }
        )

    async def handle(self, *deliveries: FakeDelivery) -> None:
        await self.handler.handle_batch(ACCOUNT, deliveries)


async def test_a_change_is_fetched_stored_announced_and_acked() -> None:
    """A notification of a new event fetches it, stores it, announces it and acks."""
    w = World()
    event = w.graph.add(subject="Lunch")
    delivery = w.change(event["id"])
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.events.live() == {w.events.event_key(ACCOUNT, event["id"])}
    assert [c.change for c in w.announcer.announced] == ["upserted"]
    assert w.statuses.syncs == [(ACCOUNT, None)]


async def test_duplicate_notifications_of_one_event_cost_one_fetch() -> None:
    """Several notifications of one event in a batch are coalesced into one GET."""
    w = World()
    event = w.graph.add(subject="Lunch")
    batch = [w.change(event["id"]) for _ in range(3)]
    await w.handle(*batch)
    assert [kind for kind, _ in w.graph.calls] == ["get"]
    assert all(d.outcome == Outcome.ack() for d in batch)


async def test_an_event_graph_no_longer_has_becomes_a_tombstone() -> None:
    """When Graph says the event is gone, the stored event is marked deleted and announced."""
    w = World()
    key = w.events.put(ACCOUNT, {"id": "gone-1", "subject": "Old", "changeKey": "a"})
    delivery = w.change("gone-1", change_type="deleted")
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert key not in w.events.live()
    assert [c.change for c in w.announcer.announced] == ["deleted"]


async def test_a_notified_version_already_stored_needs_no_fetch() -> None:
    """A notification naming the stored change key is acked without calling Graph."""
    w = World()
    w.events.put(ACCOUNT, {"id": "e1", "subject": "Same", "changeKey": "v7"})
    delivery = w.change("e1", etag_hash=ck_hash("v7"))
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.graph.calls == []
    assert w.metrics.fetches_skipped.value == 1


async def test_a_throttled_fetch_waits_what_graph_asked() -> None:
    """A 429 on the fetch parks the message for Graph's Retry-After, announcing nothing."""
    w = World()
    event = w.graph.add(subject="Busy")
    w.graph.fail = ThrottledError("429", retry_after_s=7.0)
    delivery = w.change(event["id"])
    await w.handle(delivery)
    assert delivery.outcome == Outcome.retry(7.0)
    assert w.announcer.announced == []
    assert w.statuses.syncs == []


async def test_reauthorization_pauses_the_account_and_acks() -> None:
    """A refresh that fails for good sets reauthorization_required and acks the batch."""
    w = World()
    event = w.graph.add(subject="x")
    w.graph.fail = ReauthorizationRequired(ACCOUNT, "invalid_grant")
    delivery = w.change(event["id"])
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.statuses.statuses == [(ACCOUNT, "reauthorization_required", "invalid_grant")]
    assert w.statuses.syncs == []  # acked because the account stopped is no sync


@pytest.mark.parametrize(("status", "bound"), [("disconnected", True), ("connected", False)])
async def test_a_paused_or_unbound_account_makes_no_graph_call(status: str, bound: bool) -> None:
    """Messages of a paused (or not yet bound) account are acked without a Graph call."""
    w = World(status=status, bound=bound)
    event = w.graph.add(subject="x")
    delivery = w.change(event["id"])
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.graph.calls == []


async def test_an_erased_accounts_messages_are_dropped() -> None:
    """Messages of an erased account are acked and nothing is fetched or written."""
    w = World()
    w.accounts.erased.add(ACCOUNT)
    event = w.graph.add(subject="x")
    delivery = w.change(event["id"])
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.graph.calls == []
    assert w.events.docs == {}


async def test_an_event_ref_that_does_not_decrypt_is_dead_lettered() -> None:
    """A change whose encrypted event reference does not open is dead-lettered with why."""
    w = World()
    delivery = w.change("e1")
    delivery.body["event_ref"] = "bm90IGNpcGhlcnRleHQ="
    await w.handle(delivery)
    assert delivery.outcome is not None
    assert delivery.outcome.action is Action.DEAD_LETTER
    assert "decrypt" in delivery.outcome.reason


async def test_a_resync_without_a_delta_runner_is_dead_lettered() -> None:
    """A worker that cannot run delta passes dead-letters resyncs rather than dropping them."""
    w = World()
    delivery = FakeDelivery(
        {"schema": INBOUND_SCHEMA, "kind": "resync", "account_id": ACCOUNT, "full": True}
    )
    await w.handle(delivery)
    assert delivery.outcome is not None
    assert delivery.outcome.action is Action.DEAD_LETTER

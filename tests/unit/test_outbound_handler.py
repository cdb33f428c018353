"""OutboundHandler against in-memory fakes of its ports: no broker, no database, no Graph."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers.errors import PermanentError, ReauthorizationRequired, ThrottledError
from handlers.outbound import (
    OUTBOUND_SCHEMA,
    OutboundChange,
    OutboundHandler,
    _shard_body,
    transaction_id,
)
from handlers.outcome import Action, Outcome
from handlers.reports import Reporter
from tests.unit.fakes import (
    ACCOUNT,
    NOW,
    FakeAccounts,
    FakeDelivery,
    FakeEvents,
    FakeGraph,
    FakeLinks,
    FakeMetrics,
    FakePublisher,
    FakeStatuses,
)

START = {"dateTime": "2026-12-10T09:00:00", "timeZone": "UTC"}
END = {"dateTime": "2026-12-10T10:00:00", "timeZone": "UTC"}


class World:
    """The handler and its fakes."""

    def __init__(self, *, status: str = "connected") -> None:
        self.accounts = FakeAccounts(status=status)
        self.events = FakeEvents()
        self.links = FakeLinks()
        self.graph = FakeGraph()
        self.statuses = FakeStatuses()
        self.publisher = FakePublisher()
        metrics = FakeMetrics()
        self.handler = OutboundHandler(
            store=self.accounts,
            events=self.events,
            links=self.links,
            graph=self.graph,
            statuses=self.statuses,
            reporter=Reporter(publisher=self.publisher, metrics=metrics, timeout_s=1.0),
            metrics=metrics,
            tombstone_ttl_s=86400.0,
        )

    def message(
        self, revision: int, op: str = "upsert", event: dict[str, Any] | None = None
    ) -> FakeDelivery:
        """A shard message for 1Relation event ``r1`` at ``revision``."""
        change = OutboundChange(
            account_id=ACCOUNT,
            relation_event_id="r1",
            revision=revision,
            op=op,
            occurred_at=NOW + timedelta(minutes=revision),
            event=event,
        )
        return FakeDelivery(_shard_body(change, self.accounts.cipher))

    async def handle(self, *deliveries: FakeDelivery) -> None:
        await self.handler.handle_batch(ACCOUNT, deliveries)

    async def created(self) -> str:
        """Create 1Relation's event ``r1`` in Outlook; returns its Graph id."""
        await self.handle(self.message(1, event={"subject": "Plan", "start": START, "end": END}))
        graph_id = self.links.links["r1"].graph_id
        assert graph_id is not None
        return graph_id


async def test_a_create_posts_with_a_stable_transaction_id() -> None:
    """A new 1Relation event is created once, carrying the transactionId of its creation."""
    w = World()
    delivery = w.message(1, event={"subject": "Plan", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    [(kind, _)] = w.graph.calls
    assert kind == "create"
    [created] = w.graph.events.values()
    assert created["transactionId"] == transaction_id(ACCOUNT, "r1", 0)
    assert w.links.links["r1"].applied_revision == 1


async def test_an_update_patches_only_the_changed_fields() -> None:
    """An update whose subject alone differs PATCHes the subject and nothing else."""
    w = World()
    await w.created()
    delivery = w.message(2, event={"subject": "Plan B", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.graph.patches() == [{"subject": "Plan B"}]


async def test_an_update_that_changes_nothing_makes_no_graph_call() -> None:
    """An update equal to what Outlook has is applied without a PATCH."""
    w = World()
    await w.created()
    calls = len(w.graph.calls)
    await w.handle(w.message(2, event={"subject": "Plan", "start": START, "end": END}))
    assert len(w.graph.calls) == calls
    assert w.links.links["r1"].applied_revision == 2


async def test_a_revision_at_or_below_the_applied_one_is_a_no_op() -> None:
    """A redelivered or reordered older revision is acked without touching Graph."""
    w = World()
    await w.created()
    calls = len(w.graph.calls)
    delivery = w.message(1, event={"subject": "Stale", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert len(w.graph.calls) == calls


async def test_changes_of_one_batch_apply_in_revision_order() -> None:
    """Revisions arriving out of order in one batch are applied in revision order."""
    w = World()
    await w.created()
    late = w.message(3, event={"subject": "Three", "start": START, "end": END})
    early = w.message(2, event={"subject": "Two", "start": START, "end": END})
    await w.handle(late, early)
    assert w.graph.patches() == [{"subject": "Two"}, {"subject": "Three"}]


async def test_a_delete_removes_the_event_from_outlook() -> None:
    """A delete calls Graph's DELETE and leaves a tombstone on the link."""
    w = World()
    graph_id = await w.created()
    delivery = w.message(2, op="delete")
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert ("delete", graph_id) in w.graph.calls
    assert w.links.links["r1"].deleted


async def test_an_event_deleted_in_outlook_is_not_recreated() -> None:
    """A PATCH answered 404 records the deletion and tells 1Relation event.deleted."""
    w = World()
    graph_id = await w.created()
    del w.graph.events[graph_id]
    await w.handle(w.message(2, event={"subject": "Again", "start": START, "end": END}))
    assert w.links.links["r1"].deleted
    assert not any(kind == "create" for kind, _ in w.graph.calls[1:])
    assert w.publisher.routing_keys()["event.deleted"] == 1


async def test_a_meeting_the_account_does_not_organise_is_rejected() -> None:
    """An update of a meeting organised by someone else is dead-lettered and reported."""
    w = World()
    graph_id = await w.created()
    w.events.put(ACCOUNT, {**w.graph.events[graph_id], "isOrganizer": False})
    w.links.links["r1"].event_key = w.events.event_key(ACCOUNT, graph_id)
    delivery = w.message(2, event={"subject": "Moved", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome is not None
    assert delivery.outcome.action is Action.DEAD_LETTER
    assert w.graph.patches() == []
    assert w.publisher.routing_keys()["event.rejected"] == 1


async def test_a_permanent_graph_error_is_dead_lettered_and_reported() -> None:
    """Graph refusing a write for good dead-letters the change and sends event.rejected."""
    w = World()
    await w.created()
    w.graph.fail = PermanentError("Graph said 400")
    delivery = w.message(2, event={"subject": "Bad", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome == Outcome.dead_letter("Graph said 400")
    assert w.publisher.routing_keys()["event.rejected"] == 1


async def test_a_throttled_write_waits_what_graph_asked() -> None:
    """A 429 on the PATCH parks the change for Graph's Retry-After."""
    w = World()
    await w.created()
    w.graph.fail = ThrottledError("429", retry_after_s=3.0)
    delivery = w.message(2, event={"subject": "Later", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome == Outcome.retry(3.0)


async def test_a_paused_account_parks_its_changes_for_replay() -> None:
    """Changes for a disconnected account are parked (acked) and make no Graph call."""
    w = World(status="disconnected")
    delivery = w.message(1, event={"subject": "Plan", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.graph.calls == []
    assert len(w.links.parked) == 1


async def test_a_replay_for_a_paused_account_drops_its_expired_parked_changes() -> None:
    """The account stays paused; a ``replay`` (sent because its oldest parked change is past
    the age limit) drops the expired change with an ``event.rejected`` and keeps the rest."""
    w = World(status="reauthorization_required")
    await w.handle(w.message(1, event={"subject": "Plan", "start": START, "end": END}))
    await w.handle(w.message(2, event={"subject": "Plan 2", "start": START, "end": END}))
    old, recent = sorted(w.links.parked.values(), key=lambda d: d["revision"])
    old["parked_at"] = datetime.now(UTC) - timedelta(days=15)
    recent["parked_at"] = datetime.now(UTC) - timedelta(days=1)
    replay = FakeDelivery({"schema": OUTBOUND_SCHEMA, "kind": "replay", "account_id": ACCOUNT})
    await w.handle(replay)
    assert replay.outcome == Outcome.ack()
    assert [d["revision"] for d in w.links.parked.values()] == [2]
    [rejected] = [m for m in w.publisher.messages if m.routing_key == "event.rejected"]
    assert rejected.body["revision"] == 1
    assert "waited more than 14 days" in rejected.body["reason"]
    assert w.graph.calls == []


async def test_parked_changes_are_replayed_once_the_account_is_back() -> None:
    """After a reconnect the parked change is applied first and removed from the park."""
    w = World(status="disconnected")
    await w.handle(w.message(1, event={"subject": "Plan", "start": START, "end": END}))
    w.accounts.accounts[ACCOUNT] = dataclasses.replace(
        w.accounts.accounts[ACCOUNT], status="connected"
    )
    await w.handle(w.message(2, event={"subject": "Plan 2", "start": START, "end": END}))
    assert [kind for kind, _ in w.graph.calls] == ["create", "patch"]
    assert w.links.parked == {}


async def test_reauthorization_parks_the_rest_of_the_batch() -> None:
    """A refresh that fails for good sets the status and parks the unapplied changes."""
    w = World()
    w.graph.fail = ReauthorizationRequired(ACCOUNT, "invalid_grant")
    delivery = w.message(1, event={"subject": "Plan", "start": START, "end": END})
    await w.handle(delivery)
    assert delivery.outcome == Outcome.ack()
    assert w.statuses.statuses == [(ACCOUNT, "reauthorization_required", "invalid_grant")]
    assert len(w.links.parked) == 1

"""DeltaRunner and LifecycleHandler against in-memory fakes: no broker, no database, no Graph."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from crypto import DataCipher
from handlers.delta import DeltaRunner, DeltaSettings
from handlers.errors import (
    AccountUnavailable,
    PublishError,
    ReauthorizationRequired,
    ThrottledError,
)
from handlers.inbound import SyncWindow
from handlers.outcome import Action, Outcome
from handlers.records import Account
from subscriptions.lifecycle import LifecycleHandler
from tests.unit.fakes import (
    ACCOUNT,
    USER,
    FakeAccounts,
    FakeDelivery,
    FakeDeltaLinks,
    FakeEvents,
    FakeGraph,
    FakeStatuses,
)

INSIDE = {"start": {"dateTime": "2026-12-10T09:00:00.0000000"}}
INSIDE_END = {"end": {"dateTime": "2026-12-10T10:00:00.0000000"}}


class DeltaWorld:
    """A delta runner and its fakes."""

    def __init__(self, *, status: str = "connected") -> None:
        self.accounts = FakeAccounts(status=status)
        self.events = FakeEvents()
        self.graph = FakeGraph()
        self.statuses = FakeStatuses()
        self.delta_links = FakeDeltaLinks()
        self.runner = DeltaRunner(
            store=self.accounts,
            delta_links=self.delta_links,
            events=self.events,
            graph=self.graph,
            statuses=self.statuses,
            window=SyncWindow(30, 365),
            settings=DeltaSettings(mass_delete_min_events=3),
        )

    def stored(self, graph_id: str) -> str:
        """An event stored by an earlier sync, inside the window."""
        return self.events.put(
            ACCOUNT, {"id": graph_id, "changeKey": "old", **INSIDE, **INSIDE_END}
        )

    async def run(self, *, full: bool, reason: str = "connect") -> list[Any]:
        return await self.runner(ACCOUNT, self.accounts.cipher, USER, full, reason)


async def test_a_full_pass_stores_every_event_and_keeps_the_delta_link() -> None:
    """A full round writes what Graph returned, stores the next link and notes the sync."""
    w = DeltaWorld(status="backfilling")
    for n in range(3):
        w.graph.add(subject=f"e{n}", **INSIDE, **INSIDE_END)
    changes = await w.run(full=True)
    assert len(changes) == 3
    assert len(w.events.live()) == 3
    assert ACCOUNT in w.delta_links.links
    assert w.statuses.syncs == [(ACCOUNT, None)]
    assert w.statuses.statuses == [(ACCOUNT, "connected", None)]


async def test_the_next_pass_follows_the_stored_link() -> None:
    """An incremental pass asks Graph with the link the previous pass stored."""
    w = DeltaWorld()
    w.graph.add(subject="e", **INSIDE, **INSIDE_END)
    await w.run(full=True)
    link = w.delta_links.links[ACCOUNT][0]
    await w.run(full=False, reason="burst")
    assert w.graph.calls[-1] == ("delta", link)


async def test_a_full_round_deletes_stored_events_graph_no_longer_has() -> None:
    """A stored event a full round did not return (and Graph confirms gone) is deleted."""
    w = DeltaWorld()
    for n in range(3):
        w.graph.add(subject=f"e{n}", **INSIDE, **INSIDE_END)
    gone = w.stored("vanished")
    changes = await w.run(full=True)
    assert gone not in w.events.live()
    assert [c.change for c in changes].count("deleted") == 1


async def test_an_empty_full_round_over_a_full_window_deletes_nothing() -> None:
    """The mass-deletion brake: Graph returning nothing while events are stored pauses
    deletions instead of emptying the calendar."""
    w = DeltaWorld()
    kept = {w.stored(f"s{n}") for n in range(4)}
    await w.run(full=True)
    assert w.events.live() == kept
    assert [s for _, s, _ in w.statuses.statuses] == ["deletions_paused"]
    assert ACCOUNT not in w.delta_links.links


async def test_an_operator_resync_passes_the_brake() -> None:
    """A resync an operator asked for deletes even what the brake would have kept."""
    w = DeltaWorld()
    for n in range(4):
        w.stored(f"s{n}")
    await w.run(full=True, reason="operator")
    assert w.events.live() == set()


async def test_a_pass_holding_an_erased_connections_key_writes_nothing() -> None:
    """The account was erased and connected again (a new data key) after the pass took its
    cipher: the fence stops the pass before its first write, and no link is kept."""
    w = DeltaWorld()
    for n in range(3):
        w.graph.add(subject=f"e{n}", **INSIDE, **INSIDE_END)
    held = w.accounts.cipher
    w.accounts.cipher = DataCipher.generate()  # connected again: a new key
    with pytest.raises(AccountUnavailable):
        await w.runner(ACCOUNT, held, USER, True, "connect")
    assert not w.events.live()
    assert ACCOUNT not in w.delta_links.links


async def test_a_throttled_delta_round_raises_for_the_caller_to_retry() -> None:
    """A throttled round stores nothing and lets the error reach the ack decision."""
    w = DeltaWorld()
    w.graph.add(subject="e", **INSIDE, **INSIDE_END)
    w.graph.fail = ThrottledError("429", retry_after_s=4.0)
    try:
        await w.run(full=True)
    except ThrottledError:
        pass
    else:
        raise AssertionError("the throttle did not reach the caller")
    assert w.events.live() == set()
    assert ACCOUNT not in w.delta_links.links


# ---- lifecycle ---------------------------------------------------------------------------------


class FakeSubscriptionRecords:
    """Our subscription records: one per account, or none."""

    def __init__(self, *, known: bool) -> None:
        self.known = known

    async def get_for_account(self, account_id: str, sub_hash: str) -> object | None:
        return object() if self.known else None


class FakeAccountRecords:
    """A connected, bound account."""

    async def get(self, account_id: str) -> Account | None:
        return Account(account_id, "connected", sealed_identity=(b"user", b"tenant"))


class FakeStore:
    """The two lookups the lifecycle handler makes."""

    def __init__(self, *, known: bool = True) -> None:
        self.subscriptions = FakeSubscriptionRecords(known=known)
        self.accounts = FakeAccountRecords()


class FakeManager:
    """Records what the lifecycle handler asked of the subscription manager."""

    def __init__(self, *, fail: BaseException | None = None, done: bool = True) -> None:
        self.stats: Counter[str] = Counter()
        self.asked: list[tuple[str, Any]] = []
        self.fail = fail
        self.done = done
        self.report_fails: BaseException | None = None

    async def _act(self, what: str, arg: Any) -> bool:
        self.asked.append((what, arg))
        if self.fail is not None:
            raise self.fail
        return self.done

    async def publish_resync(self, account_id: str, *, full: bool, reason: str) -> None:
        await self._act("resync", (full, reason))

    async def recreate(self, account_id: str, sub_hash: str) -> bool:
        return await self._act("recreate", sub_hash)

    async def reauthorize(self, account_id: str, sub_hash: str) -> bool:
        return await self._act("reauthorize", sub_hash)

    async def report_reauthorization(self, account_id: str, reason: str) -> None:
        self.asked.append(("report", reason))
        if self.report_fails is not None:
            raise self.report_fails

    def request_repair(self, account_id: str, actions: set[str]) -> None:
        self.asked.append(("repair", frozenset(actions)))


def lifecycle(event: str) -> FakeDelivery:
    return FakeDelivery(
        {
            "schema": "m365sync.lifecycle.v1",
            "account_id": ACCOUNT,
            "subscription_hash": "sub-1",
            "lifecycle_event": event,
        }
    )


async def handle(manager: FakeManager, delivery: FakeDelivery, *, known: bool = True) -> None:
    handler = LifecycleHandler(store=FakeStore(known=known), manager=manager)  # type: ignore[arg-type]
    await handler.handle_batch(ACCOUNT, [delivery])  # type: ignore[list-item]


async def test_missed_asks_for_a_full_resync() -> None:
    """``missed`` publishes a full resync and acks."""
    manager, delivery = FakeManager(), lifecycle("missed")
    await handle(manager, delivery)
    assert manager.asked == [("resync", (True, "missed"))]
    assert delivery.outcome == Outcome.ack()


async def test_work_that_cannot_be_done_now_goes_to_the_next_scan() -> None:
    """A throttled recreate is handed to the manager's repair and the message is acked."""
    manager = FakeManager(fail=ThrottledError("429", retry_after_s=9.0))
    delivery = lifecycle("subscriptionRemoved")
    await handle(manager, delivery)
    assert ("repair", frozenset({"check"})) in manager.asked
    assert delivery.outcome == Outcome.ack()


async def test_a_failed_refresh_marks_the_account_and_acks() -> None:
    """A reauthorization whose refresh fails for good is reported and acked."""
    manager = FakeManager(fail=ReauthorizationRequired(ACCOUNT, "invalid_grant"))
    delivery = lifecycle("reauthorizationRequired")
    await handle(manager, delivery)
    assert ("report", "invalid_grant") in manager.asked
    assert delivery.outcome == Outcome.ack()


async def test_an_unconfirmed_resync_publish_is_requeued() -> None:
    """A resync the broker did not confirm sends the lifecycle message back to the queue."""
    manager, delivery = FakeManager(fail=PublishError("nacked")), lifecycle("missed")
    await handle(manager, delivery)
    assert delivery.outcome is not None
    assert delivery.outcome.action is Action.REQUEUE


async def test_an_unknown_subscription_is_acked_and_counted() -> None:
    """A message for a subscription that is not ours (any more) is acked and counted."""
    manager, delivery = FakeManager(), lifecycle("missed")
    await handle(manager, delivery, known=False)
    assert manager.asked == []
    assert manager.stats["lifecycle_unknown"] == 1
    assert delivery.outcome == Outcome.ack()


async def test_a_handler_bug_requeues_only_its_own_message() -> None:
    """An unexpected error requeues its message without deciding for the others."""
    manager = FakeManager(fail=KeyError("boom"))
    bad, good = lifecycle("missed"), lifecycle("unknownEvent")
    handler = LifecycleHandler(store=FakeStore(), manager=manager)  # type: ignore[arg-type]
    await handler.handle_batch(ACCOUNT, [bad, good])  # type: ignore[list-item]
    assert bad.outcome == Outcome.requeue("KeyError")
    assert good.outcome == Outcome.ack()

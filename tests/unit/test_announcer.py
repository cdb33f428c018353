"""Announcer against an in-memory outbox: what a failed publish left goes out next time."""

from __future__ import annotations

from typing import Any

from handlers.errors import PublishError
from handlers.records import Change
from processor.announce import Announcer
from tests.unit.fakes import ACCOUNT, NOW, FakeMetrics, FakePublisher


class FakeOutbox:
    """The outbox marks of event documents (``EventStore``'s announcement methods)."""

    def __init__(self) -> None:
        self.marks: dict[str, Change] = {}
        self.reads = 0

    def write(self, key: str, seq: int) -> Change:
        change = Change(ACCOUNT, key, "upserted", NOW, seq)
        self.marks[key] = change
        return change

    async def pending_announcements(self, account_id: str) -> list[Change]:
        self.reads += 1
        return [c for c in self.marks.values() if c.account_id == account_id]

    async def clear_announcement(self, change: Change) -> None:
        if self.marks.get(change.event_key) == change:
            del self.marks[change.event_key]


class FailingOnce(FakePublisher):
    """Refuses the next publish (the broker lost a node), then confirms again."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def publish(self, message: Any, *, timeout_s: float) -> None:
        if self.failures:
            self.failures -= 1
            raise PublishError("channel closed")
        await super().publish(message, timeout_s=timeout_s)


def announcer(outbox: FakeOutbox, publisher: FakePublisher) -> Announcer:
    return Announcer(
        publisher=publisher,
        events=outbox,  # type: ignore[arg-type]
        metrics=FakeMetrics(),  # type: ignore[arg-type]
        timeout_s=1.0,
    )


async def test_the_next_flush_after_a_failed_one_sweeps_what_it_left() -> None:
    """A batch whose announcements failed leaves its marks; the account's next batch
    announces them with its own, without waiting for the relay."""
    outbox, publisher = FakeOutbox(), FailingOnce()
    subject = announcer(outbox, publisher)
    first = [outbox.write("e1", 1), outbox.write("e2", 2)]
    publisher.failures = 1
    assert await subject.flush(ACCOUNT, first) == 0
    assert set(outbox.marks) == {"e1", "e2"}

    assert await subject.flush(ACCOUNT, [outbox.write("e3", 3)]) == 3
    assert outbox.marks == {}
    assert sorted(m.body["event_key"] for m in publisher.messages) == ["e1", "e2", "e3"]

    reads = outbox.reads
    await subject.flush(ACCOUNT, [outbox.write("e4", 4)])
    assert outbox.reads == reads  # once swept, flushes read no outbox again


async def test_a_flush_that_succeeds_does_not_read_the_outbox() -> None:
    outbox, publisher = FakeOutbox(), FakePublisher()
    subject = announcer(outbox, publisher)
    assert await subject.flush(ACCOUNT, [outbox.write("e1", 1)]) == 1
    assert outbox.reads == 0

"""The outbox: a change written but not announced (crash in between) is announced later."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers.timeutil import utcnow
from processor.announce import OutboxRelay
from tests.e2e.harness import eventually, running_stack

pytestmark = pytest.mark.e2e

EVENT = {
    "id": "AAMkAGI-crash-window=",
    "subject": "Board meeting",
    "lastModifiedDateTime": "2026-12-01T08:16:02.1234567Z",
    "changeKey": "DwAAABYAAAB1",
    "start": {"dateTime": "2026-12-03T10:00:00.0000000", "timeZone": "UTC"},
    "end": {"dateTime": "2026-12-03T11:00:00.0000000", "timeZone": "UTC"},
    "type": "singleInstance",
}


async def test_a_change_left_unannounced_by_a_crash_is_announced_once_by_the_relay(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """After a crash between the database write and the publish, the document keeps its
    outbox mark; the relay has the shard owner announce it, then the mark is cleared."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-o", user_id)
        cipher = await stack.rt.store.keys.cipher_for("acc-o")
        # The state a crash right after the reconciling write leaves: written, marked, unsent.
        change = await stack.rt.events.upsert_version("acc-o", EVENT, cipher=cipher)
        assert change is not None
        assert await stack.announcements() == []

        relay = OutboxRelay(
            publisher=stack.rt.publisher,
            events=stack.rt.events,
            shard_count=stack.settings.shard_count,
            timeout_s=5,
        )
        assert await relay.run_once(older_than_s=0, now=utcnow()) == 1
        announced = await eventually(stack.announcements)
        assert [(a["event_key"], a["change"]) for a in announced] == [
            (change.event_key, "upserted")
        ]
        assert announced[0]["last_modified"] == "2026-12-01T08:16:02.1234567Z"
        assert announced[0]["sequence"] == change.seq

        async def mark_cleared() -> bool:
            doc = await stack.rt.events.collection.find_one({"_id": change.event_key})
            return doc is not None and "announce" not in doc

        await eventually(mark_cleared)
        assert await relay.run_once(older_than_s=0, now=utcnow()) == 0
        assert await stack.announcements() == []

"""Outbound under crashes, bad input and edits on both sides."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from handlers.timezones import event_time_to_utc
from processor.broker import REASON_HEADER
from processor.topology import DEAD_QUEUE
from tests.e2e.harness import Stack, eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event
from tests.e2e.processes import RoleProcess

pytestmark = pytest.mark.e2e


async def _subjects(stack: Stack, user_id: str) -> list[str]:
    return sorted(e["subject"] for e in await stack.control.events(user_id, immutable=True))


async def test_a_crash_between_the_graph_write_and_the_ack_leaves_exactly_one_event(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """The outbound process is SIGKILLed after Graph created the event but before it heard
    back (so before the ack); after a restart the redelivered create reuses its
    transactionId and Outlook still has exactly one event."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-c", user_id)
        first = await RoleProcess("outbound", stack.env, tmp_path / "outbound1.log").start()
        await first.wait_log("process.ready")
        await stack.control.set_faults(write_answer_delay_ms=4000)
        await publish_outbound(
            stack, [message("acc-c", "rel-crash", 1, relation_event("Crash window"))]
        )

        async def created() -> bool:
            return await _subjects(stack, user_id) == ["Crash window"]

        await eventually(created, interval_s=0.02)
        first.kill()
        await first.stop()
        await stack.control.set_faults(write_answer_delay_ms=0)
        second = await RoleProcess("outbound", stack.env, tmp_path / "outbound2.log").start()
        try:
            await second.wait_log("process.ready")

            async def applied() -> bool:
                doc = await stack.rt.links.links.find_one({"account_id": "acc-c"})
                return doc is not None and doc.get("applied_revision") == 1

            await eventually(applied, timeout_s=30)
            await asyncio.sleep(1)
            assert await _subjects(stack, user_id) == ["Crash window"]
        finally:
            await second.stop()


async def test_invalid_messages_are_dead_lettered_with_reasons_while_valid_ones_flow(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Broken JSON, a wrong schema, missing fields, impossible times, unknown zones and an
    oversize body each reach the dead-letter queue with a reason (and event.rejected when
    1Relation can match it), and the valid messages around them are applied."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-v", user_id)
        good = relation_event("Valid one")
        backwards = {**relation_event("Backwards"), "end": relation_event("x", hour=8)["start"]}
        bad: list[dict[str, Any] | bytes] = [
            b"{this is not json",
            {**message("acc-v", "rel-a", 1, good), "schema": "onerelation.event.v0"},
            {k: v for k, v in message("acc-v", "rel-b", 1, good).items() if k != "revision"},
            message("acc-v", "rel-c", 1, backwards),
            message(
                "acc-v",
                "rel-d",
                1,
                {**good, "start": {"dateTime": "2026-02-30T10:00:00", "timeZone": "UTC"}},
            ),
            message(
                "acc-v",
                "rel-e",
                1,
                {**good, "start": {**good["start"], "timeZone": "Mars/Olympus"}},
            ),
            message(
                "acc-v",
                "rel-f",
                1,
                {**good, "body": {"contentType": "text", "content": "x" * 1_100_000}},
            ),
            message("acc-v", "rel-g", 1, {**good, "colour": "red"}),
            {**message("acc-v", "rel-h", 1, good), "revision": "seven"},
            message("acc-nobody", "rel-i", 1, good),
        ]
        valid = [
            message("acc-v", f"rel-ok-{n}", 1, relation_event(f"Valid {n}", day=n + 1))
            for n in range(3)
        ]
        await publish_outbound(stack, [valid[0], *bad[:5], valid[1], *bad[5:], valid[2]])

        async def applied() -> bool:
            return await _subjects(stack, user_id) == ["Valid 0", "Valid 1", "Valid 2"]

        await eventually(applied, timeout_s=30)
        channel = await stack.rt.connection.channel()
        queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
        reasons: list[str] = []

        async def all_dead() -> bool:
            while (got := await queue.get(no_ack=True, fail=False)) is not None:
                reasons.append(str((got.headers or {}).get(REASON_HEADER)))
            return len(reasons) >= len(bad)

        await eventually(all_dead, timeout_s=20)
        await channel.close()
        assert len(reasons) == len(bad)
        text = "\n".join(reasons)
        for expected in (
            "not JSON",
            "schema",
            "revision",
            "after event.start",
            "not a real date",
            "time zone",
            "larger than",
            "colour",
            "not connected",
        ):
            assert expected in text, (expected, reasons)
        rejected = [a for a in await stack.announcements() if a["routing_key"] == "event.rejected"]
        assert {r["relation_event_id"] for r in rejected} >= {
            "rel-a",
            "rel-c",
            "rel-d",
            "rel-e",
            "rel-f",
            "rel-g",
        }
        assert all("x" * 20 not in json.dumps(r) for r in rejected)


async def test_both_sides_edit_the_same_event_and_the_newer_change_wins_per_field_group(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Outlook's newer subject beats an older 1Relation subject (reported as event.conflict
    with the lost fields), while 1Relation's time change, untouched in Outlook, still applies."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-x", user_id)
        original = relation_event("Planning", hour=9)
        await publish_outbound(stack, [message("acc-x", "rel-x", 1, original)])
        event = await eventually(lambda: _by_subject(stack, user_id, "Planning"))
        key = stack.rt.events.event_key("acc-x", event["id"])
        before_outlook_edit = datetime.now(UTC) - timedelta(seconds=1)
        await asyncio.sleep(1.1)
        await stack.control.update_event(
            user_id, event["id"], {"subject": "Planning (renamed in Outlook)"}, immutable=True
        )

        async def seen_outlook_edit() -> bool:
            doc = await stack.rt.events.collection.find_one({"_id": key})
            if doc is None:
                return False
            content = stack.rt.events.decrypt(doc, await stack.rt.store.keys.cipher_for("acc-x"))[1]
            return content["subject"] == "Planning (renamed in Outlook)"

        await eventually(seen_outlook_edit)
        moved = relation_event("Planning (renamed in 1Relation)", hour=14)
        await publish_outbound(
            stack, [message("acc-x", "rel-x", 2, moved, occurred_at=before_outlook_edit)]
        )

        async def settled() -> dict[str, Any] | None:
            current = await _by_subject(stack, user_id, "Planning (renamed in Outlook)")
            if current and event_time_to_utc(current["start"]) == event_time_to_utc(moved["start"]):
                return current
            return None

        current = await eventually(settled)
        assert current["subject"] == "Planning (renamed in Outlook)"
        conflicts = [a for a in await stack.announcements() if a["routing_key"] == "event.conflict"]
        assert len(conflicts) == 1
        assert conflicts[0]["relation_event_id"] == "rel-x"
        assert "subject" in conflicts[0]["lost_fields"]
        assert "start" not in conflicts[0]["lost_fields"]


async def _by_subject(stack: Stack, user_id: str, subject: str) -> dict[str, Any] | None:
    for event in await stack.control.events(user_id, immutable=True):
        if event["subject"] == subject:
            return event
    return None

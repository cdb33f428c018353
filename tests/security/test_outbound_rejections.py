"""Invalid 1Relation messages at the outbound intake: dead-lettered with a reason, reported,
counted, and nothing else happens (docs/contract.md §3, docs/design.md "What must always hold" 7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from processor.broker import REASON_HEADER
from processor.topology import DEAD_QUEUE, ONERELATION_INBOUND_QUEUE
from tests.e2e.harness import Stack, eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event
from tests.security.support import metrics, sample

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-out"
SECRET_SUBJECT = "Takeover of Initech 3c5e"
SECRET_ADDRESS = "peter.gibbons.77a1@initech.example"


def _event(**changes: Any) -> dict[str, Any]:
    return {
        **relation_event(SECRET_SUBJECT),
        "attendees": [{"emailAddress": {"address": SECRET_ADDRESS, "name": "Peter"}}],
        **changes,
    }


def _invalid_messages() -> dict[str, tuple[dict[str, Any] | bytes, str | None]]:
    """name -> (body, kind counted); kind None: refused before the intake handler."""
    schema = message(ACCOUNT, "rel-schema", 1, _event())
    schema["schema"] = "onerelation.event.v0"
    overflow = message(ACCOUNT, "rel-overflow", 1, _event())
    overflow["occurred_at"] = "9999-12-31T23:59:59-12:00"
    nameless = message(ACCOUNT, "rel-x", 1, _event())
    del nameless["relation_event_id"]
    ownerless = message(ACCOUNT, "rel-noacct", 1, _event())
    del ownerless["account_id"]
    zone = _event()
    zone["start"] = {**zone["start"], "timeZone": "Atlantis/Poseidonis"}
    backwards = _event()
    backwards["start"], backwards["end"] = backwards["end"], backwards["start"]
    huge = _event(body={"contentType": "text", "content": "x" * 1_100_000})
    return {
        "schema": (schema, "invalid"),
        "time zone": (message(ACCOUNT, "rel-zone", 1, zone), "invalid"),
        "attendee": (
            message(
                ACCOUNT,
                "rel-att",
                1,
                _event(attendees=[{"emailAddress": {"address": SECRET_SUBJECT}}]),
            ),
            "invalid",
        ),
        "unknown field": (
            message(ACCOUNT, "rel-field", 1, _event(webLink="https://x.example")),
            "invalid",
        ),
        "out of range": (overflow, "invalid"),
        "end before start": (message(ACCOUNT, "rel-back", 1, backwards), "invalid"),
        "no relation id": (nameless, "invalid"),
        "no account id": (ownerless, "invalid"),
        "size": (message(ACCOUNT, "rel-huge", 1, huge), "size"),
        "account": (message("acc-nobody", "rel-nobody", 1, _event()), "account"),
        "not json": (b"\x00\x01 not json", None),
    }


async def _dead_letters(stack: Stack) -> list[tuple[dict[str, Any], Any]]:
    """Drain the dead-letter queue (the test's private vhost): (headers, body) pairs."""
    out = []
    channel = await stack.rt.connection.channel()
    try:
        queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            out.append((dict(msg.headers or {}), msg.body))
    finally:
        await channel.close()
    return out


async def test_invalid_outbound_messages_are_dead_lettered_reported_and_counted(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Each kind of invalid message (schema, time zone, attendee, unknown field, a time out
    of range, end before start, no relation id, no account id, over 1 MiB, unknown account,
    not JSON) is
    dead-lettered once with a readable reason, 1Relation hears event.rejected for each it
    can match, m365sync_outbound_rejected_total counts them by kind, no reason carries the
    event's content, and nothing reaches Outlook or the database."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver", "outbound")
    ) as stack:
        ann = (await stack.control.users())[0]["id"]
        await stack.connect_account(ACCOUNT, ann)
        await stack.announcements()  # account.status of the connect: not what we count
        before = await metrics(stack)
        invalid = _invalid_messages()
        await publish_outbound(stack, [body for body, _ in invalid.values()])

        dead: list[tuple[dict[str, Any], Any]] = []

        async def all_dead() -> bool:
            dead.extend(await _dead_letters(stack))
            return len(dead) >= len(invalid)

        await eventually(all_dead, timeout_s=20)
        announced: list[dict[str, Any]] = []

        async def all_reported() -> bool:
            announced.extend(await stack.announcements())
            return sum(a["routing_key"] == "event.rejected" for a in announced) >= 9

        await eventually(all_reported, timeout_s=10)
        assert len(dead) == len(invalid)
        reasons = [str(headers.get(REASON_HEADER, "")) for headers, _ in dead]
        for reason in reasons:
            assert reason
            assert reason.isprintable()
            assert SECRET_SUBJECT not in reason
            assert SECRET_ADDRESS not in reason
        assert any("outside the supported range" in r or "occurred_at" in r for r in reasons)

        rejected = [a for a in announced if a["routing_key"] == "event.rejected"]
        assert {a["relation_event_id"] for a in rejected} == {
            "rel-schema",
            "rel-zone",
            "rel-att",
            "rel-field",
            "rel-overflow",
            "rel-back",
            "rel-huge",
            "rel-nobody",
            "rel-noacct",
        }
        assert len(rejected) == 9
        assert [a["account_id"] for a in rejected if a["relation_event_id"] == "rel-noacct"] == [
            None
        ]
        for body in rejected:
            assert set(body) >= {"schema", "relation_event_id", "revision", "reason"}
            text = json.dumps(body)
            assert SECRET_SUBJECT not in text
            assert SECRET_ADDRESS not in text
        assert [a for a in announced if a["routing_key"] != "event.rejected"] == []

        after = await metrics(stack)
        counted = "m365sync_outbound_rejected_total"
        for kind in ("invalid", "size", "account"):
            expected = sum(1 for _, k in invalid.values() if k == kind)
            assert (
                sample(after, counted, kind=kind) - sample(before, counted, kind=kind) == expected
            )
        processed = "m365sync_messages_processed_total"
        labels = {"queue": "m365sync.outbound.intake", "outcome": "dead_letter"}
        assert sample(after, processed, **labels) - sample(before, processed, **labels) == len(
            invalid
        )

        assert await stack.control.events(ann) == []
        for collection in (stack.rt.links.links, stack.rt.links.index, stack.rt.links.parked):
            assert await collection.count_documents({}) == 0
        channel = await stack.rt.connection.channel()
        try:
            queue = await channel.declare_queue(ONERELATION_INBOUND_QUEUE, passive=True)
            assert queue.declaration_result.message_count == 0
        finally:
            await channel.close()

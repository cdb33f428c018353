"""Messages no consumer can read are dead-lettered with a reason on every consumer, while
valid messages around them flow (issue 11 row 3)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from handlers.routing import shard_of
from handlers.timeutil import utcnow
from processor.broker import ORIGIN_QUEUE_HEADER, REASON_HEADER
from processor.messages import lifecycle_message
from processor.topology import (
    DEAD_QUEUE,
    INBOUND_QUEUE,
    LIFECYCLE_QUEUE,
    OUTBOUND_INTAKE_QUEUE,
    OUTBOUND_QUEUE,
)
from tests.conftest import RabbitAdmin
from tests.e2e.harness import Stack, eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-poison"
#: 50 kB of unclosed brackets: json.loads raises RecursionError, not a JSONDecodeError.
NESTED = b"[" * 50_000
#: Over every consumer's size limit, and valid JSON, so only the size can refuse it.
OVERSIZE = b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'


async def _publish_to_queues(stack: Stack, queues: list[str], bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for queue in queues:
            for body in bodies:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        content_type="application/json",
                        message_id=uuid.uuid4().hex,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                )


async def _dead_letters(stack: Stack) -> list[dict[str, Any]]:
    out = []
    channel = await stack.rt.connection.channel()
    try:
        queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(dict(msg.headers or {}))
    finally:
        await channel.close()
    return out


async def test_nested_and_oversize_messages_are_dead_lettered_on_every_consumer(
    tmp_path: Path, amqp_url: str, mongodb_url: str, vhost: str, rabbit_admin: RabbitAdmin
) -> None:
    """A 50 kB nested-JSON message and a 5 MiB message on each consumer's queue (inbound
    shard, outbound intake, outbound shard, lifecycle) are each dead-lettered once with a
    reason naming the problem; none stays unacknowledged; a change made in Outlook, one
    made in 1Relation and a lifecycle message sent after them are all worked on."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound", "subscriptions"),
    ) as stack:
        ann = (await stack.control.users())[0]["id"]
        await stack.connect_account(ACCOUNT, ann)
        shards = stack.settings.shard_count
        queues = [
            INBOUND_QUEUE.format(shard=shard_of(ACCOUNT, shards)),
            OUTBOUND_INTAKE_QUEUE,
            OUTBOUND_QUEUE.format(shard=shard_of(ACCOUNT, shards)),
            LIFECYCLE_QUEUE,
        ]
        await _publish_to_queues(stack, queues, [NESTED, OVERSIZE])

        # Valid work on each path, after the poison.
        await stack.control.create_event(
            ann,
            {
                "subject": "From Outlook",
                "start": {"dateTime": "2030-01-07T09:00:00", "timeZone": "UTC"},
                "end": {"dateTime": "2030-01-07T10:00:00", "timeZone": "UTC"},
            },
        )
        await publish_outbound(
            stack, [message(ACCOUNT, "rel-after-poison", 1, relation_event("From 1Relation"))]
        )
        lifecycle = lifecycle_message(
            account_id=ACCOUNT,
            subscription_hash="no-such-subscription",
            lifecycle_event="missed",
            received_at=utcnow(),
        )
        await _publish_to_queues(stack, [LIFECYCLE_QUEUE], [json.dumps(lifecycle).encode()])

        dead: list[dict[str, Any]] = []

        async def all_dead() -> bool:
            dead.extend(await _dead_letters(stack))
            return len(dead) >= 2 * len(queues)

        try:
            await eventually(all_dead, timeout_s=30)
        finally:
            print(
                f"dead-lettered: {[(d.get(ORIGIN_QUEUE_HEADER), d.get(REASON_HEADER)) for d in dead]}"
            )
        by_queue: dict[str, list[str]] = {}
        for headers in dead:
            by_queue.setdefault(str(headers[ORIGIN_QUEUE_HEADER]), []).append(
                str(headers[REASON_HEADER])
            )
        assert sorted(by_queue) == sorted(queues)
        for queue in queues:
            reasons = sorted(by_queue[queue])
            assert len(reasons) == 2, (queue, reasons)
            assert any("not JSON" in r for r in reasons), (queue, reasons)
            assert any("larger than" in r for r in reasons), (queue, reasons)

        async def outlook_event_announced() -> bool:
            return any(
                a["routing_key"] == "event.upserted" and a.get("origin") == "microsoft"
                for a in await stack.announcements()
            )

        await eventually(outlook_event_announced, timeout_s=20)

        async def relation_event_written() -> bool:
            return any(e["subject"] == "From 1Relation" for e in await stack.control.events(ann))

        await eventually(relation_event_written, timeout_s=20)

        async def nothing_held() -> bool:
            for queue in queues:
                record = await rabbit_admin.queue(vhost, queue)
                if record.get("messages") != 0:
                    return False
            return True

        await eventually(nothing_held, timeout_s=30, interval_s=1.0)

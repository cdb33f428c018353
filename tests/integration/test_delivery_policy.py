"""The one delivery policy, against the real RabbitMQ: ack, delay, requeue, dead-letter."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import aio_pika
import pytest

from processor.broker import REASON_HEADER, RETRIES_HEADER, ConfirmPublisher, Outcome
from processor.consumer import Delivery, ShardConsumer
from processor.metrics import Metrics
from processor.topology import (
    DEAD_QUEUE,
    INBOUND_EXCHANGE,
    TopologyConfig,
    declare_topology,
    shard_queue_names,
)

pytestmark = pytest.mark.integration


class ScriptedHandler:
    """Decides each message's outcome from its body and records every delivery."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self.seen[delivery.body["name"]].append((time.monotonic(), dict(delivery.message.headers or {})))
            mode = delivery.body["mode"]
            if mode == "ack":
                delivery.outcome = Outcome.ack()
            elif mode == "retry":
                first = len(self.seen[delivery.body["name"]]) == 1
                delivery.outcome = Outcome.retry(0.6) if first else Outcome.ack()
            elif mode == "requeue":
                delivery.outcome = Outcome.requeue("database unreachable")
            elif mode == "dead":
                delivery.outcome = Outcome.dead_letter("event.start is not a date: 'tomorrowish'")
            elif mode == "crash":
                raise RuntimeError("handler bug")


def _validate(body: dict[str, Any]) -> str | None:
    return None if isinstance(body.get("account_id"), str) else "account_id missing"


async def test_each_outcome_does_what_the_policy_says(amqp_url: str) -> None:
    """Ack removes; retry comes back after the delay without using the delivery limit;
    requeue redelivers until the limit then dead-letters; dead-letter carries the reason."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        setup = await connection.channel()
        await declare_topology(setup, TopologyConfig(shard_count=1, delivery_limit=2))
        publisher = await ConfirmPublisher.open(connection)
        handler = ScriptedHandler()
        consumer = ShardConsumer(
            connection=connection,
            queue_names=shard_queue_names("inbound", 1),
            handler=handler,
            publisher=publisher,
            retry_target="inbound",
            metrics=Metrics(),
            validate=_validate,
            prefetch=10,
        )
        await consumer.start()
        exchange = await setup.get_exchange(INBOUND_EXCHANGE, ensure=False)
        sent = time.monotonic()
        for name, mode in [("a", "ack"), ("r", "retry"), ("q", "requeue"), ("d", "dead"), ("c", "crash")]:
            body = {"account_id": f"acc-{name}", "name": name, "mode": mode}
            await exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), message_id=f"m-{name}",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="shard.0",
            )
        await exchange.publish(aio_pika.Message(b"{not json", message_id="m-bad"), routing_key="shard.0")

        async def dead_letters() -> dict[str, aio_pika.abc.AbstractIncomingMessage]:
            queue = await setup.get_queue(DEAD_QUEUE, ensure=False)
            found = {}
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                found[str(message.message_id)] = message
            return found

        collected: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            {"m-q", "m-d", "m-c", "m-bad"} <= set(collected) and len(handler.seen["r"]) >= 2
        ):
            collected.update(await dead_letters())
            await asyncio.sleep(0.1)
        await consumer.stop(grace_s=2)

        assert len(handler.seen["a"]) == 1
        # Retried once, after the asked delay, with the retry count in a header.
        assert len(handler.seen["r"]) == 2, [(round(t - handler.seen["r"][0][0], 2), {k: v for k, v in h.items() if k != "x-death"}) for t, h in handler.seen["r"]]
        assert handler.seen["r"][1][0] - handler.seen["r"][0][0] >= 0.55
        assert handler.seen["r"][1][1].get(RETRIES_HEADER) == 1
        # Requeued: delivered 1 + delivery_limit times, then dead-lettered by the broker.
        assert len(handler.seen["q"]) == 3
        assert collected["m-q"].headers["x-death"][0]["reason"] == "delivery_limit"  # type: ignore[index]
        # Dead-lettered at once, with the reason a person can read.
        assert len(handler.seen["d"]) == 1
        assert collected["m-d"].headers[REASON_HEADER] == "event.start is not a date: 'tomorrowish'"
        assert json.loads(collected["m-d"].body)["name"] == "d"
        # A handler bug is not a silent loss: requeued until the limit, then dead-lettered.
        assert "m-c" in collected
        assert collected["m-bad"].headers[REASON_HEADER] == "body is not JSON"
        assert "m-a" not in collected
        assert "m-r" not in collected
        assert time.monotonic() - sent < 20

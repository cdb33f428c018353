"""The one delivery policy, against the real RabbitMQ: ack, delay, requeue, dead-letter."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import aio_pika
import pytest

from handlers.outcome import Outcome
from processor.broker import (
    MAX_PARKED_S,
    PARK_JITTER_FRACTION,
    PARK_JITTER_MAX_S,
    PARKED_SINCE_HEADER,
    REASON_HEADER,
    RETRIES_HEADER,
    ConfirmPublisher,
    park_delay_s,
)
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
            self.seen[delivery.body["name"]].append(
                (time.monotonic(), dict(delivery.message.headers or {}))
            )
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
        for name, mode in [
            ("a", "ack"),
            ("r", "retry"),
            ("q", "requeue"),
            ("d", "dead"),
            ("c", "crash"),
        ]:
            body = {"account_id": f"acc-{name}", "name": name, "mode": mode}
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    message_id=f"m-{name}",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="shard.0",
            )
        await exchange.publish(
            aio_pika.Message(b"{not json", message_id="m-bad"), routing_key="shard.0"
        )

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
        assert len(handler.seen["r"]) == 2, [
            (round(t - handler.seen["r"][0][0], 2), {k: v for k, v in h.items() if k != "x-death"})
            for t, h in handler.seen["r"]
        ]
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


class ParkingHandler:
    """Parks each message once for the wait its body names, then acks; records the order."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = defaultdict(list)
        self.order: list[str] = []

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            name = delivery.body["name"]
            self.seen[name].append(time.monotonic())
            if len(self.seen[name]) == 1:
                delivery.outcome = Outcome.retry(float(delivery.body["wait_s"]))
            else:
                self.order.append(name)
                delivery.outcome = Outcome.ack()


async def test_a_short_throttle_wait_is_not_held_behind_a_longer_one(amqp_url: str) -> None:
    """A message parked for 1 s after one parked for 4 s comes back first and no earlier than
    asked: retry buckets are narrow enough that a queue's head does not hold it up; a message
    parked for longer than the cap since its first parking is dead-lettered with a reason."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        setup = await connection.channel()
        await declare_topology(setup, TopologyConfig(shard_count=1, delivery_limit=2))
        publisher = await ConfirmPublisher.open(connection)
        handler = ParkingHandler()
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
        for name, wait_s, headers in [
            ("long", 4.0, {}),
            ("short", 1.0, {}),
            ("stale", 1.0, {PARKED_SINCE_HEADER: int((time.time() - MAX_PARKED_S - 60) * 1000)}),
        ]:
            body = {"account_id": f"acc-{name}", "name": name, "wait_s": wait_s}
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    message_id=f"m-{name}",
                    headers=headers,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="shard.0",
            )
            await asyncio.sleep(0.2)  # parked in this order
        dead: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(handler.order) < 2 or "m-stale" not in dead):
            queue = await setup.get_queue(DEAD_QUEUE, ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                dead[str(message.message_id)] = message
            await asyncio.sleep(0.1)
        await consumer.stop(grace_s=2)
        assert handler.order == ["short", "long"]
        for name, wait_s in (("short", 1.0), ("long", 4.0)):
            assert handler.seen[name][1] - handler.seen[name][0] >= wait_s - 0.05
        assert "still throttled" in str(dead["m-stale"].headers[REASON_HEADER])


def test_park_delay_is_what_was_asked_plus_a_bounded_jitter() -> None:
    """A parking waits at least what Graph asked and at most a fifth more (2 s at most)."""
    rng = random.Random(3)
    for asked in (0.0, 0.5, 1.5, 4.0, 30.0, 700.0):
        delays = [park_delay_s(asked, rng=rng) for _ in range(200)]
        assert min(delays) >= asked
        assert max(delays) <= asked + min(PARK_JITTER_MAX_S, 0.05 + PARK_JITTER_FRACTION * asked)
        assert len(set(delays)) > 100  # spread, not one value

"""Group commit against the real RabbitMQ: concurrent POSTs share one message per shard,
and the worker handles a multi-item message item by item."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pymongo.asynchronous.database import AsyncDatabase

from handlers.inbound import validate_inbound
from handlers.messages import INBOUND_SCHEMA
from handlers.outcome import Outcome
from handlers.routing import shard_of
from processor import broker as broker_mod
from processor.broker import REASON_HEADER, ConfirmPublisher
from processor.consumer import Delivery, ShardConsumer
from processor.messages import changes_message, split_changes
from processor.metrics import Metrics
from processor.settings import Settings
from processor.topology import (
    DEAD_QUEUE,
    INBOUND_EXCHANGE,
    TopologyConfig,
    declare_topology,
    shard_queue_names,
)
from processor.web import build_app
from tests.integration.support import make_store, notification, seed_account

pytestmark = pytest.mark.integration


async def _ready() -> dict[str, bool]:
    return {"broker": True}


async def _drain_queue(amqp_url: str, name: str, *, want: int) -> list[dict[str, Any]]:
    """Consume until ``want`` messages arrived (single active consumer refuses basic.get)."""
    bodies: list[dict[str, Any]] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        queue = await (await connection.channel()).get_queue(name, ensure=False)
        async with asyncio.timeout(10), queue.iterator(no_ack=True) as messages:
            async for message in messages:
                bodies.append(json.loads(message.body))
                if len(bodies) == want:
                    break
    return bodies


async def test_concurrent_posts_share_one_confirmed_message_per_shard(
    amqp_url: str, mongo_db: AsyncDatabase[dict[str, object]]
) -> None:
    """Eight concurrent one-item POSTs become one message in the shard queue carrying all
    eight items, and every POST is answered 202 once it is confirmed."""
    store, _ = make_store(mongo_db)
    await seed_account(store)
    setup = await aio_pika.connect(amqp_url)
    async with setup:
        await declare_topology(await setup.channel(), TopologyConfig(shard_count=2))
    connection = await broker_mod.connect(amqp_url, name="t")
    publisher = await ConfirmPublisher.open(connection)
    # A long window: the group is published when its eighth item arrives, not by the clock.
    settings = Settings(shard_count=2, receiver_group_window_ms=5000, receiver_group_max_items=8)
    app = build_app(
        settings=settings, lookup=store.subscriptions, publisher=publisher, hasher=store.hasher,
        ciphers=store.keys, readiness=_ready, metrics=Metrics(),
    )  # fmt: skip
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = str(server.make_url("/graph/notifications"))

            async def post(n: int) -> int:
                body = {"value": [notification(f"AAMk-{n}=")]}
                async with http.post(url, json=body) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(post(n) for n in range(8)))
        assert statuses == [202] * 8
        queue_name = shard_queue_names("inbound", 2)[shard_of("acc-1", 2)]
        [body] = await _drain_queue(amqp_url, queue_name, want=1)
        assert body["schema"] == INBOUND_SCHEMA
        assert body["kind"] == "changes"
        assert len(body["items"]) == 8
        assert {item["kind"] for item in body["items"]} == {"change"}
        assert len({item["event_hash"] for item in body["items"]}) == 8
    finally:
        await server.close()
        await publisher.close()
        await connection.close()


async def test_every_post_of_a_refused_flush_gets_503(
    amqp_url: str, mongo_db: AsyncDatabase[dict[str, object]]
) -> None:
    """When the broker cannot route a group's message (its shard queue is missing), every
    POST whose items were in it is answered 503, none 202."""
    store, _ = make_store(mongo_db)
    await seed_account(store)
    shard_count = 64
    assert shard_of("acc-1", shard_count) != 0, "the account must map to an unbound shard"
    setup = await aio_pika.connect(amqp_url)
    async with setup:
        # Only shard.0 is bound: the account's shard routes nowhere, and mandatory
        # publishes come back as returns (a refusal by the broker).
        await declare_topology(await setup.channel(), TopologyConfig(shard_count=1))
    connection = await broker_mod.connect(amqp_url, name="t")
    publisher = await ConfirmPublisher.open(connection)
    settings = Settings(
        shard_count=shard_count,
        publish_timeout_s=2.0,
        receiver_group_window_ms=5000,
        receiver_group_max_items=4,
    )
    app = build_app(
        settings=settings, lookup=store.subscriptions, publisher=publisher, hasher=store.hasher,
        ciphers=store.keys, readiness=_ready, metrics=Metrics(),
    )  # fmt: skip
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = str(server.make_url("/graph/notifications"))

            async def post(n: int) -> tuple[int, str | None]:
                body = {"value": [notification(f"AAMk-{n}=")]}
                async with http.post(url, json=body) as resp:
                    return resp.status, resp.headers.get("Retry-After")

            answers = await asyncio.gather(*(post(n) for n in range(4)))
        assert [status for status, _ in answers] == [503] * 4
        assert all(retry_after for _, retry_after in answers)
    finally:
        await server.close()
        await publisher.close()
        await connection.close()


class ItemHandler:
    """Decides each item's outcome from its ``change_type`` and records every delivery."""

    def __init__(self) -> None:
        self.seen: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            name = delivery.body["event_hash"]
            self.seen[name].append(delivery.body)
            if delivery.body["change_type"] == "deleted":  # stands for "cannot be handled"
                delivery.outcome = Outcome.dead_letter("event_ref does not decrypt")
            elif delivery.body["change_type"] == "created" and len(self.seen[name]) == 1:
                delivery.outcome = Outcome.retry(0.3)  # throttled once
            else:
                delivery.outcome = Outcome.ack()


def _change(account_id: str, name: str, change_type: str = "updated") -> dict[str, Any]:
    return {
        "schema": INBOUND_SCHEMA,
        "kind": "change",
        "account_id": account_id,
        "change_type": change_type,
        "event_hash": name,
        "event_ref": "AAAA",
        "received_at": "2031-05-14T09:00:00Z",
    }


async def test_a_multi_item_message_is_handled_item_by_item(amqp_url: str) -> None:
    """Each item of a group-committed message is handled on its own: the good items are
    acked once, a bad or unhandleable item is dead-lettered alone with its reason, a
    throttled item comes back alone, and a one-item message of the old shape still works."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        setup = await connection.channel()
        await declare_topology(setup, TopologyConfig(shard_count=1))
        publisher = await ConfirmPublisher.open(connection)
        handler = ItemHandler()
        consumer = ShardConsumer(
            connection=connection,
            queue_names=shard_queue_names("inbound", 1),
            handler=handler,
            publisher=publisher,
            retry_target="inbound",
            metrics=Metrics(),
            validate=validate_inbound,
            prefetch=10,
            split=split_changes,
        )
        await consumer.start()
        exchange = await setup.get_exchange(INBOUND_EXCHANGE, ensure=False)
        items: list[Any] = [
            _change("acc-a", "good-a1"),
            _change("acc-b", "good-b1"),
            _change("acc-a", "dead-a"),
            _change("acc-b", "throttled-b", "created"),
            "not an object",
            {**_change("acc-a", "no-ref"), "event_ref": None},
            _change("acc-a", "good-a2"),
        ]
        items[2]["change_type"] = "deleted"
        for message_id, body in (
            ("m-group", changes_message(items)),
            ("m-old", _change("acc-c", "old-single")),
        ):
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    message_id=message_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="shard.0",
            )

        dead: list[aio_pika.abc.AbstractIncomingMessage] = []
        dead_queue = await setup.get_queue(DEAD_QUEUE, ensure=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            len(dead) >= 3 and len(handler.seen["throttled-b"]) >= 2
        ):
            while (message := await dead_queue.get(no_ack=True, fail=False)) is not None:
                dead.append(message)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything still to arrive (it must not)
        while (message := await dead_queue.get(no_ack=True, fail=False)) is not None:
            dead.append(message)
        await consumer.stop(grace_s=2)
        queue = await setup.declare_queue(shard_queue_names("inbound", 1)[0], passive=True)
        left = queue.declaration_result.message_count

    for name in ("good-a1", "good-b1", "good-a2", "dead-a", "old-single"):
        assert len(handler.seen[name]) == 1, name
    assert len(handler.seen["throttled-b"]) == 2
    assert "no-ref" not in handler.seen
    reasons = {
        str(m.headers[REASON_HEADER]): json.loads(m.body) for m in dead
    }  # one dead letter per bad item, carrying that item alone
    assert set(reasons) == {
        "event_ref does not decrypt",
        "item is not an object",
        "change without event_hash/event_ref",
    }
    assert reasons["event_ref does not decrypt"]["event_hash"] == "dead-a"
    assert reasons["change without event_hash/event_ref"]["event_hash"] == "no-ref"
    assert reasons["item is not an object"] == "not an object"
    assert left == 0

"""``m365sync demo`` never touches the broker and database the service is configured with
(issue 11 row 6): real RabbitMQ vhosts and FerretDB databases, private to each test."""

from __future__ import annotations

import json

import aio_pika
import pytest
from pymongo import AsyncMongoClient

from processor.demo import run_demo
from processor.settings import Settings
from processor.topology import (
    ONERELATION_INBOUND_QUEUE,
    OUTBOUND_INTAKE_QUEUE,
    TopologyConfig,
    declare_topology,
)

pytestmark = pytest.mark.e2e

#: What 1Relation and the service left in the configured broker and database.
REAL_ANNOUNCEMENT = {"schema": "m365sync.event.v1", "account_id": "real-account"}
REAL_ORDER = {"schema": "onerelation.event.v1", "account_id": "real-account", "revision": 7}


async def _seed(amqp_url: str, mongodb_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, TopologyConfig(shard_count=Settings().shard_count))
        for queue, body in (
            (ONERELATION_INBOUND_QUEUE, REAL_ANNOUNCEMENT),
            (OUTBOUND_INTAKE_QUEUE, REAL_ORDER),
        ):
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode()), routing_key=queue
            )
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    await client.get_default_database()["accounts"].insert_one({"_id": "real-account"})
    await client.close()


async def _queued(amqp_url: str, queue: str) -> list[object]:
    """The bodies waiting in ``queue`` (read without acknowledging, so they stay)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count or 0
        bodies: list[object] = []
        for _ in range(count):
            message = await declared.get(no_ack=False, fail=False)
            if message is not None:
                bodies.append(json.loads(message.body))
        return bodies


async def _database(mongodb_url: str) -> dict[str, list[dict[str, object]]]:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    db = client.get_default_database()
    try:
        return {
            name: await db[name].find({}).to_list()
            for name in sorted(await db.list_collection_names())
        }
    finally:
        await client.close()


async def test_demo_leaves_the_configured_broker_and_database_alone(
    amqp_url: str, mongodb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With M365SYNC_AMQP_URL and M365SYNC_MONGODB_URL naming the service's broker and
    database, the demo converges on a vhost and database of its own: the announcement
    waiting for 1Relation, 1Relation's order and the service's documents are all still
    there, untouched."""
    await _seed(amqp_url, mongodb_url)
    before = await _database(mongodb_url)
    monkeypatch.setenv("M365SYNC_AMQP_URL", amqp_url)
    monkeypatch.setenv("M365SYNC_MONGODB_URL", mongodb_url)
    monkeypatch.delenv("M365SYNC_HTTP_PORT", raising=False)
    assert await run_demo(changes=4) == 0
    assert await _queued(amqp_url, ONERELATION_INBOUND_QUEUE) == [REAL_ANNOUNCEMENT]
    assert await _queued(amqp_url, OUTBOUND_INTAKE_QUEUE) == [REAL_ORDER]
    assert await _database(mongodb_url) == before


async def test_demo_refuses_without_a_vhost_of_its_own(
    mongodb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the demo cannot make its own vhost (the broker's management API refuses these
    credentials), it exits 2 without touching any broker or database."""
    monkeypatch.setenv("M365SYNC_AMQP_URL", "amqp://nobody:wrong@127.0.0.1:5672/")
    monkeypatch.setenv("M365SYNC_MONGODB_URL", mongodb_url)
    assert await run_demo(changes=1) == 2
    assert await _database(mongodb_url) == {}

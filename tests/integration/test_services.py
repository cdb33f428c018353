"""The real RabbitMQ and FerretDB behave the way later code relies on."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from tests.conftest import RabbitAdmin

pytestmark = pytest.mark.integration


async def test_confirmed_publish_lands_in_a_durable_quorum_queue(
    amqp_url: str, vhost: str, rabbit_admin: RabbitAdmin
) -> None:
    """A persistent message published with confirms is in the quorum queue once the publish returns."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            "t.ex", aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            "t.q", durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 5}
        )
        await queue.bind(exchange, "k")
        for i in range(20):
            await exchange.publish(
                aio_pika.Message(f"m{i}".encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="k",
                mandatory=True,
                timeout=5,
            )
        info = await rabbit_admin.queue(vhost, "t.q")
        assert info["type"] == "quorum"
        assert info["durable"] is True
        received: list[bytes] = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            received.append(message.body)
            await message.ack()
        assert received == [f"m{i}".encode() for i in range(20)]


async def test_unroutable_mandatory_publish_raises(amqp_url: str) -> None:
    """With on_return_raises a mandatory message no queue takes fails instead of 'succeeding'."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange("t.lonely", aio_pika.ExchangeType.DIRECT)
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await exchange.publish(
                aio_pika.Message(b"x"), routing_key="nowhere", mandatory=True, timeout=5
            )


async def test_quorum_queue_dead_letters_after_the_delivery_limit(amqp_url: str) -> None:
    """A message requeued past x-delivery-limit goes to the dead-letter exchange, not away."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        dlx = await channel.declare_exchange("t.dlx", aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await channel.declare_queue(
            "t.dead", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx)
        work = await channel.declare_queue(
            "t.work",
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 2,
                "x-dead-letter-exchange": "t.dlx",
            },
        )
        await channel.default_exchange.publish(aio_pika.Message(b"poison"), routing_key="t.work")
        deliveries = 0
        for _ in range(10):
            message: AbstractIncomingMessage | None = await work.get(no_ack=False, fail=False)
            if message is None:
                break
            deliveries += 1
            await message.nack(requeue=True)
        assert deliveries == 3
        for _ in range(50):
            got = await dead.get(no_ack=True, fail=False)
            if got is not None:
                assert got.body == b"poison"
                assert got.headers["x-death"][0]["reason"] == "delivery_limit"  # type: ignore[index]
                return
            await asyncio.sleep(0.05)
        pytest.fail("the poison message never reached the dead-letter queue")


async def test_version_guarded_upsert_raises_duplicate_key_when_a_newer_version_exists(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """{_id: k, v: {$lt: n}} with upsert inserts, updates older, and raises 11000 over a newer one."""
    coll = mongo_db["guarded"]

    async def put(version: int) -> None:
        await coll.update_one(
            {"_id": "k", "v": {"$lt": version}}, {"$set": {"v": version}}, upsert=True
        )

    await put(5)
    await put(7)
    with pytest.raises(DuplicateKeyError):
        await put(6)
    with pytest.raises(DuplicateKeyError):
        await put(7)
    assert await coll.find_one({"_id": "k"}) == {"_id": "k", "v": 7}


async def test_racing_inserts_on_a_unique_key_have_exactly_one_winner(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Concurrent inserts of one unique key: exactly one succeeds, the rest get 11000 (locks rely on it)."""
    coll = mongo_db["leases"]
    await coll.create_index("name", unique=True)

    async def claim(owner: int) -> bool:
        try:
            await coll.insert_one({"name": "lease-1", "owner": owner})
        except DuplicateKeyError:
            return False
        return True

    for round_ in range(5):
        results = await asyncio.gather(*(claim(o) for o in range(12)))
        assert results.count(True) == 1, f"round {round_}: {results}"
        assert await coll.count_documents({"name": "lease-1"}) == 1
        await coll.delete_many({})


async def test_updates_are_not_atomic_against_concurrent_writers(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Pins docs/ferretdb.md §3.3: concurrent $inc on one document may lose updates here.

    The service never relies on update atomicity; this test documents the reason and
    tolerates a server (real MongoDB) where no update is lost.
    """
    coll = mongo_db["counter"]
    await coll.insert_one({"_id": "c", "n": 0})
    await asyncio.gather(*(coll.update_one({"_id": "c"}, {"$inc": {"n": 1}}) for _ in range(50)))
    doc = await coll.find_one({"_id": "c"})
    assert doc is not None
    assert 1 <= int(doc["n"]) <= 50  # type: ignore[call-overload]


async def test_racing_deletes_by_id_have_exactly_one_deleter(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Concurrent ``delete_one({_id})`` of one document: exactly one reports a deletion.

    The connect flow's state is taken once on this (whoever deletes it owns it). A filter
    with more than ``_id`` is not such a guard here: FerretDB reads the matches, then
    deletes by ``_id`` (see the lease takeover in ``processor/store.py``).
    """
    coll = mongo_db["take_once"]
    for round_ in range(10):
        await coll.insert_one({"_id": "state", "data": "x" * 2000})
        results = await asyncio.gather(*(coll.delete_one({"_id": "state"}) for _ in range(8)))
        counts = [r.deleted_count for r in results]
        assert sum(counts) == 1, f"round {round_}: {counts}"


async def test_a_connection_given_several_nodes_skips_the_ones_that_do_not_answer(
    amqp_url: str,
) -> None:
    """The broker connection tries each listed node in turn: a refused first node is skipped."""
    from processor.broker import ClusterConnection, connect  # noqa: PLC0415
    from tests.support.nodes import free_port  # noqa: PLC0415

    dead = amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{free_port()}")
    assert dead != amqp_url
    connection = await connect(f"{dead},{amqp_url}", name="test:cluster", reconnect_interval_s=0.2)
    async with connection:
        assert isinstance(connection, ClusterConnection)
        assert connection.node_url.port == 5672
        channel = await connection.channel()
        queue = await channel.declare_queue("t.multi", exclusive=True)
        assert queue.name == "t.multi"

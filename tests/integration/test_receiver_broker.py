"""The receiver against the real RabbitMQ: 202 only after confirms, 503 while it is away."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pymongo.asynchronous.database import AsyncDatabase

from handlers.routing import shard_routing_key
from processor import broker as broker_mod
from processor.broker import ConfirmPublisher
from processor.metrics import Metrics
from processor.settings import Settings
from processor.topology import TopologyConfig, declare_topology
from processor.web import build_app
from tests.integration.support import make_store, notification, seed_account
from tests.support.tcpproxy import TCPProxy

pytestmark = pytest.mark.integration


def via_proxy(url: str, proxy: TCPProxy) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TCPProxy]:
    parts = urlsplit(amqp_url)
    async with TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as p:
        yield p


async def test_202_after_confirms_and_503_while_the_broker_is_unreachable(
    amqp_url: str, proxy: TCPProxy, mongo_db: AsyncDatabase[dict[str, object]]
) -> None:
    """Accepted notifications are in the shard queue when 202 arrives; with the broker cut
    off the receiver answers 503 within its publish timeout; after it returns, 202 again."""
    settings = Settings(shard_count=2, publish_timeout_s=1.0)
    store, _ = make_store(mongo_db)
    await seed_account(store)
    setup = await aio_pika.connect(amqp_url)
    async with setup:
        await declare_topology(await setup.channel(), TopologyConfig(shard_count=2))
    connection = await broker_mod.connect(
        via_proxy(amqp_url, proxy), name="t", reconnect_interval_s=0.5
    )
    publisher = await ConfirmPublisher.open(connection)

    async def ready() -> dict[str, bool]:
        return {"broker": True}

    app = build_app(
        settings=settings,
        lookup=store.subscriptions,
        publisher=publisher,
        hasher=store.hasher,
        ciphers=store.keys,
        readiness=ready,
        metrics=Metrics(),
    )
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = str(server.make_url("/graph/notifications"))
            body = {"value": [notification("AAMk-one="), notification("AAMk-two=")]}
            async with http.post(url, json=body) as resp:
                assert resp.status == 202
            # The 202 came after the confirms: both messages are already in the shard queue.
            check = await aio_pika.connect(amqp_url)
            async with check:
                channel = await check.channel()
                queue_name = "m365sync.inbound." + shard_routing_key("acc-1", 2).split(".")[1]
                queue = await channel.get_queue(queue_name, ensure=False)
                got: list[dict[str, object]] = []
                # Single active consumer queues refuse basic.get: consume instead.
                async with queue.iterator(no_ack=True) as messages:
                    async for message in messages:
                        body = json.loads(message.body)
                        got += body["items"] if body["kind"] == "changes" else [body]
                        if len(got) >= 2:
                            break
                assert len(got) == 2

            proxy.refuse()
            started = time.monotonic()
            async with http.post(url, json={"value": [notification("AAMk-three=")]}) as resp:
                assert resp.status == 503
                assert resp.headers.get("Retry-After")
            assert time.monotonic() - started < settings.publish_timeout_s + 1.5

            proxy.restore()
            deadline = time.monotonic() + 20
            while True:
                async with http.post(url, json={"value": [notification("AAMk-three=")]}) as resp:
                    if resp.status == 202:
                        break
                assert time.monotonic() < deadline, "the receiver never recovered"
                await asyncio.sleep(0.3)
    finally:
        await server.close()
        await publisher.close()
        await connection.close()

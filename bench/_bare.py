"""``python -m bench._bare PORT [AMQP_URL QUEUE]``: the receiver benchmark's references.

The same aiohttp server setup as the real receiver (``AppRunner``, no access log, same
route). Without ``AMQP_URL`` the handler reads the body and answers 202 (HTTP alone). With
it, the handler also publishes the body as one confirmed, persistent, mandatory message into
``QUEUE`` (a quorum queue the caller declared), exactly as the raw-publish baseline does, and
answers 202 after the confirm: HTTP plus one confirmed publish per POST in one Python
process, with no checks, no encryption and no group commit.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
from aiohttp import web


async def _accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202)


def _publishing(
    channel: aio_pika.abc.AbstractChannel, queue: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def accept(request: web.Request) -> web.Response:
        message = aio_pika.Message(
            await request.read(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
        )
        await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
        return web.Response(status=202)

    return accept


async def _ready(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _serve(port: int, amqp_url: str | None, queue: str | None) -> None:
    connection = None
    handler = _accept
    if amqp_url is not None and queue is not None:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        handler = _publishing(channel, queue)
    app = web.Application()
    app.router.add_post("/graph/notifications", handler)
    app.router.add_get("/readyz", _ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if connection is not None:
            await connection.close()


if __name__ == "__main__":
    _, port, *publish = sys.argv
    asyncio.run(_serve(int(port), *(publish if len(publish) == 2 else (None, None))))

"""``python -m bench._bare PORT``: the receiver benchmark's baseline, 202 without any work.

The same aiohttp server setup as the real receiver (``AppRunner``, no access log, same
route); the handler reads the body and answers 202.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web


async def _accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202)


async def _ready(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/graph/notifications", _accept)
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


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))

"""The read-only operator page: the facts of ``m365sync status`` in a browser.

``GET /operator`` serves a page with no facts in it, only a form that asks for the API
token. The page's script keeps the token in a variable (never in storage, cookies or the
URL: it is gone when the tab closes or reloads) and sends it as ``Authorization: Bearer``
to ``GET /api/v1/operator/status``, which sits behind the same bearer check as the rest of
``/api/v1``. So the facts are not reachable without the token, and no token travels in a
URL, a referrer or a log line. The page is locked down: a Content-Security-Policy allowing
only its own script and style (no inline code), no framing, no referrer, no caching.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

ASSETS: Final = Path(__file__).with_name("operator_assets")
STATUS_PATH: Final = "/api/v1/operator/status"
#: Several open pages share one collection of the facts per this many seconds.
CACHE_S: Final = 2.0

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Collect = Callable[[], Awaitable[dict[str, Any]]]
Guard = Callable[
    [Callable[[web.Request], Awaitable[web.StreamResponse]]],
    Callable[[web.Request], Awaitable[web.StreamResponse]],
]


class _Cached:
    def __init__(self, collect: Collect, ttl_s: float) -> None:
        self._collect = collect
        self._ttl_s = ttl_s
        self._at = -1e9
        self._facts: dict[str, Any] | None = None

    async def get(self) -> dict[str, Any]:
        if self._facts is None or time.monotonic() - self._at > self._ttl_s:
            self._facts = await self._collect()
            self._at = time.monotonic()
        return self._facts


def _asset(name: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    body = (ASSETS / name).read_bytes()

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, headers=SECURITY_HEADERS)

    return serve


def status_handler(collect: Collect) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /api/v1/operator/status``: the facts as JSON (to be put behind the guard)."""
    cached = _Cached(collect, CACHE_S)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(await cached.get(), headers={"Cache-Control": "no-store"})

    return status


def add_operator_page(app: web.Application) -> None:
    """Register ``/operator`` and its script and style (no facts: those need the token)."""
    app.router.add_get("/operator", _asset("operator.html", "text/html"), allow_head=False)
    app.router.add_get(
        "/operator/operator.js", _asset("operator.js", "text/javascript"), allow_head=False
    )
    app.router.add_get(
        "/operator/operator.css", _asset("operator.css", "text/css"), allow_head=False
    )

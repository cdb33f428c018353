"""What Graph (or whoever answers in its place) says is not trusted: links and error text."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from graphsim.client import SimControl
from handlers.errors import PermanentError
from processor.graph import GraphClient
from tests.integration.test_graph_client import (  # noqa: F401  pytest fixtures
    ACCOUNT,
    WINDOW_END,
    WINDOW_START,
    ann,
    collect,
    control,
    event_body,
    graph_for,
    session,
    sim,
    tokens,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def attacker() -> AsyncIterator[tuple[str, list[str]]]:
    """A server outside the Graph URL that records the Authorization headers it is sent."""
    seen: list[str] = []

    async def any_request(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"value": [], "@odata.deltaLink": str(request.url)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1.0", seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("pages", [3, 1], ids=["nextLink", "deltaLink"])
async def test_a_foreign_next_or_delta_link_is_refused_and_gets_no_token(
    graph_for: Callable[..., GraphClient],  # noqa: F811
    control: SimControl,  # noqa: F811
    ann: str,  # noqa: F811
    attacker: tuple[str, list[str]],
    pages: int,
) -> None:
    """A delta page whose nextLink or deltaLink lies outside the configured Graph URL is
    refused with a clear error; the foreign server never sees a request or a token."""
    foreign_origin, seen = attacker
    for day in range(1, 4):
        await control.create_event(ann, event_body(f"Planning {day}", day=day), immutable=True)
    await control.set_faults(foreign_link_origin=foreign_origin)
    graph = graph_for()
    with pytest.raises(PermanentError, match="outside the configured Graph URL"):
        await collect(
            graph.calendar_view_delta(
                ACCOUNT,
                ann,
                delta_link=None,
                start=WINDOW_START,
                end=WINDOW_END,
                page_size=1 if pages > 1 else 100,
            )
        )
    print(f"requests to the foreign origin: {len(seen)}")
    assert seen == []


async def test_graphs_error_message_is_never_copied_out(
    graph_for: Callable[..., GraphClient],  # noqa: F811
    control: SimControl,  # noqa: F811
    ann: str,  # noqa: F811
) -> None:
    """A Graph error's free-text message (which may quote the request) appears neither in
    the raised error (which becomes dead-letter headers and event.rejected) nor in logs:
    status and code only."""
    created = await control.create_event(ann, event_body("Review"), immutable=True)
    marker = "zzInjectedText"
    graph = graph_for()
    with capture_logs() as logs, pytest.raises(PermanentError) as raised:
        await graph.get_event(ACCOUNT, ann, created["id"], select=[marker])
    print(f"error: {raised.value}")
    assert "400" in str(raised.value)
    assert "RequestBroken" in str(raised.value)
    assert marker not in str(raised.value)
    assert marker not in repr(logs)

"""GraphClient with MSAL-issued tokens against the Graph simulator over verified TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from graphsim.client import SimControl
from graphsim.server import SimConfig, Simulator
from handlers.errors import DeltaResetRequired, TransientError
from handlers.records import DeltaPage
from processor.graph import GraphClient, build_ssl_context, create_http_session
from processor.tokens import MsalApps, MsalTokenProvider, initiate_flow_async, redeem_auth_code

ACCOUNT = "acc-ann"
REDIRECT = "http://localhost:8765/auth/callback"
WINDOW_START = datetime(2026, 12, 1, tzinfo=UTC)
WINDOW_END = datetime(2027, 1, 1, tzinfo=UTC)


class MemoryStore:
    """An in-memory TokenCacheStore with compare-and-swap."""

    def __init__(self) -> None:
        self.caches: dict[str, tuple[str, int]] = {}

    async def load(self, account_id: str) -> tuple[str, int] | None:
        return self.caches.get(account_id)

    async def save(self, account_id: str, serialized: str, expected_version: int) -> bool:
        current = self.caches.get(account_id)
        if current is None or current[1] != expected_version:
            return False
        self.caches[account_id] = (serialized, expected_version + 1)
        return True


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    simulator = Simulator(SimConfig(state_dir=tmp_path / "sim", port=0))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


@pytest.fixture
async def control(sim: Simulator) -> AsyncIterator[SimControl]:
    async with SimControl(sim.base_url, sim.ca_file) as ctl:
        yield ctl


@pytest.fixture
def ann(sim: Simulator) -> str:
    user = sim.store.find_user("ann@contoso.example")
    assert user is not None
    return user.id


@pytest.fixture
async def session(sim: Simulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with create_http_session(ca_bundle=str(sim.ca_file), timeout_s=10) as http:
        yield http


@pytest.fixture
async def tokens(
    sim: Simulator, session: aiohttp.ClientSession
) -> AsyncIterator[MsalTokenProvider]:
    """Ann connected through the real MSAL auth-code flow; her cache in an in-memory store."""
    apps = MsalApps(
        client_id=sim.client_id,
        client_secret=sim.client_secret,
        authority_host=sim.authority_host,
        ca_bundle=str(sim.ca_file),
    )
    flow = await initiate_flow_async(apps, redirect_uri=REDIRECT, response_mode="query")
    async with session.get(flow["auth_uri"], allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    auth_response = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    result, serialized = await redeem_auth_code(apps, flow, auth_response)
    assert "access_token" in result, result
    store = MemoryStore()
    store.caches[ACCOUNT] = (serialized, 1)
    yield MsalTokenProvider(apps=apps, store=store)
    apps.close()


@pytest.fixture
def graph_for(
    sim: Simulator, session: aiohttp.ClientSession, tokens: MsalTokenProvider
) -> Callable[..., GraphClient]:
    def build(**kw: Any) -> GraphClient:
        return GraphClient(session=session, graph_url=sim.graph_url, tokens=tokens, **kw)

    return build


def event_body(subject: str, day: int = 3) -> dict[str, Any]:
    return {
        "subject": subject,
        "start": {"dateTime": f"2026-12-{day:02d}T09:00:00", "timeZone": "UTC"},
        "end": {"dateTime": f"2026-12-{day:02d}T10:00:00", "timeZone": "UTC"},
    }


async def collect(pages: AsyncIterator[DeltaPage]) -> list[DeltaPage]:
    return [page async for page in pages]


async def test_fetches_an_event_created_in_outlook(
    graph_for: Callable[..., GraphClient], control: SimControl, ann: str
) -> None:
    """An event created through the simulator's control API is fetched by its immutable id,
    and a deleted one reads as None."""
    created = await control.create_event(ann, event_body("Quarterly review"), immutable=True)
    graph = graph_for()
    event = await graph.get_event(
        ACCOUNT, ann, created["id"], select=["subject", "start", "end", "changeKey"]
    )
    assert event is not None
    assert event["id"] == created["id"]
    assert event["subject"] == "Quarterly review"
    assert event["start"]["timeZone"] == "UTC"
    await control.delete_event(ann, created["id"])
    assert await graph.get_event(ACCOUNT, ann, created["id"], select=["subject"]) is None


async def test_create_update_delete_round_trip(
    graph_for: Callable[..., GraphClient], control: SimControl, ann: str
) -> None:
    """create_event, update_event and delete_event work, and report a gone event as None/False."""
    graph = graph_for()
    created = await graph.create_event(ACCOUNT, ann, event_body("Draft"), transaction_id="tx-42")
    assert created["subject"] == "Draft"
    updated = await graph.update_event(ACCOUNT, ann, created["id"], {"subject": "Final"})
    assert updated is not None
    assert updated["subject"] == "Final"
    assert [e["subject"] for e in await control.events(ann, immutable=True)] == ["Final"]
    assert await graph.delete_event(ACCOUNT, ann, created["id"]) is True
    assert await graph.delete_event(ACCOUNT, ann, created["id"]) is False
    assert await graph.update_event(ACCOUNT, ann, created["id"], {"subject": "x"}) is None


async def test_delta_pages_250_events_in_pages_of_50(
    graph_for: Callable[..., GraphClient], control: SimControl, ann: str
) -> None:
    """A full delta round over 250 events arrives in 5 pages of 50; the next round has only news."""
    await control.bulk_create_events(
        ann, count=250, start="2026-12-02T08:00:00Z", spacing_minutes=30
    )
    graph = graph_for()
    pages = await collect(
        graph.calendar_view_delta(
            ACCOUNT, ann, delta_link=None, start=WINDOW_START, end=WINDOW_END, page_size=50
        )
    )
    assert [len(p.items) for p in pages] == [50, 50, 50, 50, 50]
    assert all(p.delta_link is None for p in pages[:-1])
    assert pages[-1].delta_link is not None
    ids = {item["id"] for p in pages for item in p.items}
    assert len(ids) == 250

    quiet = await collect(
        graph.calendar_view_delta(
            ACCOUNT, ann, delta_link=pages[-1].delta_link, start=WINDOW_START, end=WINDOW_END
        )
    )
    assert sum(len(p.items) + len(p.removed_ids) for p in quiet) == 0
    new = await control.create_event(ann, event_body("Late addition", day=20), immutable=True)
    gone = sorted(ids)[0]
    await control.delete_event(ann, gone)
    news = await collect(
        graph.calendar_view_delta(
            ACCOUNT, ann, delta_link=quiet[-1].delta_link, start=WINDOW_START, end=WINDOW_END
        )
    )
    assert [i["id"] for p in news for i in p.items] == [new["id"]]
    assert [r for p in news for r in p.removed_ids] == [gone]


@pytest.mark.parametrize("mode", ["gone", "syncStateNotFound"])
async def test_expired_delta_link_requires_a_reset(
    graph_for: Callable[..., GraphClient], control: SimControl, ann: str, mode: str
) -> None:
    """A delta link the server no longer knows raises DeltaResetRequired (410 or syncStateNotFound)."""
    graph = graph_for()
    pages = await collect(
        graph.calendar_view_delta(ACCOUNT, ann, delta_link=None, start=WINDOW_START, end=WINDOW_END)
    )
    await control.expire_delta_tokens(ann, mode=mode)
    with pytest.raises(DeltaResetRequired):
        await collect(
            graph.calendar_view_delta(
                ACCOUNT, ann, delta_link=pages[-1].delta_link, start=WINDOW_START, end=WINDOW_END
            )
        )


async def test_more_than_four_concurrent_requests_are_throttled_and_retried_inline(
    graph_for: Callable[..., GraphClient], control: SimControl, ann: str
) -> None:
    """With 8 allowed in flight the simulator's limit of 4 answers 429 and the client retries
    inline; with 3 in flight nothing is throttled."""
    created = await control.create_event(ann, event_body("Busy"), immutable=True)
    await control.set_faults(latency_ms=80, throttle_retry_after="0.2")

    eager = graph_for(max_concurrency_per_mailbox=8, max_attempts=8)
    results = await asyncio.gather(
        *(eager.get_event(ACCOUNT, ann, created["id"], select=["subject"]) for _ in range(16))
    )
    assert all(r is not None and r["subject"] == "Busy" for r in results)
    assert eager.stats["throttled"] > 0
    assert eager.stats["retries"] > 0
    assert (await control.counters())["throttled_429"] == eager.stats["throttled"]

    await control.reset_counters()
    polite = graph_for(max_concurrency_per_mailbox=3)
    results = await asyncio.gather(
        *(polite.get_event(ACCOUNT, ann, created["id"], select=["subject"]) for _ in range(16))
    )
    assert all(r is not None for r in results)
    assert polite.stats["throttled"] == 0
    assert (await control.counters())["throttled_429"] == 0


@pytest.fixture
async def receiver() -> AsyncIterator[str]:
    """A loopback webhook endpoint that answers validation handshakes."""

    async def handle(request: web.Request) -> web.Response:
        token = request.query.get("validationToken")
        if token is not None:
            return web.Response(text=token, content_type="text/plain")
        return web.Response(status=202)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_subscription_create_renew_reauthorize_list_delete(
    sim: Simulator, graph_for: Callable[..., GraphClient], receiver: str
) -> None:
    """Subscriptions are created, listed, renewed, reauthorized and deleted; gone ones give None/False."""
    graph = graph_for()
    expiry = sim.clock.now() + timedelta(days=1)
    sub = await graph.create_subscription(
        ACCOUNT,
        {
            "changeType": "created,updated,deleted",
            "notificationUrl": f"{receiver}/notify",
            "lifecycleNotificationUrl": f"{receiver}/lifecycle",
            "resource": "me/events",
            "expirationDateTime": expiry.isoformat(),
            "clientState": "state-1",
        },
    )
    assert [s["id"] for s in await graph.list_subscriptions(ACCOUNT)] == [sub["id"]]
    renewed = await graph.renew_subscription(ACCOUNT, sub["id"], expiry + timedelta(days=1))
    assert renewed is not None
    assert renewed["id"] == sub["id"]
    assert await graph.reauthorize_subscription(ACCOUNT, sub["id"]) is True
    assert await graph.delete_subscription(ACCOUNT, sub["id"]) is True
    assert await graph.delete_subscription(ACCOUNT, sub["id"]) is False
    assert await graph.renew_subscription(ACCOUNT, sub["id"], expiry) is None
    assert await graph.reauthorize_subscription(ACCOUNT, sub["id"]) is False
    assert await graph.list_subscriptions(ACCOUNT) == []


async def test_me_returns_the_signed_in_user(
    graph_for: Callable[..., GraphClient], ann: str
) -> None:
    """GET /me returns the signed-in user's profile."""
    me = await graph_for(max_attempts=1).me(ACCOUNT)
    assert me["id"] == ann


async def test_tls_needs_the_extra_ca(
    sim: Simulator, tokens: MsalTokenProvider, control: SimControl, ann: str
) -> None:
    """Without the simulator's CA the certificate check fails (TransientError); with it, it passes."""
    async with create_http_session(ca_bundle=None, timeout_s=5) as bare:
        graph = GraphClient(session=bare, graph_url=sim.graph_url, tokens=tokens, max_attempts=1)
        with pytest.raises(TransientError):
            await graph.get_event(ACCOUNT, ann, "whatever", select=[])
    context = build_ssl_context(str(sim.ca_file))
    assert context.verify_mode.name == "CERT_REQUIRED"
    assert context.check_hostname

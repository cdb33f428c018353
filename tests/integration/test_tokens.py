"""MsalTokenProvider and the auth-code helpers with real MSAL against the Graph simulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import msal
import pytest
from structlog.testing import capture_logs

from graphsim.client import SimControl
from graphsim.server import SimConfig, Simulator
from handlers.errors import ReauthorizationRequired, TransientError
from processor.graph import GraphClient, build_ssl_context
from processor.tokens import (
    DEFAULT_SCOPES,
    MsalApps,
    MsalTokenProvider,
    initiate_flow_async,
    redeem_auth_code,
)

REDIRECT = "http://localhost:8765/auth/callback"
ACCOUNT = "acc-ann"


class MemoryStore:
    """An in-memory TokenCacheStore with compare-and-swap and an optional pre-save hook."""

    def __init__(self) -> None:
        self.caches: dict[str, tuple[str, int]] = {}
        self.loads = 0
        self.saves: list[int] = []
        self.before_save: Callable[[str], Awaitable[None]] | None = None

    async def load(self, account_id: str) -> tuple[str, int] | None:
        self.loads += 1
        return self.caches.get(account_id)

    async def save(self, account_id: str, serialized: str, expected_version: int) -> bool:
        hook, self.before_save = self.before_save, None
        if hook is not None:
            await hook(account_id)
        current = self.caches.get(account_id)
        if current is None or current[1] != expected_version:
            return False
        self.caches[account_id] = (serialized, expected_version + 1)
        self.saves.append(expected_version + 1)
        return True


class Clock:
    """A settable clock for the provider's in-memory expiry (MSAL keeps real time)."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


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
async def http(sim: Simulator) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=build_ssl_context(str(sim.ca_file)))
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        yield session


@pytest.fixture
def apps(sim: Simulator) -> Any:
    built = MsalApps(
        client_id=sim.client_id,
        client_secret=sim.client_secret,
        authority_host=sim.authority_host,
        ca_bundle=str(sim.ca_file),
    )
    yield built
    built.close()


def ann_id(sim: Simulator) -> str:
    user = sim.store.find_user("ann@contoso.example")
    assert user is not None
    return user.id


async def connect(apps: MsalApps, http: aiohttp.ClientSession) -> tuple[dict[str, Any], str]:
    """Run the auth-code flow as a browser would, stopping at the redirect to our callback."""
    flow = await initiate_flow_async(apps, redirect_uri=REDIRECT, response_mode="query")
    async with http.get(flow["auth_uri"], allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    assert location.startswith(REDIRECT)
    auth_response = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    return await redeem_auth_code(apps, flow, auth_response)


def refresh_tokens_of(serialized: str) -> set[str]:
    return {rt["secret"] for rt in json.loads(serialized).get("RefreshToken", {}).values()}


async def reaches_graph(
    sim: Simulator, http: aiohttp.ClientSession, provider: MsalTokenProvider
) -> bool:
    """Whether Graph accepts the provider's token for Ann's mailbox (a delta first page)."""
    graph = GraphClient(session=http, graph_url=sim.graph_url, tokens=provider)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    pages = [
        p
        async for p in graph.calendar_view_delta(
            ACCOUNT, ann_id(sim), delta_link=None, start=start, end=start + timedelta(days=1)
        )
    ]
    return pages[-1].delta_link is not None


@pytest.fixture
async def connected(sim: Simulator, apps: MsalApps, http: aiohttp.ClientSession) -> MemoryStore:
    _, serialized = await connect(apps, http)
    store = MemoryStore()
    store.caches[ACCOUNT] = (serialized, 1)
    return store


async def test_auth_code_flow_gives_a_cache_that_reaches_graph(
    sim: Simulator, apps: MsalApps, http: aiohttp.ClientSession
) -> None:
    """The real MSAL auth-code flow yields id-token claims and a cache whose token works on Graph."""
    result, serialized = await connect(apps, http)
    assert "access_token" in result, result
    claims = result["id_token_claims"]
    assert claims["oid"] == ann_id(sim)
    assert claims["tid"] == sim.tenant_id
    assert refresh_tokens_of(serialized)
    store = MemoryStore()
    store.caches[ACCOUNT] = (serialized, 1)
    provider = MsalTokenProvider(apps=apps, store=store)
    assert await reaches_graph(sim, http, provider)


async def test_token_is_served_from_memory_until_near_expiry_then_refreshed(
    sim: Simulator, apps: MsalApps, http: aiohttp.ClientSession, connected: MemoryStore
) -> None:
    """Within the margin the in-memory token is reused; near expiry MSAL refreshes and the
    rotated cache is saved with compare-and-swap."""
    clock = Clock()
    provider = MsalTokenProvider(apps=apps, store=connected, clock=clock, refresh_margin_s=300)
    first = await provider.access_token(ACCOUNT)
    loads = connected.loads
    version_before = connected.caches[ACCOUNT][1]
    rts_before = refresh_tokens_of(connected.caches[ACCOUNT][0])

    assert await provider.access_token(ACCOUNT) == first
    assert connected.loads == loads  # served from memory

    clock.offset_s = 3600 - 300 + 5  # the simulator's tokens live 3600 s
    second = await provider.access_token(ACCOUNT)
    assert second != first
    serialized, version = connected.caches[ACCOUNT]
    assert version == version_before + 1
    assert refresh_tokens_of(serialized) != rts_before  # the refresh token rotated
    assert provider.stats["refreshed"] >= 1

    assert await reaches_graph(sim, http, provider)


async def test_concurrent_callers_share_one_refresh(apps: MsalApps, connected: MemoryStore) -> None:
    """Ten concurrent callers for one account cause one cache load and get one token."""
    provider = MsalTokenProvider(apps=apps, store=connected)
    tokens = await asyncio.gather(*(provider.access_token(ACCOUNT) for _ in range(10)))
    assert len(set(tokens)) == 1
    assert connected.loads == 1


async def test_cas_conflict_reloads_the_winning_cache(
    sim: Simulator, apps: MsalApps, http: aiohttp.ClientSession, connected: MemoryStore
) -> None:
    """When another process saved first, the provider reloads its cache and the newest one wins."""
    foreign: dict[str, str] = {}

    def refresh_elsewhere(serialized: str) -> tuple[str, str]:
        cache = msal.SerializableTokenCache()
        cache.deserialize(serialized)
        app = apps.build(tenant=sim.tenant_id, token_cache=cache)
        account = app.get_accounts()[0]
        result = app.acquire_token_silent_with_error(
            list(DEFAULT_SCOPES), account=account, force_refresh=True
        )
        assert result is not None
        assert "access_token" in result, result
        return result["access_token"], cache.serialize()

    async def other_process_saves(account_id: str) -> None:
        serialized, version = connected.caches[account_id]
        token, newer = await asyncio.to_thread(refresh_elsewhere, serialized)
        foreign["token"] = token
        connected.caches[account_id] = (newer, version + 1)
        foreign["cache"] = newer

    clock = Clock()
    provider = MsalTokenProvider(apps=apps, store=connected, clock=clock)
    first = await provider.access_token(ACCOUNT)
    connected.before_save = other_process_saves
    version_before = connected.caches[ACCOUNT][1]
    clock.offset_s = 3600
    token = await provider.access_token(ACCOUNT)
    assert token != first
    assert provider.stats["cas_conflicts"] == 1
    assert token != first
    assert connected.caches[ACCOUNT] == (foreign["cache"], version_before + 1)
    assert connected.saves == []  # only the other process wrote
    assert await reaches_graph(sim, http, provider)


async def test_revoked_refresh_token_requires_reauthorization(
    sim: Simulator, apps: MsalApps, connected: MemoryStore, control: SimControl
) -> None:
    """A revoked refresh token makes the next refresh raise ReauthorizationRequired (invalid_grant)."""
    clock = Clock()
    provider = MsalTokenProvider(apps=apps, store=connected, clock=clock)
    token = await provider.access_token(ACCOUNT)
    await control.revoke_tokens(ann_id(sim))
    clock.offset_s = 3600
    with capture_logs() as logs, pytest.raises(ReauthorizationRequired) as caught:
        await provider.access_token(ACCOUNT)
    assert caught.value.account_id == ACCOUNT
    assert "invalid_grant" in caught.value.reason
    assert "connect again" in caught.value.reason
    assert any(e["event"] == "tokens.reauthorization_required" for e in logs)
    serialized = connected.caches[ACCOUNT][0]
    secrets = {token, *refresh_tokens_of(serialized)}
    for entry in logs:
        assert not any(s in repr(entry) for s in secrets)


async def test_missing_or_empty_cache_requires_reauthorization(apps: MsalApps) -> None:
    """No stored cache, or a cache without an account, raises ReauthorizationRequired."""
    store = MemoryStore()
    provider = MsalTokenProvider(apps=apps, store=store)
    with pytest.raises(ReauthorizationRequired, match="must connect"):
        await provider.access_token("nobody")
    store.caches["empty"] = (msal.SerializableTokenCache().serialize(), 3)
    with pytest.raises(ReauthorizationRequired, match="no account"):
        await provider.access_token("empty")


async def test_unreachable_identity_platform_is_transient(
    sim: Simulator, apps: MsalApps, connected: MemoryStore
) -> None:
    """When the identity platform cannot be reached, access_token raises TransientError."""
    await sim.stop()
    provider = MsalTokenProvider(apps=apps, store=connected)
    with pytest.raises(TransientError):
        await provider.access_token(ACCOUNT)


async def test_invalidate_forgets_the_in_memory_token(
    apps: MsalApps, connected: MemoryStore
) -> None:
    """After invalidate the provider goes back to the store instead of memory."""
    provider = MsalTokenProvider(apps=apps, store=connected)
    await provider.access_token(ACCOUNT)
    loads = connected.loads
    provider.invalidate(ACCOUNT)
    await provider.access_token(ACCOUNT)
    assert connected.loads == loads + 1


def test_reserved_scopes_are_refused(apps: MsalApps) -> None:
    """Passing a scope MSAL adds itself (offline_access, openid, profile) fails at construction."""
    with pytest.raises(ValueError, match="offline_access"):
        MsalTokenProvider(
            apps=apps, store=MemoryStore(), scopes=("Calendars.ReadWrite", "offline_access")
        )


def test_instance_discovery_only_for_microsoft_hosts() -> None:
    """Instance discovery stays on for Microsoft's authority hosts and is off for others."""
    microsoft = MsalApps(
        client_id="c",
        client_secret="s",
        authority_host="https://login.microsoftonline.com",
        ca_bundle=None,
    )
    private = MsalApps(
        client_id="c", client_secret="s", authority_host="https://127.0.0.1:8443", ca_bundle=None
    )
    try:
        assert microsoft._instance_discovery is True
        assert private._instance_discovery is False
        assert private._http.trust_env is False
    finally:
        microsoft.close()
        private.close()

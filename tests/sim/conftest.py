"""Fixtures: an in-process simulator, its control client, a Graph client and a webhook receiver."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from graphsim.client import SimControl
from graphsim.server import SimConfig, Simulator


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    simulator = Simulator(SimConfig(state_dir=tmp_path / "sim", port=0))
    await simulator.start()
    simulator.faults.update({"delivery_retry_base_s": 0.05, "delivery_retry_cap_s": 0.2})
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
    ctx = ssl.create_default_context(cafile=str(sim.ca_file))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), trust_env=False
    ) as session:
        yield session


@dataclass
class Graph:
    """A thin Graph client bound to one bearer token."""

    sim: Simulator
    http: aiohttp.ClientSession
    token: str

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        url = path if path.startswith("https://") else f"{self.sim.graph_url}{path}"
        hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        async with self.http.request(method, url, json=body, headers=hdrs) as resp:
            raw = await resp.read()
            data = None
            if raw and resp.content_type == "application/json":
                data = await resp.json()
            return resp.status, data, resp.headers


async def app_token(sim: Simulator, http: aiohttp.ClientSession) -> str:
    form = {
        "grant_type": "client_credentials",
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "scope": "https://graph.microsoft.com/.default",
    }
    async with http.post(f"{sim.authority}/oauth2/v2.0/token", data=form) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["access_token"])


async def delegated_tokens(
    sim: Simulator,
    http: aiohttp.ClientSession,
    scope: str = "Calendars.ReadWrite User.Read offline_access openid",
) -> dict[str, Any]:
    """Authorization code + PKCE by hand (the MSAL test covers the real library)."""
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    redirect = "http://localhost/cb"
    params = {
        "client_id": sim.client_id,
        "response_type": "code",
        "redirect_uri": redirect,
        "scope": scope,
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with http.get(
        f"{sim.authority}/oauth2/v2.0/authorize", params=params, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        query = parse_qs(urlsplit(resp.headers["Location"]).query)
    form = {
        "grant_type": "authorization_code",
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "code": query["code"][0],
        "redirect_uri": redirect,
        "code_verifier": verifier,
    }
    async with http.post(f"{sim.authority}/oauth2/v2.0/token", data=form) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


@pytest.fixture
async def app_graph(sim: Simulator, http: aiohttp.ClientSession) -> Graph:
    return Graph(sim, http, await app_token(sim, http))


@pytest.fixture
async def me_graph(sim: Simulator, http: aiohttp.ClientSession) -> Graph:
    return Graph(sim, http, (await delegated_tokens(sim, http))["access_token"])


@pytest.fixture
def ann(sim: Simulator) -> str:
    user = sim.store.find_user("ann@contoso.example")
    assert user is not None
    return user.id


@dataclass
class Receiver:
    """A webhook receiver on loopback HTTP: echoes validation tokens and records POSTs."""

    url: str = ""
    notifications: list[dict[str, Any]] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)
    validations: list[str] = field(default_factory=list)
    validation_mode: str = "echo"  # echo | wrong | json | status500
    fail_next: int = 0  # answer this many notification POSTs with 503

    async def handle(self, request: web.Request) -> web.Response:
        token = request.query.get("validationToken")
        if token is not None:
            self.validations.append(token)
            if self.validation_mode == "wrong":
                return web.Response(text=token.upper(), content_type="text/plain")
            if self.validation_mode == "json":
                return web.json_response({"validationToken": token})
            if self.validation_mode == "status500":
                return web.Response(status=500)
            return web.Response(text=token, content_type="text/plain")
        body = await request.json()
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503)
        self.posts.append(body)
        self.notifications.extend(body["value"])
        return web.Response(status=202)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


SubscribeFn = Callable[..., Awaitable[tuple[int, Any]]]


@pytest.fixture
def subscribe(sim: Simulator, receiver: Receiver) -> Callable[[Graph], SubscribeFn]:
    """subscribe(graph)(resource=..., **overrides) -> (status, body)."""

    def bind(graph: Graph) -> SubscribeFn:
        async def create(
            resource: str = "me/events", *, headers: dict[str, str] | None = None, **overrides: Any
        ) -> tuple[int, Any]:
            expiry = sim.clock.now() + dt.timedelta(hours=24)
            body = {
                "changeType": "created,updated,deleted",
                "notificationUrl": f"{receiver.url}/notify?tenant=acme",
                "lifecycleNotificationUrl": f"{receiver.url}/lifecycle",
                "resource": resource,
                "expirationDateTime": expiry.isoformat(),
                "clientState": "sub-secret-1",
            }
            body.update(overrides)
            status, data, _ = await graph.call("POST", "/subscriptions", body, headers=headers)
            return status, data

        return create

    return bind


def event_body(
    subject: str = "Review",
    start: str = "2026-12-03T09:00:00",
    end: str = "2026-12-03T10:00:00",
    tz: str = "UTC",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "subject": subject,
        "start": {"dateTime": start, "timeZone": tz},
        "end": {"dateTime": end, "timeZone": tz},
        **extra,
    }

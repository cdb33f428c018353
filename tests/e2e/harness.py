"""A whole m365sync stack for end-to-end tests: simulator, receiver, workers, real services."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika

from crypto import generate_master_key_spec
from graphsim.client import SimControl
from graphsim.server import SimConfig, Simulator
from handlers.ports import OutgoingMessage
from handlers.routing import shard_routing_key
from handlers.timeutil import isoformat_z, utcnow
from processor.app import (
    Runtime,
    build_runtime,
    internal_listener,
    outbound_role,
    receiver_role,
    subscriptions_role,
    worker_role,
)
from processor.devsignin import sign_in_headless
from processor.messages import resync_message
from processor.settings import Settings, load_settings
from processor.tokens import MsalApps
from processor.topology import INBOUND_EXCHANGE, ONERELATION_INBOUND_QUEUE
from processor.verify import diff_account, expected_events
from subscriptions.manager import SubscriptionManager
from subscriptions.registration import create_subscription, register_account
from subscriptions.schedule import ManagerSettings


def service_env(
    *, sim: Simulator, amqp_url: str, mongodb_url: str, public_url: str, **extra: str
) -> dict[str, str]:
    """The environment a service process needs to run against ``sim``."""
    return {
        "M365SYNC_AMQP_URL": amqp_url,
        "M365SYNC_MONGODB_URL": mongodb_url,
        "M365SYNC_GRAPH_URL": sim.graph_url,
        "M365SYNC_AUTHORITY_HOST": sim.authority_host,
        "M365SYNC_CA_BUNDLE": str(sim.ca_file),
        "M365SYNC_CLIENT_ID": sim.client_id,
        "M365SYNC_CLIENT_SECRET": sim.client_secret,
        "M365SYNC_PUBLIC_URL": public_url,
        "M365SYNC_HTTP_HOST": "127.0.0.1",
        # Many service processes share this machine: each takes a free metrics port.
        "M365SYNC_METRICS_PORT": "0",
        "M365SYNC_MASTER_KEYS": generate_master_key_spec("k1"),
        "M365SYNC_HASH_KEY": base64.b64encode(os.urandom(32)).decode(),
        "M365SYNC_CONNECT_SECRET": base64.b64encode(os.urandom(32)).decode(),
        "M365SYNC_API_TOKEN": base64.b64encode(os.urandom(24)).decode(),
        "M365SYNC_RETURN_URL_ORIGINS": "http://127.0.0.1:9",
        "M365SYNC_SHARDS": "4",
        "M365SYNC_SHUTDOWN_GRACE_S": "5",
        **extra,
    }


def free_socket() -> socket.socket:
    """A listening-ready TCP socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Stack:
    """A running stack and handles to drive and observe it."""

    sim: Simulator
    control: SimControl
    settings: Settings
    env: dict[str, str]
    rt: Runtime
    port: int
    #: The internal listener (``/metrics``), away from the public ``port``.
    metrics_port: int
    accounts: dict[str, str] = field(default_factory=dict)  # account_id -> mailbox user id
    managers: list[SubscriptionManager] = field(default_factory=list)
    exit_stack: AsyncExitStack | None = None

    def manager_settings(self, **overrides: Any) -> ManagerSettings:
        """Manager settings for tests: fast scans, no start-up delay, ``overrides`` on top."""
        values: dict[str, Any] = {
            "public_url": self.settings.public_url,
            "shard_count": self.settings.shard_count,
            "scan_interval_s": 0.2,
            "startup_delay_max_s": 0.0,
            "retry_after_failure_s": 0.5,
            "writes_per_s": 200.0,
            "write_burst": 200,
            **overrides,
        }
        return ManagerSettings(**values)

    async def start_manager(self, **overrides: Any) -> SubscriptionManager:
        """Start (another) subscriptions role whose clock is the simulator's clock."""
        assert self.exit_stack is not None
        manager = await self.exit_stack.enter_async_context(
            subscriptions_role(
                self.rt,
                clock=self.sim.clock.now,
                manager_settings=self.manager_settings(**overrides),
            )
        )
        self.managers.append(manager)
        return manager

    async def connect_account(self, account_id: str, user_id: str) -> None:
        """Sign the user in through MSAL, register the account and subscribe to its events."""
        await self.control.set_signin_user(user_id)
        apps = MsalApps(
            client_id=self.settings.client_id,
            client_secret=self.settings.client_secret,
            authority_host=self.settings.authority_host,
            ca_bundle=self.settings.ca_bundle,
        )
        claims, cache = await sign_in_headless(
            apps, ca_bundle=self.settings.ca_bundle, tenant=self.sim.tenant_id
        )
        # Holds the connect flow's lease, as /auth/callback does, so that a running
        # subscription manager leaves the subscription to this flow.
        lease, owner = f"connect:{account_id}", uuid.uuid4().hex
        assert await self.rt.store.leases.try_take(lease, owner, ttl_s=60.0)
        try:
            await register_account(
                self.rt.store,
                account_id=account_id,
                serialized_cache=cache,
                user_id=claims["oid"],
                tenant_id=claims["tid"],
            )
            await create_subscription(
                self.rt.store,
                self.rt.graph,
                account_id=account_id,
                public_url=self.settings.public_url,
            )
        finally:
            await self.rt.store.leases.release(lease, owner)
        self.accounts[account_id] = user_id

    async def request_resync(self, account_id: str, *, full: bool, reason: str) -> None:
        """Publish a resync job to the account's shard, as the manager or the API would."""
        await self.rt.publisher.publish(
            OutgoingMessage(
                exchange=INBOUND_EXCHANGE,
                routing_key=shard_routing_key(account_id, self.settings.shard_count),
                body=resync_message(
                    account_id=account_id, reason=reason, full=full, requested_at=utcnow()
                ),
                message_id=uuid.uuid4().hex,
            ),
            timeout_s=5.0,
        )

    async def status(self, account_id: str) -> str | None:
        """The account's current status."""
        doc = await self.rt.store.accounts.get(account_id)
        return None if doc is None else doc.status

    async def announcements(self) -> list[dict[str, Any]]:
        """Drain ``onerelation.inbound`` (as 1Relation would) and return the bodies."""
        bodies = []
        channel = await self.rt.connection.channel()
        try:
            queue = await channel.get_queue(ONERELATION_INBOUND_QUEUE, ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                bodies.append({"routing_key": message.routing_key, **json.loads(message.body)})
        finally:
            await channel.close()
        return bodies


#: The default sync window (30 days back, 365 ahead) as the tests compare it.
WINDOW_START = datetime.now(UTC) - timedelta(days=30)
WINDOW_END = datetime.now(UTC) + timedelta(days=365)


def timed_event(
    subject: str, *, days: float = 2, hours: float = 0, minutes: int = 30
) -> dict[str, Any]:
    """An Outlook event body (UTC) starting ``days`` and ``hours`` after the current hour."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(
        days=days, hours=hours
    )
    return {
        "subject": subject,
        "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        "end": {
            "dateTime": (start + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": "UTC",
        },
    }


async def expected_for(stack: Stack, user_id: str) -> dict[str, Any]:
    """What the database should hold for ``user_id``'s mailbox (the simulator's truth)."""
    return expected_events(
        await stack.control.events(user_id, immutable=True),
        await stack.control.calendar_view(
            user_id, isoformat_z(WINDOW_START), isoformat_z(WINDOW_END), immutable=True
        ),
    )


async def converged(stack: Stack, account_id: str, user_id: str) -> bool:
    """The account's decrypted events equal the mailbox's (database = ground truth)."""
    diff = await diff_account(
        stack.rt.store, stack.rt.events, account_id, await expected_for(stack, user_id)
    )
    return diff.ok


@asynccontextmanager
async def running_stack(
    tmp_path: Path,
    *,
    amqp_url: str,
    mongodb_url: str,
    roles: Sequence[str] = ("receiver", "worker"),
    sim_config: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
    manager: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """Start the simulator and the chosen roles in this process.

    The ``subscriptions`` role runs on the simulator's clock with ``manager`` overriding
    :meth:`Stack.manager_settings`.
    """
    stack = AsyncExitStack()
    try:
        sim = Simulator(SimConfig(state_dir=tmp_path / "sim", port=0, **(sim_config or {})))
        await sim.start()
        stack.push_async_callback(sim.stop)
        sim.faults.update({"delivery_retry_base_s": 0.05, "delivery_retry_cap_s": 0.5})
        control = await stack.enter_async_context(SimControl(sim.base_url, sim.ca_file))
        sock = free_socket()
        port = sock.getsockname()[1]
        env = service_env(
            sim=sim,
            amqp_url=amqp_url,
            mongodb_url=mongodb_url,
            public_url=f"http://127.0.0.1:{port}",
            **(extra_env or {}),
        )
        settings = load_settings(env)
        rt = await build_runtime(settings, stack, mailbox_concurrency=3)
        metrics_port = await stack.enter_async_context(internal_listener(rt, sock=free_socket()))
        if "receiver" in roles:
            await stack.enter_async_context(receiver_role(rt, sock=sock))
        else:
            sock.close()
        if "worker" in roles:
            await stack.enter_async_context(worker_role(rt))
        if "outbound" in roles:
            await stack.enter_async_context(outbound_role(rt))
        running = Stack(
            sim=sim,
            control=control,
            settings=settings,
            env=env,
            rt=rt,
            port=port,
            metrics_port=metrics_port,
            exit_stack=stack,
        )
        if "subscriptions" in roles:
            await running.start_manager(**(manager or {}))
        yield running
    finally:
        await _bounded_close(stack)


#: A role that does not stop within this is cancelled; the rest of the stack still closes.
TEARDOWN_S = 45.0


async def _bounded_close(stack: AsyncExitStack) -> None:
    """Close the stack, cancelling a part that hangs (after a test timeout, say) so that the
    parts after it still close and the run goes on instead of stalling."""
    try:
        async with asyncio.timeout(TEARDOWN_S):
            await stack.aclose()
    except TimeoutError as exc:
        raise AssertionError(f"the stack did not stop within {TEARDOWN_S:g} s") from exc


async def eventually(predicate: Any, *, timeout_s: float = 20.0, interval_s: float = 0.1) -> Any:
    """Poll an async predicate until it returns something truthy or the time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s (last: {last!r})")


__all__ = ["Stack", "aio_pika", "eventually", "running_stack", "service_env"]


# -- connect, consent and the 1Relation API as their clients use them -----------------------

#: A return URL whose origin ``service_env`` allows (nothing listens there: never followed).
RETURN_URL = "http://127.0.0.1:9/calendar/connected?tab=sync"


def mint_link(stack: Stack, account_id: str, *, secret: str | None = None, **claims: Any) -> str:
    """A connect/consent token as 1Relation signs it (claims set to None are left out)."""
    import time  # noqa: PLC0415  kept local: the helpers below were appended to this module
    import uuid  # noqa: PLC0415

    import jwt  # noqa: PLC0415

    body: dict[str, Any] = {
        "sub": account_id,
        "exp": int(time.time()) + 600,
        "jti": uuid.uuid4().hex,
        "return_url": RETURN_URL,
        **claims,
    }
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None},
        secret or stack.settings.connect_secrets[0],
        algorithm="HS256",
    )


@dataclass
class BrowserRun:
    """Where a browser ended up: the last answer's status, Location and body."""

    status: int
    location: str
    body: str
    hops: list[str] = field(default_factory=list)

    def query(self) -> dict[str, str]:
        """The query of the final Location (the return URL's ``status`` and ``reason``)."""
        from urllib.parse import parse_qsl, urlsplit  # noqa: PLC0415

        return dict(parse_qsl(urlsplit(self.location).query))


def browser_jar() -> Any:
    """A browser's cookies; accepts cookies of IP-address hosts like a browser does."""
    import aiohttp  # noqa: PLC0415

    return aiohttp.CookieJar(unsafe=True)


async def browse(
    stack: Stack, path_or_url: str, *, max_hops: int = 3, jar: Any = None
) -> BrowserRun:
    """GET ``path_or_url`` (a receiver path or a full URL) and follow redirects by hand, as a
    browser would, until the answer is not a redirect or points outside the receiver and the
    simulator. ``jar`` is the browser's cookies (a fresh browser when None)."""
    import ssl  # noqa: PLC0415

    import aiohttp  # noqa: PLC0415

    base = f"http://127.0.0.1:{stack.port}"
    url = path_or_url if "://" in path_or_url else base + path_or_url
    context = ssl.create_default_context(cafile=str(stack.sim.ca_file))
    hops: list[str] = []
    async with aiohttp.ClientSession(
        trust_env=False, cookie_jar=jar if jar is not None else browser_jar()
    ) as http:
        for _ in range(max_hops):
            hops.append(url.split("?")[0])
            async with http.get(url, allow_redirects=False, ssl=context) as resp:
                status, body = resp.status, await resp.text()
                location = resp.headers.get("Location", "")
            ours = location.startswith((base, stack.sim.base_url, stack.sim.authority_host))
            if status != 302 or not ours:
                return BrowserRun(status, location, body, hops)
            url = location
    return BrowserRun(status, location, body, hops)


async def browser_connect(
    stack: Stack, account_id: str, *, user_id: str | None = None, **claims: Any
) -> BrowserRun:
    """The user clicks "Connect to Microsoft": /connect → authorize → /auth/callback."""
    from urllib.parse import quote  # noqa: PLC0415

    if user_id is not None:
        await stack.control.set_signin_user(user_id)
    token = mint_link(stack, account_id, **claims)
    run = await browse(stack, f"/connect?token={quote(token)}")
    if user_id is not None and run.status == 302 and run.query().get("status") == "connected":
        stack.accounts[account_id] = user_id
    return run


async def api(
    stack: Stack, method: str, path: str, *, token: str | None = "", **kwargs: Any
) -> tuple[int, Any, dict[str, str]]:
    """Call the 1Relation API (``token=""`` uses the configured token, None sends none)."""
    import aiohttp  # noqa: PLC0415

    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token or stack.settings.api_tokens[0]}"
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.request(
            method, f"http://127.0.0.1:{stack.port}{path}", headers=headers, **kwargs
        ) as resp,
    ):
        text = await resp.text()
        body: Any = None
        if resp.content_type == "application/json":
            body = json.loads(text)
        return resp.status, body, dict(resp.headers)

"""The Simulator: one HTTPS aiohttp server for the identity platform, Graph and /_sim/ control."""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from . import tls
from .clock import SimClock
from .control import ControlApi
from .delivery import DeliveryEngine
from .delta import DeltaEngine
from .faults import Faults
from .graph import GraphApi
from .identity import Identity
from .store import Store
from .subscriptions import SubscriptionManager

DEFAULT_TENANT_ID = "0c9d8e7f-6a5b-4c3d-9e1f-0a9b8c7d6e5f"
DEFAULT_CLIENT_ID = "6e8f1d2c-3b4a-4c5d-8e9f-1a2b3c4d5e6f"


@dataclass(frozen=True)
class SimConfig:
    """Everything the simulator is started with; `reset()` returns to this state."""

    host: str = "127.0.0.1"
    port: int = 0
    state_dir: Path = Path(".graphsim")
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = "graphsim-client-secret"  # noqa: S105  a well-known simulator default
    tenant_id: str = DEFAULT_TENANT_ID
    tenant_domain: str = "contoso.example"
    # (displayName, userPrincipalName) of the mailboxes created at start; ids derive from the UPN
    users: tuple[tuple[str, str], ...] = (
        ("Ann Example", "ann@contoso.example"),
        ("Bob Example", "bob@contoso.example"),
    )
    redirect_uris: tuple[str, ...] = ()  # empty: any http(s) redirect URI is accepted
    delegated_scopes: tuple[str, ...] = ("Calendars.ReadWrite", "User.Read")
    app_roles: tuple[str, ...] = ("Calendars.ReadWrite", "User.Read.All")
    access_token_lifetime_s: int = 3600
    clock_speed: float = 1.0
    seed: int = 0
    allow_http_loopback_notifications: bool = True
    notification_ca_file: Path | None = None
    verify_notification_tls: bool = True
    extra_hosts: tuple[str, ...] = field(default_factory=tuple)
    # The host its URLs name (issuer, discovery, Graph links) when it listens on a
    # wildcard address, e.g. in a container whose port is published to the laptop.
    public_host: str | None = None


def user_id_for(upn: str) -> str:
    """The deterministic object id the simulator gives a configured user."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"graphsim-user:{upn.lower()}"))


class Simulator:
    """Microsoft Graph + identity platform simulator; `await start()`, then use the URLs."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.clock = SimClock(self.config.clock_speed)
        self.faults = Faults(seed=self.config.seed)
        self.store = Store(self.clock)
        self.identity = Identity(
            store=self.store,
            clock=self.clock,
            client_id=self.config.client_id,
            client_secret=self.config.client_secret,
            delegated_scopes=list(self.config.delegated_scopes),
            app_roles=list(self.config.app_roles),
            access_token_lifetime_s=self.config.access_token_lifetime_s,
        )
        self.delivery = DeliveryEngine(
            clock=self.clock, faults=self.faults, ssl_context=self._notification_ssl()
        )
        self.subs = SubscriptionManager(
            store=self.store,
            clock=self.clock,
            faults=self.faults,
            delivery=self.delivery,
            allow_http_loopback=self.config.allow_http_loopback_notifications,
        )
        self.delta = DeltaEngine(self.store, self.faults)
        self.graph = GraphApi(
            store=self.store,
            identity=self.identity,
            subs=self.subs,
            delta=self.delta,
            faults=self.faults,
            clock=self.clock,
        )
        self.control = ControlApi(self)
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._tls: tls.TlsMaterial | None = None
        self._seed_directory()

    def _notification_ssl(self) -> ssl.SSLContext | bool:
        if not self.config.verify_notification_tls:
            return False
        ctx = ssl.create_default_context()
        if self.config.notification_ca_file:
            ctx.load_verify_locations(cafile=str(self.config.notification_ca_file))
        return ctx

    def _seed_directory(self) -> None:
        self.store.add_tenant(self.config.tenant_id, self.config.tenant_domain)
        for name, upn in self.config.users:
            self.store.add_user(name, upn=upn, user_id=user_id_for(upn))
        self.identity.state.redirect_uris = list(self.config.redirect_uris)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Generate TLS material, bind, and start the background tasks."""
        self._tls = tls.generate(
            self.config.state_dir,
            (
                self.config.host,
                *self.config.extra_hosts,
                *((self.config.public_host,) if self.config.public_host else ()),
            ),
        )
        app = web.Application(
            middlewares=[self.control.middleware], client_max_size=50 * 1024 * 1024
        )
        app.add_routes(self.control.routes())
        app.add_routes(self.graph.routes())
        app.add_routes(self.identity.routes())
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.host, self.config.port, ssl_context=self._tls.server_context()
        )
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self._port = sockets[0].getsockname()[1] if sockets else self.config.port
        self.identity.base_url = self.base_url
        self.graph.graph_url = self.graph_url
        await self.delivery.start()
        await self.subs.start()

    async def stop(self) -> None:
        """Stop background work and the listener; safe to call twice."""
        await self.subs.stop()
        await self.delivery.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget all mailboxes' content, subscriptions, tokens, deliveries; default faults."""
        self.store.tenants.clear()
        self.store.mailboxes.clear()
        self.subs.reset()
        self.delivery.reset()
        self.delta.reset()
        self.graph.reset()
        self.identity.state = type(self.identity.state)()
        self.faults.update(Faults(seed=self.config.seed).to_json())
        self.clock.reset()
        self.clock.set_speed(self.config.clock_speed)
        self._seed_directory()

    # ---- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        host = self.config.public_host or self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self._port}"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def authority_host(self) -> str:
        return self.base_url

    @property
    def authority(self) -> str:
        """The tenant authority MSAL is given: authority_host/tenant_id."""
        return f"{self.base_url}/{self.config.tenant_id}"

    @property
    def ca_file(self) -> Path:
        if self._tls is None:
            raise RuntimeError("the simulator is not started")
        return self._tls.ca_file

    @property
    def tenant_id(self) -> str:
        return self.config.tenant_id

    @property
    def client_id(self) -> str:
        return self.config.client_id

    @property
    def client_secret(self) -> str:
        return self.config.client_secret

    def describe(self) -> dict[str, Any]:
        """The JSON `python -m graphsim` prints and GET /_sim/state returns."""
        return {
            "base_url": self.base_url,
            "graph_url": self.graph_url,
            "authority_host": self.authority_host,
            "authority": self.authority,
            "ca_file": str(self._tls.ca_file) if self._tls else None,
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "tenants": [t.to_json() for t in self.store.tenants.values()],
            "users": [b.user.to_json() for b in self.store.mailboxes.values()],
            "signin_user_id": self.identity.state.signin_user_id,
            "authorize_prompts": list(self.identity.state.prompts),
        }

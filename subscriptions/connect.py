"""Connect to Microsoft: ``GET /connect?token=JWT`` and ``GET /auth/callback`` (contract §2).

``/connect`` verifies the link (:mod:`subscriptions.links`), starts MSAL's authorization-code
flow with PKCE and keeps the whole flow dict server-side: encrypted under the service's own
``connect`` data key, keyed by a keyed hash of MSAL's ``state``, expiring after 15 minutes.
The callback takes that record exactly once (the delete's count decides), redeems the code
through MSAL, binds the Microsoft user (``oid``/``tid`` of the ID token) to the 1Relation
account, stores the token cache encrypted under the account's key, makes sure a
subscription exists, asks for a full resync and redirects to the link's ``return_url``.

Every flow is bound to the browser that started it (docs/contract.md §2): ``/connect`` sets a
random, HttpOnly, ``SameSite=Lax`` cookie (:func:`browser_binding`) and the flow keeps its
keyed hash; a callback that does not present it is refused and leaves the flow for the
right browser, so a sign-in URL passed to a colleague cannot bind the colleague's mailbox
(login CSRF). A Microsoft mailbox is bound to at most one 1Relation account.

Logs carry the account id and a reason, never a token, code or state.
"""

from __future__ import annotations

import hmac
import html
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import structlog
from aiohttp import web

from contract.problems import json_error
from contract.storage import SCHEMA_VERSION, aad
from crypto import DecryptionError
from handlers.errors import PublishError, TransientError
from handlers.timeutil import utcnow
from subscriptions.links import (
    CONNECT_AUDIENCE,
    LinkRejected,
    LinkVerifier,
    canonical_origin,
    is_guid,
)
from subscriptions.ports import (
    AccountStatusPublisher,
    FlowRecords,
    GraphSubscriptionApi,
    Repositories,
    ResyncRequests,
    SignIn,
    SignInSettings,
)
from subscriptions.registration import (
    SUBSCRIPTION_LEASE_PREFIX,
    create_subscription,
    register_account,
)

__all__ = [
    "CONNECT_FLOWS",
    "BrowserMismatch",
    "FlowStore",
    "add_connect_routes",
    "bind_browser",
    "browser_binding",
    "browser_mismatch_page",
    "html_page",
    "redirect",
    "with_status",
]

log = structlog.get_logger(__name__)

CONNECT_FLOWS: Final = "connect_flows"
CALLBACK_PATH: Final = "/auth/callback"
#: How long a started sign-in may take before its state is forgotten.
FLOW_TTL_S: Final = 900.0
#: The service data key that encrypts flow state (``_service:connect`` in ``data_keys``).
SERVICE_KEY_PURPOSE: Final = "connect"
MAX_STATE_CHARS: Final = 512
#: Holds off a second callback of the same account while one is binding it.
CONNECT_LEASE_TTL_S: Final = 60.0
#: How long the connect flow waits for a subscription manager's lease of the account.
SUBSCRIPTION_LEASE_WAIT_S: Final = 10.0
#: Statuses in which an account's existing connection still stands (a failed reconnect
#: attempt does not overwrite them).
_WORKING: Final = frozenset({"connected", "backfilling", "deletions_paused"})
#: The browser-binding cookie. Over https it carries the ``__Host-`` prefix (Secure, Path=/,
#: no Domain: a sibling subdomain cannot plant one); plain http is only allowed on loopback
#: (the demo and the tests), where a Secure cookie would not come back from every client.
BROWSER_COOKIE: Final = "m365sync-signin"
SECURE_BROWSER_COOKIE: Final = f"__Host-{BROWSER_COOKIE}"
_BINDING_VALUE: Final = re.compile(r"[A-Za-z0-9_-]{43}")


class BrowserMismatch(Exception):
    """A callback for a flow that another browser started; the flow is left in place."""


def _cookie_name(public_url: str) -> str:
    secure = canonical_origin(public_url).startswith("https://")
    return SECURE_BROWSER_COOKIE if secure else BROWSER_COOKIE


def browser_binding(request: web.Request, public_url: str) -> str | None:
    """The binding value the browser presents, if it is well-formed."""
    value = request.cookies.get(_cookie_name(public_url))
    return value if value is not None and _BINDING_VALUE.fullmatch(value) else None


def bind_browser(request: web.Request, response: web.StreamResponse, public_url: str) -> str:
    """The browser's binding value (a new random one unless it has one), set on ``response``.

    One value per browser rather than per flow: two tabs connecting at once both finish.
    """
    value = browser_binding(request, public_url) or secrets.token_urlsafe(32)
    name = _cookie_name(public_url)
    response.set_cookie(
        name,
        value,
        max_age=int(FLOW_TTL_S),
        path="/",
        secure=name == SECURE_BROWSER_COOKIE,
        httponly=True,
        samesite="Lax",
    )
    return value


def browser_mismatch_page() -> web.Response:
    """What a browser that did not start the sign-in it finishes is told."""
    return html_page(
        "Sign-in not started here",
        "This sign-in was started in another browser, so it was not completed. "
        "Open the link from 1Relation again in this browser.",
        status=403,
    )


class FlowStore:
    """Server-side state of sign-ins in progress: encrypted, expiring, taken once."""

    def __init__(
        self, *, store: Repositories, records: FlowRecords, ttl_s: float = FLOW_TTL_S
    ) -> None:
        self._store = store
        self._records = records
        self._name = records.name
        self._ttl_s = ttl_s

    def _key(self, state: str) -> str:
        return self._store.hasher.hash_id(self._name, state)

    def _browser_hash(self, binding: str) -> str:
        return self._store.hasher.hash_id(f"{self._name}:browser", binding)

    async def put(
        self, state: str, account_id: str, data: Mapping[str, Any], *, browser: str
    ) -> None:
        """Keep ``data`` for ``state`` until taken or expired, bound to the ``browser`` value."""
        cipher = await self._store.keys.service_cipher(SERVICE_KEY_PURPOSE)
        key = self._key(state)
        now = utcnow()
        await self._records.insert(
            {
                "_id": key,
                "schema": SCHEMA_VERSION,
                "account_id": account_id,
                "browser_hash": self._browser_hash(browser),
                "data_ct": cipher.encrypt_json(
                    dict(data), aad(self._name, account_id, key, "data")
                ),
                "created_at": now,
                "expires_at": now + timedelta(seconds=self._ttl_s),
            }
        )

    async def take(
        self, state: str | None, *, browser: str | None
    ) -> tuple[str, dict[str, Any]] | None:
        """The account id and data kept for ``state``, once; None if unknown, used or expired.

        Raises :class:`BrowserMismatch`, leaving the flow, unless ``browser`` is the value
        the flow was started with.
        """
        if not state or len(state) > MAX_STATE_CHARS:
            return None
        key = self._key(state)
        doc = await self._records.get(key)
        if doc is None:
            return None
        bound = doc.get("browser_hash")
        presented = self._browser_hash(browser) if browser is not None else ""
        if not isinstance(bound, str) or not hmac.compare_digest(bound, presented):
            raise BrowserMismatch
        # Whoever deletes it owns it: a replayed or concurrent callback finds nothing to delete.
        if not await self._records.remove(key):
            return None
        expires_at: datetime = doc["expires_at"]
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= utcnow():
            return None
        account_id = str(doc["account_id"])
        cipher = await self._store.keys.service_cipher(SERVICE_KEY_PURPOSE)
        try:
            data = cipher.decrypt_json(doc["data_ct"], aad(self._name, account_id, key, "data"))
        except DecryptionError:
            return None
        return account_id, data if isinstance(data, dict) else {}


def with_status(return_url: str, status: str, reason: str | None = None) -> str:
    """``return_url`` with ``status`` (and ``reason``) in its query, replacing any there."""
    parts = urlsplit(return_url)
    query = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name not in ("status", "reason")
    ]
    query.append(("status", status))
    if reason is not None:
        query.append(("reason", reason))
    return urlunsplit(parts._replace(query=urlencode(query)))


_NO_STORE: Final = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def redirect(location: str) -> web.Response:
    """A 302 that is never cached and leaks no referrer (the callback URL holds a code)."""
    return web.Response(status=302, headers={"Location": location, **_NO_STORE})


def html_page(title: str, text: str, *, status: int = 200) -> web.Response:
    """A tiny, script-free page for a browser that has no ``return_url`` to go back to."""
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={
            **_NO_STORE,
            "Content-Security-Policy": "default-src 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )


#: What the browser is told, by reason (never Microsoft's own error text).
_FAILURES: Final = {
    "admin_consent_required": (
        403,
        "An administrator of your Microsoft 365 organisation must approve the app first.",
    ),
    "access_denied": (403, "The sign-in was cancelled or refused."),
    "different_user": (
        403,
        "This account is connected to a different Microsoft user; disconnect it first.",
    ),
    "wrong_tenant": (403, "The Microsoft user belongs to another organisation than expected."),
    "mailbox_in_use": (
        409,
        "This Microsoft mailbox is connected to another 1Relation account; "
        "disconnect it there first.",
    ),
    "connect_in_progress": (409, "This account is being connected right now; try again."),
    "temporarily_unavailable": (503, "Microsoft could not be reached; try again."),
    "sign_in_failed": (400, "The Microsoft sign-in did not complete; try again."),
}


class _Connect:
    """The two connect routes and what they share."""

    def __init__(
        self,
        *,
        settings: SignInSettings,
        store: Repositories,
        graph: GraphSubscriptionApi,
        resyncs: ResyncRequests,
        statuses: AccountStatusPublisher,
        sign_in: SignIn,
        links: LinkVerifier,
    ) -> None:
        self._settings = settings
        self._store = store
        self._graph = graph
        self._resyncs = resyncs
        self._statuses = statuses
        self._sign_in = sign_in
        self._links = links
        self._flows = FlowStore(store=store, records=store.connect_flows)
        self._redirect_uri = f"{settings.public_url}{CALLBACK_PATH}"

    async def start(self, request: web.Request) -> web.Response:
        """``GET /connect?token=JWT``: verify, keep the flow, send the browser to Microsoft."""
        try:
            link = await self._links.verify(request.query.get("token"), audience=CONNECT_AUDIENCE)
        except LinkRejected as exc:
            log.info("connect.rejected", code=exc.code)
            return json_error(exc.status, exc.code, exc.message)
        log.info("connect.started", account_id=link.account_id, tenant_hint=link.tenant is not None)
        try:
            flow = await self._sign_in.initiate(
                redirect_uri=self._redirect_uri,
                domain_hint=link.tenant if link.tenant and not link.tenant_is_guid else None,
                tenant=link.tenant or "organizations",
                # Microsoft shows its account picker even under single sign-on, so whoever
                # signs in sees which mailbox is about to be connected.
                prompt="select_account",
            )
        except (ValueError, requests.RequestException) as exc:
            # MSAL raises ValueError when the authority (tenant) cannot be discovered.
            reason = "sign_in_failed" if isinstance(exc, ValueError) else "temporarily_unavailable"
            return self._failed(link.account_id, link.return_url, reason)
        response = redirect(str(flow["auth_uri"]))
        await self._flows.put(
            str(flow["state"]),
            link.account_id,
            {
                "flow": flow,
                "return_url": link.return_url,
                "tenant": link.tenant,
                "started_at": time.time(),
            },
            browser=bind_browser(request, response, self._settings.public_url),
        )
        return response

    async def callback(self, request: web.Request) -> web.Response:
        """``GET /auth/callback``: finish the sign-in and connect the account."""
        query = {name: request.query[name] for name in request.query}
        try:
            taken = await self._flows.take(
                query.get("state"), browser=browser_binding(request, self._settings.public_url)
            )
        except BrowserMismatch:
            log.info("connect.failed", reason="browser_mismatch")
            return browser_mismatch_page()
        if taken is None:
            log.info("connect.failed", reason="unknown_state")
            return json_error(
                400,
                "invalid_state",
                "this sign-in is unknown, expired or finished already: start again",
            )
        account_id, data = taken
        return_url = data.get("return_url")
        return_url = return_url if isinstance(return_url, str) else None
        if "error" in query:
            return await self._sign_in_error(account_id, return_url, query["error"])
        try:
            result, cache = await self._sign_in.redeem(data["flow"], query)
        except ValueError:  # MSAL: state mismatch or a malformed answer
            return self._failed(account_id, return_url, "sign_in_failed")
        except TransientError:
            return self._failed(account_id, return_url, "temporarily_unavailable")
        if "error" in result:
            return await self._sign_in_error(
                account_id, return_url, str(result.get("error")), result
            )
        claims = result.get("id_token_claims") or {}
        oid, tid = claims.get("oid"), claims.get("tid")
        if not (isinstance(oid, str) and oid and isinstance(tid, str) and tid):
            return self._failed(account_id, return_url, "sign_in_failed")
        tenant = data.get("tenant")
        if is_guid(tenant) and tid.lower() != str(tenant).lower():
            return self._failed(account_id, return_url, "wrong_tenant")
        started = data.get("started_at")
        return await self._bind(
            account_id,
            return_url,
            user_id=oid,
            tenant_id=tid,
            cache=cache,
            started_at=float(started) if isinstance(started, int | float) else None,
        )

    async def _bind(
        self,
        account_id: str,
        return_url: str | None,
        *,
        user_id: str,
        tenant_id: str,
        cache: str,
        started_at: float | None,
    ) -> web.Response:
        lease, owner = f"connect:{account_id}", uuid.uuid4().hex
        if not await self._store.leases.try_take(lease, owner, ttl_s=CONNECT_LEASE_TTL_S):
            return self._failed(account_id, return_url, "connect_in_progress")
        user_hash = self._store.hasher.hash_id("user", user_id.lower())
        # Held while the mailbox is checked and bound, so that two accounts connecting the
        # same mailbox at once cannot both pass the check.
        mailbox_lease = f"mailbox:{user_hash}"
        if not await self._store.leases.try_take(mailbox_lease, owner, ttl_s=CONNECT_LEASE_TTL_S):
            await self._store.leases.release(lease, owner)
            return self._failed(account_id, return_url, "connect_in_progress")
        try:
            account = await self._store.accounts.get(account_id)
            bound = account.user_hash if account is not None else None
            if bound is not None and bound != user_hash:
                return self._failed(account_id, return_url, "different_user")
            if await self._store.accounts.mailbox_bound_elsewhere(user_hash, account_id):
                return self._failed(account_id, return_url, "mailbox_in_use")
            previous = account.status if account is not None else None
            await register_account(
                self._store,
                account_id=account_id,
                serialized_cache=cache,
                user_id=user_id,
                tenant_id=tenant_id,
            )
            # The status goes out before the resync is queued: the delta runner turns
            # "backfilling" into "connected" when the pass ends, which may be very soon.
            await self._announce(account_id, reconnect=bound is not None, previous=previous)
            await self._ensure_subscription(account_id)
            try:
                await self._resyncs.request(account_id, full=True, reason="connect")
            except (PublishError, TimeoutError) as exc:
                # The periodic delta pass backfills it later; the connection itself stands.
                log.warning("connect.resync_not_queued", account_id=account_id, error=str(exc))
        finally:
            await self._store.leases.release(mailbox_lease, owner)
            await self._store.leases.release(lease, owner)
        log.info(
            "connect.completed",
            account_id=account_id,
            reconnect=bound is not None,
            duration_s=round(time.time() - started_at, 3) if started_at else None,
        )
        if return_url is not None:
            return redirect(with_status(return_url, "connected"))
        return html_page(
            "Connected", "Your Microsoft 365 calendar is connected. You can close this window."
        )

    async def _ensure_subscription(self, account_id: str) -> None:
        """Create the account's subscription unless a live one exists.

        Under the subscription manager's lease of the account, so that a manager scan
        creating one at the same moment (a reconnect whose subscription had expired) does
        not make a second. If a manager holds it past the wait, the subscription is left to
        the manager (it creates a missing one on its next scan).
        """
        name, owner = f"{SUBSCRIPTION_LEASE_PREFIX}{account_id}", uuid.uuid4().hex
        if not await self._store.leases.take(
            name, owner, ttl_s=CONNECT_LEASE_TTL_S, wait_s=SUBSCRIPTION_LEASE_WAIT_S, poll_s=0.2
        ):
            log.info("connect.subscription_left_to_manager", account_id=account_id)
            return
        try:
            if await self._store.subscriptions.has_live(account_id, utcnow()):
                return
            try:
                await create_subscription(
                    self._store,
                    self._graph,
                    account_id=account_id,
                    public_url=self._settings.public_url,
                )
            except Exception as exc:  # the subscription manager's periodic check creates it later
                log.warning(
                    "connect.subscription_failed", account_id=account_id, error=type(exc).__name__
                )
        finally:
            await self._store.leases.release(name, owner)

    async def _announce(self, account_id: str, *, reconnect: bool, previous: str | None) -> None:
        """Tell 1Relation the new status (``register_account`` wrote ``connected`` silently)."""
        try:
            if not reconnect:
                await self._statuses.set(account_id, "backfilling")
            elif previous != "connected":
                await self._statuses.publish(account_id)
        except TransientError as exc:
            log.warning("connect.status_not_published", account_id=account_id, error=str(exc))

    async def _sign_in_error(
        self,
        account_id: str,
        return_url: str | None,
        error: str,
        result: Mapping[str, Any] | None = None,
    ) -> web.Response:
        codes = (result or {}).get("error_codes") or []
        suberror = str((result or {}).get("suberror") or "")
        if error == "consent_required" or suberror == "consent_required" or 65001 in codes:
            await self._consent_required(account_id)
            return self._failed(account_id, return_url, "admin_consent_required")
        if error == "access_denied":
            return self._failed(account_id, return_url, "access_denied")
        return self._failed(account_id, return_url, "sign_in_failed")

    async def _consent_required(self, account_id: str) -> None:
        """Record that an administrator must approve, unless a working connection stands."""
        account = await self._store.accounts.get(account_id)
        if account is None:
            await self._store.accounts.create(account_id)
        elif account.status in _WORKING and account.bound:
            return
        try:
            await self._statuses.set(account_id, "admin_consent_required")
        except TransientError as exc:
            log.warning("connect.status_not_published", account_id=account_id, error=str(exc))

    def _failed(self, account_id: str, return_url: str | None, reason: str) -> web.Response:
        log.info("connect.failed", account_id=account_id, reason=reason)
        if return_url is not None:
            return redirect(with_status(return_url, "error", reason))
        status, message = _FAILURES[reason]
        return json_error(status, reason, message)


def add_connect_routes(
    app: web.Application,
    *,
    settings: SignInSettings,
    store: Repositories,
    graph: GraphSubscriptionApi,
    resyncs: ResyncRequests,
    statuses: AccountStatusPublisher,
    sign_in: SignIn,
    links: LinkVerifier,
) -> None:
    """Register ``GET /connect`` and ``GET /auth/callback``."""
    routes = _Connect(
        settings=settings,
        store=store,
        graph=graph,
        resyncs=resyncs,
        statuses=statuses,
        sign_in=sign_in,
        links=links,
    )
    app.router.add_get("/connect", routes.start, allow_head=False)
    app.router.add_get(CALLBACK_PATH, routes.callback, allow_head=False)

"""Organisation approval: ``GET /admin-consent?token=JWT`` and its callback (docs/contract.md §2).

The link is verified like a connect link; a random state is kept server-side (encrypted,
expiring, taken once, see :class:`subscriptions.connect.FlowStore`) and the administrator
is sent to the tenant's admin consent page. The callback records the tenant's approval only
for a state we issued, and only for the tenant that state was started for when the link
named one: the ``tenant`` parameter Microsoft appends is never trusted on its own
(docs/graph.md §8). Before anything is recorded, the approval is confirmed with Microsoft:
an app-only token (client credentials, ``.default``) is issued for a tenant only once its
administrator approved the app, so a callback naming another tenant records nothing.
Like a sign-in, the approval is bound to the browser that started it (a cookie, see
:func:`subscriptions.connect.bind_browser`). Approvals are kept in ``tenants`` by keyed
hash of the tenant id.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Final
from urllib.parse import quote, urlencode

import requests
import structlog
from aiohttp import web

from contract.problems import json_error
from handlers.timeutil import utcnow
from subscriptions.connect import (
    BrowserMismatch,
    FlowStore,
    bind_browser,
    browser_binding,
    browser_mismatch_page,
    html_page,
    redirect,
    with_status,
)
from subscriptions.links import CONSENT_AUDIENCE, LinkRejected, LinkVerifier, is_guid
from subscriptions.ports import Repositories, SignIn, SignInSettings

__all__ = ["CONSENT_FLOWS", "TENANTS", "add_consent_routes"]

log = structlog.get_logger(__name__)

CONSENT_FLOWS: Final = "consent_flows"
TENANTS: Final = "tenants"
CALLBACK_PATH: Final = "/admin-consent/callback"
#: Application permissions are asked for as the resource's ``.default`` scope.
CONSENT_SCOPE: Final = "https://graph.microsoft.com/.default"


class _Consent:
    def __init__(
        self, *, settings: SignInSettings, store: Repositories, links: LinkVerifier, apps: SignIn
    ) -> None:
        self._settings = settings
        self._store = store
        self._links = links
        self._apps = apps
        self._flows = FlowStore(store=store, records=store.consent_flows)

    async def start(self, request: web.Request) -> web.Response:
        """Verify the link, keep a state, send the administrator to Microsoft."""
        try:
            link = await self._links.verify(request.query.get("token"), audience=CONSENT_AUDIENCE)
        except LinkRejected as exc:
            log.info("consent.rejected", code=exc.code)
            return json_error(exc.status, exc.code, exc.message)
        state = secrets.token_urlsafe(32)
        response = redirect("")  # Location set below, once the state is kept
        await self._flows.put(
            state,
            link.account_id,
            {"return_url": link.return_url, "tenant": link.tenant},
            browser=bind_browser(request, response, self._settings.public_url),
        )
        # Not "common": the admin consent endpoint needs a tenant or "organizations".
        segment = quote(link.tenant or "organizations", safe="")
        query = urlencode(
            {
                "client_id": self._settings.client_id,
                "scope": CONSENT_SCOPE,
                "redirect_uri": f"{self._settings.public_url}{CALLBACK_PATH}",
                "state": state,
            }
        )
        log.info("consent.started", account_id=link.account_id, tenant_hint=link.tenant is not None)
        response.headers["Location"] = (
            f"{self._settings.authority_host}/{segment}/v2.0/adminconsent?{query}"
        )
        return response

    async def callback(self, request: web.Request) -> web.Response:
        """Record the approval for a state we issued; redirect to the link's ``return_url``."""
        try:
            taken = await self._flows.take(
                request.query.get("state"),
                browser=browser_binding(request, self._settings.public_url),
            )
        except BrowserMismatch:
            log.info("consent.failed", reason="browser_mismatch")
            return browser_mismatch_page()
        if taken is None:
            log.info("consent.failed", reason="unknown_state")
            return json_error(
                400,
                "invalid_state",
                "this approval is unknown, expired or finished already: start again",
            )
        account_id, data = taken
        return_url = data.get("return_url") if isinstance(data.get("return_url"), str) else None
        expected = data.get("tenant")
        tenant = request.query.get("tenant", "")
        if "error" in request.query:
            return self._failed(account_id, return_url, "admin_consent_declined")
        if request.query.get("admin_consent", "").lower() != "true" or not is_guid(tenant):
            return self._failed(account_id, return_url, "admin_consent_declined")
        if is_guid(expected) and str(expected).lower() != tenant.lower():
            return self._failed(account_id, return_url, "wrong_tenant")
        confirmed = await self._confirmed(tenant.lower())
        if confirmed is None:
            return self._failed(account_id, return_url, "temporarily_unavailable")
        if not confirmed:
            return self._failed(account_id, return_url, "admin_consent_not_confirmed")
        await self._record(tenant.lower())
        log.info("consent.completed", account_id=account_id)
        if return_url is not None:
            return redirect(with_status(return_url, "connected"))
        return html_page(
            "Approved",
            "Your organisation approved the app; its users can now connect their calendars.",
        )

    async def _confirmed(self, tenant_id: str) -> bool | None:
        """Whether Microsoft issues an app-only token for the tenant; None if it cannot say."""

        def ask() -> bool:
            app = self._apps.build(tenant=tenant_id)
            result = app.acquire_token_for_client(scopes=[CONSENT_SCOPE])
            return isinstance(result, dict) and bool(result.get("access_token"))

        try:
            return await asyncio.to_thread(ask)
        except ValueError:  # MSAL: the tenant's authority cannot be discovered (no such tenant)
            return False
        except requests.RequestException as exc:
            log.warning("consent.confirm_failed", error=type(exc).__name__)
            return None

    async def _record(self, tenant_id: str) -> None:
        key = self._store.hasher.hash_id("tenant", tenant_id)
        await self._store.tenants.record_approval(key, at=utcnow())

    def _failed(self, account_id: str, return_url: str | None, reason: str) -> web.Response:
        log.info("consent.failed", account_id=account_id, reason=reason)
        if return_url is not None:
            return redirect(with_status(return_url, "error", reason))
        status, message = {
            "admin_consent_declined": (403, "The administrator did not approve the app."),
            "wrong_tenant": (
                403,
                "The approval came from another organisation than the link named.",
            ),
            "admin_consent_not_confirmed": (
                403,
                "Microsoft does not confirm that the organisation approved the app; "
                "ask an administrator to approve it again.",
            ),
            "temporarily_unavailable": (503, "Microsoft could not be reached; try again."),
        }[reason]
        return json_error(status, reason, message)


def add_consent_routes(
    app: web.Application,
    *,
    settings: SignInSettings,
    store: Repositories,
    links: LinkVerifier,
    apps: SignIn,
) -> None:
    """Register ``GET /admin-consent`` and ``GET /admin-consent/callback``."""
    routes = _Consent(settings=settings, store=store, links=links, apps=apps)
    app.router.add_get("/admin-consent", routes.start, allow_head=False)
    app.router.add_get(CALLBACK_PATH, routes.callback, allow_head=False)

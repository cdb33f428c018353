"""SimControl: an async client for the simulator's /_sim/ control API (for tests in any process)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

JSON = dict[str, Any]


class SimControlError(RuntimeError):
    """A control call answered with a non-2xx status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"control API answered {status}: {body}")
        self.status = status
        self.body = body


class SimControl:
    """Typed wrappers around every /_sim/ route. Use as `async with SimControl(url, ca) as sim:`."""

    def __init__(self, base_url: str, ca_file: Path | str) -> None:
        self.base_url = base_url.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SimControl:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl), trust_env=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        if self._session is None:
            raise RuntimeError("use SimControl as an async context manager")
        async with self._session.request(
            method, f"{self.base_url}/_sim{path}", json=body, params=params
        ) as resp:
            data = await resp.json() if resp.status != 204 else None
            if resp.status >= 300:
                raise SimControlError(resp.status, data)
            return data

    # ---- directory and identity ------------------------------------------------------------

    async def state(self) -> JSON:
        """URLs, tenant, app and users of the simulator."""
        result: JSON = await self._call("GET", "/state")
        return result

    async def reset(self) -> JSON:
        """Back to the configured users with empty mailboxes, no subscriptions, default faults."""
        result: JSON = await self._call("POST", "/reset")
        return result

    async def users(self) -> list[JSON]:
        result: list[JSON] = await self._call("GET", "/users")
        return result

    async def create_user(
        self,
        display_name: str,
        upn: str | None = None,
        *,
        user_id: str | None = None,
        tenant_id: str | None = None,
        mail: str | None = None,
    ) -> JSON:
        """Add a mailbox; returns {id, userPrincipalName, mail, displayName, tenantId}."""
        body = {
            "displayName": display_name,
            "userPrincipalName": upn,
            "id": user_id,
            "tenantId": tenant_id,
            "mail": mail,
        }
        result: JSON = await self._call(
            "POST", "/users", {k: v for k, v in body.items() if v is not None}
        )
        return result

    async def create_tenant(
        self, domain: str, *, tenant_id: str | None = None, consented: bool = True
    ) -> JSON:
        body = {"domain": domain, "id": tenant_id, "consented": consented}
        result: JSON = await self._call(
            "POST", "/tenants", {k: v for k, v in body.items() if v is not None}
        )
        return result

    async def set_signin_user(self, user_id: str) -> None:
        """The user the authorize endpoint signs in (auto-approved)."""
        await self._call("POST", "/signin-user", {"userId": user_id})

    async def set_consent(self, consented: bool, tenant_id: str | None = None) -> JSON:
        """Grant or revoke the tenant's admin consent (revoking also revokes refresh tokens)."""
        result: JSON = await self._call(
            "POST", "/consent", {"tenantId": tenant_id, "consented": consented}
        )
        return result

    async def set_admin_consent_decision(self, accept: bool) -> None:
        """Whether the admin accepts or declines at /adminconsent."""
        await self._call("POST", "/admin-consent-decision", {"accept": accept})

    async def set_redirect_uris(self, uris: list[str]) -> None:
        """Registered redirect URIs (empty list: any http(s) URI)."""
        await self._call("POST", "/redirect-uris", {"redirectUris": uris})

    async def revoke_tokens(
        self, user_id: str, *, access_tokens: bool = False, remove_subscriptions: bool = False
    ) -> JSON:
        """Revoke a user's refresh tokens, optionally access tokens and delegated subscriptions."""
        result: JSON = await self._call(
            "POST",
            "/revoke",
            {
                "userId": user_id,
                "accessTokens": access_tokens,
                "removeSubscriptions": remove_subscriptions,
            },
        )
        return result

    # ---- mailbox content -------------------------------------------------------------------

    @staticmethod
    def _imm(immutable: bool) -> dict[str, str]:
        return {"immutable": "1"} if immutable else {}

    async def create_event(self, user_id: str, event: JSON, *, immutable: bool = False) -> JSON:
        """Create an event as the user in Outlook (notifies subscriptions)."""
        result: JSON = await self._call(
            "POST", f"/users/{user_id}/events", event, self._imm(immutable)
        )
        return result

    async def update_event(
        self, user_id: str, event_id: str, changes: JSON, *, immutable: bool = False
    ) -> JSON:
        """Edit an event, series master or occurrence as the user in Outlook."""
        result: JSON = await self._call(
            "PATCH", f"/users/{user_id}/events/{event_id}", changes, self._imm(immutable)
        )
        return result

    async def delete_event(self, user_id: str, event_id: str) -> None:
        """Delete an event or series, or cancel an occurrence, as the user in Outlook."""
        await self._call("DELETE", f"/users/{user_id}/events/{event_id}")

    async def bulk_create_events(
        self,
        user_id: str,
        *,
        events: list[JSON] | None = None,
        count: int = 0,
        start: str = "2026-12-01T08:00:00Z",
        spacing_minutes: float = 60,
        duration_minutes: float = 30,
        subject_prefix: str = "Event",
        notify: bool = True,
        immutable: bool = False,
    ) -> JSON:
        """Create `events` and/or `count` generated events; returns {count, ids}."""
        body: JSON = {"events": events or [], "notify": notify}
        if count:
            body["generate"] = {
                "count": count,
                "start": start,
                "spacingMinutes": spacing_minutes,
                "durationMinutes": duration_minutes,
                "subjectPrefix": subject_prefix,
            }
        result: JSON = await self._call(
            "POST", f"/users/{user_id}/events/bulk", body, self._imm(immutable)
        )
        return result

    async def events(self, user_id: str, *, immutable: bool = False) -> list[JSON]:
        """Ground truth: singles and series masters as Graph returns them (UTC)."""
        result: list[JSON] = await self._call(
            "GET", f"/users/{user_id}/events", params=self._imm(immutable)
        )
        return result

    async def calendar_view(
        self, user_id: str, start: str, end: str, *, immutable: bool = False
    ) -> list[JSON]:
        """Ground truth: the expanded calendar view of [start, end)."""
        result: list[JSON] = await self._call(
            "GET",
            f"/users/{user_id}/calendar-view",
            params={"start": start, "end": end, **self._imm(immutable)},
        )
        return result

    # ---- observation -----------------------------------------------------------------------

    async def counters(self) -> JSON:
        """Graph request counters: total, by_kind, by_mailbox, by_status, 429s, 503s, recent."""
        result: JSON = await self._call("GET", "/counters")
        return result

    async def reset_counters(self) -> None:
        await self._call("POST", "/counters/reset")

    async def deliveries(
        self, *, since: int = 0, kind: str | None = None, subscription_id: str | None = None
    ) -> list[JSON]:
        """Delivery attempts (kind: change, lifecycle, validation, dropped), oldest first."""
        params = {"since": str(since)}
        if kind:
            params["kind"] = kind
        if subscription_id:
            params["subscriptionId"] = subscription_id
        result: list[JSON] = await self._call("GET", "/deliveries", params=params)
        return result

    async def is_idle(self) -> bool:
        result: JSON = await self._call("GET", "/deliveries/idle")
        return bool(result["idle"])

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until nothing is queued or being delivered."""
        deadline = time.monotonic() + timeout_s
        while not await self.is_idle():
            if time.monotonic() > deadline:
                raise TimeoutError("deliveries still pending")
            await asyncio.sleep(0.02)

    async def wait_for_deliveries(
        self,
        predicate: Callable[[list[JSON]], bool],
        *,
        timeout_s: float = 10.0,
        kind: str | None = None,
    ) -> list[JSON]:
        """Poll the delivery log until `predicate(log)` is true; returns the log."""
        deadline = time.monotonic() + timeout_s
        while True:
            log = await self.deliveries(kind=kind)
            if predicate(log):
                return log
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met; {len(log)} deliveries so far")
            await asyncio.sleep(0.02)

    async def subscriptions(self) -> list[JSON]:
        """All subscriptions ever created, with state (active/expired/removed/deleted)."""
        result: list[JSON] = await self._call("GET", "/subscriptions")
        return result

    async def trigger_lifecycle(self, subscription_id: str, event: str) -> JSON:
        """subscriptionRemoved | missed | reauthorizationRequired, with its side effect."""
        result: JSON = await self._call(
            "POST", f"/subscriptions/{subscription_id}/lifecycle", {"event": event}
        )
        return result

    # ---- faults, clock, delta --------------------------------------------------------------

    async def faults(self) -> JSON:
        result: JSON = await self._call("GET", "/faults")
        return result

    async def set_faults(self, **changes: Any) -> JSON:
        """Set fault/limit knobs by name (see graphsim.faults.Faults)."""
        result: JSON = await self._call("POST", "/faults", changes)
        return result

    async def clock(self) -> JSON:
        result: JSON = await self._call("GET", "/clock")
        return result

    async def advance_clock(self, seconds: float) -> JSON:
        result: JSON = await self._call("POST", "/clock/advance", {"seconds": seconds})
        return result

    async def set_clock_speed(self, speed: float) -> JSON:
        result: JSON = await self._call("POST", "/clock/speed", {"speed": speed})
        return result

    async def expire_delta_tokens(self, user_id: str | None = None, *, mode: str = "gone") -> int:
        """Make delta/skip tokens fail: mode 'gone' (410 + Location) or 'syncStateNotFound'."""
        result: JSON = await self._call("POST", "/delta/expire", {"userId": user_id, "mode": mode})
        return int(result["expired"])

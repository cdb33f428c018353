"""Graph subscriptions: create/renew/delete/reauthorize, expiry, notification fan-out, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .clock import SimClock
from .delivery import DeliveryEngine, QueuedItem
from .errors import GraphError
from .faults import Faults
from .ids import make_id
from .store import EventRecord, Store
from .timezones import format_offset

MAX_EXPIRY_MIN = 4230
MIN_EXPIRY_MIN = 45
MAX_PER_MAILBOX = 1000
RESOURCE_RE = re.compile(r"^/?(?:(me)|users/([^/]+))/events/?$", re.IGNORECASE)
CHANGE_TYPES = {"created", "updated", "deleted"}
TLS_VERSIONS = {"v1_0", "v1_1", "v1_2", "v1_3"}


@dataclass
class Subscription:
    id: str
    resource: str
    user_id: str
    change_types: list[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expiration: dt.datetime
    application_id: str
    tenant_id: str
    creator_id: str
    delegated: bool
    immutable: bool
    tls_version: str
    created_at: dt.datetime
    state: str = "active"  # active | expired | removed | deleted
    paused: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_graph(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.application_id,
            "changeType": ",".join(self.change_types),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "notificationQueryOptions": None,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": self.expiration.isoformat().replace("+00:00", "Z"),
            "creatorId": self.creator_id,
            "includeResourceData": None,
            "latestSupportedTlsVersion": self.tls_version,
            "encryptionCertificate": None,
            "encryptionCertificateId": None,
            "notificationUrlAppId": None,
        }

    def to_json(self) -> dict[str, Any]:
        out = self.to_graph()
        out.update(
            {
                "state": self.state,
                "paused": self.paused,
                "userId": self.user_id,
                "tenantId": self.tenant_id,
                "immutableIds": self.immutable,
                "delegated": self.delegated,
                "history": self.history,
            }
        )
        return out


def _is_loopback(host: str | None) -> bool:
    if host in (None, ""):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_expiry(value: Any) -> dt.datetime:
    if not isinstance(value, str):
        raise GraphError(400, "InvalidRequest", "expirationDateTime is required.")
    text = value.strip().replace("Z", "+00:00")
    if "." in text:
        head, rest = text.split(".", 1)
        digits = re.match(r"\d*", rest)
        frac = digits.group(0) if digits else ""
        text = f"{head}.{frac[:6]}{rest[len(frac) :]}"
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise GraphError(400, "InvalidRequest", f"Invalid expirationDateTime '{value}'.") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC)


class SubscriptionManager:
    """Owns every subscription and turns store changes into queued notifications."""

    def __init__(
        self,
        *,
        store: Store,
        clock: SimClock,
        faults: Faults,
        delivery: DeliveryEngine,
        allow_http_loopback: bool = True,
    ) -> None:
        self.store = store
        self.clock = clock
        self.faults = faults
        self.delivery = delivery
        self.allow_http_loopback = allow_http_loopback
        self.subs: dict[str, Subscription] = {}
        self._writes: dict[tuple[str, str], deque[float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        store.listener = self.on_change
        delivery.on_dropped = self._on_dropped

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def reset(self) -> None:
        self.subs.clear()
        self._writes.clear()

    # ---- expiry ----------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.sweep()

    def sweep(self) -> None:
        """Silently remove subscriptions whose expiry passed on the sim clock."""
        now = self.clock.now()
        for sub in self.subs.values():
            if sub.state == "active" and sub.expiration <= now:
                sub.state = "expired"
                sub.history.append({"event": "expired", "sim_time": now.timestamp()})

    def _live(self, sub_id: str, app_id: str, tenant_id: str, user_id: str | None) -> Subscription:
        self.sweep()
        sub = self.subs.get(sub_id)
        if (
            sub is None
            or sub.state != "active"
            or sub.application_id != app_id
            or sub.tenant_id != tenant_id
            or (user_id and sub.creator_id != user_id)
        ):
            raise GraphError(
                404, "ResourceNotFound", f"The object was not found. Subscription '{sub_id}'."
            )
        return sub

    # ---- limits ----------------------------------------------------------------------------

    def _count_write(self, app_id: str, tenant_id: str) -> None:
        window = self._writes.setdefault((app_id, tenant_id), deque())
        now = self.clock.now_s()
        while window and window[0] <= now - 20:
            window.popleft()
        if len(window) >= self.faults.subscription_write_limit:
            retry = max(0.1, window[0] + 20 - now)
            raise GraphError(
                429,
                "ApplicationThrottled",
                "Application is over its subscription request limit.",
                headers={"Retry-After": str(int(retry) + 1)},
            )
        window.append(now)

    def _clamp_expiry(self, requested: dt.datetime) -> dt.datetime:
        now = self.clock.now()
        if requested <= now:
            raise GraphError(
                400, "InvalidRequest", "Subscription expiration date time must be in the future."
            )
        if requested > now + dt.timedelta(minutes=MAX_EXPIRY_MIN):
            raise GraphError(
                400,
                "InvalidRequest",
                f"Subscription expiration can only be {MAX_EXPIRY_MIN} minutes in the future.",
            )
        return max(requested, now + dt.timedelta(minutes=MIN_EXPIRY_MIN))

    def _check_url(self, url: Any, name: str) -> str:
        if not isinstance(url, str) or not url:
            raise GraphError(400, "InvalidRequest", f"{name} is required.")
        parts = urlsplit(url)
        if parts.scheme == "https" or (
            parts.scheme == "http" and self.allow_http_loopback and _is_loopback(parts.hostname)
        ):
            return url
        raise GraphError(400, "InvalidRequest", f"The {name} must be an https URL: '{url}'.")

    async def _validate(self, url: str) -> None:
        ok, reason = await self.delivery.validate(url)
        if not ok:
            raise GraphError(
                400,
                "ValidationError",
                "Subscription validation request failed. Notification endpoint "
                f"must respond with 200 OK to validation request. ({reason})",
            )

    # ---- Graph operations ------------------------------------------------------------------

    async def create(
        self,
        body: Any,
        *,
        app_id: str,
        tenant_id: str,
        user_id: str | None,
        creator_id: str,
        immutable: bool,
    ) -> dict[str, Any]:
        """POST /subscriptions."""
        if not isinstance(body, dict):
            raise GraphError(400, "InvalidRequest", "The request body must be a JSON object.")
        self._count_write(app_id, tenant_id)
        allowed = {
            "changeType",
            "notificationUrl",
            "lifecycleNotificationUrl",
            "resource",
            "expirationDateTime",
            "clientState",
            "latestSupportedTlsVersion",
            "@odata.type",
            "includeResourceData",
        }
        unknown = set(body) - allowed
        if unknown:
            raise GraphError(
                400, "InvalidRequest", f"Unsupported subscription properties: {sorted(unknown)}."
            )
        if body.get("includeResourceData"):
            raise GraphError(
                400,
                "InvalidRequest",
                "graphsim supports basic notifications only (no resource data).",
            )
        kinds = [k.strip() for k in str(body.get("changeType") or "").split(",") if k.strip()]
        if not kinds or any(k not in CHANGE_TYPES for k in kinds):
            raise GraphError(
                400, "InvalidRequest", f"Invalid changeType '{body.get('changeType')}'."
            )
        resource = body.get("resource")
        match = RESOURCE_RE.match(resource or "") if isinstance(resource, str) else None
        if match is None:
            raise GraphError(
                400,
                "InvalidRequest",
                f"Resource '{resource}' is not supported by graphsim; use "
                "me/events or users/{id}/events.",
            )
        if match.group(1):
            if user_id is None:
                raise GraphError(
                    400,
                    "BadRequest",
                    "/me request is only valid with delegated authentication flow.",
                )
            target = self.store.find_user(user_id)
        else:
            target = self.store.find_user(match.group(2))
            if target is None or target.tenant_id != tenant_id:
                raise GraphError(404, "ResourceNotFound", f"Resource '{resource}' not found.")
            if user_id is not None and target.id != user_id:
                raise GraphError(
                    403,
                    "ExtensionError",
                    "Operation: Create; Exception: [Status Code: Forbidden; "
                    "Reason: Access is denied. Check credentials and try again.]",
                )
        assert target is not None
        client_state = body.get("clientState")
        if client_state is not None and (
            not isinstance(client_state, str) or len(client_state) > 128
        ):
            raise GraphError(400, "InvalidRequest", "clientState must be at most 128 chars.")
        tls = body.get("latestSupportedTlsVersion") or "v1_2"
        if tls not in TLS_VERSIONS:
            raise GraphError(400, "InvalidRequest", f"Invalid latestSupportedTlsVersion {tls}.")
        url = self._check_url(body.get("notificationUrl"), "notificationUrl")
        lifecycle = body.get("lifecycleNotificationUrl")
        if lifecycle is not None:
            lifecycle = self._check_url(lifecycle, "lifecycleNotificationUrl")
        expiry = self._clamp_expiry(_parse_expiry(body.get("expirationDateTime")))
        self.sweep()
        active = sum(
            1 for s in self.subs.values() if s.state == "active" and s.user_id == target.id
        )
        if active >= MAX_PER_MAILBOX:
            raise GraphError(
                403,
                "ExtensionError",
                f"Operation: Create; Exception: [Status Code: Forbidden; Reason: "
                f"Subscription limit of {MAX_PER_MAILBOX} per mailbox reached.]",
            )
        await self._validate(url)
        if lifecycle is not None:
            await self._validate(lifecycle)
        now = self.clock.now()
        sub = Subscription(
            id=str(uuid.uuid4()),
            resource=resource,
            user_id=target.id,
            change_types=kinds,
            notification_url=url,
            lifecycle_url=lifecycle,
            client_state=client_state,
            expiration=expiry,
            application_id=app_id,
            tenant_id=tenant_id,
            creator_id=creator_id,
            delegated=user_id is not None,
            immutable=immutable,
            tls_version=tls,
            created_at=now,
        )
        sub.history.append({"event": "created", "sim_time": now.timestamp()})
        self.subs[sub.id] = sub
        return sub.to_graph()

    async def update(
        self, sub_id: str, body: Any, *, app_id: str, tenant_id: str, user_id: str | None
    ) -> dict[str, Any]:
        """PATCH /subscriptions/{id}: renew (and reauthorize), or change notificationUrl."""
        if not isinstance(body, dict):
            raise GraphError(400, "InvalidRequest", "The request body must be a JSON object.")
        self._count_write(app_id, tenant_id)
        sub = self._live(sub_id, app_id, tenant_id, user_id)
        if "lifecycleNotificationUrl" in body:
            raise GraphError(
                400,
                "InvalidRequest",
                "lifecycleNotificationUrl cannot be added or changed on an existing subscription.",
            )
        unknown = set(body) - {"expirationDateTime", "notificationUrl", "@odata.type"}
        if unknown:
            raise GraphError(
                400,
                "InvalidRequest",
                f"Only expirationDateTime and notificationUrl can be updated, "
                f"not {sorted(unknown)}.",
            )
        expiry = sub.expiration
        if "expirationDateTime" in body:
            expiry = self._clamp_expiry(_parse_expiry(body["expirationDateTime"]))
        if "notificationUrl" in body:
            url = self._check_url(body["notificationUrl"], "notificationUrl")
            if url != sub.notification_url:
                await self._validate(url)
            sub.notification_url = url
        sub.expiration = expiry
        sub.paused = False
        sub.history.append({"event": "renewed", "sim_time": self.clock.now_s()})
        return sub.to_graph()

    def delete(self, sub_id: str, *, app_id: str, tenant_id: str, user_id: str | None) -> None:
        self._count_write(app_id, tenant_id)
        sub = self._live(sub_id, app_id, tenant_id, user_id)
        sub.state = "deleted"
        sub.history.append({"event": "deleted", "sim_time": self.clock.now_s()})

    def reauthorize(self, sub_id: str, *, app_id: str, tenant_id: str, user_id: str | None) -> None:
        sub = self._live(sub_id, app_id, tenant_id, user_id)
        sub.paused = False
        sub.history.append({"event": "reauthorized", "sim_time": self.clock.now_s()})

    def get(
        self, sub_id: str, *, app_id: str, tenant_id: str, user_id: str | None
    ) -> dict[str, Any]:
        return self._live(sub_id, app_id, tenant_id, user_id).to_graph()

    def list_for(self, *, app_id: str, tenant_id: str, user_id: str | None) -> list[dict[str, Any]]:
        self.sweep()
        return [
            s.to_graph()
            for s in self.subs.values()
            if s.state == "active"
            and s.application_id == app_id
            and s.tenant_id == tenant_id
            and (user_id is None or s.creator_id == user_id)
        ]

    # ---- notifications ---------------------------------------------------------------------

    def _item(self, sub: Subscription, change_type: str, record: EventRecord) -> dict[str, Any]:
        event_id = make_id(record.key, immutable=sub.immutable)
        path = f"Users/{sub.user_id}/Events/{event_id}"
        return {
            "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": format_offset(sub.expiration),
            "changeType": change_type,
            "resource": path,
            "resourceData": {
                "@odata.type": "#Microsoft.Graph.Event",
                "@odata.id": path,
                "@odata.etag": f'W/"{record.change_key}"',
                "id": event_id,
            },
            "clientState": sub.client_state,
            "tenantId": sub.tenant_id,
        }

    def on_change(self, user_id: str, change_type: str, record: EventRecord) -> None:
        """Store listener: fan a change out to every live subscription on the mailbox."""
        self.sweep()
        rng = self.faults.rng
        for sub in list(self.subs.values()):
            if sub.state != "active" or sub.user_id != user_id or sub.paused:
                continue
            kinds = [change_type]
            if self.faults.notify_copies > 0:
                kinds = [change_type] * self.faults.notify_copies
            elif self.faults.duplicates:
                if change_type == "created":
                    kinds.append("updated")
                elif change_type == "updated":
                    kinds.extend(["updated"] * rng.randint(0, 2))
            for kind in kinds:
                if kind in sub.change_types:
                    self.delivery.enqueue(
                        sub.notification_url,
                        sub.id,
                        self._item(sub, kind, record),
                        "change",
                        delay_s=self.faults.notify_delay_ms / 1000,
                    )
            if (
                change_type == "deleted"
                and self.faults.deleted_ghosts > 0
                and "updated" in sub.change_types
                and rng.random() < self.faults.deleted_ghosts
            ):
                self.delivery.enqueue(
                    sub.notification_url,
                    sub.id,
                    self._item(sub, "updated", record),
                    "change",
                    delay_s=rng.uniform(0.05, 0.5),
                )

    def lifecycle(self, sub_id: str, event: str) -> dict[str, Any]:
        """Trigger a lifecycle event with its side effect; returns the subscription state."""
        if event not in {"subscriptionRemoved", "missed", "reauthorizationRequired"}:
            raise ValueError(f"unknown lifecycle event {event}")
        sub = self.subs[sub_id]
        if event == "subscriptionRemoved":
            sub.state = "removed"
        elif event == "missed":
            self.delivery.drop_subscription(sub.id)
        else:
            sub.paused = True
        self._send_lifecycle(sub, event)
        return sub.to_json()

    def _send_lifecycle(self, sub: Subscription, event: str) -> None:
        sub.history.append({"event": event, "sim_time": self.clock.now_s()})
        if sub.lifecycle_url is None:
            return
        item = {
            "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": format_offset(sub.expiration),
            "tenantId": sub.tenant_id,
            "clientState": sub.client_state,
            "lifecycleEvent": event,
        }
        self.delivery.enqueue(sub.lifecycle_url, sub.id, item, "lifecycle")

    def _on_dropped(self, items: list[QueuedItem]) -> None:
        for sub_id in {i.subscription_id for i in items}:
            sub = self.subs.get(sub_id)
            if sub is not None:
                self._send_lifecycle(sub, "missed")

    def remove_user_subscriptions(self, user_id: str) -> int:
        """Delegated subscriptions of a user go away (e.g. password reset), with notice."""
        count = 0
        for sub in self.subs.values():
            if sub.state == "active" and sub.delegated and sub.creator_id == user_id:
                sub.state = "removed"
                self._send_lifecycle(sub, "subscriptionRemoved")
                count += 1
        return count

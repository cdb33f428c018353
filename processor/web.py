"""The receiver's aiohttp app: Graph webhooks, liveness, readiness (docs/contract.md §2).

Routes are registered by small ``add_*_routes`` functions so that other parts (connect,
admin consent, ``/api/v1``) can add theirs to the same app. Every error answer is JSON
``{"error": {"code": "...", "message": "..."}}``, including unknown routes.

The webhook answers 202 only after the broker confirmed every accepted item, and 503 with
``Retry-After`` otherwise, so that Graph retries (docs/design.md "What must always hold" 1). Items
that fail a check are dropped and counted; the sender still gets 202 and learns nothing.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from contract.problems import IS_PROBLEM, PROBLEM_CONTENT_TYPE, json_error
from crypto import DataCipher, Hasher, seal_message
from handlers.errors import AccountUnavailable, PublishError
from handlers.messages import INBOUND_SEAL, event_ref_aad
from handlers.notifications import (
    DEFAULT_MAX_ITEMS,
    AcceptedLifecycle,
    MalformedBody,
    Rejected,
    check_change,
    check_lifecycle,
    parse_collection,
)
from handlers.ports import OutgoingMessage, Publisher, SubscriptionLookup, SubscriptionRecord
from handlers.routing import shard_routing_key
from handlers.timeutil import utcnow
from processor.group_commit import GroupCommitter
from processor.interfaces import CipherSource
from processor.logs import correlation, get_logger
from processor.messages import change_message, lifecycle_message
from processor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from processor.metrics import Metrics
from processor.settings import Settings
from processor.topology import INBOUND_EXCHANGE, LIFECYCLE_EXCHANGE

__all__ = [
    "CORRELATION_HEADER",
    "CORRELATION_ID",
    "METRICS_KEY",
    "SETTINGS_KEY",
    "add_graph_routes",
    "add_health_routes",
    "build_app",
    "build_internal_app",
    "correlation_middleware",
    "error_middleware",
    "problem_middleware",
]

log = get_logger(__name__)

NOTIFICATIONS_PATH: Final = "/graph/notifications"
LIFECYCLE_PATH: Final = "/graph/lifecycle"
LIFECYCLE_ROUTING_KEY: Final = "lifecycle"
#: Longest validation token echoed; Graph's are about 100 characters.
MAX_VALIDATION_TOKEN_CHARS: Final = 4096
#: Distinct unknown subscription ids one POST may make us look up (see _RequestLookups).
MAX_UNKNOWN_SUBSCRIPTIONS_PER_REQUEST: Final = 8
#: How long a client may take to send its body before it gets 408.
BODY_READ_TIMEOUT_S: Final = 2.0
READINESS_TIMEOUT_S: Final = 2.0
RETRY_AFTER_S: Final = 5
#: Time beyond the publisher's own timeout before the webhook gives up on it: a publish
#: can hang while the connection recovers (aio-pika #636), and Graph gives up at 3 s.
_PUBLISH_GRACE_S: Final = 0.2
_MIN_PUBLISH_TIMEOUT_S: Final = 0.05

CORRELATION_HEADER: Final = "X-Correlation-Id"
_INCOMING_ID_HEADERS: Final = ("client-request-id", "request-id")
_SANE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

CORRELATION_ID: Final = web.RequestKey("correlation_id", str)
METRICS_KEY: Final = web.AppKey("m365sync.metrics", Metrics)
SETTINGS_KEY: Final = web.AppKey("m365sync.settings", Settings)

_ERROR_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


# -- shared helpers -------------------------------------------------------------------------


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Label error answers ``application/problem+json`` for clients that accept it."""
    response = await handler(request)
    if response.get(IS_PROBLEM) and PROBLEM_CONTENT_TYPE in request.headers.get("Accept", ""):
        response.content_type = PROBLEM_CONTENT_TYPE
    return response


def _unavailable(message: str) -> web.Response:
    return json_error(503, "unavailable", message, headers={"Retry-After": str(RETRY_AFTER_S)})


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def correlation_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a correlation id to the request's log events and return it as a header.

    An incoming ``client-request-id``/``request-id`` (Graph sends them) is reused when it
    is a short plain token, so that a request can be followed across both sides.
    """
    incoming = next(
        (
            value
            for name in _INCOMING_ID_HEADERS
            if (value := request.headers.get(name)) and _SANE_ID.fullmatch(value)
        ),
        None,
    )
    with correlation(incoming) as cid:
        request[CORRELATION_ID] = cid
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects pass through error_middleware
            exc.headers[CORRELATION_HEADER] = cid
            _count_response(request, exc.status)
            raise
        response.headers[CORRELATION_HEADER] = cid
        _count_response(request, response.status)
        return response


def _count_response(request: web.Request, status: int) -> None:
    metrics = request.app.get(METRICS_KEY)
    if metrics is not None:
        metrics.http_responses.labels(route=_route_name(request), status=str(status)).inc()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every HTTP error (unknown route, wrong method, crash) into the JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json":  # already in shape: keep its body
            return web.Response(status=exc.status, body=exc.body, headers=exc.headers)
        headers = {
            name: value
            for name, value in exc.headers.items()
            if name.lower() not in ("content-type", "content-length")
        }
        return json_error(
            exc.status,
            _ERROR_CODES.get(exc.status, f"http_{exc.status}"),
            exc.reason,
            headers=headers,
        )
    except Exception:
        log.exception("http.unhandled_error", route=_route_name(request), method=request.method)
        return json_error(500, "internal_error", "internal error")


# -- Graph webhooks -------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    """The body is longer than the limit."""


async def _read_body(request: web.Request, *, limit: int, timeout_s: float) -> bytes:
    """The body, read as a stream: an oversize body is refused before it is buffered whole.

    Raises :class:`_BodyTooLarge` past ``limit`` bytes and ``TimeoutError`` after ``timeout_s``.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _BodyTooLarge
    stream = request.content
    if stream.is_eof():  # a small body usually arrives with the headers: no wait, no timer
        whole = stream.read_nowait()
        if len(whole) > limit:
            raise _BodyTooLarge
        return whole
    body = bytearray()
    async with asyncio.timeout(timeout_s):
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > limit:
                raise _BodyTooLarge
    return bytes(body)


class _RequestLookups:
    """Per-request memo: the items of one POST mostly share a subscription and an account.

    Graph's own POSTs name our live subscriptions; one that names more than
    :data:`MAX_UNKNOWN_SUBSCRIPTIONS_PER_REQUEST` distinct unknown ones is forged (or
    hopelessly stale), so its remaining unseen ids are answered "unknown" without a lookup:
    an unauthenticated request costs a bounded number of database reads.
    """

    def __init__(self, lookup: SubscriptionLookup, ciphers: CipherSource) -> None:
        self._lookup = lookup
        self._ciphers = ciphers
        self._records: dict[str, SubscriptionRecord | None] = {}
        self._account_ciphers: dict[str, DataCipher | None] = {}
        self._unknown = 0
        #: Items answered "unknown" without a lookup once the budget was spent.
        self.unchecked = 0

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        if subscription_hash not in self._records:
            if self._unknown >= MAX_UNKNOWN_SUBSCRIPTIONS_PER_REQUEST:
                self.unchecked += 1
                return None
            record = await self._lookup.find_subscription(subscription_hash)
            self._unknown += record is None
            self._records[subscription_hash] = record
        return self._records[subscription_hash]

    async def cipher_for(self, account_id: str, subscription_hash: str) -> DataCipher | None:
        """The account's cipher, or None when the account is gone (erased, disconnected).

        The subscription's record proves the cached key current: after the account was
        erased and connected again elsewhere, this process may still hold the old key.
        """
        if account_id not in self._account_ciphers:
            record = self._records.get(subscription_hash)
            check = None if record is None else record.key_check
            try:
                cipher: DataCipher | None = await self._ciphers.cipher_for(account_id, check=check)
            except AccountUnavailable:
                cipher = None
            self._account_ciphers[account_id] = cipher
        return self._account_ciphers[account_id]


@dataclass
class _Batch:
    """What one request's items came to."""

    messages: list[OutgoingMessage] = field(default_factory=list)
    accepted: int = 0
    rejected: Counter[tuple[str, str | None]] = field(default_factory=Counter)
    unchecked: int = 0


class _GraphWebhook:
    """Handles one webhook route: validation handshake, checks, confirmed publish."""

    def __init__(
        self,
        *,
        route: str,
        settings: Settings,
        lookup: SubscriptionLookup,
        publisher: Publisher,
        hasher: Hasher,
        ciphers: CipherSource,
        metrics: Metrics,
        clock: Callable[[], datetime],
        body_read_timeout_s: float,
        max_items: int,
    ) -> None:
        self._route = route
        self._settings = settings
        self._lookup = lookup
        self._publisher = publisher
        self._hasher = hasher
        self._ciphers = ciphers
        self._metrics = metrics
        self._clock = clock
        self._body_read_timeout_s = body_read_timeout_s
        self._max_items = max_items

    async def get(self, request: web.Request) -> web.StreamResponse:
        """GET is only ever the validation handshake."""
        if "validationToken" in request.query:
            return await self._observed(self._handshake(request))
        return json_error(
            405, "method_not_allowed", "GET only answers validation", headers={"Allow": "POST"}
        )

    async def post(self, request: web.Request) -> web.StreamResponse:
        """A validation handshake (query ``validationToken``) or a notification collection."""
        if "validationToken" in request.query:
            # Answered before the body is read: it is empty or plain text, never JSON.
            return await self._observed(self._handshake(request))
        return await self._observed(self._notifications(request))

    async def _observed(self, answer: Awaitable[web.Response]) -> web.Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await answer
            status = response.status
            return response
        finally:
            self._metrics.webhook_requests.labels(route=self._route, status=str(status)).inc()
            self._metrics.webhook_duration.observe(time.perf_counter() - started)

    async def _handshake(self, request: web.Request) -> web.Response:
        # request.query is already URL-decoded; echo it exactly, never escaped.
        token = request.query.get("validationToken", "")
        if not token or len(token) > MAX_VALIDATION_TOKEN_CHARS:
            return json_error(400, "invalid_validation_token", "validationToken is empty or long")
        log.info("webhook.validated", route=self._route)
        return web.Response(
            text=token,
            content_type="text/plain",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
        )

    async def _notifications(self, request: web.Request) -> web.Response:
        try:
            body = await _read_body(
                request,
                limit=self._settings.max_body_bytes,
                timeout_s=self._body_read_timeout_s,
            )
        except _BodyTooLarge:
            self._malformed("body_too_large")
            return json_error(413, "payload_too_large", "the body is too large")
        except TimeoutError:
            self._malformed("body_read_timeout")
            return json_error(408, "request_timeout", "the body was not sent in time")
        try:
            items = parse_collection(body, max_items=self._max_items)
        except MalformedBody as exc:
            self._malformed(exc.reason)
            return json_error(400, "malformed_body", f"not a notification collection: {exc.reason}")
        self._metrics.notifications_received.inc(len(items))

        # One budget for checks and publish, so that the answer stays under Graph's 3 s.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.publish_timeout_s
        batch: _Batch | None = None
        try:
            async with asyncio.timeout_at(deadline + _PUBLISH_GRACE_S):
                batch = await self._collect(items, request[CORRELATION_ID])
                self._count_rejections(batch)
                if batch.messages:
                    await self._publisher.publish_many(
                        batch.messages,
                        timeout_s=max(deadline - loop.time(), _MIN_PUBLISH_TIMEOUT_S),
                    )
        except Exception as exc:
            if batch is None:  # the subscription store or key source failed: let Graph retry
                log.exception("webhook.check_failed", route=self._route, error=type(exc).__name__)
                return _unavailable("notifications could not be checked")
            # A broken channel or a bug gets a traceback; either way no 2xx without a confirm.
            expected = isinstance(exc, PublishError | TimeoutError)
            return self._publish_failed(exc, len(batch.messages), traceback=not expected)

        self._metrics.notifications_accepted.inc(batch.accepted)
        # Per-POST detail is for debugging only; the counters above are what operators watch.
        log.debug(
            "webhook.accepted",
            route=self._route,
            items=len(items),
            accepted=batch.accepted,
            rejected=sum(batch.rejected.values()),
            published=len(batch.messages),
        )
        return web.Response(status=202)

    async def _collect(self, items: list[Any], correlation_id: str) -> _Batch:
        """Check every item and build one message per distinct accepted notification."""
        lookups = _RequestLookups(self._lookup, self._ciphers)
        received_at = self._clock()
        batch = _Batch()
        seen: set[tuple[str, ...]] = set()
        for item in items:
            result = await (
                check_lifecycle(item, lookup=lookups, hasher=self._hasher)
                if isinstance(item, Mapping) and "lifecycleEvent" in item
                else check_change(item, lookup=lookups, hasher=self._hasher)
            )
            if isinstance(result, Rejected):
                batch.rejected[result.reason, result.subscription_hash] += 1
                continue
            # Duplicates within one POST are published once: every message is a hint to
            # fetch current state, so one is as good as three.
            key: tuple[str, ...]
            if isinstance(result, AcceptedLifecycle):
                key = ("lifecycle", result.subscription_hash, result.lifecycle_event)
                if key not in seen:
                    body = lifecycle_message(
                        account_id=result.account_id,
                        subscription_hash=result.subscription_hash,
                        lifecycle_event=result.lifecycle_event,
                        received_at=received_at,
                    )
                    batch.messages.append(
                        self._message(
                            LIFECYCLE_EXCHANGE, LIFECYCLE_ROUTING_KEY, body, correlation_id
                        )
                    )
            else:
                cipher = await lookups.cipher_for(result.account_id, result.subscription_hash)
                if cipher is None:  # the account is gone: its notifications are moot
                    batch.rejected["account_unavailable", result.subscription_hash] += 1
                    continue
                event_hash = self._hasher.hash_id("event", result.account_id, result.event_id)
                key = (
                    "change",
                    result.account_id,
                    event_hash,
                    result.change_type,
                    result.change_key or "",
                )
                if key not in seen:
                    body = seal_message(
                        cipher,
                        change_message(
                            account_id=result.account_id,
                            change_type=result.change_type,
                            event_hash=event_hash,
                            event_ref_ct=cipher.encrypt_str(
                                result.event_id, aad=event_ref_aad(result.account_id, event_hash)
                            ),
                            received_at=received_at,
                            etag_hash=None
                            if result.change_key is None
                            else self._hasher.hash_id(
                                "change_key", result.account_id, result.change_key
                            ),
                        ),
                        purpose=INBOUND_SEAL,
                    )
                    routing_key = shard_routing_key(result.account_id, self._settings.shard_count)
                    batch.messages.append(
                        self._message(INBOUND_EXCHANGE, routing_key, body, correlation_id)
                    )
            seen.add(key)
            batch.accepted += 1
        batch.unchecked = lookups.unchecked
        return batch

    @staticmethod
    def _message(
        exchange: str, routing_key: str, body: Mapping[str, Any], correlation_id: str
    ) -> OutgoingMessage:
        return OutgoingMessage(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            message_id=uuid.uuid4().hex,
            correlation_id=correlation_id,
        )

    def _publish_failed(self, exc: Exception, messages: int, *, traceback: bool) -> web.Response:
        self._metrics.publish_failures.inc()
        log.error(
            "webhook.publish_failed",
            route=self._route,
            error=type(exc).__name__,
            messages=messages,
            exc_info=exc if traceback else None,
        )
        return _unavailable("notifications could not be queued")

    def _malformed(self, reason: str) -> None:
        self._metrics.webhook_malformed.labels(route=self._route, reason=reason).inc()
        log.info("webhook.malformed", route=self._route, reason=reason)

    def _count_rejections(self, batch: _Batch) -> None:
        # One log event per reason rather than per item or per subscription: a forged flood
        # of a thousand distinct ids costs one line, not a thousand. A reason that concerns a
        # single subscription names it; otherwise the line says how many there were.
        by_reason: dict[str, list[tuple[str | None, int]]] = {}
        for (reason, subscription_hash), count in batch.rejected.items():
            by_reason.setdefault(reason, []).append((subscription_hash, count))
        for reason, entries in by_reason.items():
            count = sum(n for _, n in entries)
            self._metrics.notifications_rejected.labels(reason=reason).inc(count)
            hashes = {h for h, _ in entries}
            log.warning(
                "webhook.rejected",
                route=self._route,
                reason=reason,
                subscription_hash=next(iter(hashes)) if len(hashes) == 1 else None,
                subscriptions=len(hashes),
                count=count,
                unchecked=batch.unchecked if reason == "unknown_subscription" else 0,
            )


def add_graph_routes(
    app: web.Application,
    *,
    settings: Settings,
    lookup: SubscriptionLookup,
    publisher: Publisher,
    hasher: Hasher,
    ciphers: CipherSource,
    metrics: Metrics,
    clock: Callable[[], datetime] = utcnow,
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> None:
    """Register ``/graph/notifications`` and ``/graph/lifecycle`` (POST, and GET for validation).

    Both routes take change and lifecycle items alike (an item is a lifecycle notification
    when it has ``lifecycleEvent``), since a subscription may use one URL for both.
    """
    for route, path in (("notifications", NOTIFICATIONS_PATH), ("lifecycle", LIFECYCLE_PATH)):
        webhook = _GraphWebhook(
            route=route,
            settings=settings,
            lookup=lookup,
            publisher=publisher,
            hasher=hasher,
            ciphers=ciphers,
            metrics=metrics,
            clock=clock,
            body_read_timeout_s=body_read_timeout_s,
            max_items=max_items,
        )
        app.router.add_post(path, webhook.post)
        app.router.add_get(path, webhook.get, allow_head=False)


# -- health and metrics ---------------------------------------------------------------------


def add_health_routes(
    app: web.Application,
    *,
    readiness: Callable[[], Awaitable[Mapping[str, bool]]],
) -> None:
    """Register ``/healthz`` (alive) and ``/readyz`` (dependencies reachable)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_S):
                checks = {name: bool(ok) for name, ok in (await readiness()).items()}
        except Exception as exc:  # a failing check is an answer, not a crash
            log.warning("readiness.failed", error=type(exc).__name__)
            checks, failed = {}, True
        else:
            failed = not all(checks.values())
        if not failed:
            return web.json_response({"status": "ok", "checks": checks})
        not_ready = sorted(name for name, ok in checks.items() if not ok) or ["readiness"]
        return web.json_response(
            {
                "status": "unavailable",
                "checks": checks,
                "error": {"code": "not_ready", "message": "not ready: " + ", ".join(not_ready)},
            },
            status=503,
        )

    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)


def build_internal_app(
    *,
    readiness: Callable[[], Awaitable[Mapping[str, bool]]],
    metrics: Metrics,
) -> web.Application:
    """The internal listener's app: ``/metrics``, ``/healthz`` and ``/readyz``.

    ``/metrics`` is served only here, never on the public listener: its rejection counters
    by reason would tell a prober whether a guessed subscription exists.
    """

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app = web.Application(middlewares=[error_middleware])
    add_health_routes(app, readiness=readiness)
    app.router.add_get("/metrics", metrics_view, allow_head=False)
    return app


def build_app(
    *,
    settings: Settings,
    lookup: SubscriptionLookup,
    publisher: Publisher,
    hasher: Hasher,
    ciphers: CipherSource,
    readiness: Callable[[], Awaitable[Mapping[str, bool]]],
    metrics: Metrics,
    clock: Callable[[], datetime] = utcnow,
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S,
) -> web.Application:
    """The receiver app with the Graph webhook and health routes; others add theirs later."""
    app = web.Application(
        middlewares=[correlation_middleware, problem_middleware, error_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics
    # Concurrent POSTs share confirmed publishes, one message per shard queue per flush.
    group = GroupCommitter(
        publisher=publisher,
        window_s=settings.receiver_group_window_ms / 1000,
        max_items=settings.receiver_group_max_items,
    )

    async def drain_group(_: web.Application) -> None:
        await group.drain(timeout_s=settings.publish_timeout_s + _PUBLISH_GRACE_S)

    app.on_shutdown.append(drain_group)
    add_graph_routes(
        app,
        settings=settings,
        lookup=lookup,
        publisher=group,
        hasher=hasher,
        ciphers=ciphers,
        metrics=metrics,
        clock=clock,
        body_read_timeout_s=body_read_timeout_s,
    )
    add_health_routes(app, readiness=readiness)
    return app

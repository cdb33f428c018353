"""The Microsoft Graph client: per-mailbox concurrency, throttling, retries, immutable ids.

Every request carries a delegated bearer token from :class:`AccessTokens`, the
``Prefer: IdType="ImmutableId"`` opt-in and a fresh ``client-request-id``. 429/503/504
answers are retried inline when ``Retry-After`` is short, otherwise raised as
:class:`ThrottledError` so that the caller parks the work in a retry queue instead of
holding a message (docs/design.md "Waiting is never done by holding a message").

Graph throttles a mailbox, not a request: every request passes the mailbox's gate
(:mod:`processor.mailbox_gates`), which a ``Retry-After`` on any answer for the mailbox
closes until it has elapsed.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote, urlencode

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from handlers.errors import DeltaResetRequired, PermanentError, ThrottledError, TransientError
from handlers.records import DeltaPage
from handlers.timeutil import isoformat_z
from processor.interfaces import AccessTokens
from processor.logs import get_logger
from processor.mailbox_gates import MailboxGates, parse_retry_after

log = get_logger(__name__)

PREFER_IMMUTABLE_ID: Final = 'IdType="ImmutableId"'
PREFER_UTC: Final = 'outlook.timezone="UTC"'
#: Statuses Graph documents as "wait, then repeat" (429, and 503/504 with or without Retry-After).
THROTTLE_STATUSES: Final = frozenset({429, 503, 504})
#: Error codes Graph uses (with 400 or 404) when a delta token can no longer be used.
DELTA_RESET_CODES: Final = frozenset({"syncstatenotfound", "resyncrequired"})
#: Exceptions that mean "the request may not have reached Graph or its answer was lost"
#: (the HTTP transport's; the broker's are :data:`processor.broker.CONNECTION_EXCEPTIONS`).
HTTP_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, TimeoutError, ConnectionError)


class ResourceNotFound(PermanentError):
    """Graph answered 404 where the method has no "gone" answer of its own (e.g. the mailbox)."""


class ForeignLinkError(PermanentError):
    """A ``@odata.nextLink``/``deltaLink`` points outside the configured Graph URL.

    Following it would send the account's bearer token to whoever named the URL.
    """


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any
    headers: Mapping[str, str]


def build_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A verifying client context: the system trust store plus ``ca_bundle`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


def create_http_session(*, ca_bundle: str | None, timeout_s: float) -> aiohttp.ClientSession:
    """An aiohttp session for Graph: TLS always verified, ``ca_bundle`` trusted in addition."""
    connector = aiohttp.TCPConnector(ssl=build_ssl_context(ca_bundle), limit=200)
    # trust_env=False: proxies and CA overrides come from our settings, not ambient variables.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        trust_env=False,
        raise_for_status=False,
    )


#: Longest Graph error code passed on; Graph's are short camelCase words.
_MAX_CODE_CHARS: Final = 64


def _error_code_of(body: Any) -> str:
    """Graph's ``error.code`` (empty when absent or not a short word).

    Graph's ``error.message`` is never read: it is free text from outside (it may quote
    the request back) and must not reach logs, dead-letter headers or ``event.rejected``.
    """
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            if isinstance(code, str) and len(code) <= _MAX_CODE_CHARS and code.isprintable():
                return code
    return ""


def same_origin(link: URL, base: URL) -> bool:
    """Whether ``link`` has ``base``'s scheme, host and port and lies under its path."""
    prefix = base.path.rstrip("/") + "/"
    return (
        link.scheme.lower() == base.scheme.lower()
        and (link.host or "").lower() == (base.host or "").lower()
        and link.port == base.port
        and not link.user
        and (link.path == prefix.rstrip("/") or link.path.startswith(prefix))
    )


class GraphClient:
    """Calls Microsoft Graph on behalf of connected accounts (delegated tokens)."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        graph_url: str,
        tokens: AccessTokens,
        max_concurrency_per_mailbox: int = 3,
        inline_retry_max_wait_s: float = 2.0,
        max_attempts: int = 4,
        request_timeout_s: float = 30.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_concurrency_per_mailbox < 1 or max_attempts < 1:
            raise ValueError("max_concurrency_per_mailbox and max_attempts must be at least 1")
        self._session = session
        self._graph_url = graph_url.rstrip("/")
        self._base = URL(self._graph_url)
        self._tokens = tokens
        self._inline_max_s = inline_retry_max_wait_s
        self._max_attempts = max_attempts
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311  jitter, not security
        #: Counts by outcome, for the metrics module: requests (HTTP calls made), succeeded,
        #: not_found, throttled (429/503/504 answers), retries (inline), unauthorized,
        #: delta_resets, errors (calls that ended in an exception), gate_waits (requests
        #: held back by a mailbox's Retry-After), gate_refusals (failed without a request).
        self.stats: Counter[str] = Counter()
        self._gates = MailboxGates(
            limit=max_concurrency_per_mailbox,
            inline_max_s=inline_retry_max_wait_s,
            stats=self.stats,
            sleep=sleep,
            monotonic=monotonic,
        )

    # ---- events -----------------------------------------------------------------------------

    async def get_event(
        self, account_id: str, user_id: str, event_id: str, *, select: Sequence[str]
    ) -> dict[str, Any] | None:
        """The event's current state, or None when it is deleted (404)."""
        params = {"$select": ",".join(select)} if select else {}
        answer = await self._call(
            "GET",
            self._url(f"/users/{_q(user_id)}/events/{_q(event_id)}", params),
            account_id=account_id,
            gate=user_id,
            template="/users/{user_id}/events/{event_id}",
            prefer=(PREFER_IMMUTABLE_ID, PREFER_UTC),
            none_on_404=True,
        )
        return None if answer is None else _as_dict(answer.body)

    async def list_instances(
        self,
        account_id: str,
        user_id: str,
        series_master_id: str,
        start: datetime,
        end: datetime,
        *,
        select: Sequence[str],
    ) -> list[dict[str, Any]]:
        """The occurrences and exceptions of a series in ``[start, end)``, all pages."""
        params = {"startDateTime": isoformat_z(start), "endDateTime": isoformat_z(end)}
        if select:
            params["$select"] = ",".join(select)
        return await self._collect(
            self._url(f"/users/{_q(user_id)}/events/{_q(series_master_id)}/instances", params),
            account_id=account_id,
            gate=user_id,
            template="/users/{user_id}/events/{event_id}/instances",
            prefer=(PREFER_IMMUTABLE_ID, PREFER_UTC),
        )

    async def calendar_view_delta(
        self,
        account_id: str,
        user_id: str,
        *,
        delta_link: str | None,
        start: datetime,
        end: datetime,
        page_size: int = 100,
    ) -> AsyncIterator[DeltaPage]:
        """One delta round: pages until the one that carries the next ``delta_link``.

        Without ``delta_link`` the round starts from ``calendarView/delta`` over
        ``[start, end)``; with one, ``start``/``end`` are ignored (they are encoded in the
        link). Raises :class:`DeltaResetRequired` when Graph refuses the link.
        """
        if delta_link:
            url = URL(delta_link, encoded=True)
            if not same_origin(url, self._base):
                # Stored under another Graph URL setting: start over rather than follow it.
                self.stats["delta_resets"] += 1
                log.warning("graph.link.refused", account_id=account_id, kind="stored_delta_link")
                raise DeltaResetRequired("the stored delta link is not under the Graph URL")
        else:
            url = self._url(
                f"/users/{_q(user_id)}/calendarView/delta",
                {"startDateTime": isoformat_z(start), "endDateTime": isoformat_z(end)},
            )
        prefer = (PREFER_IMMUTABLE_ID, PREFER_UTC, f"odata.maxpagesize={page_size}")
        while True:
            answer = await self._call(
                "GET",
                url,
                account_id=account_id,
                gate=user_id,
                template="/users/{user_id}/calendarView/delta",
                prefer=prefer,
                delta=True,
            )
            assert answer is not None
            body = _as_dict(answer.body)
            items: list[dict[str, Any]] = []
            removed: list[str] = []
            for entry in body.get("value") or []:
                if not isinstance(entry, dict):
                    continue
                if "@removed" in entry:
                    if entry.get("id"):
                        removed.append(str(entry["id"]))
                else:
                    items.append(entry)
            next_link = body.get("@odata.nextLink")
            if next_link:
                next_url = self._own_link(next_link, account_id=account_id, kind="nextLink")
                yield DeltaPage(items=items, removed_ids=removed, delta_link=None)
                url = next_url
                continue
            new_delta = body.get("@odata.deltaLink")
            if not new_delta:
                self.stats["errors"] += 1
                raise TransientError("Graph delta page carried neither nextLink nor deltaLink")
            self._own_link(new_delta, account_id=account_id, kind="deltaLink")
            yield DeltaPage(items=items, removed_ids=removed, delta_link=str(new_delta))
            return

    async def create_event(
        self, account_id: str, user_id: str, body: Mapping[str, Any], *, transaction_id: str
    ) -> dict[str, Any]:
        """Create an event; ``transaction_id`` makes Graph drop a retried duplicate."""
        payload = {**body, "transactionId": transaction_id}
        answer = await self._call(
            "POST",
            self._url(f"/users/{_q(user_id)}/events"),
            account_id=account_id,
            gate=user_id,
            template="/users/{user_id}/events",
            prefer=(PREFER_IMMUTABLE_ID, PREFER_UTC),
            json_body=payload,
        )
        assert answer is not None
        return _as_dict(answer.body)

    async def update_event(
        self, account_id: str, user_id: str, event_id: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """PATCH an event and return its new state, or None when it is deleted (404)."""
        answer = await self._call(
            "PATCH",
            self._url(f"/users/{_q(user_id)}/events/{_q(event_id)}"),
            account_id=account_id,
            gate=user_id,
            template="/users/{user_id}/events/{event_id}",
            prefer=(PREFER_IMMUTABLE_ID, PREFER_UTC),
            json_body=dict(patch),
            none_on_404=True,
        )
        return None if answer is None else _as_dict(answer.body)

    async def delete_event(self, account_id: str, user_id: str, event_id: str) -> bool:
        """Delete an event; False when it was already gone (404)."""
        answer = await self._call(
            "DELETE",
            self._url(f"/users/{_q(user_id)}/events/{_q(event_id)}"),
            account_id=account_id,
            gate=user_id,
            template="/users/{user_id}/events/{event_id}",
            prefer=(PREFER_IMMUTABLE_ID,),
            none_on_404=True,
        )
        return answer is not None

    # ---- user and subscriptions -------------------------------------------------------------

    async def me(self, account_id: str) -> dict[str, Any]:
        """The signed-in user's profile (``GET /me``)."""
        answer = await self._call(
            "GET",
            self._url("/me"),
            account_id=account_id,
            gate=_account_gate(account_id),
            template="/me",
            prefer=(PREFER_IMMUTABLE_ID,),
        )
        assert answer is not None
        return _as_dict(answer.body)

    async def create_subscription(self, account_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create a subscription (immutable ids in its notifications); returns Graph's object."""
        answer = await self._call(
            "POST",
            self._url("/subscriptions"),
            account_id=account_id,
            gate=_account_gate(account_id),
            template="/subscriptions",
            prefer=(PREFER_IMMUTABLE_ID,),
            json_body=dict(body),
        )
        assert answer is not None
        return _as_dict(answer.body)

    async def renew_subscription(
        self, account_id: str, subscription_id: str, expiration: datetime
    ) -> dict[str, Any] | None:
        """Extend (and reauthorize) a subscription; None when Graph no longer has it."""
        answer = await self._call(
            "PATCH",
            self._url(f"/subscriptions/{_q(subscription_id)}"),
            account_id=account_id,
            gate=_account_gate(account_id),
            template="/subscriptions/{subscription_id}",
            prefer=(PREFER_IMMUTABLE_ID,),
            json_body={"expirationDateTime": isoformat_z(expiration)},
            none_on_404=True,
        )
        return None if answer is None else _as_dict(answer.body)

    async def reauthorize_subscription(self, account_id: str, subscription_id: str) -> bool:
        """Reauthorize without extending; False when Graph no longer has the subscription."""
        answer = await self._call(
            "POST",
            self._url(f"/subscriptions/{_q(subscription_id)}/reauthorize"),
            account_id=account_id,
            gate=_account_gate(account_id),
            template="/subscriptions/{subscription_id}/reauthorize",
            prefer=(PREFER_IMMUTABLE_ID,),
            none_on_404=True,
        )
        return answer is not None

    async def delete_subscription(self, account_id: str, subscription_id: str) -> bool:
        """Delete a subscription; False when it was already gone."""
        answer = await self._call(
            "DELETE",
            self._url(f"/subscriptions/{_q(subscription_id)}"),
            account_id=account_id,
            gate=_account_gate(account_id),
            template="/subscriptions/{subscription_id}",
            prefer=(PREFER_IMMUTABLE_ID,),
            none_on_404=True,
        )
        return answer is not None

    async def list_subscriptions(self, account_id: str) -> list[dict[str, Any]]:
        """Every subscription the app holds for this account, all pages."""
        return await self._collect(
            self._url("/subscriptions"),
            account_id=account_id,
            gate=_account_gate(account_id),
            template="/subscriptions",
            prefer=(PREFER_IMMUTABLE_ID,),
        )

    # ---- plumbing ---------------------------------------------------------------------------

    def _own_link(self, link: Any, *, account_id: str, kind: str) -> URL:
        """``link`` as a URL if it lies under the configured Graph URL, else refuse it."""
        try:
            url = URL(str(link), encoded=True)
        except ValueError:
            url = None
        if url is None or not same_origin(url, self._base):
            self.stats["errors"] += 1
            # The host only: the rest of a link may carry tokens.
            host = None if url is None else url.host
            log.warning("graph.link.refused", account_id=account_id, kind=kind, host=host)
            raise ForeignLinkError(f"Graph answered a {kind} outside the configured Graph URL")
        return url

    def _url(self, path: str, params: Mapping[str, str] | None = None) -> URL:
        query = f"?{urlencode(params, quote_via=quote)}" if params else ""
        return URL(f"{self._graph_url}{path}{query}", encoded=True)

    async def _collect(
        self, url: URL, *, account_id: str, gate: str, template: str, prefer: Sequence[str]
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        next_url: URL | None = url
        while next_url is not None:
            answer = await self._call(
                "GET", next_url, account_id=account_id, gate=gate, template=template, prefer=prefer
            )
            assert answer is not None
            body = _as_dict(answer.body)
            items.extend(v for v in body.get("value") or [] if isinstance(v, dict))
            link = body.get("@odata.nextLink")
            next_url = (
                self._own_link(link, account_id=account_id, kind="nextLink") if link else None
            )
        return items

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, capped."""
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2.0 ** (attempt - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def _retry_inline(
        self,
        attempt: int,
        wait_s: float,
        event: str,
        *,
        failed_event: str = "graph.request.failed",
        allowed: bool = True,
        **fields: Any,
    ) -> bool:
        """Wait ``wait_s`` and return True when the request may be repeated here (``allowed``
        and attempts left); otherwise count and log the failure and return False."""
        if allowed and attempt < self._max_attempts:
            self.stats["retries"] += 1
            log.info(event, **fields, attempt=attempt, wait_s=round(wait_s, 3), inline=True)
            await self._sleep(wait_s)
            return True
        self.stats["errors"] += 1
        log.warning(failed_event, **fields, attempt=attempt, wait_s=round(wait_s, 3), inline=False)
        return False

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        gate: str,
        template: str,
        headers: CIMultiDict[str],
        json_body: Mapping[str, Any] | None,
    ) -> _Answer:
        async with self._gates.passage(gate, method=method, template=template):
            return await self._request(method, url, headers=headers, json_body=json_body)

    async def _request(
        self,
        method: str,
        url: URL,
        *,
        headers: CIMultiDict[str],
        json_body: Mapping[str, Any] | None,
    ) -> _Answer:
        async with self._session.request(
            method,
            url,
            headers=headers,
            json=json_body,
            timeout=self._timeout,
            allow_redirects=False,
        ) as resp:
            self.stats["requests"] += 1
            raw = await resp.read()
            body: Any = None
            if raw:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
            return _Answer(resp.status, body, dict(resp.headers))

    async def _call(
        self,
        method: str,
        url: URL,
        *,
        account_id: str,
        gate: str,
        template: str,
        prefer: Sequence[str],
        json_body: Mapping[str, Any] | None = None,
        none_on_404: bool = False,
        delta: bool = False,
    ) -> _Answer | None:
        """One logical request: retries inline, returns the 2xx answer or None on a 404."""
        attempt = 0
        reauthenticated = False
        ctx: dict[str, Any] = {"account_id": account_id, "method": method, "path": template}
        while True:
            attempt += 1
            request_id = str(uuid.uuid4())
            headers = _headers(await self._tokens.access_token(account_id), request_id, prefer)
            try:
                answer = await self._send(
                    method, url, gate=gate, template=template, headers=headers, json_body=json_body
                )
            except HTTP_TRANSPORT_ERRORS as exc:
                reason = type(exc).__name__
                if await self._retry_inline(
                    attempt,
                    self._backoff_s(attempt),
                    "graph.request.retry",
                    **ctx,
                    reason=reason,
                    client_request_id=request_id,
                ):
                    continue
                raise TransientError(f"Graph {method} {template}: {reason}") from exc

            status = answer.status
            code = _error_code_of(answer.body)
            graph_request_id = answer.headers.get("request-id", "")
            if 200 <= status < 300:
                self.stats["succeeded"] += 1
                return answer
            if status == 404 and none_on_404 and code.lower() not in DELTA_RESET_CODES:
                self.stats["not_found"] += 1
                return None
            if status == 401:
                self.stats["unauthorized"] += 1
                if not reauthenticated:
                    reauthenticated = True
                    attempt -= 1  # a token refresh is not a retry of the same request
                    self._tokens.invalidate(account_id)
                    log.info("graph.request.unauthorized", **ctx, code=code)
                    continue
                self._tokens.invalidate(account_id)  # do not hand the refused token out again
                self.stats["errors"] += 1
                log.warning(
                    "graph.request.failed",
                    **ctx,
                    status=status,
                    code=code,
                    request_id=graph_request_id,
                )
                raise TransientError(f"Graph {method} {template}: 401 {code} with a fresh token")
            if status in THROTTLE_STATUSES:
                self.stats["throttled"] += 1
                retry_after = parse_retry_after(answer.headers.get("Retry-After"))
                wait_s = self._backoff_s(attempt) if retry_after is None else retry_after
                if retry_after is not None:
                    self._gates.close(gate, retry_after)
                if await self._retry_inline(
                    attempt,
                    wait_s,
                    "graph.request.throttled",
                    failed_event="graph.request.throttled",
                    allowed=wait_s <= self._inline_max_s,
                    **ctx,
                    status=status,
                    code=code,
                    retry_after_s=retry_after,
                ):
                    continue
                raise ThrottledError(
                    f"Graph {method} {template}: {status} {code}".rstrip(),
                    retry_after_s=wait_s,
                )
            if delta and (status == 410 or code.lower() in DELTA_RESET_CODES):
                self.stats["delta_resets"] += 1
                self.stats["errors"] += 1
                log.info("graph.delta.reset_required", **ctx, status=status, code=code)
                raise DeltaResetRequired(f"Graph {method} {template}: {status} {code}".rstrip())
            if status >= 500:
                if await self._retry_inline(
                    attempt,
                    self._backoff_s(attempt),
                    "graph.request.retry",
                    **ctx,
                    status=status,
                    code=code,
                    request_id=graph_request_id,
                ):
                    continue
                raise TransientError(f"Graph {method} {template}: {status} {code}".rstrip())
            # Every other answer (400, 403, 404 without a "gone" meaning, 405, 409, 412, 3xx…)
            # will not change by repeating the same request.
            self.stats["errors"] += 1
            log.warning(
                "graph.request.failed", **ctx, status=status, code=code, request_id=graph_request_id
            )
            reason = f"Graph {method} {template}: {status} {code}".rstrip()
            if status == 404:
                raise ResourceNotFound(reason)
            raise PermanentError(reason)


def _headers(token: str, request_id: str, prefer: Sequence[str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Authorization"] = f"Bearer {token}"
    headers["Accept"] = "application/json"
    headers["client-request-id"] = request_id
    headers["return-client-request-id"] = "true"
    for value in prefer:  # one Prefer header per preference, as Graph's docs show them
        headers.add("Prefer", value)
    return headers


def _q(segment: str) -> str:
    """Percent-encode one path segment (ids may hold ``/``, ``+`` or ``=``)."""
    return quote(segment, safe="")


def _account_gate(account_id: str) -> str:
    """Concurrency key for calls that address no mailbox (``/me``, ``/subscriptions``)."""
    return f"account:{account_id}"


def _as_dict(body: Any) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    if body is None:
        return {}
    raise TransientError(f"Graph answered a {type(body).__name__} where an object was expected")

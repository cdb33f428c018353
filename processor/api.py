"""The 1Relation API: ``/api/v1/accounts/...`` (docs/contract.md §2).

Every route needs ``Authorization: Bearer <M365SYNC_API_TOKEN>``; the token is compared in
constant time with every configured one (so a rotation can overlap), and anything else
answers 401 before the account is even looked at. Errors are the contract's JSON shape.

- ``GET    /api/v1/accounts/{id}``: the status document; 404 when unknown.
- ``GET    /api/v1/accounts/{id}/events?start&end[&limit][&cursor]``: live events overlapping
  ``[start, end)``, decrypted, sorted by start then ``event_key``, paged through ``next``.
- ``POST   /api/v1/accounts/{id}/resync``: queue a full resync; 202.
- ``DELETE /api/v1/accounts/{id}``: erase; 204, also when repeated or never known.
- ``GET    /api/v1/openapi.json``: ``docs/openapi.yaml`` as JSON.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode

from aiohttp import web

from contract import openapi_document
from contract.problems import json_error
from crypto import DecryptionError
from handlers.errors import AccountUnavailable, KeyUnreadable, PublishError, TransientError
from handlers.ports import Publisher
from handlers.records import CONTRACT_EVENT_FIELDS
from handlers.timeutil import parse_graph_datetime, to_millis
from handlers.timezones import event_time_to_utc
from processor.accounts import AccountStatuses
from processor.event_links import LinkStore
from processor.event_store import EventStore
from processor.logs import get_logger
from processor.resync import ResyncPublisher
from processor.settings import Settings
from processor.store import Store
from processor.tokens import MsalApps, MsalSignIn
from subscriptions.erasure import Eraser
from subscriptions.links import is_account_id
from subscriptions.ports import SignInSettings

if TYPE_CHECKING:
    from processor.app import Runtime

__all__ = [
    "API_PREFIX",
    "add_account_routes",
    "add_api_routes",
    "event_for_api",
]

log = get_logger(__name__)

API_PREFIX: Final = "/api/v1"
DEFAULT_LIMIT: Final = 1000
MAX_LIMIT: Final = 1000
#: Widest window one request may ask for (a bound on the work one call can cause).
MAX_WINDOW: Final = timedelta(days=732)
MAX_CURSOR_CHARS: Final = 512
#: The resync reason that also releases the mass-deletion brake (handlers.delta).
OPERATOR_RESYNC_REASON: Final = "operator"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LIMIT: Final = re.compile(r"[0-9]{1,7}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _utc_time(value: Any, *, all_day: bool) -> Any:
    """Graph's ``{"dateTime", "timeZone"}`` in UTC (Graph's 7-digit format).

    All-day events keep their own dates: they are floating days, not instants, and moving
    them to UTC would shift them into the previous or next day.
    """
    if all_day:
        return value
    instant = event_time_to_utc(value)
    if instant is None:
        return value
    return {"dateTime": instant.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0", "timeZone": "UTC"}


def event_for_api(
    event_key: str, content: Mapping[str, Any], relation_event_id: Any
) -> dict[str, Any]:
    """One stored event in the contract's shape: Graph's fields, times in UTC, plus keys."""
    all_day = bool(content.get("isAllDay"))
    event = {name: content.get(name) for name in CONTRACT_EVENT_FIELDS}
    event["type"] = content.get("type") or "singleInstance"
    event["start"] = _utc_time(content.get("start"), all_day=all_day)
    event["end"] = _utc_time(content.get("end"), all_day=all_day)
    event["event_key"] = event_key
    event["relation_event_id"] = relation_event_id if isinstance(relation_event_id, str) else None
    return event


def _encode_cursor(start: datetime, key: str) -> str:
    raw = json.dumps({"s": to_millis(start), "k": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_cursor(text: str) -> tuple[datetime, str]:
    if len(text) > MAX_CURSOR_CHARS:
        raise _BadRequest("cursor is not one this service issued")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
        millis, key = data["s"], data["k"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise _BadRequest("cursor is not one this service issued") from None
    if isinstance(millis, bool) or not isinstance(millis, int) or not isinstance(key, str):
        raise _BadRequest("cursor is not one this service issued")
    try:
        return _EPOCH + timedelta(milliseconds=millis), key
    except OverflowError:  # an integer no datetime can hold
        raise _BadRequest("cursor is not one this service issued") from None


def _instant(query: Mapping[str, str], name: str) -> datetime:
    value = query.get(name)
    if not value:
        raise _BadRequest(f"{name} is required (ISO 8601, e.g. 2026-12-01T00:00:00Z)")
    try:
        return parse_graph_datetime(value)
    except (ValueError, OverflowError):
        raise _BadRequest(f"{name} is not an ISO 8601 date-time") from None


def _window(query: Mapping[str, str]) -> tuple[datetime, datetime]:
    start, end = _instant(query, "start"), _instant(query, "end")
    if end <= start:
        raise _BadRequest("end must be after start")
    if end - start > MAX_WINDOW:
        raise _BadRequest(f"the window may span at most {MAX_WINDOW.days} days")
    return start, end


def _limit(query: Mapping[str, str]) -> int:
    value = query.get("limit")
    if value is None:
        return DEFAULT_LIMIT
    # str.isdigit() also accepts "²" and other non-ASCII digits int() refuses.
    if _LIMIT.fullmatch(value) is None or not 1 <= int(value) <= MAX_LIMIT:
        raise _BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(value)


class _Api:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        events: EventStore,
        links: LinkStore,
        statuses: AccountStatuses,
        publisher: Publisher,
        eraser: Eraser,
    ) -> None:
        self._settings = settings
        self._store = store
        self._events = events
        self._links = links
        self._statuses = statuses
        self._publisher = publisher
        self._eraser = eraser
        self._tokens = tuple(token.encode("utf-8") for token in settings.api_tokens)

    # ---- authentication -------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        candidate = given.strip().encode("utf-8")
        matched = False
        for token in self._tokens:  # no early exit: every token is compared every time
            matched |= hmac.compare_digest(candidate, token)
        return matched

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the bearer check."""

        async def guard(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                log.info("api.unauthorized", path=request.path, method=request.method)
                return json_error(
                    401,
                    "unauthorized",
                    "a valid bearer token is required",
                    headers={"WWW-Authenticate": 'Bearer realm="m365sync"'},
                )
            return await handler(request)

        return guard

    # ---- routes -----------------------------------------------------------------------------

    @staticmethod
    def _not_found() -> web.Response:
        return json_error(404, "account_not_found", "no such account")

    async def status(self, request: web.Request) -> web.StreamResponse:
        account_id = request.match_info["account_id"]
        if not is_account_id(account_id):
            return self._not_found()
        try:
            document = await self._statuses.document(account_id)
        except AccountUnavailable:  # erased between the two reads
            document = None
        except KeyUnreadable:
            return _key_unreadable()
        if document is None:
            return self._not_found()
        return web.json_response(document)

    async def events(self, request: web.Request) -> web.StreamResponse:
        account_id = request.match_info["account_id"]
        try:
            start, end = _window(request.query)
            limit = _limit(request.query)
            cursor = request.query.get("cursor")
            after = _decode_cursor(cursor) if cursor is not None else None
        except _BadRequest as exc:
            return json_error(400, "bad_request", exc.message)
        account = await self._store.accounts.get(account_id) if is_account_id(account_id) else None
        if account is None:
            return self._not_found()
        try:
            cipher = await self._store.cipher_for(account_id, account)
        except AccountUnavailable:
            return self._not_found()
        except KeyUnreadable:
            return _key_unreadable()
        docs = await self._events.page_in_window(
            account_id, start, end, after=after, limit=limit + 1
        )
        page, more = docs[:limit], len(docs) > limit
        relation_ids = await self._links.relation_ids(account_id, [str(doc["_id"]) for doc in page])
        items = []
        for doc in page:
            try:
                _, content = self._events.decrypt(doc, cipher)
            except DecryptionError:
                log.warning("api.event_unreadable", account_id=account_id, event_key=doc["_id"])
                continue
            key = str(doc["_id"])
            items.append(event_for_api(key, content, relation_ids.get(key)))
        next_url = None
        if more and page:
            params = {
                "start": request.query["start"],
                "end": request.query["end"],
                "limit": str(limit),
                "cursor": _encode_cursor(page[-1]["start"], str(page[-1]["_id"])),
            }
            next_url = (
                f"{API_PREFIX}/accounts/{quote(account_id, safe='')}/events?{urlencode(params)}"
            )
        return web.json_response({"events": items, "next": next_url})

    async def resync(self, request: web.Request) -> web.StreamResponse:
        account_id = request.match_info["account_id"]
        if not is_account_id(account_id) or await self._store.accounts.get(account_id) is None:
            return self._not_found()
        try:
            await ResyncPublisher(
                publisher=self._publisher,
                shard_count=self._settings.shard_count,
                timeout_s=self._settings.publish_timeout_s,
            ).request(account_id, full=True, reason=OPERATOR_RESYNC_REASON)
        except (PublishError, TimeoutError):
            log.warning("api.resync_not_queued", account_id=account_id)
            return json_error(
                503, "unavailable", "the resync could not be queued", headers={"Retry-After": "5"}
            )
        log.info("api.resync_queued", account_id=account_id)
        return web.json_response({"account_id": account_id, "resync": "queued"}, status=202)

    async def erase(self, request: web.Request) -> web.StreamResponse:
        account_id = request.match_info["account_id"]
        if is_account_id(account_id):  # an id that cannot exist has nothing to erase
            try:
                await self._eraser.erase(account_id)
            except TransientError:
                return json_error(
                    503,
                    "unavailable",
                    "the erasure could not be confirmed; repeat the request",
                    headers={"Retry-After": "5"},
                )
        return web.Response(status=204)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(openapi_document())

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        return json_error(404, "not_found", "no such API route")


def add_api_routes(
    app: web.Application,
    *,
    settings: Settings,
    store: Store,
    events: EventStore,
    links: LinkStore,
    statuses: AccountStatuses,
    publisher: Any,
    eraser: Eraser,
    extra_gets: Sequence[tuple[str, Handler]] = (),
) -> None:
    """Register the ``/api/v1`` routes, every one behind the bearer check (``extra_gets``:
    more GET routes under ``/api/v1`` from other modules, behind the same check)."""
    api = _Api(
        settings=settings,
        store=store,
        events=events,
        links=links,
        statuses=statuses,
        publisher=publisher,
        eraser=eraser,
    )
    account = f"{API_PREFIX}/accounts/{{account_id}}"
    router = app.router
    router.add_get(account, api.guarded(api.status), allow_head=False)
    router.add_delete(account, api.guarded(api.erase))
    router.add_get(f"{account}/events", api.guarded(api.events), allow_head=False)
    router.add_post(f"{account}/resync", api.guarded(api.resync))
    for path, handler in extra_gets:
        router.add_get(path, api.guarded(handler), allow_head=False)
    # Behind the token like every /api/v1 route (docs/contract.md §2); the same file is public in
    # docs/, so the guard hides nothing from 1Relation and nothing new from anyone else.
    router.add_get(f"{API_PREFIX}/openapi.json", api.guarded(api.openapi), allow_head=False)
    # Anything else under /api/v1 also answers 401 without a token (then 404).
    router.add_route("*", f"{API_PREFIX}/{{tail:.*}}", api.guarded(api.unknown))


async def add_account_routes(app: web.Application, rt: Runtime) -> Callable[[], None]:
    """Register connect, admin consent and ``/api/v1`` on the receiver's app.

    Returns the function that closes what this opened (MSAL's HTTP connection pool).
    """
    from processor.operator_page import (  # noqa: PLC0415
        STATUS_PATH,
        add_operator_page,
        status_handler,
    )
    from processor.status import collect as collect_status  # noqa: PLC0415
    from subscriptions.connect import add_connect_routes  # noqa: PLC0415
    from subscriptions.consent import add_consent_routes  # noqa: PLC0415
    from subscriptions.links import LinkVerifier  # noqa: PLC0415

    store = rt.store
    for repository in (store.used_links, store.connect_flows, store.consent_flows):
        await repository.ensure_indexes()
    settings = rt.settings
    apps = MsalApps(
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        client_certificate=settings.client_certificate,
        authority_host=settings.authority_host,
        ca_bundle=settings.ca_bundle,
    )
    links = LinkVerifier(
        secrets=settings.connect_secrets,
        return_url_origins=settings.return_url_origins,
        used=store.used_links,
        hasher=rt.hasher,
        require_audience=settings.link_audience_required,
    )
    sign_in_settings = SignInSettings(
        public_url=settings.public_url,
        client_id=settings.client_id,
        authority_host=settings.authority_host,
    )
    sign_in = MsalSignIn(apps=apps)
    add_connect_routes(
        app,
        settings=sign_in_settings,
        store=rt.store,
        graph=rt.graph,
        resyncs=ResyncPublisher(
            publisher=rt.publisher,
            shard_count=settings.shard_count,
            timeout_s=settings.publish_timeout_s,
        ),
        statuses=rt.statuses,
        sign_in=sign_in,
        links=links,
    )
    add_consent_routes(app, settings=sign_in_settings, store=rt.store, links=links, apps=sign_in)
    add_operator_page(app)

    async def operator_facts() -> dict[str, Any]:
        return await collect_status(
            db=rt.db, connection=rt.connection, shard_count=settings.shard_count
        )

    add_api_routes(
        app,
        settings=settings,
        store=rt.store,
        events=rt.events,
        links=rt.links,
        statuses=rt.statuses,
        publisher=rt.publisher,
        eraser=Eraser(
            store=rt.store,
            graph=rt.graph,
            tokens=rt.tokens,
            statuses=rt.statuses,
        ),
        extra_gets=[(STATUS_PATH, status_handler(operator_facts))],
    )
    return apps.close


def _key_unreadable() -> web.Response:
    """The account exists but its data key is wrapped by a master key this process lacks."""
    return json_error(
        503,
        "temporarily_unavailable",
        "the account's data cannot be read right now",
        headers={"Retry-After": "30"},
    )

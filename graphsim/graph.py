"""Graph v1.0 routes: users, events, calendarView (+delta), instances, subscriptions."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from .clock import SimClock
from .delta import DeltaEngine
from .errors import GraphError, graph_error_response
from .faults import Faults
from .identity import Identity
from .ids import make_id
from .store import SELECTABLE, Instance, Store, User
from .subscriptions import SubscriptionManager
from .timezones import TimeZoneError, canonical_windows_name, parse_query_instant

PREFER_TZ = re.compile(r'outlook\.timezone\s*=\s*"([^"]*)"', re.IGNORECASE)
PREFER_PAGE = re.compile(r"odata\.maxpagesize\s*=\s*(\d+)", re.IGNORECASE)
PREFER_IMMUTABLE = re.compile(r'IdType\s*=\s*"?ImmutableId"?', re.IGNORECASE)
EXPAND_EXT = re.compile(r"^singleValueExtendedProperties\(\$filter=(.+)\)$", re.IGNORECASE)
FILTER_EXT = re.compile(
    r"^singleValueExtendedProperties/any\(\s*(\w+)\s*:\s*\1/id\s+eq\s+'([^']*)'"
    r"(?:\s+and\s+\1/value\s+eq\s+'([^']*)')?\s*\)$",
    re.IGNORECASE,
)
SELECT_MAP = {name.lower(): name for name in SELECTABLE}
DEFAULT_PAGE = 10
MAX_TOP = 1000


@dataclass
class Ctx:
    """What one Graph request is allowed to do and how it wants its answer."""

    request: web.Request
    claims: dict[str, Any]
    app_id: str
    tenant_id: str
    user: User | None  # the signed-in user for delegated tokens
    immutable: bool
    tz_name: str
    page_size: int | None
    base: str  # request URL up to the resource path, for nextLinks

    @property
    def delegated(self) -> bool:
        return self.user is not None

    def perms(self) -> set[str]:
        if self.delegated:
            return set(str(self.claims.get("scp", "")).split())
        return set(self.claims.get("roles") or [])


@dataclass
class Counters:
    total: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_mailbox: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    throttled_429: int = 0
    unavailable_503: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5000))
    # The top-level fields of every PATCH of an event that reached the store, in order.
    patch_fields: deque[list[str]] = field(default_factory=lambda: deque(maxlen=5000))
    # Requests that reached a mailbox before the Retry-After of an earlier answer for that
    # mailbox (app + mailbox, any method) had elapsed; those arriving within the grace of
    # the answer are counted apart (they were most likely sent before it was read).
    retry_after_violations: int = 0
    retry_after_violations_by_mailbox: Counter[str] = field(default_factory=Counter)
    retry_after_within_grace: int = 0
    retry_after_recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_kind": dict(self.by_kind),
            "by_mailbox": dict(self.by_mailbox),
            "by_status": dict(self.by_status),
            "throttled_429": self.throttled_429,
            "unavailable_503": self.unavailable_503,
            "retry_after_violations": self.retry_after_violations,
            "retry_after_violations_by_mailbox": dict(self.retry_after_violations_by_mailbox),
            "retry_after_within_grace": self.retry_after_within_grace,
            "retry_after_recent": list(self.retry_after_recent),
            "recent": list(self.recent),
            "patch_fields": list(self.patch_fields),
        }


def _deny() -> GraphError:
    return GraphError(
        403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
    )


class GraphApi:
    """Dispatches /v1.0/... with auth, throttling and fault injection in front."""

    def __init__(
        self,
        *,
        store: Store,
        identity: Identity,
        subs: SubscriptionManager,
        delta: DeltaEngine,
        faults: Faults,
        clock: SimClock,
    ) -> None:
        self.store = store
        self.identity = identity
        self.subs = subs
        self.delta = delta
        self.faults = faults
        self.clock = clock
        self.counters = Counters()
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._budget: dict[tuple[str, str], deque[float]] = {}
        #: (app, mailbox) -> (real time of the last throttled answer, real time its wait ends).
        self._throttled: dict[tuple[str, str], tuple[float, float]] = {}
        self.graph_url = ""

    def reset(self) -> None:
        self.counters = Counters()
        self._budget.clear()
        self._throttled.clear()

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/v1.0/{tail:.*}", self.handle)]

    # ---- front door ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # Real time, not the simulator's clock: Retry-After is waited in real seconds.
        arrived = time.monotonic()
        rid = str(uuid.uuid4())
        kind = "unknown"
        mailbox = ""
        app_id = ""
        try:
            ctx = self._auth(request)
            app_id = ctx.app_id
            segs = [s for s in request.match_info["tail"].split("/") if s]
            kind, mailbox_user, handler = self._route(ctx, request.method, segs)
            mailbox = mailbox_user.id if mailbox_user else ""
            if mailbox:
                self._watch_arrival(app_id, mailbox, kind, request.method, arrived)
            resp = await self._guarded(ctx, mailbox, handler, kind)
        except GraphError as err:
            resp = graph_error_response(err.status, err.code, err.message, rid, err.headers)
        if mailbox and resp.status in (429, 503, 504):
            self._watch_answer(app_id, mailbox, resp.headers.get("Retry-After"))
        resp.headers.setdefault("request-id", rid)
        resp.headers.setdefault("client-request-id", request.headers.get("client-request-id", rid))
        c = self.counters
        c.total += 1
        c.by_kind[kind] += 1
        c.by_status[str(resp.status)] += 1
        if mailbox:
            c.by_mailbox[mailbox] += 1
        if resp.status == 429:
            c.throttled_429 += 1
        if resp.status == 503:
            c.unavailable_503 += 1
        c.recent.append(
            {
                "method": request.method,
                "path": request.path,
                "kind": kind,
                "mailbox": mailbox,
                "status": resp.status,
                "sim_time": self.clock.now_s(),
            }
        )
        return resp

    def _watch_arrival(
        self, app_id: str, mailbox: str, kind: str, method: str, arrived: float
    ) -> None:
        """Count a request that reaches a mailbox whose Retry-After has not elapsed."""
        window = self._throttled.get((app_id, mailbox))
        if window is None:
            return
        answered, until = window
        if arrived >= until:
            del self._throttled[(app_id, mailbox)]
            return
        c = self.counters
        if arrived - answered < self.faults.retry_after_grace_ms / 1000:
            c.retry_after_within_grace += 1
            return
        c.retry_after_violations += 1
        c.retry_after_violations_by_mailbox[mailbox] += 1
        c.retry_after_recent.append(
            {
                "mailbox": mailbox,
                "kind": kind,
                "method": method,
                "after_answer_s": round(arrived - answered, 4),
                "early_by_s": round(until - arrived, 4),
            }
        )

    def _watch_answer(self, app_id: str, mailbox: str, retry_after: str | None) -> None:
        """Remember until when a throttled answer told the mailbox's client to wait."""
        try:
            wait_s = float(retry_after) if retry_after is not None else 0.0
        except ValueError:
            return
        if not math.isfinite(wait_s) or wait_s <= 0:
            return
        now = time.monotonic()
        previous = self._throttled.get((app_id, mailbox))
        until = max(now + wait_s, previous[1] if previous else 0.0)
        self._throttled[(app_id, mailbox)] = (now, until)

    async def _guarded(
        self, ctx: Ctx, mailbox: str, handler: Any, kind: str = ""
    ) -> web.StreamResponse:
        key = (ctx.app_id, mailbox)
        if mailbox:
            if self._in_flight[key] >= self.faults.max_concurrent_per_mailbox:
                raise GraphError(
                    429,
                    "ApplicationThrottled",
                    "Application is over its MailboxConcurrency limit.",
                    headers={"Retry-After": self.faults.throttle_retry_after},
                )
            window = self._budget.setdefault(key, deque())
            now = self.clock.now_s()
            while window and window[0] <= now - self.faults.mailbox_budget_window_s:
                window.popleft()
            if len(window) >= self.faults.mailbox_budget:
                raise GraphError(
                    429,
                    "ApplicationThrottled",
                    "Application is over its MailboxRequests limit.",
                    headers={"Retry-After": self.faults.throttle_retry_after},
                )
            window.append(now)
        random_faults = self.faults.random_faults_apply(kind)
        rate_429 = self.faults.random_429_rate
        if random_faults and rate_429 and self.faults.rng.random() < rate_429:
            low = self.faults.random_429_retry_after_min_s
            high = max(low, self.faults.random_429_retry_after_max_s)
            wait_s = self.faults.rng.uniform(low, high)
            raise GraphError(
                429,
                "TooManyRequests",
                "Too many requests; retry after the time in Retry-After.",
                headers={"Retry-After": f"{wait_s:.3f}"},
            )
        if (
            random_faults
            and self.faults.random_503_rate
            and self.faults.rng.random() < self.faults.random_503_rate
        ):
            headers = {}
            if self.faults.random_503_retry_after and self.faults.rng.random() < 0.5:
                headers["Retry-After"] = self.faults.random_503_retry_after
            raise GraphError(
                503,
                "serviceNotAvailable",
                "The service is temporarily unavailable.",
                headers=headers,
            )
        if mailbox:
            self._in_flight[key] += 1
        try:
            if self.faults.latency_ms:
                await asyncio.sleep(self.faults.latency_ms / 1000)
            result: web.StreamResponse = await handler()
            is_write = ctx.request.method in ("POST", "PATCH", "DELETE")
            if self.faults.write_answer_delay_ms and is_write:
                # The change is already made; only the answer is late (a client that times
                # out or dies now does not know its write happened).
                await asyncio.sleep(self.faults.write_answer_delay_ms / 1000)
            return result
        finally:
            if mailbox:
                self._in_flight[key] -= 1
                if self._in_flight[key] <= 0:
                    del self._in_flight[key]

    def _auth(self, request: web.Request) -> Ctx:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        claims = self.identity.verify_access_token(header[7:].strip())
        user = None
        if claims.get("idtyp") == "user":
            user = self.store.find_user(claims["oid"])
            if user is None:
                raise GraphError(401, "InvalidAuthenticationToken", "User not found.")
        prefer = ",".join(request.headers.getall("Prefer", []))
        tz_name = "UTC"
        tz_match = PREFER_TZ.search(prefer)
        if tz_match:
            try:
                tz_name = canonical_windows_name(tz_match.group(1))
            except TimeZoneError:
                tz_name = "UTC"  # Graph ignores a zone it does not know and answers in UTC
        page = PREFER_PAGE.search(prefer)
        return Ctx(
            request=request,
            claims=claims,
            app_id=claims["appid"],
            tenant_id=claims["tid"],
            user=user,
            immutable=bool(PREFER_IMMUTABLE.search(prefer)),
            tz_name=tz_name,
            page_size=int(page.group(1)) if page else None,
            base=self.graph_url,
        )

    # ---- routing ---------------------------------------------------------------------------

    def _mailbox(self, ctx: Ctx, segs: list[str]) -> tuple[User, list[str]]:
        head = segs[0].lower()
        if head == "me":
            if ctx.user is None:
                raise GraphError(
                    400,
                    "BadRequest",
                    "/me request is only valid with delegated authentication flow.",
                )
            return ctx.user, segs[1:]
        if head == "users" and len(segs) >= 2:
            user = self.store.find_user(segs[1])
            if user is None or user.tenant_id != ctx.tenant_id:
                raise GraphError(
                    404, "ErrorInvalidUser", f"The requested user '{segs[1]}' is invalid."
                )
            return user, segs[2:]
        raise GraphError(
            400, "BadRequest", f"Resource not found for the segment '{segs[0] if segs else ''}'."
        )

    def _route(self, ctx: Ctx, method: str, segs: list[str]) -> tuple[str, User | None, Any]:
        low = [s.lower() for s in segs]
        if not segs:
            raise GraphError(400, "BadRequest", "Invalid request.")
        if low[0] == "subscriptions":
            return self._route_subs(ctx, method, segs)
        if low == ["me"] or (low[0] == "users" and len(segs) == 2):
            if method != "GET":
                raise GraphError(405, "Request_BadRequest", "Method not allowed.")
            if low == ["me"]:
                if ctx.user is None:
                    raise GraphError(
                        400,
                        "BadRequest",
                        "/me request is only valid with delegated authentication flow.",
                    )
                target: User | None = ctx.user
            else:
                target = self.store.find_user(segs[1])
                if target is None or target.tenant_id != ctx.tenant_id:
                    raise GraphError(
                        404,
                        "Request_ResourceNotFound",
                        f"Resource '{segs[1]}' does not exist or one of its "
                        "queried reference-property objects are not present.",
                    )
            assert target is not None
            perms = ctx.perms()
            if (
                ctx.delegated
                and target.id != ctx.user.id
                and not (  # type: ignore[union-attr]
                    perms & {"User.ReadBasic.All", "User.Read.All"}
                )
            ):
                raise GraphError(
                    403,
                    "Authorization_RequestDenied",
                    "Insufficient privileges to complete the operation.",
                )
            profile = target.to_graph()

            async def get_user() -> web.Response:
                return self._json(profile)

            return "user.get", None, get_user
        user, rest = self._mailbox(ctx, segs)
        rest_low = [s.lower() for s in rest]
        if rest_low[:1] == ["calendar"] and rest_low[1:2] == ["events"]:
            rest, rest_low = rest[1:], rest_low[1:]
        write = method in {"POST", "PATCH", "DELETE"}
        self._check_mailbox_access(ctx, user, write)
        if rest_low == ["events"]:
            if method == "GET":
                return "events.list", user, lambda: self.list_events(ctx, user)
            if method == "POST":
                return "events.create", user, lambda: self.create_event(ctx, user)
        elif len(rest) == 2 and rest_low[0] == "events":
            eid = rest[1]
            if method == "GET":
                return "events.get", user, lambda: self.get_event(ctx, user, eid)
            if method == "PATCH":
                return "events.update", user, lambda: self.update_event(ctx, user, eid)
            if method == "DELETE":
                return "events.delete", user, lambda: self.delete_event(ctx, user, eid)
        elif len(rest) == 3 and rest_low[0] == "events" and rest_low[2] == "instances":
            if method == "GET":
                return "events.instances", user, lambda: self.instances(ctx, user, rest[1])
        elif rest_low == ["calendarview"]:
            if method == "GET":
                return "calendarView", user, lambda: self.calendar_view(ctx, user)
        elif rest_low == ["calendarview", "delta"]:
            if method == "GET":
                return "calendarView.delta", user, lambda: self.delta_view(ctx, user)
        else:
            raise GraphError(
                400, "BadRequest", f"Resource not found for the segment '{'/'.join(rest)}'."
            )
        raise GraphError(405, "ErrorInvalidRequest", f"The {method} method is not allowed here.")

    def _check_mailbox_access(self, ctx: Ctx, user: User, write: bool) -> None:
        perms = ctx.perms()
        needed = {"Calendars.ReadWrite"} if write else {"Calendars.Read", "Calendars.ReadWrite"}
        if ctx.delegated:
            assert ctx.user is not None
            if user.id != ctx.user.id or not perms & needed:
                raise _deny()
        elif not perms & needed:
            raise _deny()

    def _route_subs(self, ctx: Ctx, method: str, segs: list[str]) -> tuple[str, None, Any]:
        ident = {
            "app_id": ctx.app_id,
            "tenant_id": ctx.tenant_id,
            "user_id": ctx.user.id if ctx.user else None,
        }
        perms = ctx.perms()
        if not perms & {"Calendars.Read", "Calendars.ReadWrite"}:
            raise _deny()

        async def create() -> web.Response:
            creator = ctx.user.id if ctx.user else self.identity.service_principal_id
            body = await self._body(ctx)
            return self._json(
                await self.subs.create(body, creator_id=creator, immutable=ctx.immutable, **ident),
                201,
            )

        async def update(sid: str) -> web.Response:
            return self._json(await self.subs.update(sid, await self._body(ctx), **ident))

        async def delete(sid: str) -> web.Response:
            self.subs.delete(sid, **ident)
            return web.Response(status=204)

        async def reauthorize(sid: str) -> web.Response:
            self.subs.reauthorize(sid, **ident)
            return web.Response(status=204)

        async def get(sid: str) -> web.Response:
            return self._json(self.subs.get(sid, **ident))

        async def list_all() -> web.Response:
            return self._paged(ctx, self.subs.list_for(**ident))

        if len(segs) == 1:
            if method == "POST":
                return "subscriptions.create", None, create
            if method == "GET":
                return "subscriptions.list", None, list_all
        elif len(segs) == 2:
            sid = segs[1]
            if method == "PATCH":
                return "subscriptions.update", None, lambda: update(sid)
            if method == "DELETE":
                return "subscriptions.delete", None, lambda: delete(sid)
            if method == "GET":
                return "subscriptions.get", None, lambda: get(sid)
        elif len(segs) == 3 and segs[2].lower() == "reauthorize" and method == "POST":
            return "subscriptions.reauthorize", None, lambda: reauthorize(segs[1])
        raise GraphError(405, "BadRequest", "Unsupported subscriptions request.")

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _json(
        body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            status=status, text=json.dumps(body), content_type="application/json", headers=headers
        )

    @staticmethod
    async def _body(ctx: Ctx) -> Any:
        raw = await ctx.request.read()
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise GraphError(400, "BadRequest", "Unable to read JSON request payload.") from exc

    @staticmethod
    def _query(ctx: Ctx) -> dict[str, str]:
        return {k.lower(): v for k, v in ctx.request.query.items()}

    def _select(self, ctx: Ctx) -> set[str] | None:
        raw = self._query(ctx).get("$select")
        if not raw:
            return None
        out = set()
        for name in raw.split(","):
            canon = SELECT_MAP.get(name.strip().lower())
            if canon is None:
                raise GraphError(
                    400,
                    "RequestBroken",
                    f"Could not find a property named "
                    f"'{name.strip()}' on type 'microsoft.graph.event'.",
                )
            out.add(canon)
        return out

    def _expand(self, ctx: Ctx) -> set[str] | None:
        raw = self._query(ctx).get("$expand")
        if not raw:
            return None
        match = EXPAND_EXT.match(raw.strip())
        if not match:
            raise GraphError(
                400,
                "BadRequest",
                f"Unsupported $expand '{raw}'; use "
                "singleValueExtendedProperties($filter=id eq '...').",
            )
        ids = re.findall(r"id\s+eq\s+'([^']*)'", match.group(1), re.IGNORECASE)
        if not ids:
            raise GraphError(
                400, "BadRequest", "$expand of extended properties needs a $filter on id."
            )
        return {i.lower() for i in ids}

    def _render(self, ctx: Ctx, inst: Instance, *, select: bool = True) -> dict[str, Any]:
        return self.store.render(
            inst,
            immutable=ctx.immutable,
            tz_name=ctx.tz_name,
            select=self._select(ctx) if select else None,
            expand_ext=self._expand(ctx),
        )

    def _window(self, ctx: Ctx) -> tuple[Any, Any]:
        q = self._query(ctx)
        if "startdatetime" not in q or "enddatetime" not in q:
            raise GraphError(
                400,
                "ErrorInvalidParameter",
                "This request requires a time window specified by the query "
                "string parameters StartDateTime and EndDateTime.",
            )
        try:
            ws, we = parse_query_instant(q["startdatetime"]), parse_query_instant(q["enddatetime"])
        except ValueError as exc:
            raise GraphError(
                400,
                "ErrorInvalidParameter",
                "The value of startDateTime or endDateTime is invalid.",
            ) from exc
        if we < ws:
            raise GraphError(
                400, "ErrorInvalidParameter", "endDateTime must not be before startDateTime."
            )
        return ws, we

    def _top_skip(self, ctx: Ctx) -> tuple[int, int]:
        q = self._query(ctx)
        try:
            top = int(q.get("$top", ctx.page_size or DEFAULT_PAGE))
            skip = int(q.get("$skip", 0))
        except ValueError as exc:
            raise GraphError(400, "BadRequest", "Invalid $top or $skip.") from exc
        if top < 1 or top > MAX_TOP or skip < 0:
            raise GraphError(400, "BadRequest", f"$top must be between 1 and {MAX_TOP}.")
        return top, skip

    def _next_link(self, ctx: Ctx, skip: int) -> str:
        params = {k: v for k, v in ctx.request.query.items() if k.lower() != "$skip"}
        params["$skip"] = str(skip)
        return self._link(f"{self._self_url(ctx)}?{urlencode(params)}")

    def _link(self, url: str) -> str:
        """A nextLink/deltaLink as sent: under ``foreign_link_origin`` when that fault is on."""
        foreign = self.faults.foreign_link_origin
        if foreign and url.startswith(self.graph_url):
            return foreign.rstrip("/") + url[len(self.graph_url) :]
        return url

    def _self_url(self, ctx: Ctx) -> str:
        path = ctx.request.path
        return self.graph_url + path[len("/v1.0") :]

    def _paged(self, ctx: Ctx, items: list[Any]) -> web.Response:
        """A page of dicts or Instances (rendered lazily), with @odata.nextLink."""
        top, skip = self._top_skip(ctx)
        value = [
            self._render(ctx, i) if isinstance(i, Instance) else i for i in items[skip : skip + top]
        ]
        body: dict[str, Any] = {"@odata.context": f"{self.graph_url}/$metadata", "value": value}
        if skip + top < len(items):
            body["@odata.nextLink"] = self._next_link(ctx, skip + top)
        headers = {}
        if ctx.tz_name != "UTC":
            headers["Preference-Applied"] = f'outlook.timezone="{ctx.tz_name}"'
        return self._json(body, headers=headers)

    # ---- events ----------------------------------------------------------------------------

    async def list_events(self, ctx: Ctx, user: User) -> web.Response:
        records = self.store.list_events(user.id)
        raw_filter = self._query(ctx).get("$filter")
        if raw_filter:
            match = FILTER_EXT.match(raw_filter.strip())
            if not match:
                raise GraphError(
                    400,
                    "ErrorInvalidUrlQueryFilter",
                    "graphsim supports only singleValueExtendedProperties/any(ep: "
                    "ep/id eq '...' and ep/value eq '...') in $filter.",
                )
            pid, pval = match.group(2).lower(), match.group(3)
            records = [
                r
                for r in records
                if pid in r.ext_props and (pval is None or r.ext_props[pid][1] == pval)
            ]
        top, skip = self._top_skip(ctx)
        page = [self._render(ctx, self.store.instance(r, None)) for r in records[skip : skip + top]]
        body: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#users('{user.id}')/events",
            "value": page,
        }
        if skip + top < len(records):
            body["@odata.nextLink"] = self._next_link(ctx, skip + top)
        return self._json(body)

    async def get_event(self, ctx: Ctx, user: User, eid: str) -> web.Response:
        record, orig = self.store.resolve(user.id, eid)
        return self._json(self._render(ctx, self.store.instance(record, orig)))

    async def create_event(self, ctx: Ctx, user: User) -> web.Response:
        body = await self._body(ctx)
        record, _ = self.store.create_event(user.id, body)
        out = self._render(ctx, self.store.instance(record, None), select=False)
        return self._json(
            out, 201, {"Location": f"{self.graph_url}/users/{user.id}/events/{out['id']}"}
        )

    async def update_event(self, ctx: Ctx, user: User, eid: str) -> web.Response:
        body = await self._body(ctx)
        if isinstance(body, dict):
            self.counters.patch_fields.append(sorted(body))
        record, orig = self.store.update_event(user.id, eid, body)
        return self._json(self._render(ctx, self.store.instance(record, orig), select=False))

    async def delete_event(self, ctx: Ctx, user: User, eid: str) -> web.Response:
        self.store.delete_event(user.id, eid)
        return web.Response(status=204)

    async def instances(self, ctx: Ctx, user: User, eid: str) -> web.Response:
        record, orig = self.store.resolve(user.id, eid)
        if orig is not None or not record.is_master:
            raise GraphError(
                400,
                "ErrorInvalidRequest",
                "The instances of an event can be listed only for a series master.",
            )
        ws, we = self._window(ctx)
        items = sorted(self.store.expand(record, ws, we), key=lambda i: i.start)
        return self._paged(ctx, items)

    async def calendar_view(self, ctx: Ctx, user: User) -> web.Response:
        ws, we = self._window(ctx)
        return self._paged(ctx, self.store.calendar_view(user.id, ws, we))

    async def delta_view(self, ctx: Ctx, user: User) -> web.Response:
        q = self._query(ctx)
        for banned in ("$select", "$expand", "$filter", "$orderby", "$search"):
            if banned in q:
                raise GraphError(
                    400,
                    "ErrorInvalidUrlQuery",
                    f"The query parameter '{banned}' is not supported with delta.",
                )
        self_url = self._self_url(ctx)
        size = ctx.page_size or DEFAULT_PAGE
        if "$skiptoken" in q:
            pages, offset = self.delta.page_of(user.id, q["$skiptoken"], self_url)
        elif "$deltatoken" in q:
            try:
                ws, we = self.delta.window_of_delta(q["$deltatoken"])
                window = {"startDateTime": ws.isoformat(), "endDateTime": we.isoformat()}
                restart = f"{self_url}?{urlencode(window)}"
            except (KeyError, ValueError):
                restart = self_url
            pages = self.delta.next_round(user.id, q["$deltatoken"], restart)
            offset = 0
        else:
            ws, we = self._window(ctx)
            pages = self.delta.initial(user.id, ws, we)
            offset = 0
        chunk = pages.entries[offset : offset + size]
        value = []
        for what, (key, orig) in chunk:
            record = self.store.mailbox(user.id).events.get(key)
            alive = (
                record is not None
                and not record.deleted
                and (orig is None or self.store.occurrence_exists(record, orig))
            )
            if what == "item" and alive:
                assert record is not None
                value.append(
                    self.store.render(
                        self.store.instance(record, orig),
                        immutable=ctx.immutable,
                        tz_name=ctx.tz_name,
                    )
                )
            else:
                value.append(
                    {
                        "@odata.type": "#microsoft.graph.event",
                        "id": make_id(key, orig, immutable=ctx.immutable),
                        "@removed": {"reason": "deleted"},
                    }
                )
        body: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#Collection(event)",
            "value": value,
        }
        if offset + size < len(pages.entries):
            body["@odata.nextLink"] = self._link(
                f"{self_url}?$skiptoken={self.delta.skiptoken(pages, offset + size)}"
            )
        else:
            body["@odata.deltaLink"] = self._link(
                f"{self_url}?$deltatoken={self.delta.deltatoken(pages)}"
            )
        headers = {"Preference-Applied": f"odata.maxpagesize={size}"}
        if ctx.tz_name != "UTC":
            headers["Preference-Applied"] += f', outlook.timezone="{ctx.tz_name}"'
        return self._json(body, headers=headers)

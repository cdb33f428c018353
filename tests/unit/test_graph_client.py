"""GraphClient against an in-process fake Graph (plain HTTP on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from handlers.errors import DeltaResetRequired, PermanentError, ThrottledError, TransientError
from handlers.records import DeltaPage
from processor.graph import GraphClient, ResourceNotFound
from processor.mailbox_gates import parse_retry_after

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
START = datetime(2030, 1, 1, tzinfo=UTC)
END = datetime(2030, 2, 1, tzinfo=UTC)


class FakeTokens:
    """AccessTokens double: a new token after every invalidate."""

    def __init__(self) -> None:
        self.generation = 1
        self.invalidated: list[str] = []

    async def access_token(self, account_id: str) -> str:
        return f"secret-token-{account_id}-{self.generation}"

    def invalidate(self, account_id: str) -> None:
        self.invalidated.append(account_id)
        self.generation += 1


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: dict[str, str]
    headers: dict[str, list[str]]
    body: Any


@dataclass
class FakeGraph:
    """Records requests and in-flight counts per mailbox; answers through ``handler``."""

    handler: Handler
    seen: list[Seen] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)
    max_in_flight: dict[str, int] = field(default_factory=dict)
    url: str = ""

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers: dict[str, list[str]] = {}
        for key, value in request.headers.items():
            headers.setdefault(key.lower(), []).append(value)
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.raw_path,
                dict(request.query),
                headers,
                await request.json() if raw else None,
            )
        )
        parts = request.path.split("/")
        mailbox = parts[3] if len(parts) > 3 and parts[2] == "users" else "-"
        self.in_flight[mailbox] = self.in_flight.get(mailbox, 0) + 1
        self.max_in_flight[mailbox] = max(
            self.max_in_flight.get(mailbox, 0), self.in_flight[mailbox]
        )
        try:
            return await self.handler(request)
        finally:
            self.in_flight[mailbox] -= 1


def graph_error(status: int, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": f"{code} happened"}}, status=status, headers=headers
    )


def found(request: web.Request) -> web.Response:
    return web.json_response({"id": "evt-1", "subject": "hello"})


async def ok(request: web.Request) -> web.Response:
    return found(request)


def sequence(*answers: Callable[[web.Request], web.Response]) -> Handler:
    """A handler that gives the answers in order, then repeats the last one."""
    state = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        index = min(state["n"], len(answers) - 1)
        state["n"] += 1
        return answers[index](request)

    return handler


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def fake_graph() -> AsyncIterator[Callable[[Handler], Awaitable[FakeGraph]]]:
    servers: list[TestServer] = []

    async def start(handler: Handler) -> FakeGraph:
        fake = FakeGraph(handler)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.dispatch)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        fake.url = str(server.make_url("/v1.0"))
        return fake

    yield start
    for server in servers:
        await server.close()


class Sleeps:
    """Records requested waits and returns at once, advancing its own clock by the wait
    (inline retries and mailbox gates without real waiting)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.now = 1000.0

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def client(
    http: aiohttp.ClientSession, fake: FakeGraph, tokens: FakeTokens | None = None, **kw: Any
) -> GraphClient:
    sleeps = kw.setdefault("sleep", Sleeps())
    if isinstance(sleeps, Sleeps):
        kw.setdefault("monotonic", sleeps.clock)
    return GraphClient(session=http, graph_url=fake.url, tokens=tokens or FakeTokens(), **kw)


# ---- Retry-After and throttling --------------------------------------------------------------


async def test_fractional_retry_after_is_honoured_inline(http, fake_graph) -> None:
    """A 429 with ``Retry-After: 0.128`` is retried inline after exactly that wait."""
    fake = await fake_graph(
        sequence(lambda r: graph_error(429, "TooManyRequests", {"Retry-After": "0.128"}), found)
    )
    sleeps = Sleeps()
    graph = client(http, fake, sleep=sleeps)
    event = await graph.get_event("acc", "user-1", "evt-1", select=["subject"])
    assert event == {"id": "evt-1", "subject": "hello"}
    assert sleeps.waits == [0.128]
    assert len(fake.seen) == 2
    assert graph.stats["throttled"] == 1
    assert graph.stats["retries"] == 1


async def test_http_date_retry_after_is_honoured(http, fake_graph) -> None:
    """A ``Retry-After`` given as an HTTP-date waits until that moment."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    fake = await fake_graph(
        sequence(lambda r: graph_error(503, "serviceNotAvailable", {"Retry-After": when}), found)
    )
    sleeps = Sleeps()
    graph = client(http, fake, sleep=sleeps, inline_retry_max_wait_s=5.0)
    assert await graph.get_event("acc", "user-1", "evt-1", select=[]) is not None
    assert len(sleeps.waits) == 1
    assert 0.5 < sleeps.waits[0] <= 3.0


def test_parse_retry_after_accepts_seconds_fractions_and_dates() -> None:
    """Retry-After parses delta-seconds (fractional too) and HTTP-dates; junk gives None."""
    assert parse_retry_after("2.128") == 2.128
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = time.time()
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    parsed = parse_retry_after(date, now=now)
    assert parsed is not None
    assert 28.5 <= parsed <= 30.0


async def test_long_retry_after_raises_throttled_error_without_waiting(http, fake_graph) -> None:
    """A Retry-After above the inline threshold raises ThrottledError carrying that wait."""
    fake = await fake_graph(sequence(lambda r: graph_error(429, "x", {"Retry-After": "30"})))
    sleeps = Sleeps()
    graph = client(http, fake, sleep=sleeps, inline_retry_max_wait_s=2.0)
    with pytest.raises(ThrottledError) as caught:
        await graph.get_event("acc", "user-1", "evt-1", select=[])
    assert caught.value.retry_after_s == 30.0
    assert sleeps.waits == []
    assert len(fake.seen) == 1


async def test_throttled_error_once_attempts_are_spent(http, fake_graph) -> None:
    """Short Retry-Afters are retried inline only until max_attempts, then ThrottledError."""
    fake = await fake_graph(sequence(lambda r: graph_error(504, "x", {"Retry-After": "0.01"})))
    sleeps = Sleeps()
    graph = client(http, fake, sleep=sleeps, max_attempts=3)
    with pytest.raises(ThrottledError) as caught:
        await graph.delete_event("acc", "user-1", "evt-1")
    assert caught.value.retry_after_s == 0.01
    assert len(fake.seen) == 3
    assert sleeps.waits == [0.01, 0.01]


async def test_exponential_backoff_with_jitter_without_retry_after(http, fake_graph) -> None:
    """Without Retry-After the waits grow exponentially (with jitter) between attempts."""
    fake = await fake_graph(
        sequence(
            lambda r: graph_error(429, "x"),
            lambda r: graph_error(503, "x"),
            lambda r: graph_error(429, "x"),
            found,
        )
    )
    sleeps = Sleeps()
    graph = client(http, fake, sleep=sleeps, backoff_base_s=0.2, inline_retry_max_wait_s=5.0)
    assert await graph.get_event("acc", "user-1", "evt-1", select=[]) is not None
    assert len(sleeps.waits) == 3
    for attempt, wait in enumerate(sleeps.waits, start=1):
        ceiling = 0.2 * 2 ** (attempt - 1)
        assert ceiling / 2 <= wait <= ceiling
    assert sleeps.waits[0] <= sleeps.waits[1] <= sleeps.waits[2]


async def test_server_errors_are_retried_then_transient(http, fake_graph) -> None:
    """Other 5xx answers are retried with backoff up to max_attempts, then TransientError."""
    fake = await fake_graph(sequence(lambda r: graph_error(500, "generalException")))
    sleeps = Sleeps()
    graph = client(http, fake, sleep=sleeps, max_attempts=4)
    with pytest.raises(TransientError) as caught:
        await graph.get_event("acc", "user-1", "evt-1", select=[])
    assert not isinstance(caught.value, ThrottledError)
    assert len(fake.seen) == 4
    assert len(sleeps.waits) == 3


async def test_connection_errors_become_transient_after_retries(http) -> None:
    """A refused connection is retried up to max_attempts and then raised as TransientError."""
    server = TestServer(web.Application(), host="127.0.0.1", port=0)
    await server.start_server()
    url = str(server.make_url("/v1.0"))
    await server.close()
    sleeps = Sleeps()
    graph = GraphClient(
        session=http, graph_url=url, tokens=FakeTokens(), max_attempts=3, sleep=sleeps
    )
    with pytest.raises(TransientError):
        await graph.me("acc")
    assert len(sleeps.waits) == 2


async def test_request_timeout_is_transient(http, fake_graph) -> None:
    """A request slower than request_timeout_s is retried, then raised as TransientError."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.json_response({})

    fake = await fake_graph(slow)
    graph = client(http, fake, request_timeout_s=0.1, max_attempts=2)
    with pytest.raises(TransientError):
        await graph.get_event("acc", "user-1", "evt-1", select=[])
    assert len(fake.seen) == 2


# ---- concurrency ----------------------------------------------------------------------------


async def test_at_most_n_requests_in_flight_per_mailbox(http, fake_graph) -> None:
    """Twenty concurrent calls for one mailbox never put more than N in flight at the server."""

    async def slow_ok(request: web.Request) -> web.Response:
        await asyncio.sleep(0.03)
        return web.json_response({"id": "e"})

    fake = await fake_graph(slow_ok)
    graph = client(http, fake, max_concurrency_per_mailbox=3)
    calls = [graph.get_event("acc", "mbx-a", f"e{i}", select=[]) for i in range(20)]
    calls += [graph.get_event("acc", "mbx-b", f"e{i}", select=[]) for i in range(20)]
    results = await asyncio.gather(*calls)
    assert all(r == {"id": "e"} for r in results)
    assert fake.max_in_flight == {"mbx-a": 3, "mbx-b": 3}
    assert len(graph._gates) == 0  # idle mailbox semaphores are dropped


async def test_retry_after_holds_back_every_request_to_the_mailbox(http, fake_graph) -> None:
    """After a 429 with Retry-After on one request, no other request to that mailbox is sent
    before the wait has elapsed, while another mailbox goes on at once."""
    arrivals: list[tuple[str, float]] = []
    throttled_at: list[float] = []
    throttled = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        arrivals.append((name, time.monotonic()))
        if name == "first" and not throttled_at:
            throttled_at.append(time.monotonic())
            throttled.set()
            return graph_error(429, "x", {"Retry-After": "0.4"})
        return web.json_response({"id": name})

    fake = await fake_graph(handler)
    graph = client(http, fake, max_concurrency_per_mailbox=3, sleep=asyncio.sleep)
    first = asyncio.create_task(graph.get_event("acc", "mbx", "first", select=[]))
    await throttled.wait()
    await asyncio.sleep(0.05)
    others = [
        asyncio.create_task(graph.get_event("acc", "mbx", f"later{i}", select=[])) for i in range(4)
    ]
    await asyncio.sleep(0.02)
    other_mailbox = await graph.get_event("acc", "mbx-2", "elsewhere", select=[])
    assert other_mailbox == {"id": "elsewhere"}
    assert [r["id"] for r in await asyncio.gather(*others)] == [f"later{i}" for i in range(4)]
    assert await first == {"id": "first"}
    early = [
        name
        for name, at in arrivals
        if name != "elsewhere" and throttled_at[0] < at < throttled_at[0] + 0.4
    ]
    assert early == []
    elsewhere = next(at for name, at in arrivals if name == "elsewhere")
    assert elsewhere < throttled_at[0] + 0.4
    assert graph.stats["gate_waits"] >= 3  # the fourth may find the gate open after its slot


async def test_a_long_mailbox_wait_fails_fast_with_the_time_left(http, fake_graph) -> None:
    """While a mailbox waits longer than an inline retry may, a request to it raises
    ThrottledError carrying the time left and never reaches Graph (parking carries it)."""
    fake = await fake_graph(sequence(lambda r: graph_error(429, "x", {"Retry-After": "30"}), found))
    sleeps = Sleeps()
    graph = client(http, fake, sleep=sleeps, inline_retry_max_wait_s=2.0)
    with pytest.raises(ThrottledError):
        await graph.get_event("acc", "mbx", "first", select=[])
    sleeps.now += 10
    with pytest.raises(ThrottledError) as caught:
        await graph.update_event("acc", "mbx", "second", {"subject": "s"})
    assert caught.value.retry_after_s == pytest.approx(20.0)
    assert len(fake.seen) == 1
    assert graph.stats["gate_refusals"] == 1
    sleeps.now += 20
    assert await graph.get_event("acc", "mbx", "third", select=[]) is not None
    assert len(fake.seen) == 2


# ---- status handling ------------------------------------------------------------------------


async def test_401_invalidates_the_token_and_retries_once(http, fake_graph) -> None:
    """A 401 invalidates the cached token and repeats the request once with a fresh one."""

    async def handler(request: web.Request) -> web.Response:
        if request.headers["Authorization"].endswith("-1"):
            return graph_error(401, "InvalidAuthenticationToken")
        return web.json_response({"id": "me"})

    fake = await fake_graph(handler)
    tokens = FakeTokens()
    graph = client(http, fake, tokens)
    assert await graph.me("acc-7") == {"id": "me"}
    assert tokens.invalidated == ["acc-7"]
    assert [s.headers["authorization"] for s in fake.seen] == [
        ["Bearer secret-token-acc-7-1"],
        ["Bearer secret-token-acc-7-2"],
    ]


async def test_second_401_is_transient(http, fake_graph) -> None:
    """A 401 with the fresh token too is a TransientError after exactly two requests."""
    fake = await fake_graph(sequence(lambda r: graph_error(401, "InvalidAuthenticationToken")))
    graph = client(http, fake)
    with pytest.raises(TransientError):
        await graph.get_event("acc", "user-1", "evt-1", select=[])
    assert len(fake.seen) == 2


async def test_404_means_gone(http, fake_graph) -> None:
    """A 404 gives None or False on the methods whose target can be gone."""
    fake = await fake_graph(sequence(lambda r: graph_error(404, "ErrorItemNotFound")))
    graph = client(http, fake)
    assert await graph.get_event("acc", "u", "e", select=["subject"]) is None
    assert await graph.update_event("acc", "u", "e", {"subject": "x"}) is None
    assert await graph.delete_event("acc", "u", "e") is False
    assert await graph.renew_subscription("acc", "s", END) is None
    assert await graph.reauthorize_subscription("acc", "s") is False
    assert await graph.delete_subscription("acc", "s") is False
    assert graph.stats["not_found"] == 6
    with pytest.raises(ResourceNotFound):
        await graph.list_instances("acc", "u", "e", START, END, select=[])


async def test_403_and_400_are_permanent_with_graph_code(http, fake_graph) -> None:
    """403 and 400 raise PermanentError naming Graph's error code, without retrying."""
    fake = await fake_graph(
        sequence(
            lambda r: graph_error(403, "ErrorAccessDenied"),
            lambda r: graph_error(400, "ErrorInvalidRequest"),
        )
    )
    graph = client(http, fake)
    with pytest.raises(PermanentError, match="ErrorAccessDenied"):
        await graph.create_event("acc", "u", {"subject": "s"}, transaction_id="t")
    with pytest.raises(PermanentError, match="ErrorInvalidRequest"):
        await graph.create_subscription("acc", {"resource": "/me/events"})
    assert len(fake.seen) == 2


@pytest.mark.parametrize(
    ("status", "code"),
    [(410, ""), (400, "syncStateNotFound"), (404, "resyncRequired"), (400, "resyncRequired")],
)
async def test_delta_reset_signals(http, fake_graph, status: int, code: str) -> None:
    """410 Gone and syncStateNotFound/resyncRequired on delta raise DeltaResetRequired."""
    fake = await fake_graph(sequence(lambda r: graph_error(status, code)))
    graph = client(http, fake)
    link = f"{fake.url}/users/u/calendarView/delta?$deltatoken=abc"
    with pytest.raises(DeltaResetRequired):
        async for _ in graph.calendar_view_delta("acc", "u", delta_link=link, start=START, end=END):
            pass
    assert isinstance(DeltaResetRequired("x"), TransientError)


# ---- delta and paging -----------------------------------------------------------------------


async def test_delta_pages_follow_next_link_to_the_delta_link(http, fake_graph) -> None:
    """A delta round follows nextLinks as given and ends on the page with the deltaLink."""
    base = {"url": ""}

    async def handler(request: web.Request) -> web.Response:
        q = request.query
        if "$skiptoken" not in q and "$deltatoken" not in q:
            return web.json_response(
                {
                    "value": [{"id": "a"}, {"id": "x", "@removed": {"reason": "deleted"}}],
                    "@odata.nextLink": f"{base['url']}/users/u/calendarView/delta?$skiptoken=p%2B2",
                }
            )
        if q.get("$skiptoken") == "p+2":
            return web.json_response(
                {
                    "value": [{"id": "b"}],
                    "@odata.nextLink": f"{base['url']}/users/u/calendarView/delta?$skiptoken=p3",
                }
            )
        if q.get("$skiptoken") == "p3":
            return web.json_response(
                {
                    "value": [{"id": "c"}],
                    "@odata.deltaLink": f"{base['url']}/users/u/calendarView/delta?$deltatoken=d1",
                }
            )
        assert q.get("$deltatoken") == "d1"
        return web.json_response(
            {
                "value": [{"id": "y", "@removed": {"reason": "deleted"}}],
                "@odata.deltaLink": f"{base['url']}/users/u/calendarView/delta?$deltatoken=d2",
            }
        )

    fake = await fake_graph(handler)
    base["url"] = fake.url
    graph = client(http, fake)
    pages: list[DeltaPage] = [
        p
        async for p in graph.calendar_view_delta(
            "acc", "u", delta_link=None, start=START, end=END, page_size=2
        )
    ]
    assert [[i["id"] for i in p.items] for p in pages] == [["a"], ["b"], ["c"]]
    assert pages[0].removed_ids == ["x"]
    assert [p.delta_link for p in pages[:2]] == [None, None]
    assert pages[2].delta_link == f"{fake.url}/users/u/calendarView/delta?$deltatoken=d1"
    first = fake.seen[0]
    assert first.path == "/v1.0/users/u/calendarView/delta"
    assert first.query == {
        "startDateTime": "2030-01-01T00:00:00Z",
        "endDateTime": "2030-02-01T00:00:00Z",
    }
    assert all("odata.maxpagesize=2" in s.headers["prefer"] for s in fake.seen)

    again = [
        p
        async for p in graph.calendar_view_delta(
            "acc", "u", delta_link=pages[2].delta_link, start=START, end=END
        )
    ]
    assert again == [
        DeltaPage(
            items=[],
            removed_ids=["y"],
            delta_link=f"{fake.url}/users/u/calendarView/delta?$deltatoken=d2",
        )
    ]


async def test_lists_follow_next_link(http, fake_graph) -> None:
    """list_instances and list_subscriptions gather every page through @odata.nextLink."""
    base = {"url": ""}

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("$skip", "0"))
        body: dict[str, Any] = {"value": [{"id": f"{request.path}-{page}"}]}
        if page < 2:
            body["@odata.nextLink"] = f"{base['url']}{request.path[5:]}?$skip={page + 1}"
        return web.json_response(body)

    fake = await fake_graph(handler)
    base["url"] = fake.url
    graph = client(http, fake)
    instances = await graph.list_instances("acc", "u", "m", START, END, select=["start", "end"])
    assert [i["id"] for i in instances] == [
        f"/v1.0/users/u/events/m/instances-{n}" for n in range(3)
    ]
    assert fake.seen[0].query == {
        "startDateTime": "2030-01-01T00:00:00Z",
        "endDateTime": "2030-02-01T00:00:00Z",
        "$select": "start,end",
    }
    subs = await graph.list_subscriptions("acc")
    assert len(subs) == 3


async def test_headers_on_every_request(http, fake_graph) -> None:
    """Each request carries the bearer token, ImmutableId, UTC on event reads and a fresh GUID."""
    fake = await fake_graph(ok)
    graph = client(http, fake)
    await graph.get_event("acc", "u", "e", select=["subject"])
    await graph.create_event("acc", "u", {"subject": "s"}, transaction_id="tx-1")
    await graph.create_subscription("acc", {"resource": "/me/events"})
    ids = []
    for seen in fake.seen:
        assert seen.headers["authorization"] == ["Bearer secret-token-acc-1"]
        assert seen.headers["accept"] == ["application/json"]
        assert 'IdType="ImmutableId"' in seen.headers["prefer"]
        ids.append(str(uuid.UUID(seen.headers["client-request-id"][0])))
    assert len(set(ids)) == len(ids)
    assert 'outlook.timezone="UTC"' in fake.seen[0].headers["prefer"]
    assert fake.seen[0].query == {"$select": "subject"}
    assert fake.seen[1].body == {"subject": "s", "transactionId": "tx-1"}


async def test_renew_sends_expiration_in_utc(http, fake_graph) -> None:
    """renew_subscription PATCHes only expirationDateTime, as UTC with a Z suffix."""
    fake = await fake_graph(ok)
    graph = client(http, fake)
    await graph.renew_subscription("acc", "sub-1", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert fake.seen[0].method == "PATCH"
    assert fake.seen[0].path == "/v1.0/subscriptions/sub-1"
    assert fake.seen[0].body == {"expirationDateTime": "2030-01-02T03:04:05Z"}


async def test_ids_are_encoded_as_single_path_segments(http, fake_graph) -> None:
    """Ids holding ``/``, ``+`` or ``=`` are percent-encoded so they stay one path segment."""
    fake = await fake_graph(ok)
    graph = client(http, fake)
    await graph.get_event("acc", "u 1", "AAMk/a+b=", select=[])
    assert fake.seen[0].raw_path == "/v1.0/users/u%201/events/AAMk%2Fa%2Bb%3D"


async def test_no_token_in_any_log_line(http, fake_graph) -> None:
    """Throttling, 401 and failure logs carry identifiers but never the access token."""
    fake = await fake_graph(
        sequence(
            lambda r: graph_error(401, "InvalidAuthenticationToken"),
            lambda r: graph_error(429, "x", {"Retry-After": "0.01"}),
            lambda r: graph_error(500, "x"),
            lambda r: graph_error(403, "ErrorAccessDenied"),
        )
    )
    graph = client(http, fake)
    with capture_logs() as logs, pytest.raises(PermanentError):
        await graph.get_event("acc", "user-1", "evt-1", select=[])
    assert {e["event"] for e in logs} >= {
        "graph.request.unauthorized",
        "graph.request.throttled",
        "graph.request.retry",
        "graph.request.failed",
    }
    for entry in logs:
        assert "secret-token" not in repr(entry)
        assert "user-1" not in repr(entry)
        assert "evt-1" not in repr(entry)
        assert entry["account_id"] == "acc"
        assert entry["path"] == "/users/{user_id}/events/{event_id}"

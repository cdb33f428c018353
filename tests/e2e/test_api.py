"""The 1Relation API (docs/contract.md §2): bearer tokens, status, events window with paging, resync."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from handlers.records import CONTRACT_EVENT_FIELDS
from handlers.routing import shard_of
from handlers.timeutil import isoformat_z, parse_graph_datetime
from processor.topology import INBOUND_QUEUE
from tests.e2e.harness import Stack, api, browser_connect, eventually, running_stack

pytestmark = pytest.mark.e2e

ROUTES = [
    ("GET", "/api/v1/accounts/acc-x"),
    ("GET", "/api/v1/accounts/acc-x/events?start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z"),
    ("POST", "/api/v1/accounts/acc-x/resync"),
    ("DELETE", "/api/v1/accounts/acc-x"),
    ("GET", "/api/v1/accounts"),
    ("PUT", "/api/v1/accounts/acc-x"),
]


async def test_every_route_needs_a_valid_bearer_token(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Without a token, with a wrong one or with another scheme every /api/v1 route answers
    401 (JSON, WWW-Authenticate); with the token, an unknown account is 404 (DELETE: 204)."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver",),
        extra_env={"M365SYNC_API_TOKEN": "old-token-0123456789,new-token-0123456789"},
    ) as stack:
        good = stack.settings.api_tokens[0]
        for method, path in ROUTES:
            for token, headers in (
                (None, {}),
                ("wrong-token-0123456789", {}),
                (good + "x", {}),
                (good[:-1], {}),
                (None, {"Authorization": f"Basic {good}"}),
                (None, {"Authorization": "Bearer"}),
            ):
                status, body, response_headers = await api(
                    stack, method, path, token=token, headers=headers
                )
                assert status == 401, (method, path, token, headers)
                assert body["error"]["code"] == "unauthorized"
                assert response_headers["WWW-Authenticate"].startswith("Bearer")
        expected = {"GET": 404, "POST": 404, "DELETE": 204, "PUT": 404}
        for token in stack.settings.api_tokens:  # each configured token is accepted
            for method, path in ROUTES:
                status, body, _ = await api(stack, method, path, token=token)
                assert status == expected[method], (method, path)
                if status == 404:
                    assert "code" in body["error"]


def _event(
    start: datetime, subject: str, *, zone: str = "UTC", minutes: int = 30
) -> dict[str, Any]:
    local = start
    if zone != "UTC":
        from zoneinfo import ZoneInfo  # noqa: PLC0415

        local = start.astimezone(ZoneInfo("Europe/Copenhagen"))
    return {
        "subject": subject,
        "body": {"contentType": "text", "content": f"Agenda of {subject}"},
        "start": {"dateTime": local.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": zone},
        "end": {
            "dateTime": (local + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": zone,
        },
        "location": {"displayName": "Room 4"},
        "attendees": [
            {"emailAddress": {"address": "ann@example.com", "name": "Ann"}, "type": "required"}
        ],
    }


async def _connected(stack: Stack, account_id: str) -> str:
    user_id = (await stack.control.users())[0]["id"]
    run = await browser_connect(stack, account_id, user_id=user_id)
    assert run.query()["status"] == "connected"
    return str(user_id)


async def test_events_window_is_decrypted_in_contract_shape_and_paged(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """25 events in the window (one in a Windows time zone, one starting before the window)
    come back decrypted in the contract's shape, in UTC, sorted, in 3 pages of at most 10,
    whose union equals Graph's calendar view of the window; events outside are left out."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = await _connected(stack, "acc-api")
        window_start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(
            days=2
        )
        window_end = window_start + timedelta(days=3)
        events = [
            _event(window_start + timedelta(hours=2 * n + 1), f"In window {n}") for n in range(23)
        ]
        events.append(
            _event(window_start + timedelta(hours=5), "Copenhagen", zone="Romance Standard Time")
        )
        events.append(_event(window_start - timedelta(minutes=30), "Overlapping", minutes=60))
        events.append(_event(window_start - timedelta(hours=3), "Before"))
        events.append(_event(window_end, "At the end"))  # [start, end): excluded
        created = await stack.control.bulk_create_events(user_id, events=events, immutable=True)
        keys = {stack.rt.events.event_key("acc-api", gid) for gid in created["ids"]}

        async def all_stored() -> bool:
            return keys <= await stack.rt.events.live_keys("acc-api")

        await eventually(all_stored)
        truth = await stack.control.calendar_view(
            user_id, isoformat_z(window_start), isoformat_z(window_end), immutable=True
        )
        assert len(truth) == 25
        expected = {stack.rt.events.event_key("acc-api", e["id"]): e for e in truth}

        path: str | None = (
            f"/api/v1/accounts/acc-api/events?start={quote(isoformat_z(window_start))}"
            f"&end={quote(isoformat_z(window_end))}&limit=10"
        )
        pages: list[list[dict[str, Any]]] = []
        while path is not None:
            status, body, _ = await api(stack, "GET", path)
            assert status == 200, body
            pages.append(body["events"])
            path = body["next"]
            assert path is None or path.startswith("/api/v1/accounts/acc-api/events?")
        assert [len(page) for page in pages] == [10, 10, 5]
        returned = [event for page in pages for event in page]
        assert {e["event_key"] for e in returned} == set(expected)
        assert len(returned) == 25
        starts = [(e["start"]["dateTime"], e["event_key"]) for e in returned]
        assert starts == sorted(starts)
        for event in returned:
            assert set(event) == {*CONTRACT_EVENT_FIELDS, "event_key", "relation_event_id"}
            assert event["relation_event_id"] is None
            truth_event = expected[event["event_key"]]
            for name in ("subject", "body", "location", "attendees", "iCalUId", "type"):
                assert event[name] == truth_event[name], name
            assert event["start"]["timeZone"] == "UTC"
            assert parse_graph_datetime(event["start"]["dateTime"]) == parse_graph_datetime(
                truth_event["start"]["dateTime"]
            )
        copenhagen = next(e for e in returned if e["subject"] == "Copenhagen")
        assert parse_graph_datetime(copenhagen["start"]["dateTime"]) == window_start + timedelta(
            hours=5
        )

        status, body, _ = await api(stack, "GET", "/api/v1/accounts/acc-api")
        assert status == 200
        assert body["account_id"] == "acc-api"
        assert body["status"] in ("connected", "backfilling")
        assert body["event_count"] == 27
        assert body["subscription_expires_at"] is not None
        assert body["tenant_id"] == stack.sim.tenant_id
        await stack.rt.statuses.set("acc-api", "reauthorization_required")
        status, body, _ = await api(stack, "GET", "/api/v1/accounts/acc-api")
        assert body["status"] == "reauthorization_required"
        assert "connect" in body["status_reason"].lower()


async def _truthy(value: Any) -> Any:
    return value


async def test_resync_queues_a_full_resync_on_the_accounts_shard(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """POST .../resync answers 202 and leaves one full-resync message on the account's shard."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        await stack.rt.store.accounts.create("acc-rs")
        status, body, _ = await api(stack, "POST", "/api/v1/accounts/acc-rs/resync")
        assert status == 202
        assert body == {"account_id": "acc-rs", "resync": "queued"}
        channel = await stack.rt.connection.channel()
        try:
            shard = shard_of("acc-rs", stack.settings.shard_count)
            queue = await channel.get_queue(INBOUND_QUEUE.format(shard=shard), ensure=False)
            received: list[Any] = []
            # Shard queues have a single active consumer, which basic.get cannot be.
            await queue.consume(received.append, no_ack=True)
            await eventually(lambda: _truthy(received), timeout_s=5)
            await asyncio.sleep(0.3)  # time for a second message, if one were there
            [message] = received
            assert json.loads(message.body) | {"received_at": None} == {
                "schema": "m365sync.inbound.v1",
                "kind": "resync",
                "account_id": "acc-rs",
                "reason": "operator",
                "full": True,
                "received_at": None,
            }
            assert message.message_id
        finally:
            await channel.close()


BAD_QUERIES = [
    ("end=2026-12-02T00:00:00Z", "start is required"),
    ("start=yesterday&end=2026-12-02T00:00:00Z", "start is not"),
    ("start=2026-12-01T00:00:00Z&end=2026-13-02T00:00:00Z", "end is not"),
    ("start=2026-12-02T00:00:00Z&end=2026-12-02T00:00:00Z", "after start"),
    ("start=2026-12-03T00:00:00Z&end=2026-12-02T00:00:00Z", "after start"),
    ("start=2020-01-01T00:00:00Z&end=2026-12-02T00:00:00Z", "at most"),
    ("start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z&limit=0", "limit"),
    ("start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z&limit=1001", "limit"),
    ("start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z&limit=-5", "limit"),
    ("start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z&limit=ten", "limit"),
    ("start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z&cursor=%%%", "cursor"),
    ("start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z&cursor=eyJzIjoxfQ", "cursor"),
]


async def test_bad_event_parameters_are_400(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Missing or malformed start/end, an empty or reversed or too wide window, a limit
    outside 1..1000 and a forged cursor each get a 400 JSON error."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        await stack.rt.store.accounts.create("acc-p")
        for query, fragment in BAD_QUERIES:
            status, body, _ = await api(stack, "GET", f"/api/v1/accounts/acc-p/events?{query}")
            assert status == 400, query
            assert body["error"]["code"] == "bad_request"
            assert fragment in body["error"]["message"], query

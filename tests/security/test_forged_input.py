"""Forged and broken input against the running receiver (real RabbitMQ and FerretDB).

Only the receiver runs, so nothing consumes the service's queues: a message published for
bad input would stay there and be counted. Each input gets its bounded answer, the queues
and the database are exactly as before, and /metrics says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest

from handlers.routing import shard_of
from processor.topology import INBOUND_QUEUE, LIFECYCLE_QUEUE
from processor.web import BODY_READ_TIMEOUT_S
from tests.e2e.harness import Stack, mint_link, running_stack
from tests.security.support import (
    document_counts,
    metrics,
    queue_depths,
    sample,
    work_queues,
)

pytestmark = pytest.mark.e2e

MAX_BODY_BYTES = 64 * 1024
ACCOUNT = "acc-sec"


async def _post(stack: Stack, path: str, body: bytes | Any, **kwargs: Any) -> int:
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.post(f"http://127.0.0.1:{stack.port}{path}", data=body, **kwargs) as resp,
    ):
        await resp.read()
        return resp.status


async def _request(stack: Stack, method: str, path: str, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.request(method, f"http://127.0.0.1:{stack.port}{path}", headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


def _collection(*items: dict[str, Any]) -> bytes:
    return json.dumps({"value": list(items)}).encode()


async def _slow_body(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    """Open a POST of a 1000-byte body and return once the receiver has taken it on: it
    answers ``Expect: 100-continue`` as it passes the request to the route, whose handler
    then waits for the body. Returns the connection and when it was opened."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(
        b"POST /graph/notifications HTTP/1.1\r\nHost: receiver\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readline(), BODY_READ_TIMEOUT_S + 3)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    assert await reader.readline() == b"\r\n"
    return reader, writer, started


async def _trickle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    started: float,
    *,
    interval_s: float,
    count: int,
) -> tuple[bytes, float]:
    """Send the body one byte every interval; the status line and how long after the
    connection was opened it came."""

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(count):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(interval_s)

    try:
        writer.write(b"{")
        await writer.drain()
        dripping = asyncio.create_task(drip())
        status_line = await asyncio.wait_for(reader.readline(), BODY_READ_TIMEOUT_S + 3)
        elapsed = time.monotonic() - started
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return status_line, elapsed


async def test_forged_and_broken_input_is_answered_counted_and_costs_nothing(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Forged notifications (unknown subscription, wrong clientState, wrong tenant, a real
    subscription naming another mailbox or another event) get 202 and are dropped; broken
    JSON gets 400, oversize bodies 413, trickled bodies 408 on time while the receiver keeps
    answering others; bad connect tokens 400/403; /api/v1 without or with a wrong bearer
    token 401. Nothing is published, no document is written, and the counters say why. A
    genuine notification sent last is published, which shows the queues would have told."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver",),
        extra_env={"M365SYNC_MAX_BODY_BYTES": str(MAX_BODY_BYTES)},
    ) as stack:
        ann, bob = [user["id"] for user in await stack.control.users()][:2]
        await stack.connect_account(ACCOUNT, ann)
        [subscription] = await stack.control.subscriptions()
        event_id = "AAMkAGI2TGuLAAA="
        genuine = {
            "subscriptionId": subscription["id"],
            "clientState": subscription["clientState"],
            "tenantId": stack.sim.tenant_id,
            "changeType": "updated",
            "resource": f"Users/{ann}/Events/{event_id}",
            "resourceData": {"@odata.type": "#Microsoft.Graph.Event", "id": event_id},
        }
        queues = work_queues(stack)
        depths_before = await queue_depths(stack, queues)
        documents_before = await document_counts(stack)
        before = await metrics(stack)

        # -- forged notifications: 202 (the sender learns nothing), dropped, counted -------
        forged = {
            "unknown_subscription": {**genuine, "subscriptionId": str(uuid.uuid4())},
            "client_state_mismatch": {**genuine, "clientState": "guessed-client-state"},
            "tenant_mismatch": {**genuine, "tenantId": str(uuid.uuid4())},
            "foreign_mailbox": {**genuine, "resource": f"Users/{bob}/Events/{event_id}"},
            "resource_mismatch": {**genuine, "resourceData": {"id": "AAMkOtherEvent="}},
        }
        for item in forged.values():
            assert await _post(stack, "/graph/notifications", _collection(item)) == 202
        lifecycle_forged = {
            "subscriptionId": subscription["id"],
            "clientState": "guessed-client-state",
            "tenantId": stack.sim.tenant_id,
            "lifecycleEvent": "reauthorizationRequired",
        }
        assert await _post(stack, "/graph/lifecycle", _collection(lifecycle_forged)) == 202
        # A flood in one request: many forged items cost one answer and one log line.
        flood = _collection(*[forged["client_state_mismatch"]] * 150)
        assert await _post(stack, "/graph/notifications", flood) == 202

        # -- broken and oversize bodies ----------------------------------------------------
        for body in (b"{not json", b"", b"[]", b'{"value": 7}', b"\xff\xfe"):
            assert await _post(stack, "/graph/notifications", body) == 400
        assert await _post(stack, "/graph/notifications", b" " * (MAX_BODY_BYTES + 1)) == 413

        async def chunks() -> Any:
            for _ in range(MAX_BODY_BYTES // 4096 + 2):
                yield b" " * 4096

        assert await _post(stack, "/graph/lifecycle", chunks()) == 413

        # -- slow bodies: 408 on time, and the receiver answers others meanwhile -----------
        opened = await asyncio.gather(*(_slow_body(stack.port) for _ in range(10)))
        slow = [
            asyncio.create_task(_trickle(*connection, interval_s=0.1, count=200))
            for connection in opened
        ]
        # Every slow body is in the receiver's hands until it refuses it (408, counted
        # before it answers). A receiver that made other requests wait behind slow bodies
        # would answer these only after it had refused some.
        timed_out = {"route": "notifications", "reason": "body_read_timeout"}
        refused_meanwhile = []
        for _ in range(5):
            assert await _request(stack, "GET", "/healthz", {}) == 200
            assert (
                await _post(stack, "/graph/notifications", _collection(forged["tenant_mismatch"]))
                == 202
            )
            now = await metrics(stack)
            refused_meanwhile.append(
                sample(now, "m365sync_webhook_malformed_total", **timed_out)
                - sample(before, "m365sync_webhook_malformed_total", **timed_out)
            )
            await asyncio.sleep(0.2)
        assert refused_meanwhile[0] == 0, refused_meanwhile
        for status_line, elapsed in await asyncio.gather(*slow):
            assert status_line.startswith(b"HTTP/1.1 408"), status_line
            assert BODY_READ_TIMEOUT_S - 0.2 <= elapsed <= BODY_READ_TIMEOUT_S + 1.0, elapsed

        # -- connect and consent links that are not ours -----------------------------------
        expired = mint_link(stack, ACCOUNT, exp=int(time.time()) - 3600)
        links = {
            "not a jwt": 400,
            "a.b.c": 400,
            mint_link(stack, ACCOUNT, secret="w" * 44): 403,
            expired: 403,
            mint_link(stack, ACCOUNT, return_url="https://evil.example/steal"): 403,
            jwt.encode(
                {"sub": ACCOUNT, "jti": "x", "exp": int(time.time()) + 60}, None, algorithm="none"
            ): 403,
        }
        for token, status in links.items():
            for route in ("/connect", "/admin-consent"):
                answer = await _request(stack, "GET", f"{route}?token={quote(token)}", {})
                assert answer == status, (route, token, answer)

        # -- the 1Relation API without the bearer token ------------------------------------
        real = stack.settings.api_tokens[0]
        refused = [
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Bearer {real}x"},
            {"Authorization": f"Bearer {real[:-1]}"},
            {"Authorization": f"Basic {real}"},
            {"Authorization": real},
        ]
        for headers in refused:
            for method, path in (
                ("GET", f"/api/v1/accounts/{ACCOUNT}"),
                ("DELETE", f"/api/v1/accounts/{ACCOUNT}"),
                ("POST", f"/api/v1/accounts/{ACCOUNT}/resync"),
                (
                    "GET",
                    f"/api/v1/accounts/{ACCOUNT}/events?start=2026-01-01T00:00:00Z&end=2027-01-01T00:00:00Z",
                ),
            ):
                assert await _request(stack, method, path, headers) == 401, (method, headers)

        # -- nothing published, nothing written, and the counters say why ------------------
        assert await queue_depths(stack, queues) == depths_before
        assert await document_counts(stack) == documents_before
        assert await stack.rt.store.accounts.get(ACCOUNT) is not None  # DELETE was refused
        after = await metrics(stack)

        def delta(name: str, **labels: str) -> float:
            return sample(after, name, **labels) - sample(before, name, **labels)

        rejected = "m365sync_notifications_rejected_total"
        assert delta(rejected, reason="unknown_subscription") == 1
        assert delta(rejected, reason="client_state_mismatch") == 1 + 1 + 150
        assert delta(rejected, reason="tenant_mismatch") == 1 + 5
        assert delta(rejected, reason="foreign_mailbox") == 1
        assert delta(rejected, reason="resource_mismatch") == 1
        assert delta("m365sync_notifications_accepted_total") == 0
        malformed = "m365sync_webhook_malformed_total"
        assert delta(malformed, route="notifications", reason="invalid_json") == 3
        assert delta(malformed, route="notifications", reason="not_an_object") == 1
        assert delta(malformed, route="notifications", reason="missing_value") == 1
        assert delta(malformed, route="notifications", reason="body_too_large") == 1
        assert delta(malformed, route="lifecycle", reason="body_too_large") == 1
        assert delta(malformed, route="notifications", reason="body_read_timeout") == 10
        responses = "m365sync_http_responses_total"
        for route in ("/connect", "/admin-consent"):
            assert delta(responses, route=route, status="400") == 2
            assert delta(responses, route=route, status="403") == 4
        api_401 = sum(
            delta(responses, route=route, status="401")
            for route in (
                "/api/v1/accounts/{account_id}",
                "/api/v1/accounts/{account_id}/resync",
                "/api/v1/accounts/{account_id}/events",
            )
        )
        assert api_401 == len(refused) * 4

        # -- control: the same path does publish a genuine notification --------------------
        assert await _post(stack, "/graph/notifications", _collection(genuine)) == 202
        shard = INBOUND_QUEUE.format(shard=shard_of(ACCOUNT, stack.settings.shard_count))
        depths = await queue_depths(stack, [shard, LIFECYCLE_QUEUE])
        assert depths[shard] == depths_before[shard] + 1
        assert depths[LIFECYCLE_QUEUE] == depths_before[LIFECYCLE_QUEUE]

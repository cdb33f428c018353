"""The receiver app (processor.web) against in-memory fakes of its collaborators."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from crypto import DataCipher, Hasher, KeyCheck, seal_valid
from handlers.errors import AccountUnavailable, PublishError
from handlers.messages import INBOUND_SEAL, event_ref_aad, unb64
from handlers.ports import OutgoingMessage, SubscriptionRecord
from handlers.routing import shard_routing_key
from processor.metrics import Metrics
from processor.settings import Settings
from processor.topology import INBOUND_EXCHANGE, LIFECYCLE_EXCHANGE
from processor.web import build_app, build_internal_app

HASHER = Hasher(b"w" * 32)
SUB_ID = "3f1c9a52-7d0e-4b8a-9c11-5e2f6a7b8c90"
CLIENT_STATE = "sub-secret-7f3e91"
TENANT = "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"
USER = "6d2b7e10-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
EVENT_ONE = "AAMkAGEXAMPLE-event-one="
EVENT_TWO = "AAMkAGEXAMPLE-event-two="
ACCOUNT = "acc-42"
NOW = datetime(2031, 5, 14, 9, 0, tzinfo=UTC)
PUBLISH_TIMEOUT_S = 0.3
TOKEN = (
    "Validation: Testing client+application reachability for subscription "
    "Request-Id: b1c2d3e4-0000-4111-8222-333344445555 ✓ ünïcode & <b>ok</b> 100%"
)


class FakeLookup:
    """Subscription records by hash; can be made to fail like a store that is down."""

    def __init__(self, *records: SubscriptionRecord) -> None:
        self.records = {r.subscription_hash: r for r in records}
        self.error: Exception | None = None

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        if self.error is not None:
            raise self.error
        return self.records.get(subscription_hash)


class FakeCiphers:
    """One DataCipher per known account; AccountUnavailable for the rest."""

    def __init__(self, *accounts: str) -> None:
        self.ciphers = {account: DataCipher.generate() for account in accounts}

    async def cipher_for(self, account_id: str, *, check: KeyCheck | None = None) -> DataCipher:
        if account_id not in self.ciphers:
            raise AccountUnavailable(account_id, "erased")
        return self.ciphers[account_id]


class FakePublisher:
    """Records confirmed batches; can fail, hang, or wait on a gate before confirming."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls: list[tuple[list[OutgoingMessage], float]] = []
        self.published: list[OutgoingMessage] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def publish(self, message: OutgoingMessage, *, timeout_s: float) -> None:
        await self.publish_many([message], timeout_s=timeout_s)

    async def publish_many(self, messages: list[OutgoingMessage], *, timeout_s: float) -> None:
        self.calls.append((list(messages), timeout_s))
        self.entered.set()
        if self.mode == "fail":
            raise PublishError("broker unreachable")
        if self.mode == "hang":  # ignores its own timeout, like aio-pika #636
            await asyncio.Event().wait()
        if self.gate is not None:
            await self.gate.wait()
        self.published.extend(messages)


def our_record(**overrides: str) -> SubscriptionRecord:
    values = {
        "subscription_hash": HASHER.hash_id("subscription", SUB_ID),
        "account_id": ACCOUNT,
        "client_state_hash": HASHER.hash_id("client_state", CLIENT_STATE),
        "tenant_hash": HASHER.hash_id("tenant", TENANT),
        "user_hash": HASHER.hash_id("user", USER),
    }
    values.update(overrides)
    return SubscriptionRecord(expires_at=NOW, **values)


def change_item(event_id: str = EVENT_ONE, **overrides: Any) -> dict[str, Any]:
    resource = f"Users/{USER}/Events/{event_id}"
    item: dict[str, Any] = {
        "subscriptionId": SUB_ID,
        "subscriptionExpirationDateTime": "2031-05-14T09:30:00.0000000+00:00",
        "changeType": "updated",
        "resource": resource,
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Event",
            "@odata.id": resource,
            "@odata.etag": 'W/"DwAAABYAAABexampleChangeKey01"',
            "id": event_id,
        },
        "clientState": CLIENT_STATE,
        "tenantId": TENANT,
    }
    item.update(overrides)
    return item


def items_of(published: list[OutgoingMessage]) -> list[Mapping[str, Any]]:
    """The change bodies of published messages, one-item and group-committed alike."""
    bodies: list[Mapping[str, Any]] = []
    for message in published:
        if message.body.get("kind") == "changes":
            bodies += message.body["items"]
        else:
            bodies.append(message.body)
    return bodies


def collection(*items: Mapping[str, Any]) -> bytes:
    return json.dumps({"value": list(items)}).encode()


@dataclasses.dataclass
class Receiver:
    client: TestClient[web.Request, web.Application]
    publisher: FakePublisher
    lookup: FakeLookup
    ciphers: FakeCiphers
    metrics: Metrics
    checks: dict[str, bool]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


ReceiverFactory = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def make_receiver() -> AsyncIterator[ReceiverFactory]:
    """Build receiver apps behind real TCP test servers; every one is closed afterwards."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(**settings_overrides: Any) -> Receiver:
        settings = dataclasses.replace(
            Settings(),
            publish_timeout_s=PUBLISH_TIMEOUT_S,
            max_body_bytes=64 * 1024,
            shard_count=4,
            **settings_overrides,
        )
        publisher, lookup, ciphers = FakePublisher(), FakeLookup(our_record()), FakeCiphers(ACCOUNT)
        metrics, checks = Metrics(), {"broker": True, "database": True}

        async def readiness() -> Mapping[str, bool]:
            return checks

        app = build_app(
            settings=settings,
            lookup=lookup,
            publisher=publisher,
            hasher=HASHER,
            ciphers=ciphers,
            readiness=readiness,
            metrics=metrics,
            clock=lambda: NOW,
            body_read_timeout_s=0.3,
        )
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return Receiver(client, publisher, lookup, ciphers, metrics, checks)

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def receiver(make_receiver: ReceiverFactory) -> Receiver:
    return await make_receiver()


async def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status
    assert response.content_type == "application/json"
    document = await response.json()
    assert set(document["error"]) == {"code", "message"}
    assert document["error"]["code"] == code
    return dict(document)


# -- validation handshake --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/graph/notifications", "/graph/lifecycle"])
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_handshake_echoes_the_exact_decoded_token(
    receiver: Receiver, path: str, method: str
) -> None:
    """A validationToken is answered 200 text/plain with the URL-decoded token, body unread."""
    url = f"{path}?tenant=acme&validationToken={quote(TOKEN, safe='')}"
    response = await receiver.client.request(
        method,
        url,
        data="this is not JSON {" if method == "POST" else None,
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    assert response.status == 200
    assert response.headers["Content-Type"].split(";")[0] == "text/plain"
    assert await response.text() == TOKEN
    assert receiver.publisher.calls == []


async def test_handshake_with_graphs_encoding_keeps_reserved_characters(
    receiver: Receiver,
) -> None:
    """Graph's %20/%3A encoding decodes to spaces and colons; an encoded + stays a plus."""
    url = (
        "/graph/notifications?validationToken=Validation%3A%20Testing%20a%2Bb%20"
        "Request-Id%3A%20b1c2%26x%3D%C3%BC"
    )
    response = await receiver.client.post(url)
    assert await response.text() == "Validation: Testing a+b Request-Id: b1c2&x=ü"


async def test_handshake_is_answered_before_reading_an_oversize_body(receiver: Receiver) -> None:
    """The handshake never looks at the body, even one above the body limit."""
    url = f"/graph/notifications?validationToken={quote(TOKEN, safe='')}"
    response = await receiver.client.post(url, data=b"x" * (128 * 1024))
    assert response.status == 200
    assert await response.text() == TOKEN


@pytest.mark.parametrize("token", ["", "x" * 4097])
async def test_empty_or_huge_token_is_400(receiver: Receiver, token: str) -> None:
    """An empty or over-long validationToken gets a 400 JSON error."""
    response = await receiver.client.post("/graph/notifications", params={"validationToken": token})
    await assert_error(response, 400, "invalid_validation_token")


async def test_get_without_token_is_405(receiver: Receiver) -> None:
    """GET on a webhook route without validationToken is 405 in the JSON error shape."""
    response = await receiver.client.get("/graph/lifecycle")
    await assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


# -- notifications -----------------------------------------------------------------------------


async def test_valid_notifications_are_published_then_202(receiver: Receiver) -> None:
    """Accepted items become encrypted inbound messages on the account's shard, then 202."""
    body = collection(change_item(EVENT_ONE), change_item(EVENT_TWO, changeType="deleted"))
    response = await receiver.client.post("/graph/notifications", data=body)
    assert response.status == 202
    # Both items share the account's shard: one confirmed message carries them.
    [message] = receiver.publisher.published
    assert receiver.publisher.calls[0][1] <= PUBLISH_TIMEOUT_S
    assert message.exchange == INBOUND_EXCHANGE
    assert message.routing_key == shard_routing_key(ACCOUNT, 4)
    assert message.correlation_id == response.headers["X-Correlation-Id"]
    assert len(message.message_id) == 32
    assert message.body["schema"] == "m365sync.inbound.v1"
    assert message.body["kind"] == "changes"
    cipher = receiver.ciphers.ciphers[ACCOUNT]
    for item, event_id, change_type in zip(
        items_of(receiver.publisher.published),
        (EVENT_ONE, EVENT_TWO),
        ("updated", "deleted"),
        strict=True,
    ):
        assert item["kind"] == "change"
        assert item["account_id"] == ACCOUNT
        assert item["change_type"] == change_type
        assert item["event_hash"] == HASHER.hash_id("event", ACCOUNT, event_id)
        assert item["received_at"] == "2031-05-14T09:00:00Z"
        aad = event_ref_aad(ACCOUNT, item["event_hash"])
        assert cipher.decrypt_str(unb64(item["event_ref"]), aad) == event_id
        assert seal_valid(cipher, item, purpose=INBOUND_SEAL)
        assert not seal_valid(cipher, {**item, "change_type": "x"}, purpose=INBOUND_SEAL)
        assert event_id not in json.dumps(message.body)
    assert receiver.sample("m365sync_notifications_received_total") == 2
    assert receiver.sample("m365sync_notifications_accepted_total") == 2
    assert (
        receiver.sample("m365sync_webhook_requests_total", route="notifications", status="202") == 1
    )


async def test_202_only_after_publish_returns(receiver: Receiver) -> None:
    """The answer waits until the publisher has confirmed every message."""
    receiver.publisher.gate = asyncio.Event()
    pending = asyncio.create_task(
        receiver.client.post("/graph/notifications", data=collection(change_item()))
    )
    await asyncio.wait_for(receiver.publisher.entered.wait(), 2)
    await asyncio.sleep(0.05)
    assert not pending.done()
    receiver.publisher.gate.set()
    response = await pending
    assert response.status == 202
    assert len(receiver.publisher.published) == 1


async def test_concurrent_posts_are_grouped_and_all_answered_after_the_confirm(
    make_receiver: ReceiverFactory,
) -> None:
    """Concurrent POSTs share one message per shard; none is answered before its confirm."""
    receiver = await make_receiver(receiver_group_window_ms=5000, receiver_group_max_items=5)
    receiver.publisher.gate = asyncio.Event()
    events = [f"AAMkAGI2THVSAAA{n}=" for n in range(5)]
    pending = [
        asyncio.create_task(
            receiver.client.post("/graph/notifications", data=collection(change_item(event)))
        )
        for event in events
    ]
    await asyncio.wait_for(receiver.publisher.entered.wait(), 5)
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in pending)
    receiver.publisher.gate.set()
    responses = await asyncio.gather(*pending)
    assert [r.status for r in responses] == [202] * 5
    [message] = receiver.publisher.published
    assert message.routing_key == shard_routing_key(ACCOUNT, 4)
    expected = {HASHER.hash_id("event", ACCOUNT, event) for event in events}
    assert {item["event_hash"] for item in items_of([message])} == expected


async def test_every_post_of_a_failed_group_gets_503(make_receiver: ReceiverFactory) -> None:
    """When the group's publish fails, every POST that had an item in it is answered 503."""
    receiver = await make_receiver(receiver_group_window_ms=5000, receiver_group_max_items=3)
    receiver.publisher.mode = "fail"
    responses = await asyncio.gather(
        *(
            receiver.client.post(
                "/graph/notifications", data=collection(change_item(f"AAMkAGI2THVSAAA{n}="))
            )
            for n in range(3)
        )
    )
    for response in responses:
        await assert_error(response, 503, "unavailable")
    assert len(receiver.publisher.calls) == 1
    assert receiver.sample("m365sync_notifications_accepted_total") == 0


@pytest.mark.parametrize("mode", ["fail", "hang"])
async def test_publish_failure_or_hang_is_503(receiver: Receiver, mode: str) -> None:
    """A publisher that raises or hangs past the timeout gives 503 Retry-After, nothing accepted."""
    receiver.publisher.mode = mode
    started = time.monotonic()
    response = await receiver.client.post("/graph/notifications", data=collection(change_item()))
    elapsed = time.monotonic() - started
    await assert_error(response, 503, "unavailable")
    assert response.headers["Retry-After"] == "5"
    assert elapsed < PUBLISH_TIMEOUT_S + 1.0
    assert receiver.sample("m365sync_notifications_accepted_total") == 0
    assert receiver.sample("m365sync_publish_failures_total") == 1
    assert receiver.publisher.published == []


async def test_lookup_failure_is_503(receiver: Receiver) -> None:
    """When the subscription store fails, the request gets 503 so that Graph retries."""
    receiver.lookup.error = ConnectionError("database down")
    response = await receiver.client.post("/graph/notifications", data=collection(change_item()))
    await assert_error(response, 503, "unavailable")
    assert response.headers["Retry-After"] == "5"
    assert receiver.publisher.calls == []


async def test_forged_items_get_202_with_nothing_published(receiver: Receiver) -> None:
    """Items that fail the checks are dropped and counted by reason; the sender still gets 202."""
    body = collection(
        change_item(clientState="guessed"),
        change_item(clientState="guessed-again"),
        change_item(subscriptionId="someone-elses"),
        change_item(tenantId="another-tenant"),
        change_item(resource=f"Users/intruder/Events/{EVENT_ONE}"),
        {"not": "a notification"},
        "junk",
    )
    response = await receiver.client.post("/graph/notifications", data=body)
    assert response.status == 202
    assert await response.read() == b""
    assert receiver.publisher.calls == []
    rejected = "m365sync_notifications_rejected_total"
    assert receiver.sample(rejected, reason="client_state_mismatch") == 2
    assert receiver.sample(rejected, reason="unknown_subscription") == 1
    assert receiver.sample(rejected, reason="tenant_mismatch") == 1
    assert receiver.sample(rejected, reason="foreign_mailbox") == 1
    assert receiver.sample(rejected, reason="missing_field") == 1
    assert receiver.sample(rejected, reason="malformed_item") == 1
    assert receiver.sample("m365sync_notifications_accepted_total") == 0


async def test_mixed_request_publishes_only_the_valid_items(receiver: Receiver) -> None:
    """A request with valid and forged items publishes the valid ones and answers 202."""
    body = collection(change_item(EVENT_ONE), change_item(EVENT_TWO, clientState="forged"))
    response = await receiver.client.post("/graph/notifications", data=body)
    assert response.status == 202
    assert len(receiver.publisher.published) == 1
    assert receiver.sample("m365sync_notifications_accepted_total") == 1


async def test_duplicates_in_one_request_are_published_once(receiver: Receiver) -> None:
    """The same change repeated within one POST becomes one message."""
    body = collection(change_item(), change_item(), change_item(changeType="created"))
    response = await receiver.client.post("/graph/notifications", data=body)
    assert response.status == 202
    assert [m["change_type"] for m in items_of(receiver.publisher.published)] == [
        "updated",
        "created",
    ]
    assert receiver.sample("m365sync_notifications_accepted_total") == 3


async def test_items_of_an_erased_account_are_dropped(receiver: Receiver) -> None:
    """When the account's key is gone, its items are dropped and counted, with 202."""
    receiver.ciphers.ciphers.clear()
    response = await receiver.client.post("/graph/notifications", data=collection(change_item()))
    assert response.status == 202
    assert receiver.publisher.calls == []
    assert (
        receiver.sample("m365sync_notifications_rejected_total", reason="account_unavailable") == 1
    )


@pytest.mark.parametrize("path", ["/graph/lifecycle", "/graph/notifications"])
async def test_lifecycle_items_go_to_the_lifecycle_exchange(receiver: Receiver, path: str) -> None:
    """A valid lifecycle item becomes a lifecycle message with routing key lifecycle."""
    item = {
        "subscriptionId": SUB_ID,
        "subscriptionExpirationDateTime": "2031-05-14T09:30:00.0000000+00:00",
        "tenantId": TENANT,
        "clientState": CLIENT_STATE,
        "lifecycleEvent": "missed",
    }
    response = await receiver.client.post(path, data=collection(item))
    assert response.status == 202
    [message] = receiver.publisher.published
    assert (message.exchange, message.routing_key) == (LIFECYCLE_EXCHANGE, "lifecycle")
    assert message.body["lifecycle_event"] == "missed"
    assert message.body["account_id"] == ACCOUNT
    assert message.body["subscription_hash"] == HASHER.hash_id("subscription", SUB_ID)


async def test_empty_collection_is_202(receiver: Receiver) -> None:
    """An empty value list is answered 202 and publishes nothing."""
    response = await receiver.client.post("/graph/notifications", data=b'{"value": []}')
    assert response.status == 202
    assert receiver.publisher.calls == []


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"value": 3}'])
async def test_malformed_body_is_400(receiver: Receiver, body: bytes) -> None:
    """Broken JSON or a body that is not a collection gets a 400 JSON error."""
    response = await receiver.client.post("/graph/notifications", data=body)
    await assert_error(response, 400, "malformed_body")
    assert receiver.publisher.calls == []


async def test_oversize_body_is_413(receiver: Receiver) -> None:
    """A body above max_body_bytes gets 413."""
    response = await receiver.client.post("/graph/notifications", data=b" " * (64 * 1024 + 1))
    await assert_error(response, 413, "payload_too_large")


async def test_oversize_chunked_body_is_413(receiver: Receiver) -> None:
    """A chunked body (no Content-Length) is cut off at the limit with 413."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 8192

    response = await receiver.client.post("/graph/notifications", data=chunks())
    await assert_error(response, 413, "payload_too_large")


async def test_body_at_the_limit_is_read(receiver: Receiver) -> None:
    """A body of exactly max_body_bytes is accepted for parsing."""
    body = collection(change_item())
    padded = body + b" " * (64 * 1024 - len(body))
    response = await receiver.client.post("/graph/notifications", data=padded)
    assert response.status == 202


async def test_slow_client_gets_408(receiver: Receiver) -> None:
    """A client that does not finish its body within the read deadline gets 408."""
    server = receiver.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"POST /graph/notifications HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"value": ['
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 3)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 408")


# -- correlation and logs --------------------------------------------------------------------


async def test_incoming_request_id_is_reused(receiver: Receiver) -> None:
    """A sane client-request-id becomes the correlation id; a strange one is replaced."""
    response = await receiver.client.get("/healthz", headers={"client-request-id": "abc-123"})
    assert response.headers["X-Correlation-Id"] == "abc-123"
    response = await receiver.client.get("/healthz", headers={"request-id": "<script>"})
    assert response.headers["X-Correlation-Id"] not in ("<script>", "")
    assert len(response.headers["X-Correlation-Id"]) == 32


async def test_logs_carry_no_client_state_or_event_id(receiver: Receiver) -> None:
    """The webhook's log events name reasons and hashes, never clientState or Graph ids."""
    body = collection(
        change_item(EVENT_ONE),
        change_item(EVENT_TWO, clientState="forged-client-state"),
        change_item(EVENT_TWO, subscriptionId="forged-subscription"),
    )
    with capture_logs() as events:
        response = await receiver.client.post("/graph/notifications", data=body)
        receiver.publisher.mode = "fail"
        failed = await receiver.client.post("/graph/notifications", data=body)
    assert (response.status, failed.status) == (202, 503)
    names = [event["event"] for event in events]
    assert "webhook.accepted" in names
    assert "webhook.publish_failed" in names
    accepted = next(e for e in events if e["event"] == "webhook.accepted")
    assert (accepted["accepted"], accepted["rejected"]) == (1, 2)
    rejected = {e["reason"]: e for e in events if e["event"] == "webhook.rejected"}
    assert rejected["client_state_mismatch"]["subscription_hash"] == HASHER.hash_id(
        "subscription", SUB_ID
    )
    assert "unknown_subscription" in rejected
    text = repr(events)
    for secret in (
        CLIENT_STATE,
        "forged-client-state",
        EVENT_ONE,
        EVENT_TWO,
        USER,
        TENANT,
        SUB_ID,
        "forged-subscription",
    ):
        assert secret not in text


# -- errors, health, readiness, metrics --------------------------------------------------------


async def test_unknown_route_is_404_json(receiver: Receiver) -> None:
    """An unknown path gets 404 in the JSON error shape."""
    response = await receiver.client.get("/nowhere")
    await assert_error(response, 404, "not_found")


async def test_wrong_method_is_405_json(receiver: Receiver) -> None:
    """A method a route does not take gets 405 in the JSON error shape, with Allow."""
    response = await receiver.client.put("/graph/notifications", data=b"{}")
    await assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


async def test_healthz_is_ok(receiver: Receiver) -> None:
    """/healthz answers 200 {"status": "ok"} while the process runs."""
    response = await receiver.client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_is_ok_when_every_check_passes(receiver: Receiver) -> None:
    """/readyz answers 200 listing the checks when all are true."""
    response = await receiver.client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "status": "ok",
        "checks": {"broker": True, "database": True},
    }


async def test_readyz_is_503_when_a_check_fails(receiver: Receiver) -> None:
    """/readyz answers 503 listing the checks when one is false."""
    receiver.checks["broker"] = False
    response = await receiver.client.get("/readyz")
    document = await assert_error(response, 503, "not_ready")
    assert document["checks"] == {"broker": False, "database": True}
    assert "broker" in document["error"]["message"]


async def test_metrics_exposition_contains_the_counters(receiver: Receiver) -> None:
    """The internal listener's /metrics serves the Prometheus text format with the webhook
    counters; the public app has no /metrics."""
    await receiver.client.post("/graph/notifications", data=collection(change_item()))
    await receiver.client.post(
        "/graph/notifications", data=collection(change_item(clientState="x"))
    )
    await assert_error(await receiver.client.get("/metrics"), 404, "not_found")

    async def readiness() -> Mapping[str, bool]:
        return receiver.checks

    internal = TestClient(
        TestServer(build_internal_app(readiness=readiness, metrics=receiver.metrics))
    )
    await internal.start_server()
    try:
        response = await internal.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
        assert (await internal.get("/readyz")).status == 200
    finally:
        await internal.close()
    for line in (
        "m365sync_notifications_received_total 2.0",
        "m365sync_notifications_accepted_total 1.0",
        'm365sync_notifications_rejected_total{reason="client_state_mismatch"} 1.0',
        'm365sync_webhook_requests_total{route="notifications",status="202"} 2.0',
        "m365sync_publish_failures_total 0.0",
        "m365sync_webhook_duration_seconds_count 2.0",
    ):
        assert line in text


async def test_two_apps_have_independent_metrics(make_receiver: ReceiverFactory) -> None:
    """Each Metrics has its own registry, so apps built side by side do not collide."""
    first, second = await make_receiver(), await make_receiver()
    await first.client.post("/graph/notifications", data=collection(change_item()))
    assert first.sample("m365sync_notifications_accepted_total") == 1
    assert second.sample("m365sync_notifications_accepted_total") == 0


async def test_readyz_is_503_when_readiness_raises(receiver: Receiver) -> None:
    """A readiness probe that raises makes /readyz answer 503; an empty set of checks is ready."""
    receiver.checks.clear()
    response = await receiver.client.get("/readyz")
    assert response.status == 200  # no checks at all: nothing is down

    async def broken() -> Mapping[str, bool]:
        raise ConnectionError("probe failed")

    app = build_app(
        settings=Settings(),
        lookup=FakeLookup(),
        publisher=FakePublisher(),
        hasher=HASHER,
        ciphers=FakeCiphers(),
        readiness=broken,
        metrics=Metrics(),
    )
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/readyz")
        await assert_error(response, 503, "not_ready")


async def test_unhandled_error_is_500_json_and_logged() -> None:
    """A crash in a route added later is answered 500 in the JSON shape and logged."""

    async def crash(_: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = build_app(
        settings=Settings(),
        lookup=FakeLookup(),
        publisher=FakePublisher(),
        hasher=HASHER,
        ciphers=FakeCiphers(),
        readiness=lambda: asyncio.sleep(0, {}),
        metrics=Metrics(),
    )
    app.router.add_get("/crash", crash)
    async with TestClient(TestServer(app)) as client:
        with capture_logs() as events:
            response = await client.get("/crash")
        await assert_error(response, 500, "internal_error")
        assert "X-Correlation-Id" in response.headers
    assert [e["event"] for e in events] == ["http.unhandled_error"]
    assert events[0]["route"] == "/crash"


async def test_json_http_errors_raised_by_routes_keep_their_body() -> None:
    """A route that raises an HTTP error with a JSON body (e.g. a 401 of /api/v1) keeps it."""

    async def unauthorized(_: web.Request) -> web.Response:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": {"code": "unauthorized", "message": "bearer token"}}),
            content_type="application/json",
        )

    app = build_app(
        settings=Settings(),
        lookup=FakeLookup(),
        publisher=FakePublisher(),
        hasher=HASHER,
        ciphers=FakeCiphers(),
        readiness=lambda: asyncio.sleep(0, {}),
        metrics=Metrics(),
    )
    app.router.add_get("/api/v1/accounts/x", unauthorized)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/api/v1/accounts/x")
        document = await assert_error(response, 401, "unauthorized")
        assert document["error"]["message"] == "bearer token"

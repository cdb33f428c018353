"""Bad input, by property: whole webhook bodies and connect tokens (docs/design.md "What must always hold" 6, 7).

Item-level checks of notifications have their own properties in tests/unit; these go one
level up: any body POSTed to either webhook route gets 202 or 400 and publishes exactly the
items that prove themselves ours, in ciphertext; any string or tampered JWT given as a
connect token is refused with the contract's 400 or 403 and consumes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from collections.abc import Coroutine, Iterator
from datetime import datetime
from typing import Any, TypeVar

import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from crypto import Hasher
from processor.metrics import Metrics
from processor.settings import Settings
from processor.web import build_app
from subscriptions.links import LinkRejected, LinkVerifier
from tests.unit.test_web import (
    ACCOUNT,
    CLIENT_STATE,
    EVENT_ONE,
    EVENT_TWO,
    HASHER,
    NOW,
    SUB_ID,
    TENANT,
    USER,
    FakeCiphers,
    FakeLookup,
    FakePublisher,
    change_item,
    items_of,
    our_record,
)

T = TypeVar("T")

OTHER_USER = "9a8b7c6d-0000-4111-8222-333344445555"
PLAINTEXT_IDS = (CLIENT_STATE, SUB_ID, TENANT, USER, OTHER_USER, EVENT_ONE, EVENT_TWO)


def lifecycle_item(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "subscriptionId": SUB_ID,
        "subscriptionExpirationDateTime": "2031-05-14T09:30:00.0000000+00:00",
        "tenantId": TENANT,
        "clientState": CLIENT_STATE,
        "lifecycleEvent": "reauthorizationRequired",
    }
    item.update(overrides)
    return item


# -- the webhook, one app for every example --------------------------------------------------


@dataclasses.dataclass
class Webhook:
    loop: asyncio.AbstractEventLoop
    client: TestClient[Any, Any]
    publisher: FakePublisher
    metrics: Metrics

    def post(self, path: str, body: bytes) -> int:
        async def send() -> int:
            async with self.client.post(path, data=body) as response:
                await response.read()
                return response.status

        return self.loop.run_until_complete(send())

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    """A receiver app on fakes, served once for all examples (hypothesis calls the test
    hundreds of times; a server per example would dominate the run)."""
    loop = asyncio.new_event_loop()
    publisher = loop.run_until_complete(_make_publisher())
    metrics = Metrics()
    app = build_app(
        settings=dataclasses.replace(
            Settings(), publish_timeout_s=0.5, max_body_bytes=64 * 1024, shard_count=4
        ),
        lookup=FakeLookup(our_record()),
        publisher=publisher,
        hasher=HASHER,
        ciphers=FakeCiphers(ACCOUNT),
        readiness=_ready,
        metrics=metrics,
        clock=lambda: NOW,
        body_read_timeout_s=1.0,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app), loop=loop)
    loop.run_until_complete(client.start_server())
    try:
        yield Webhook(loop, client, publisher, metrics)
    finally:
        loop.run_until_complete(client.close())
        loop.close()


async def _make_publisher() -> FakePublisher:
    return FakePublisher()  # its asyncio.Event belongs to this loop


async def _ready() -> dict[str, bool]:
    return {}


small_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)

#: Valid and forged items: each field may be swapped for a lookalike or garbage.
forged_values: dict[str, st.SearchStrategy[Any]] = {
    "subscriptionId": st.sampled_from([SUB_ID, SUB_ID.upper(), str(uuid.uuid4()), ""]),
    "clientState": st.sampled_from([CLIENT_STATE, CLIENT_STATE + " ", "forged", None]),
    "tenantId": st.sampled_from([TENANT, str(uuid.uuid4()), TENANT.upper()]),
    "resource": st.sampled_from(
        [
            f"Users/{USER}/Events/{EVENT_ONE}",
            f"Users/{OTHER_USER}/Events/{EVENT_ONE}",
            f"users('{USER}')/events('{EVENT_TWO}')",
            f"Users/{USER}/Messages/{EVENT_ONE}",
            f"Users/{USER}/Events/{EVENT_ONE}/../../{OTHER_USER}",
        ]
    ),
    "changeType": st.sampled_from(["created", "updated", "deleted", "missed", "UPDATED"]),
    "lifecycleEvent": st.sampled_from(
        ["reauthorizationRequired", "subscriptionRemoved", "missed", "deleted"]
    ),
}


@st.composite
def items(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["change", "lifecycle", "garbage"]))
    if kind == "garbage":
        return draw(small_json)
    item = (
        change_item(draw(st.sampled_from([EVENT_ONE, EVENT_TWO])))
        if kind == "change"
        else (lifecycle_item())
    )
    for name in draw(st.lists(st.sampled_from(sorted(forged_values)), max_size=3, unique=True)):
        if name == "lifecycleEvent" and kind == "change":
            continue  # adding it would turn the item into a lifecycle item
        value = draw(forged_values[name] | small_json)
        if value is None:
            item.pop(name, None)
        else:
            item[name] = value
    if kind == "change" and isinstance(item.get("resource"), str):
        # Keep resourceData consistent with the path most of the time, so that the
        # mailbox check (not the id check) is what a foreign path meets.
        tail = item["resource"].rsplit("/", 1)[-1].removeprefix("events('").rstrip("')")
        if draw(st.booleans()):
            item["resourceData"]["id"] = tail
    return item


def _resource_event(resource: Any) -> str | None:
    for event in (EVENT_ONE, EVENT_TWO):
        if resource in (f"Users/{USER}/Events/{event}", f"users('{USER}')/events('{event}')"):
            return event
    return None


def _identity(item: Any) -> tuple[str | None, ...] | None:
    """What an accepted item is published as, or None when it must be rejected: every
    field exactly as our subscription has it."""
    if not isinstance(item, dict):
        return None
    common = (
        item.get("subscriptionId") == SUB_ID
        and item.get("clientState") == CLIENT_STATE
        and item.get("tenantId") == TENANT
    )
    if not common:
        return None
    if "lifecycleEvent" in item:
        lifecycle = item["lifecycleEvent"]
        ok = lifecycle in ("reauthorizationRequired", "subscriptionRemoved", "missed")
        return ("lifecycle", lifecycle) if ok else None
    event = _resource_event(item.get("resource"))
    data = item.get("resourceData")
    if (
        event is None
        or item.get("changeType") not in ("created", "updated", "deleted")
        or not (data is None or isinstance(data, dict))
        or (isinstance(data, dict) and data.get("id") not in (None, event))
    ):
        return None
    return ("change", event, item["changeType"])


bodies = st.one_of(
    st.builds(lambda xs: json.dumps({"value": xs}).encode(), st.lists(items(), max_size=6)),
    st.builds(lambda v: json.dumps(v).encode(), small_json),
    st.binary(max_size=64),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(path=st.sampled_from(["/graph/notifications", "/graph/lifecycle"]), body=bodies)
@example(path="/graph/notifications", body=b'{"value": ' + b"[" * 30_000 + b"]" * 30_000 + b"}")
@example(path="/graph/lifecycle", body=b" " * (64 * 1024 + 1))
@example(path="/graph/lifecycle", body=json.dumps({"value": [{}] * 1001}).encode())
def test_any_body_gets_202_or_400_and_only_proven_items_are_published(
    webhook: Webhook, path: str, body: bytes
) -> None:
    """Whatever body arrives on either route, the answer is 202 (a collection), 400 (not
    one) or 413 (too long); exactly the items that match our subscription in every field are published, in
    ciphertext; every other item is counted under a reason; a refused body is counted
    under its reason (m365sync_webhook_malformed_total)."""
    webhook.publisher.published.clear()
    received = webhook.sample("m365sync_notifications_received_total")
    accepted = webhook.sample("m365sync_notifications_accepted_total")
    rejected = _rejected_total(webhook.metrics)
    route = path.removeprefix("/graph/")
    malformed = _malformed_total(webhook.metrics, route)

    status = webhook.post(path, body)

    if len(body) > 64 * 1024:
        assert status == 413
        assert webhook.publisher.published == []
        assert _malformed_total(webhook.metrics, route) == malformed + 1
        return
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    is_collection = isinstance(document, dict) and isinstance(document.get("value"), list)
    if not is_collection or len(document["value"]) > 1000:
        assert status == 400
        assert webhook.publisher.published == []
        assert _malformed_total(webhook.metrics, route) == malformed + 1
        return
    assert status == 202
    values = document["value"]
    ours = [identity for item in values if (identity := _identity(item)) is not None]
    # Concurrent or same-shard items may share a group-committed message: count items.
    assert len(items_of(webhook.publisher.published)) == len(set(ours))
    assert webhook.sample("m365sync_notifications_received_total") == received + len(values)
    assert webhook.sample("m365sync_notifications_accepted_total") == accepted + len(ours)
    assert _rejected_total(webhook.metrics) == rejected + len(values) - len(ours)
    for item in items_of(webhook.publisher.published):
        assert item["account_id"] == ACCOUNT
        text = json.dumps(item)
        assert not [secret for secret in PLAINTEXT_IDS if secret in text]


def _malformed_total(metrics: Metrics, route: str) -> float:
    """Requests refused whole, summed over every reason."""
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "m365sync_webhook_malformed":
            total += sum(
                s.value
                for s in family.samples
                if s.name.endswith("_total") and s.labels["route"] == route
            )
    return total


def _rejected_total(metrics: Metrics) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "m365sync_notifications_rejected":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


# -- connect and consent tokens ---------------------------------------------------------------

SECRET = "connect-secret-" + "k" * 40
ORIGIN = "https://app.onerelation.example"


class CountingUsedLinks:
    """An in-memory used-link store that records every consume."""

    def __init__(self) -> None:
        self.consumed: list[str] = []

    async def consume(self, link_hash: str, *, expires_at: datetime) -> bool:
        if link_hash in self.consumed:
            return False
        self.consumed.append(link_hash)
        return True


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (the fake store does not) without a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine suspended")


def _verifier(used: CountingUsedLinks) -> LinkVerifier:
    return LinkVerifier(
        secrets=(SECRET,), return_url_origins=(ORIGIN,), used=used, hasher=Hasher(b"j" * 32)
    )


def _claims() -> dict[str, Any]:
    return {
        "sub": "acc-42",
        "exp": int(time.time()) + 600,
        "jti": uuid.uuid4().hex,
        "return_url": f"{ORIGIN}/calendar",
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def tampered_tokens(draw: st.DrawFn) -> str:
    """A good token, then one kind of tampering an attacker can do without the secret
    (or with a wrong one, or with the right one but claims the contract refuses)."""
    claims = _claims()
    good = jwt.encode(claims, SECRET, algorithm="HS256")
    header, payload, signature = good.split(".")
    how = draw(
        st.sampled_from(
            [
                "flip",
                "cut",
                "insert",
                "payload",
                "alg",
                "secret",
                "claims",
                "segments",
            ]
        )
    )
    if how == "flip":
        at = draw(st.integers(0, len(good) - 1))
        assume(good[at] != ".")
        return good[:at] + draw(st.sampled_from(B64URL)) + good[at + 1 :]
    if how == "cut":
        at = draw(st.integers(0, len(good) - 1))
        return good[:at]
    if how == "insert":
        at = draw(st.integers(0, len(good)))
        return good[:at] + draw(st.text(min_size=1, max_size=3)) + good[at:]
    if how == "payload":  # another claims set under the original signature
        forged = draw(st.dictionaries(st.sampled_from(["sub", "exp", "jti", "x"]), small_json))
        return f"{header}.{_b64(json.dumps({**claims, **forged, 'sub': 'acc-evil'}).encode())}.{signature}"
    if how == "alg":
        alg = draw(st.sampled_from(["none", "None", "HS512", "HS384", "RS256", "ES256", ""]))
        forged_header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        sig = draw(st.sampled_from(["", signature]))
        return f"{forged_header}.{payload}.{sig}"
    if how == "secret":
        other = draw(st.text(min_size=32, max_size=64).filter(lambda s: s != SECRET))
        return jwt.encode(claims, other.encode("utf-8", "surrogatepass"), algorithm="HS256")
    if how == "claims":
        spoiled = dict(claims)
        name = draw(st.sampled_from(["sub", "exp", "jti", "return_url", "tenant"]))
        value = draw(
            st.sampled_from(
                {
                    "sub": [None, "", "acc 42", "a" * 200, 42],
                    "exp": [None, int(time.time()) - 3600, int(time.time()) + 10 * 86400, "soon"],
                    "jti": [None, "", "x" * 300, 7],
                    "return_url": ["https://evil.example/x", "javascript:alert(1)", 3, ""],
                    "tenant": ["not a tenant", 5, "../etc"],
                }[name]
            )
        )
        if value is None:
            spoiled.pop(name)
        else:
            spoiled[name] = value
        return jwt.encode(spoiled, SECRET, algorithm="HS256")
    # "segments": too few or too many parts, or empty ones
    parts = draw(st.lists(st.sampled_from([header, payload, signature, ""]), max_size=5))
    return ".".join(parts)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300) | tampered_tokens())
@example("")
@example("a.b.c")
@example("." * 2)
@example("x" * 5000)
def test_no_string_but_a_good_token_starts_anything(token: str) -> None:
    """Any string or tampered JWT is refused with 400 (not a JWT) or 403 (anything else the
    contract names), and nothing is consumed; the rare tampering that changes no byte of the
    decoded token (base64 padding bits) is the original token and verifies as it."""
    used = CountingUsedLinks()
    verifier = _verifier(used)
    rejection: LinkRejected | None = None
    try:
        link = run_sync(verifier.verify(token))
    except LinkRejected as exc:
        rejection = exc
    if rejection is not None:
        assert rejection.status in (400, 403)
        assert (rejection.status == 400) == (rejection.code == "invalid_token")
        assert rejection.message.isprintable()
        assert len(rejection.message) < 200
        assert used.consumed == []
        return
    # Accepted: it must be the good token in another spelling (same claims, same signature).
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert decoded["sub"] == link.account_id == "acc-42"
    assert len(used.consumed) == 1

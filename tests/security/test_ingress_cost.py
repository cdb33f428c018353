"""An unauthenticated POST costs the receiver a small constant, however many ids it names."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from aiohttp.test_utils import TestClient, TestServer
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from handlers.ports import OutgoingMessage, SubscriptionRecord
from processor.metrics import Metrics
from processor.settings import Settings
from processor.store import Store
from processor.web import build_app
from tests.integration.support import (
    CLIENT_STATE,
    SUBSCRIPTION_ID,
    make_store,
    notification,
    seed_account,
)

ITEMS = 1000
#: A small constant, independent of the number of items.
LOOKUP_BOUND = 16


class CountingStore:
    """The real store's subscription lookup, counted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lookups = 0

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        self.lookups += 1
        return await self.store.subscriptions.find_subscription(subscription_hash)


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[OutgoingMessage] = []

    async def publish(self, message: OutgoingMessage, *, timeout_s: float) -> None:
        self.published.append(message)

    async def publish_many(self, messages: list[OutgoingMessage], *, timeout_s: float) -> None:
        self.published.extend(messages)


async def test_a_thousand_distinct_unknown_ids_cost_a_bounded_number_of_lookups_and_lines(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """One POST of 1,000 items with distinct random subscriptionIds makes at most a few
    database lookups and a few log lines, is answered 202, and a genuine notification in
    its own request is still published."""
    store, _ = make_store(mongo_db)
    await seed_account(store)
    counting, publisher = CountingStore(store), RecordingPublisher()

    async def readiness() -> Mapping[str, bool]:
        return {}

    app = build_app(
        settings=dataclasses.replace(Settings(), max_body_bytes=1024 * 1024, shard_count=2),
        lookup=counting,
        publisher=publisher,
        hasher=store.hasher,
        ciphers=store.keys,
        readiness=readiness,
        metrics=Metrics(),
        clock=lambda: datetime.now(UTC),
    )
    forged = []
    for n in range(ITEMS):
        item = notification(f"AAMkAGforged{n}=")
        item["subscriptionId"] = str(uuid.uuid4())
        forged.append(item)
    async with TestClient(TestServer(app)) as client:
        with capture_logs() as logs:
            response = await client.post("/graph/notifications", data=json.dumps({"value": forged}))
        assert response.status == 202
        forged_lookups = counting.lookups
        genuine = notification("AAMkAGgenuine=")
        assert genuine["subscriptionId"] == SUBSCRIPTION_ID
        assert genuine["clientState"] == CLIENT_STATE
        response = await client.post("/graph/notifications", data=json.dumps({"value": [genuine]}))
        assert response.status == 202

    warnings = [entry for entry in logs if entry["log_level"] in {"warning", "error"}]
    print(f"lookups={forged_lookups} log_lines={len(logs)} warning_lines={len(warnings)}")
    assert forged_lookups <= LOOKUP_BOUND
    assert len(logs) <= 5
    assert [e["reason"] for e in warnings] == ["unknown_subscription"]
    assert warnings[0]["count"] == ITEMS
    assert len(publisher.published) == 1

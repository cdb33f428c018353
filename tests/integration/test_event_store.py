"""The version guard and tombstones of the event store, on the real MongoDB-wire database."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from handlers.records import Change
from tests.integration.support import make_store

pytestmark = pytest.mark.integration


def version(lm: str, ck: str, subject: str = "s") -> dict[str, Any]:
    return {
        "id": "AAMk-evt=",
        "subject": subject,
        "lastModifiedDateTime": lm,
        "changeKey": ck,
        "start": {"dateTime": "2026-12-03T10:00:00.0000000", "timeZone": "UTC"},
        "end": {"dateTime": "2026-12-03T11:00:00.0000000", "timeZone": "UTC"},
    }


T1 = "2026-12-01T08:00:00.0000000Z"
T2 = "2026-12-01T09:00:00.0000000Z"
T3 = "2026-12-01T10:00:00.0000000Z"


async def test_newer_wins_older_and_identical_versions_are_stale(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """A newer lastModifiedDateTime replaces; an older one or the same version changes nothing."""
    store, events = make_store(mongo_db)
    cipher = await store.accounts.create("acc-1")
    assert await events.upsert_version("acc-1", version(T2, "ck2", "v2"), cipher=cipher) is not None
    assert await events.upsert_version("acc-1", version(T1, "ck1", "v1"), cipher=cipher) is None
    assert (
        await events.upsert_version("acc-1", version(T2, "ck2", "v2-again"), cipher=cipher) is None
    )
    written = await events.upsert_version("acc-1", version(T3, "ck3", "v3"), cipher=cipher)
    assert isinstance(written, Change)
    doc = await events.collection.find_one({"_id": written.event_key})
    assert doc is not None
    assert events.decrypt(doc, cipher)[1]["subject"] == "v3"


async def test_equal_timestamp_with_another_change_key_is_the_later_fetch_and_wins(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """On an equal timestamp a different changeKey wins: that fetch is the current state."""
    store, events = make_store(mongo_db)
    cipher = await store.accounts.create("acc-1")
    await events.upsert_version("acc-1", version(T2, "ck-a", "first"), cipher=cipher)
    change = await events.upsert_version("acc-1", version(T2, "ck-b", "second"), cipher=cipher)
    assert change is not None
    doc = await events.collection.find_one({"_id": change.event_key})
    assert doc is not None
    assert events.decrypt(doc, cipher)[1]["subject"] == "second"


async def test_a_tombstone_is_not_resurrected_by_a_late_fetch_of_an_old_version(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """After a delete, a late fetch of the last or an older version is stale; only a newer
    version (Graph restored the event) brings it back."""
    store, events = make_store(mongo_db)
    cipher = await store.accounts.create("acc-1")
    change = await events.upsert_version("acc-1", version(T2, "ck2"), cipher=cipher)
    assert change is not None
    deleted = await events.mark_deleted("acc-1", change.event_key)
    assert deleted is not None
    assert deleted.change == "deleted"
    assert await events.mark_deleted("acc-1", change.event_key) is None
    tomb = await events.collection.find_one({"_id": change.event_key})
    assert tomb is not None
    assert tomb["deleted"] is True
    assert "doc_ct" not in tomb
    assert tomb["expires_at"]
    assert await events.upsert_version("acc-1", version(T2, "ck2"), cipher=cipher) is None
    assert await events.upsert_version("acc-1", version(T1, "ck1"), cipher=cipher) is None
    assert await events.upsert_version("acc-1", version(T3, "ck3"), cipher=cipher) is not None


async def test_the_outbox_mark_is_cleared_only_for_its_own_change(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """Clearing an older announcement leaves a newer change's mark in place."""
    store, events = make_store(mongo_db)
    cipher = await store.accounts.create("acc-1")
    old = await events.upsert_version("acc-1", version(T1, "ck1"), cipher=cipher)
    new = await events.upsert_version("acc-1", version(T2, "ck2"), cipher=cipher)
    assert old is not None
    assert new is not None
    await events.clear_announcement(old)
    assert [c.seq for c in await events.pending_announcements("acc-1")] == [new.seq]
    await events.clear_announcement(new)
    assert await events.pending_announcements("acc-1") == []


async def test_token_cache_compare_and_swap_has_one_winner(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """Two processes saving over the same version: exactly one succeeds (unique insert)."""

    store, _ = make_store(mongo_db)
    await store.ensure_indexes()
    await store.accounts.create("acc-1")
    assert await store.token_caches.save("acc-1", "cache-1", 0)
    results = await asyncio.gather(
        *(store.token_caches.save("acc-1", f"cache-2-{i}", 1) for i in range(6))
    )
    assert results.count(True) == 1
    text, version_ = await store.token_caches.load("acc-1") or ("", 0)
    assert version_ == 2
    assert text.startswith("cache-2-")

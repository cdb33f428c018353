"""Leases and the token-cache head of the store, on the real MongoDB-wire database.

The subscription manager's leases are taken insert-first and given back by ``_id`` (the
only filter FerretDB looks up without reading the collection); these tests hold the
guarantees that shortcut must keep: one holder at a time, a lease is never given back by
someone who does not hold it, an expired lease can be taken over. The token-cache head is
a hint: a stale or missing head must never hide the newest cache.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from handlers.timeutil import utcnow
from processor.repositories.leases import LEASE_RELEASE_MARGIN
from tests.integration.support import make_store

pytestmark = pytest.mark.integration


async def test_one_of_many_concurrent_takers_gets_a_free_lease(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    store, _ = make_store(mongo_db)
    results = await asyncio.gather(
        *(store.leases.try_take("l", f"owner-{i}", ttl_s=30) for i in range(8))
    )
    assert results.count(True) == 1
    holder = f"owner-{results.index(True)}"
    doc = await store.db["leases"].find_one({"_id": "l"})
    assert doc is not None
    assert doc["owner"] == holder


async def test_the_holder_extends_its_lease_and_others_are_refused(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    store, _ = make_store(mongo_db)
    assert await store.leases.try_take("l", "a", ttl_s=30)
    first = (await store.db["leases"].find_one({"_id": "l"}) or {})["expires_at"]
    assert not await store.leases.try_take("l", "b", ttl_s=30)
    assert await store.leases.try_take("l", "a", ttl_s=60)
    extended = (await store.db["leases"].find_one({"_id": "l"}) or {})["expires_at"]
    assert extended > first


async def test_an_expired_lease_is_taken_over(mongo_db: AsyncDatabase[dict[str, Any]]) -> None:
    store, _ = make_store(mongo_db)
    await store.db["leases"].insert_one(
        {"_id": "l", "owner": "gone", "expires_at": utcnow() - timedelta(seconds=1)}
    )
    results = await asyncio.gather(
        *(store.leases.try_take("l", f"o-{i}", ttl_s=30) for i in range(4))
    )
    assert results.count(True) == 1
    doc = await store.db["leases"].find_one({"_id": "l"})
    assert doc is not None
    assert doc["owner"] == f"o-{results.index(True)}"


async def test_release_gives_back_only_ones_own_lease(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    store, _ = make_store(mongo_db)
    assert await store.leases.try_take("l", "a", ttl_s=60)
    await store.leases.release("l", "b")
    assert (await store.db["leases"].find_one({"_id": "l"}) or {}).get("owner") == "a"
    await store.leases.release("l", "a")
    assert await store.db["leases"].find_one({"_id": "l"}) is None
    assert await store.leases.try_take("l", "b", ttl_s=60)
    await store.leases.release("l", "a")  # a no longer holds it: b's lease stays
    assert (await store.db["leases"].find_one({"_id": "l"}) or {}).get("owner") == "b"


async def test_a_lease_near_its_end_is_left_to_expire_then_taken_over(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """Within LEASE_RELEASE_MARGIN of its end a lease is neither given back nor extended
    (a takeover may be about to remove it): it expires, and then anyone can take it."""
    ttl_s = 2.0
    assert timedelta(seconds=ttl_s) < LEASE_RELEASE_MARGIN
    store, _ = make_store(mongo_db)
    assert await store.leases.try_take("l", "a", ttl_s=ttl_s)
    await store.leases.release("l", "a")
    assert (await store.db["leases"].find_one({"_id": "l"}) or {}).get("owner") == "a"
    assert not await store.leases.try_take("l", "a", ttl_s=ttl_s)  # no extension this near the end
    assert not await store.leases.try_take("l", "b", ttl_s=ttl_s)
    await asyncio.sleep(ttl_s + 0.2)
    assert await store.leases.try_take("l", "b", ttl_s=60)
    assert (await store.db["leases"].find_one({"_id": "l"}) or {}).get("owner") == "b"


async def test_the_sweeper_never_removes_a_lease_taken_over_meanwhile(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """Sweeper and takers race for expired leases: each ends with at most one holder, the
    one whose try_lease said yes, and a lease nobody took is swept."""
    store, _ = make_store(mongo_db)
    past = utcnow() - timedelta(seconds=5)
    names = [f"l-{i}" for i in range(12)]
    await store.db["leases"].insert_many(
        [{"_id": n, "owner": "gone", "expires_at": past} for n in names]
    )

    async def take(name: str, owner: str) -> tuple[str, str, bool]:
        return name, owner, await store.leases.try_take(name, owner, ttl_s=60)

    takers = [take(n, f"o-{j}") for n in names[:8] for j in range(3)]
    results, _counts = await asyncio.gather(asyncio.gather(*takers), store.leases.sweep_expired())
    for name in names[:8]:
        winners = [owner for n, owner, ok in results if n == name and ok]
        assert len(winners) <= 1, (name, winners)
        doc = await store.db["leases"].find_one({"_id": name})
        holder = None if doc is None or doc["owner"] == "gone" else doc["owner"]
        assert holder == (winners[0] if winners else None), (name, winners, doc)
    await store.leases.sweep_expired()
    for name in names[8:]:
        assert await store.db["leases"].find_one({"_id": name}) is None


async def test_a_lagging_token_cache_head_still_finds_the_newest_cache(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    """The head may lag behind a concurrent save (updates are not atomic): the versions
    after it are looked up too."""
    store, _ = make_store(mongo_db)
    await store.ensure_indexes()
    await store.accounts.create("acc-1")
    for version, text in enumerate(["c1", "c2", "c3"]):
        assert await store.token_caches.save("acc-1", text, version)
    assert await store.token_caches.load("acc-1") == ("c3", 3)
    await store.db["token_cache_heads"].update_one({"_id": "acc-1"}, {"$set": {"version": 2}})
    assert await store.token_caches.load("acc-1") == ("c3", 3)


@pytest.mark.parametrize("head", ["missing", "gone"])
async def test_without_a_usable_head_the_newest_cache_is_found_by_account(
    mongo_db: AsyncDatabase[dict[str, Any]], head: str
) -> None:
    """A cache saved before heads existed (no head), or a head naming a version already
    pruned, falls back to the query by account."""
    store, _ = make_store(mongo_db)
    await store.ensure_indexes()
    await store.accounts.create("acc-1")
    for version, text in enumerate(["c1", "c2", "c3", "c4"]):
        assert await store.token_caches.save("acc-1", text, version)
    if head == "missing":
        await store.db["token_cache_heads"].delete_one({"_id": "acc-1"})
    else:  # version 1 was pruned when version 3 was saved
        await store.db["token_cache_heads"].update_one({"_id": "acc-1"}, {"$set": {"version": 1}})
    assert await store.token_caches.load("acc-1") == ("c4", 4)


async def test_deleting_the_token_cache_removes_its_head(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    store, _ = make_store(mongo_db)
    await store.ensure_indexes()
    await store.accounts.create("acc-1")
    assert await store.token_caches.save("acc-1", "c1", 0)
    await store.token_caches.delete("acc-1")
    assert await store.token_caches.load("acc-1") is None
    assert await store.db["token_cache_heads"].find_one({"_id": "acc-1"}) is None

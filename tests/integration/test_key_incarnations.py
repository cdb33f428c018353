"""An account erased in one process and connected again at once: the other processes'
cached data keys are the destroyed one, and nothing they hold may write or read under it."""

from __future__ import annotations

import os

from pymongo.asynchronous.database import AsyncDatabase

from crypto import CipherCache, Hasher, KeyRing, generate_master_key_spec, parse_master_keys
from processor.repositories.base import ACCOUNT_DATA_COLLECTIONS
from processor.repositories.renewals import RENEWAL_STATE_COLLECTION
from processor.repositories.sync_state import SYNC_STATE
from processor.store import Store
from tests.integration.support import USER_ID, seed_account

ACCOUNT = "acc-twice"


def two_processes(db: AsyncDatabase[dict[str, object]]) -> tuple[Store, Store]:
    """Two stores on one database with the same keys, each with its own key cache."""
    keyring = KeyRing(parse_master_keys(generate_master_key_spec("t1")))
    hasher = Hasher(os.urandom(32))
    return Store(db=db, keyring=keyring, hasher=hasher), Store(
        db=db, keyring=keyring, hasher=hasher
    )


async def erase(store: Store, account_id: str) -> None:
    """What erasure does to the documents and the key (subscriptions/erasure.py)."""
    await store.keys.destroy(account_id)
    await store.accounts.delete_other_documents(account_id)
    await store.accounts.delete(account_id)
    store.keys.forget(account_id)


async def test_a_key_cached_before_the_erasure_is_replaced_wherever_it_is_used(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Process b cached the first connection's key; after a erased the account and it was
    connected again, b reads the identity, the token cache and the subscription under the
    new key, and the cipher it hands to handlers (checked against the account) is a's."""
    a, b = two_processes(mongo_db)
    await seed_account(a, ACCOUNT)
    assert (await b.identity(ACCOUNT)).user_id == USER_ID
    old = await b.keys.cipher_for(ACCOUNT)

    await erase(a, ACCOUNT)
    subscription_hash = await seed_account(a, ACCOUNT)
    assert await a.token_caches.save(ACCOUNT, '{"cache": "new"}', 0)
    new = await a.keys.cipher_for(ACCOUNT)
    assert await b.keys.cipher_for(ACCOUNT) is old  # unchecked, the cache still has it

    record = await b.subscriptions.find_subscription(subscription_hash)
    assert record is not None
    assert record.key_check is not None
    from_record = await b.keys.cipher_for(ACCOUNT, check=record.key_check)
    assert from_record is not old
    blob = from_record.encrypt(b"written by b", b"aad")
    assert new.decrypt(blob, b"aad") == b"written by b"

    b.keys._ciphers.put(ACCOUNT, old)  # the stale cache again, for each reader
    assert (await b.identity(ACCOUNT)).user_id == USER_ID

    b.keys._ciphers.put(ACCOUNT, old)
    loaded = await b.token_caches.load(ACCOUNT)
    assert loaded is not None
    assert loaded[0] == '{"cache": "new"}'

    b.keys._ciphers.put(ACCOUNT, old)
    checked = await b.cipher_for(ACCOUNT, await b.account(ACCOUNT))
    assert new.decrypt(checked.encrypt(b"x", b"aad"), b"aad") == b"x"


async def test_a_pass_holding_the_erased_key_is_fenced_after_the_account_is_back(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """The fence a pass checks before each write stops a pass that holds the erased
    connection's key even though the account is connected again; the new key passes."""
    a, _ = two_processes(mongo_db)
    await seed_account(a, ACCOUNT)
    old = await a.keys.cipher_for(ACCOUNT)
    assert not await a.fenced(ACCOUNT, old)

    await erase(a, ACCOUNT)
    assert await a.fenced(ACCOUNT, old)
    await seed_account(a, ACCOUNT)
    new = await a.keys.cipher_for(ACCOUNT)
    assert await a.fenced(ACCOUNT, old)
    assert not await a.fenced(ACCOUNT, new)
    assert not await a.fenced(ACCOUNT)


async def test_connecting_an_account_without_a_key_removes_what_an_erased_connection_left(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Documents of an account that has no data key (a late writer's, after erasure) are
    removed when it is created again, leases and sign-in flows are not; documents written
    while a key exists are never touched by a repeated create."""
    a, _ = two_processes(mongo_db)
    for name in ACCOUNT_DATA_COLLECTIONS:
        await mongo_db[name].insert_one({"_id": f"{name}-late", "account_id": ACCOUNT})
    await mongo_db[SYNC_STATE].insert_one({"_id": ACCOUNT})
    await mongo_db["leases"].insert_one({"_id": f"connect:{ACCOUNT}", "owner": "flow"})
    await mongo_db["connect_flows"].insert_one({"_id": "flow-1", "account_id": ACCOUNT})

    await a.accounts.create(ACCOUNT)
    for name in ACCOUNT_DATA_COLLECTIONS:
        assert await mongo_db[name].count_documents({"account_id": ACCOUNT}) == 0, name
    assert await mongo_db[SYNC_STATE].find_one({"_id": ACCOUNT}) is None
    assert await mongo_db["leases"].find_one({"_id": f"connect:{ACCOUNT}"}) is not None
    assert await mongo_db["connect_flows"].count_documents({"account_id": ACCOUNT}) == 1

    await mongo_db["parked"].insert_one({"_id": "parked-now", "account_id": ACCOUNT})
    await a.accounts.create(ACCOUNT)
    assert await mongo_db["parked"].count_documents({"account_id": ACCOUNT}) == 1


def test_the_collections_swept_on_create_are_the_ones_the_repositories_write() -> None:
    assert SYNC_STATE in ACCOUNT_DATA_COLLECTIONS
    assert RENEWAL_STATE_COLLECTION in ACCOUNT_DATA_COLLECTIONS


async def test_a_process_learns_the_key_was_replaced_after_its_cache_entry_expired(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Process b's cache entry expired before the account was erased and connected again,
    so it reads the new key without a stale one to fail; it still tells its listeners (its
    token provider drops the access token of the erased connection). A key rotation or a
    repeated read of the same key tells nobody."""
    keyring = KeyRing(parse_master_keys(generate_master_key_spec("t1")))
    hasher = Hasher(os.urandom(32))
    clock = [0.0]
    a = Store(db=mongo_db, keyring=keyring, hasher=hasher)
    b = Store(
        db=mongo_db,
        keyring=keyring,
        hasher=hasher,
        cipher_cache=CipherCache(ttl_s=300.0, clock=lambda: clock[0]),
    )
    replaced: list[str] = []
    b.keys.on_key_replaced(replaced.append)
    await seed_account(a, ACCOUNT)
    await b.keys.cipher_for(ACCOUNT)
    clock[0] += 301.0
    await b.keys.cipher_for(ACCOUNT)
    await a.keys.rotate()
    clock[0] += 301.0
    await b.keys.cipher_for(ACCOUNT)
    assert replaced == []

    await erase(a, ACCOUNT)
    await seed_account(a, ACCOUNT)
    clock[0] += 301.0
    await b.keys.cipher_for(ACCOUNT)
    assert replaced == [ACCOUNT]

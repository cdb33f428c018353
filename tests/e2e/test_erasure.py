"""Erasure (``DELETE /api/v1/accounts/{id}``): nothing of the account remains or reads back."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from bson import Binary

from contract.storage import aad
from crypto import CipherCache, DataCipher, DecryptionError, KeyRing, WrappedKey
from handlers.errors import AccountUnavailable
from processor.store import Store
from subscriptions.connect import CONNECT_FLOWS
from tests.e2e.harness import (
    Stack,
    api,
    browse,
    browser_connect,
    eventually,
    mint_link,
    running_stack,
)

pytestmark = pytest.mark.e2e

GONE = "acc-erase-7f3a"
HASH = re.compile(r"[A-Za-z0-9_-]{43}")
KEPT = "acc-keep-51b2"


def _event(n: int) -> dict[str, Any]:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=n + 1)
    return {
        "subject": f"Private {n}",
        "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        "end": {
            "dateTime": (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": "UTC",
        },
    }


async def _connect_with_events(stack: Stack, account_id: str, user_id: str, count: int) -> set[str]:
    run = await browser_connect(stack, account_id, user_id=user_id)
    assert run.query()["status"] == "connected"
    created = await stack.control.bulk_create_events(
        user_id, events=[_event(n) for n in range(count)], immutable=True
    )
    keys = {stack.rt.events.event_key(account_id, gid) for gid in created["ids"]}

    async def stored() -> bool:
        return keys <= await stack.rt.events.live_keys(account_id)

    await eventually(stored)
    return keys


async def _everything(stack: Stack) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for name in await stack.rt.db.list_collection_names():
        docs += [(name, doc) async for doc in stack.rt.db[name].find({})]
    return docs


def _binaries(value: Any) -> list[bytes]:
    if isinstance(value, bytes | Binary):
        return [bytes(value)]
    if isinstance(value, dict):
        return [b for item in value.values() for b in _binaries(item)]
    if isinstance(value, list):
        return [b for item in value for b in _binaries(item)]
    return []


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value, *(s for item in value.values() for s in _strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


async def test_erasure_leaves_nothing_readable_and_is_harmless_to_repeat(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """After DELETE no document mentions the account, its ids, hashes or ciphertexts; saved
    ciphertext no longer decrypts; the Graph subscription is gone; 1Relation hears
    "disconnected" once; a second DELETE is harmless; another account is untouched."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        users = await stack.control.users()
        gone_user = users[0]["id"]
        kept_user = (await stack.control.create_user("Kept User", "kept@example.com"))["id"]
        gone_keys = await _connect_with_events(stack, GONE, gone_user, 4)
        kept_keys = await _connect_with_events(stack, KEPT, kept_user, 2)
        # A sign-in left half-way: its flow state belongs to the account too.
        started = await browse(stack, f"/connect?token={quote(mint_link(stack, GONE))}", max_hops=1)
        assert started.status == 302
        assert await stack.rt.db[CONNECT_FLOWS].count_documents({"account_id": GONE}) == 1

        # What an attacker with a copy of the database would hold afterwards.
        before = [(n, d) for n, d in await _everything(stack) if GONE in json.dumps(d, default=str)]
        secrets: set[bytes] = {b for _, doc in before for b in _binaries(doc)}
        names: set[str] = {
            s
            for _, doc in before
            for s in _strings(doc)
            if HASH.fullmatch(s)  # keyed hashes: event keys, user, subscription …
        } | gone_keys
        # The organisation is not the account's: the other user of the tenant shares its hash.
        names.discard(stack.rt.hasher.hash_id("tenant", stack.sim.tenant_id))
        event_doc = await stack.rt.events.collection.find_one({"_id": next(iter(gone_keys))})
        saved_ct, saved_aad = (
            bytes(event_doc["doc_ct"]),
            aad("events", GONE, event_doc["_id"], "doc"),
        )
        wrapped = await stack.rt.store.db["data_keys"].find_one({"_id": GONE})
        assert wrapped is not None
        assert len(secrets) > 8
        await stack.announcements()  # drop what connecting announced

        status, _, _ = await api(stack, "DELETE", f"/api/v1/accounts/{GONE}")
        assert status == 204

        after = await _everything(stack)
        for name, doc in after:
            text = json.dumps(doc, default=str)
            assert GONE not in text, (name, doc["_id"])
            assert not names & set(_strings(doc)), (name, doc["_id"])
            assert not secrets & set(_binaries(doc)), (name, doc["_id"])
        assert await stack.rt.store.db["data_keys"].find_one({"_id": GONE}) is None

        # The ciphertext saved before cannot be read: not by a fresh process, not by this
        # one, and not with any data key that is left.
        fresh = Store(
            db=stack.rt.db,
            keyring=KeyRing(stack.settings.master_keys),
            hasher=stack.rt.hasher,
            cipher_cache=CipherCache(),
        )
        with pytest.raises(AccountUnavailable):
            await fresh.keys.cipher_for(GONE)
        with pytest.raises(AccountUnavailable):
            await stack.rt.store.keys.cipher_for(GONE)
        keyring = KeyRing(stack.settings.master_keys)
        async for key_doc in stack.rt.store.db["data_keys"].find({}):
            cipher: DataCipher = keyring.unwrap(str(key_doc["_id"]), WrappedKey.from_doc(key_doc))
            with pytest.raises(DecryptionError):
                cipher.decrypt(saved_ct, saved_aad)

        subscriptions = {s["userId"]: s for s in await stack.control.subscriptions()}
        assert subscriptions[gone_user]["state"] == "deleted"
        assert subscriptions[kept_user]["state"] == "active"

        statuses = [a for a in await stack.announcements() if a["routing_key"] == "account.status"]
        assert [(a["account_id"], a["status"], a["event_count"]) for a in statuses] == [
            (GONE, "disconnected", 0)
        ]

        status, _, _ = await api(stack, "DELETE", f"/api/v1/accounts/{GONE}")
        assert status == 204
        assert await stack.announcements() == []
        status, body, _ = await api(stack, "GET", f"/api/v1/accounts/{GONE}")
        assert status == 404
        assert body["error"]["code"] == "account_not_found"

        # The other account is untouched and still syncs.
        assert kept_keys <= await stack.rt.events.live_keys(KEPT)
        status, body, _ = await api(stack, "GET", f"/api/v1/accounts/{KEPT}")
        assert status == 200
        assert body["event_count"] == 2
        # A notification for the erased mailbox is dropped, not stored.
        await stack.control.create_event(gone_user, _event(9), immutable=True)
        late = await stack.control.create_event(kept_user, _event(9), immutable=True)
        await eventually(
            lambda: stack.rt.events.collection.find_one(
                {"_id": stack.rt.events.event_key(KEPT, late["id"])}
            )
        )
        assert await stack.rt.events.collection.count_documents({"account_id": GONE}) == 0


async def test_erasure_finishes_after_a_crash_midway(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """An erasure that stopped after destroying the key (the crash case) is finished by the
    next DELETE: the rest of the documents go and "disconnected" is published."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await _connect_with_events(stack, GONE, user_id, 2)
        await stack.rt.store.keys.destroy(GONE)  # where the crash left it
        await stack.announcements()

        status, _, _ = await api(stack, "DELETE", f"/api/v1/accounts/{GONE}")
        assert status == 204
        for name, doc in await _everything(stack):
            assert GONE not in json.dumps(doc, default=str), name
        statuses = [a for a in await stack.announcements() if a["routing_key"] == "account.status"]
        assert [(a["account_id"], a["status"]) for a in statuses] == [(GONE, "disconnected")]

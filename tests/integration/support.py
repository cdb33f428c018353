"""Building real collaborators (store, keys, records) for integration tests."""

from __future__ import annotations

import base64
import os
from datetime import timedelta

from pymongo.asynchronous.database import AsyncDatabase

from crypto import Hasher, KeyRing, generate_master_key_spec, parse_master_keys
from handlers.timeutil import utcnow
from processor.event_store import EventStore
from processor.store import Store

USER_ID = "6d2b7e10-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
TENANT_ID = "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"
SUBSCRIPTION_ID = "3f1c9a52-7d0e-4b8a-9c11-5e2f6a7b8c90"
CLIENT_STATE = "sub-secret-7f3e91-long-enough"


def make_store(db: AsyncDatabase[dict[str, object]]) -> tuple[Store, EventStore]:
    """A Store and EventStore with fresh keys on ``db``."""
    keyring = KeyRing(parse_master_keys(generate_master_key_spec("t1")))
    hasher = Hasher(os.urandom(32))
    store = Store(db=db, keyring=keyring, hasher=hasher)
    return store, EventStore(db=db, hasher=hasher, tombstone_ttl_s=3600)


async def seed_account(store: Store, account_id: str = "acc-1") -> str:
    """An account bound to USER_ID/TENANT_ID with one subscription; returns its hash."""
    await store.accounts.create(account_id)
    await store.accounts.bind_identity(account_id, user_id=USER_ID, tenant_id=TENANT_ID)
    return await store.subscriptions.save(
        account_id,
        subscription_id=SUBSCRIPTION_ID,
        client_state=CLIENT_STATE,
        user_id=USER_ID,
        tenant_id=TENANT_ID,
        expires_at=utcnow() + timedelta(days=2),
    )


def notification(event_id: str, change_type: str = "updated") -> dict[str, object]:
    """One change notification as Graph sends it for the seeded subscription."""
    resource = f"Users/{USER_ID}/Events/{event_id}"
    return {
        "subscriptionId": SUBSCRIPTION_ID,
        "subscriptionExpirationDateTime": "2031-05-14T09:30:00.0000000+00:00",
        "changeType": change_type,
        "resource": resource,
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Event",
            "@odata.id": resource,
            "@odata.etag": 'W/"DwAAABYAAAB"',
            "id": event_id,
        },
        "clientState": CLIENT_STATE,
        "tenantId": TENANT_ID,
    }


def b64key() -> str:
    return base64.b64encode(os.urandom(32)).decode()

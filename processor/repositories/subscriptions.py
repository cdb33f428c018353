"""Our records of the Graph subscriptions we created, and of their granted expiries."""

from __future__ import annotations

import time
from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase

from contract.storage import SCHEMA_VERSION, aad
from crypto import Hasher, KeyCheck
from handlers.ports import SubscriptionRecord
from handlers.timeutil import utcnow
from processor.repositories.base import Document
from processor.repositories.keys import KeyRepository

#: What deciding a renewal needs of a record.
_RENEWAL_FIELDS = {"account_id": 1, "expires_at": 1, "granted_at": 1}


class SubscriptionRepository:
    """The ``subscriptions`` collection, keyed by the keyed hash of Graph's id.

    FerretDB pushes only a filter that is exactly ``{_id: x}`` down to SQL; any other
    filter decodes every record, so lookups go by ``_id`` and reads of many records are
    made once per batch.
    """

    def __init__(
        self,
        *,
        db: AsyncDatabase[Document],
        keys: KeyRepository,
        hasher: Hasher,
        cache_ttl_s: float = 2.0,
    ) -> None:
        self._keys = keys
        self.hasher = hasher
        self.collection = db["subscriptions"]
        self._cache: dict[str, tuple[float, SubscriptionRecord | None]] = {}
        self._cache_ttl_s = cache_ttl_s

    def hash_graph_id(self, subscription_id: str) -> str:
        """The keyed hash a record of Graph's subscription ``subscription_id`` is stored under."""
        return self.hasher.hash_id("subscription", subscription_id)

    async def save(
        self,
        account_id: str,
        *,
        subscription_id: str,
        client_state: str,
        user_id: str,
        tenant_id: str,
        expires_at: datetime,
        granted_at: datetime | None = None,
    ) -> str:
        """Record a subscription we created; returns its keyed hash.

        ``granted_at``: when the expiry was asked for (see :meth:`set_expiry`), recorded in
        the same write.
        """
        cipher = await self._keys.cipher_for(account_id)
        sub_hash = self.hash_graph_id(subscription_id)
        now = utcnow()
        granted = {} if granted_at is None else {"granted_at": granted_at}
        await self.collection.replace_one(
            {"_id": sub_hash},
            {
                "_id": sub_hash,
                "schema": SCHEMA_VERSION,
                "account_id": account_id,
                "subscription_ct": cipher.encrypt_str(
                    subscription_id, aad("subscriptions", account_id, sub_hash, "id")
                ),
                "client_state_hash": self.hasher.hash_id("client_state", client_state),
                "tenant_hash": self.hasher.hash_id("tenant", tenant_id),
                "user_hash": self.hasher.hash_id("user", user_id.lower()),
                "expires_at": expires_at,
                **granted,
                "created_at": now,
                "updated_at": now,
            },
            upsert=True,
        )
        self._cache.pop(sub_hash, None)
        return sub_hash

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        """Our record of a subscription (briefly cached: the receiver asks on every item)."""
        now = time.monotonic()
        hit = self._cache.get(subscription_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        doc = await self.collection.find_one({"_id": subscription_hash})
        record = None
        if doc is not None:
            record = SubscriptionRecord(
                subscription_hash=subscription_hash,
                account_id=doc["account_id"],
                client_state_hash=doc["client_state_hash"],
                tenant_hash=doc["tenant_hash"],
                user_hash=doc["user_hash"],
                expires_at=doc["expires_at"],
                key_check=KeyCheck(
                    bytes(doc["subscription_ct"]),
                    aad("subscriptions", doc["account_id"], subscription_hash, "id"),
                ),
            )
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[subscription_hash] = (now + self._cache_ttl_s, record)
        return record

    async def get_for_account(self, account_id: str, subscription_hash: str) -> Document | None:
        """The account's subscription record; None if there is none or it is another's."""
        # By ``_id`` alone, the account compared here (see the class docstring).
        doc = await self.collection.find_one({"_id": subscription_hash})
        return doc if doc is not None and doc.get("account_id") == account_id else None

    async def exists(self, subscription_hash: str) -> bool:
        """Whether a record of the subscription exists (whoever's it is)."""
        return await self.collection.find_one({"_id": subscription_hash}, {"_id": 1}) is not None

    async def recorded_among(self, subscription_hashes: list[str]) -> set[str]:
        """Those of ``subscription_hashes`` that have a record (one query)."""
        cursor = self.collection.find({"_id": {"$in": subscription_hashes}}, {"_id": 1})
        return {str(doc["_id"]) async for doc in cursor}

    async def fetch_graph_id(self, account_id: str, subscription_hash: str) -> str | None:
        """Graph's id of one of the account's subscriptions, read and decrypted."""
        doc = await self.get_for_account(account_id, subscription_hash)
        return None if doc is None else await self.decrypt_graph_id(account_id, doc)

    async def decrypt_graph_id(self, account_id: str, doc: Document) -> str | None:
        """Graph's id from a record already read (with ``subscription_ct``); None when the
        record is not the account's."""
        if doc.get("account_id") != account_id:
            return None
        check = KeyCheck(
            bytes(doc["subscription_ct"]), aad("subscriptions", account_id, str(doc["_id"]), "id")
        )
        cipher = await self._keys.cipher_for(account_id, check=check)
        return cipher.decrypt_str(check.blob, check.aad)

    async def for_account(self, account_id: str) -> list[Document]:
        """Every record of the account."""
        return [doc async for doc in self.collection.find({"account_id": account_id})]

    async def hashes_for_account(self, account_id: str) -> list[str]:
        """The keyed hashes of the account's records."""
        cursor = self.collection.find({"account_id": account_id}, {"_id": 1})
        return [str(doc["_id"]) async for doc in cursor]

    async def expiries(self, account_id: str) -> list[datetime]:
        """When each of the account's subscriptions expires."""
        cursor = self.collection.find({"account_id": account_id}, {"expires_at": 1})
        return [doc["expires_at"] async for doc in cursor]

    async def has_live(self, account_id: str, now: datetime) -> bool:
        """Whether the account has a record that expires after ``now``."""
        live = await self.collection.find_one(
            {"account_id": account_id, "expires_at": {"$gt": now}}, {"_id": 1}
        )
        return live is not None

    async def renewal_view(self, account_ids: list[str] | None = None) -> dict[str, list[Document]]:
        """Per account, its records' expiries (and the encrypted id when ``account_ids`` are
        named): one query for every account, or one ``$in`` query for the named ones."""
        if account_ids is None:
            cursor = self.collection.find({}, _RENEWAL_FIELDS)
        else:
            cursor = self.collection.find(
                {"account_id": {"$in": account_ids}}, {**_RENEWAL_FIELDS, "subscription_ct": 1}
            )
        records: dict[str, list[Document]] = {}
        async for doc in cursor:
            records.setdefault(str(doc["account_id"]), []).append(doc)
        return records

    async def set_expiry(
        self, subscription_hash: str, *, expires_at: datetime, granted_at: datetime
    ) -> None:
        """Record a granted expiry and when it was granted (the lifetime renewals go by).

        Written only by the subscription manager holding the account's lease.
        """
        await self.collection.update_one(
            {"_id": subscription_hash},
            {"$set": {"expires_at": expires_at, "granted_at": granted_at, "updated_at": utcnow()}},
        )
        self._cache.pop(subscription_hash, None)

    async def delete(self, subscription_hash: str) -> None:
        """Forget a subscription record."""
        await self.collection.delete_one({"_id": subscription_hash})
        self._cache.pop(subscription_hash, None)

"""MSAL token caches: versioned, encrypted, replaced by compare-and-swap."""

from __future__ import annotations

import contextlib

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contract.storage import aad
from crypto import KeyCheck
from handlers.timeutil import utcnow
from processor.repositories.base import Document
from processor.repositories.keys import KeyRepository


def _token_cache_id(account_id: str, version: int) -> str:
    return f"{account_id}:{version}"


class TokenCacheRepository:
    """``token_caches`` (one document per version) and ``token_cache_heads`` (per account,
    the version of its newest cache: a hint, see :meth:`_newest`)."""

    def __init__(self, *, db: AsyncDatabase[Document], keys: KeyRepository) -> None:
        self._keys = keys
        self.collection = db["token_caches"]
        self.heads = db["token_cache_heads"]

    async def ensure_indexes(self) -> None:
        """The unique (account, version) index the compare-and-swap relies on."""
        await self.collection.create_index(
            [("account_id", ASCENDING), ("version", ASCENDING)], unique=True
        )

    async def load(self, account_id: str) -> tuple[str, int] | None:
        """The newest serialized MSAL cache and its version, decrypted."""
        doc = await self._newest(account_id)
        if doc is None:
            return None
        version = int(doc["version"])
        check = KeyCheck(
            bytes(doc["cache_ct"]), aad("token_caches", account_id, str(version), "cache")
        )
        cipher = await self._keys.cipher_for(account_id, check=check)
        return cipher.decrypt_str(check.blob, check.aad), version

    async def _newest(self, account_id: str) -> Document | None:
        """The newest cache document, found by ``_id`` where possible.

        FerretDB pushes only ``_id`` equality down to SQL: a query on ``account_id``
        decodes every account's caches (several kB each), which would make the first token
        of each of n accounts cost O(n). The head names the newest version; it may lag
        behind a concurrent save (updates are not atomic), so the versions after it are
        looked up too (a save always adds the version after one that exists). Without a
        head, or with one whose version is gone, the query on ``account_id`` decides.
        """
        head = await self.heads.find_one({"_id": account_id})
        if head is not None and isinstance(head.get("version"), int):
            version = int(head["version"])
            doc = await self.collection.find_one({"_id": _token_cache_id(account_id, version)})
            while doc is not None:
                newer = await self.collection.find_one(
                    {"_id": _token_cache_id(account_id, version + 1)}
                )
                if newer is None:
                    return doc
                doc, version = newer, version + 1
        return await self.collection.find_one(
            {"account_id": account_id}, sort=[("version", DESCENDING)]
        )

    async def save(self, account_id: str, serialized: str, expected_version: int) -> bool:
        """Compare-and-swap: store version ``expected_version + 1`` unless someone did first.

        Built on a unique (account_id, version) insert, which is atomic on FerretDB too,
        where a conditional update is not.
        """
        cipher = await self._keys.cipher_for(account_id)
        version = expected_version + 1
        try:
            await self.collection.insert_one(
                {
                    "_id": _token_cache_id(account_id, version),
                    "account_id": account_id,
                    "version": version,
                    "cache_ct": cipher.encrypt_str(
                        serialized, aad("token_caches", account_id, str(version), "cache")
                    ),
                    "saved_at": utcnow(),
                }
            )
        except DuplicateKeyError:
            return False
        with contextlib.suppress(DuplicateKeyError):  # a concurrent first save made the head
            await self.heads.update_one(
                {"_id": account_id},
                {"$set": {"version": version, "updated_at": utcnow()}},
                upsert=True,
            )
        # Older versions hold superseded refresh tokens: keep one back for readers mid-swap.
        await self.collection.delete_many(
            {"account_id": account_id, "version": {"$lt": version - 1}}
        )
        return True

    async def delete(self, account_id: str) -> None:
        """Remove every stored token cache of the account."""
        await self.collection.delete_many({"account_id": account_id})
        await self.heads.delete_one({"_id": account_id})

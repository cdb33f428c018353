"""Accounts: status, the Microsoft identity they are bound to, and their erasure sweep."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contract.storage import SCHEMA_VERSION, aad
from crypto import DataCipher, Hasher, KeyCheck, opens
from handlers.errors import AccountUnavailable
from handlers.records import Account
from handlers.timeutil import utcnow
from processor.repositories.base import ACCOUNT_DATA_COLLECTIONS, ERASURE_RESWEEPS, Document
from processor.repositories.keys import KeyRepository
from subscriptions.ports import AccountIdentity

#: The fields the subscription manager decides an account from.
_MANAGER_FIELDS = {"status": 1, "user_ct": 1, "tenant_ct": 1, "user_hash": 1, "tenant_hash": 1}


def identity_check(account_id: str, user_ct: bytes) -> KeyCheck:
    """The account's sealed user id as proof of its current data key (see
    :meth:`KeyRepository.cipher_for`): it is written under the key of the connection."""
    return KeyCheck(bytes(user_ct), aad("accounts", account_id, "user"))


def _account(doc: Document) -> Account:
    sealed = (doc["user_ct"], doc["tenant_ct"]) if "user_ct" in doc else None
    return Account(
        account_id=str(doc["_id"]),
        status=str(doc.get("status", "disconnected")),
        status_reason=str(doc.get("status_reason", "")),
        user_hash=doc.get("user_hash"),
        tenant_hash=doc.get("tenant_hash"),
        sealed_identity=sealed,
    )


class AccountRepository:
    """The ``accounts`` collection, behind methods that encrypt and hash."""

    def __init__(self, *, db: AsyncDatabase[Document], keys: KeyRepository, hasher: Hasher) -> None:
        self._db = db
        self._keys = keys
        self.hasher = hasher
        self.collection = db["accounts"]

    async def create(self, account_id: str) -> DataCipher:
        """Create the account with a fresh data key, or return the existing account's cipher."""
        if not await self._keys.exists(account_id):
            # Without a data key nothing of the account can be read: documents it has now
            # are a late writer's of an erased connection (a pass that was past its last
            # fence check when the account was erased). They go before the new key does.
            await self.delete_documents(account_id, ACCOUNT_DATA_COLLECTIONS)
        cipher, _ = await self._keys.create(account_id)
        now = utcnow()
        # Reconnecting keeps the account, its data and its mapping.
        with contextlib.suppress(DuplicateKeyError):
            await self.collection.insert_one(
                {
                    "_id": account_id,
                    "schema": SCHEMA_VERSION,
                    "status": "backfilling",
                    "status_reason": "",
                    "created_at": now,
                    "updated_at": now,
                }
            )
        return cipher

    async def get(self, account_id: str) -> Account | None:
        """The account (its identity stays sealed)."""
        doc = await self.get_document(account_id)
        return None if doc is None else _account(doc)

    async def get_document(self, account_id: str) -> Document | None:
        """The raw account document (ciphertext fields stay encrypted)."""
        return await self.collection.find_one({"_id": account_id})

    async def bound_statuses(self) -> dict[str, str]:
        """The status of every account bound to a Microsoft identity."""
        cursor = self.collection.find({"user_ct": {"$exists": True}}, {"status": 1})
        return {str(doc["_id"]): str(doc.get("status", "")) async for doc in cursor}

    async def get_many(self, account_ids: list[str]) -> dict[str, Account]:
        """The accounts among ``account_ids`` (status, identity ciphertext and hashes), one query.

        The filter names the accounts (``$in``), so on MongoDB it reads through an index
        what is asked and no more. (FerretDB, the test database, evaluates such a filter by
        going through the whole collection: one query costs about what a few lookups do.)
        """
        cursor = self.collection.find({"_id": {"$in": account_ids}}, _MANAGER_FIELDS)
        return {str(doc["_id"]): _account(doc) async for doc in cursor}

    async def mailbox_bound_elsewhere(self, user_hash: str, account_id: str) -> bool:
        """Whether another account than ``account_id`` is bound to the user ``user_hash``."""
        other = await self.collection.find_one(
            {"user_hash": user_hash, "_id": {"$ne": account_id}}, {"_id": 1}
        )
        return other is not None

    async def bind_identity(self, account_id: str, *, user_id: str, tenant_id: str) -> None:
        """Record the Microsoft user and tenant the account is connected as."""
        # Called right after create(), which leaves the current key in the cache.
        cipher = await self._keys.cipher_for(account_id)
        await self.collection.update_one(
            {"_id": account_id},
            {
                "$set": {
                    "user_hash": self.hasher.hash_id("user", user_id.lower()),
                    "user_ct": cipher.encrypt_str(user_id, aad("accounts", account_id, "user")),
                    "tenant_hash": self.hasher.hash_id("tenant", tenant_id),
                    "tenant_ct": cipher.encrypt_str(
                        tenant_id, aad("accounts", account_id, "tenant")
                    ),
                    "updated_at": utcnow(),
                }
            },
        )

    async def identity(self, account_id: str) -> AccountIdentity:
        """The decrypted user and tenant ids; :class:`AccountUnavailable` if not bound."""
        account = await self.get(account_id)
        if account is None:
            raise AccountUnavailable(account_id, "not connected")
        return await self.decrypt_identity(account)

    async def decrypt_identity(self, account: Account) -> AccountIdentity:
        """The decrypted user and tenant ids of an account already read;
        :class:`AccountUnavailable` if it is not bound."""
        account_id = account.account_id
        if account.sealed_identity is None:
            raise AccountUnavailable(account_id, "not connected")
        user_ct, tenant_ct = account.sealed_identity
        cipher = await self._keys.cipher_for(account_id, check=identity_check(account_id, user_ct))
        return AccountIdentity(
            user_id=cipher.decrypt_str(user_ct, aad("accounts", account_id, "user")),
            tenant_id=cipher.decrypt_str(tenant_ct, aad("accounts", account_id, "tenant")),
        )

    async def set_status(self, account_id: str, status: str, reason: str = "") -> bool:
        """Set the account's status; returns True when it changed."""
        doc = await self.collection.find_one({"_id": account_id}, {"status": 1})
        if doc is None or (doc.get("status") == status and status == "connected"):
            return False
        changed = doc.get("status") != status
        await self.collection.update_one(
            {"_id": account_id},
            {"$set": {"status": status, "status_reason": reason, "updated_at": utcnow()}},
        )
        return changed

    async def fenced(self, account_id: str, cipher: DataCipher | None = None) -> bool:
        """Whether writes for the account must stop: it is erased or being erased, or (with
        the ``cipher`` a pass writes under) it was erased and connected again since.

        Erasure marks the account ``disconnected`` before anything else and removes the
        document last, so a pass that began earlier sees one of the two before each write.
        A connection made after the erasure has a new data key: the pass's key no longer
        opens the account's sealed user id.
        """
        account = await self.collection.find_one({"_id": account_id}, {"status": 1, "user_ct": 1})
        if account is None or account.get("status") == "disconnected":
            return True
        if cipher is None or "user_ct" not in account:
            return False
        return not opens(cipher, identity_check(account_id, account["user_ct"]))

    async def delete(self, account_id: str) -> int:
        """Remove the account document; returns how many were removed (0 or 1)."""
        return (await self.collection.delete_one({"_id": account_id})).deleted_count

    async def delete_documents(self, account_id: str, names: Iterable[str]) -> int:
        """The account's documents in the collections ``names`` (by ``account_id`` or
        ``_id``; not the account document); returns how many were removed."""
        total = 0
        for name in names:
            collection = self._db[name]
            total += (await collection.delete_many({"account_id": account_id})).deleted_count
            if name != "accounts":
                total += (await collection.delete_many({"_id": account_id})).deleted_count
        return total

    async def delete_other_documents(self, account_id: str) -> int:
        """Every document of the account except the account document itself, with its
        leases (``<purpose>:<id>``, slots, takeover claims); returns how many."""
        total = 0
        # "subscription:<id>", "connect:<id>", "resync:<id>:<slot>", and the takeover
        # claims of expired ones, "<lease>@<expiry>".
        lease_names = re.compile(f"^[^:]+:{re.escape(account_id)}([:@]|$)")
        for name in sorted(await self._db.list_collection_names()):
            if name.startswith("system.") or name == ERASURE_RESWEEPS:
                continue
            collection = self._db[name]
            total += await self.delete_documents(account_id, [name])
            if name in ("leases", "lease_takeovers"):
                total += (
                    await collection.delete_many({"_id": {"$regex": lease_names.pattern}})
                ).deleted_count
        return total

"""Data keys: one per account (envelope encryption under the master keys) and per service use."""

from __future__ import annotations

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from crypto import CipherCache, DataCipher, DecryptionError, KeyRing, WrappedKey
from processor.errors import AccountUnavailable
from processor.repositories.base import SCHEMA_VERSION, Document
from processor.timeutil import utcnow


class KeyRepository:
    """The ``data_keys`` collection and the process's cache of unwrapped keys.

    Data keys live apart from the account document: only creation, rotation and erasure
    write them, so a rotation never races a status update (FerretDB's updates are not
    atomic against concurrent writers).
    """

    def __init__(
        self,
        *,
        db: AsyncDatabase[Document],
        keyring: KeyRing,
        cipher_cache: CipherCache | None = None,
    ) -> None:
        self.keyring = keyring
        self._ciphers = cipher_cache or CipherCache()
        self.collection = db["data_keys"]

    async def create(self, account_id: str) -> tuple[DataCipher, bool]:
        """A fresh data key for the account, or the existing one's cipher; True when created."""
        wrapped, cipher = self.keyring.new_data_key(account_id)
        try:
            await self.collection.insert_one(
                {
                    "_id": account_id,
                    "schema": SCHEMA_VERSION,
                    **wrapped.to_doc(),
                    "created_at": utcnow(),
                }
            )
        except DuplicateKeyError:
            return await self.cipher_for(account_id), False
        self._ciphers.put(account_id, cipher)
        return cipher, True

    async def cipher_for(self, account_id: str) -> DataCipher:
        """The account's data cipher; :class:`AccountUnavailable` once it is erased."""
        cached = self._ciphers.get(account_id)
        if cached is not None:
            return cached
        doc = await self.collection.find_one({"_id": account_id})
        if doc is None:
            raise AccountUnavailable(account_id, "erased")
        try:
            cipher = self.keyring.unwrap(account_id, WrappedKey.from_doc(doc))
        except DecryptionError as exc:
            raise AccountUnavailable(account_id, "key unreadable") from exc
        self._ciphers.put(account_id, cipher)
        return cipher

    async def rotate(self) -> tuple[int, int]:
        """Rewrap every data key not under the active master key; returns (rewrapped, total).

        Data ciphertext is untouched (envelope encryption), so this runs beside live
        traffic: a process holding an old wrapped key in its cache still has the same data
        key, and one that reads the new wrapping unwraps it with the new master key.
        """
        rewrapped = total = 0
        async for doc in self.collection.find({}):
            total += 1
            wrapped = WrappedKey.from_doc(doc)
            if not self.keyring.needs_rewrap(wrapped):
                continue
            account_id = str(doc["_id"])
            fresh = self.keyring.rewrap(account_id, wrapped)
            await self.collection.update_one(
                {"_id": account_id, "kid": wrapped.master_key_id},
                {"$set": {**fresh.to_doc(), "rotated_at": utcnow()}},
            )
            rewrapped += 1
        return rewrapped, total

    async def destroy(self, account_id: str) -> None:
        """Crypto-shred the account: without its data key none of its ciphertext reads."""
        await self.collection.delete_one({"_id": account_id})
        self._ciphers.evict(account_id)

    def forget(self, account_id: str) -> None:
        """Drop the cached key (after erasure or rotation)."""
        self._ciphers.evict(account_id)

    async def service_cipher(self, purpose: str) -> DataCipher:
        """A data key of the service itself (e.g. ``"connect"`` for flow state in progress).

        Kept in ``data_keys`` as ``_service:<purpose>`` beside the accounts' keys, so that
        ``keys rotate`` rewraps it too; 1Relation account ids never start with ``_``. The
        first process to need it creates it (a unique-key insert decides a race).
        """
        key_id = f"_service:{purpose}"
        cached = self._ciphers.get(key_id)
        if cached is not None:
            return cached
        if await self.collection.find_one({"_id": key_id}, {"_id": 1}) is None:
            cipher, _ = await self.create(key_id)
            return cipher
        return await self.cipher_for(key_id)

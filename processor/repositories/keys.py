"""Data keys: one per account (envelope encryption under the master keys) and per service use."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contract.storage import SCHEMA_VERSION
from crypto import CipherCache, DataCipher, DecryptionError, KeyCheck, KeyRing, WrappedKey, opens
from handlers.errors import AccountUnavailable, KeyUnreadable
from handlers.timeutil import utcnow
from processor.repositories.base import Document

log = structlog.get_logger(__name__)


@dataclass
class RotationReport:
    """What ``keys rotate`` covered: every data key is in exactly one of the three counts."""

    total: int = 0
    rewrapped: int = 0
    current: int = 0  # already under the active master key
    #: Data keys whose master key is not in the key ring, by master key id.
    unreadable: dict[str, int] = field(default_factory=dict)


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
        on_key_unreadable: Callable[[], None] | None = None,
    ) -> None:
        self.keyring = keyring
        self._on_key_unreadable = on_key_unreadable
        self._ciphers = cipher_cache if cipher_cache is not None else CipherCache()
        self.collection = db["data_keys"]
        #: The generation of each account's key this process last used (outlives the
        #: cache entry): a different one means the account was erased and connected again.
        self._generations: dict[str, str] = {}
        self._replaced_listeners: list[Callable[[str], None]] = []

    def on_key_replaced(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(account_id)`` when this process finds that an account's key is
        not the one it used before: whatever it holds for the erased connection (an access
        token above all) must go."""
        self._replaced_listeners.append(listener)

    def _note_generation(self, account_id: str, generation: str) -> None:
        previous = self._generations.get(account_id)
        self._generations[account_id] = generation
        if previous is not None and previous != generation:
            log.info("keys.key_replaced", account_id=account_id)
            for listener in self._replaced_listeners:
                listener(account_id)

    async def create(self, account_id: str) -> tuple[DataCipher, bool]:
        """A fresh data key for the account, or the existing one's cipher; True when created."""
        wrapped, cipher = self.keyring.new_data_key(account_id)
        generation = uuid.uuid4().hex
        try:
            await self.collection.insert_one(
                {
                    "_id": account_id,
                    "schema": SCHEMA_VERSION,
                    **wrapped.to_doc(),
                    "generation": generation,
                    "created_at": utcnow(),
                }
            )
        except DuplicateKeyError:
            # The stored key, not a cached one: another process may have created it after
            # an erasure that this process's cache does not know of.
            self._ciphers.evict(account_id)
            return await self.cipher_for(account_id), False
        self._ciphers.put(account_id, cipher)
        self._note_generation(account_id, generation)
        return cipher, True

    async def exists(self, account_id: str) -> bool:
        """Whether the account has a data key (none before its first connect and after erasure)."""
        return await self.collection.find_one({"_id": account_id}, {"_id": 1}) is not None

    async def cipher_for(self, account_id: str, *, check: KeyCheck | None = None) -> DataCipher:
        """The account's data cipher; :class:`AccountUnavailable` once it is erased.

        Keys are cached per process, and erasure in one process cannot reach the caches of
        the others: when the account is connected again at once, another process's cache
        still holds the destroyed key. ``check`` (a ciphertext written under the account's
        current key, with its associated data) proves a cached key current; one that does
        not open it is dropped and the key is read again.
        """
        cached = self._ciphers.get(account_id)
        if cached is not None:
            if check is None or opens(cached, check):
                return cached
            self._ciphers.evict(account_id)
            log.info("keys.cached_key_stale", account_id=account_id)
        doc = await self.collection.find_one({"_id": account_id})
        if doc is None:
            raise AccountUnavailable(account_id, "erased")
        # Keys created before generations were recorded are told apart by creation time.
        self._note_generation(account_id, str(doc.get("generation") or doc.get("created_at")))
        try:
            cipher: DataCipher | None = self.keyring.unwrap(account_id, WrappedKey.from_doc(doc))
        except DecryptionError:
            cipher = None
        if cipher is None:
            key_id = str(doc.get("kid", ""))[:64]
            log.error("keys.unreadable", account_id=account_id, key_id=key_id)
            if self._on_key_unreadable is not None:
                self._on_key_unreadable()
            raise KeyUnreadable(account_id, key_id)
        self._ciphers.put(account_id, cipher)
        return cipher

    async def missing_master_keys(self) -> dict[str, int]:
        """Master key ids that wrap data keys but are not in the key ring, with counts."""
        missing: dict[str, int] = {}
        known = set(self.keyring.key_ids)
        async for doc in self.collection.find({}, {"kid": 1}):
            key_id = str(doc.get("kid", ""))
            if key_id not in known:
                missing[key_id] = missing.get(key_id, 0) + 1
        return missing

    async def rotate(self) -> RotationReport:
        """Rewrap every data key not under the active master key; says what it covered.

        Data ciphertext is untouched (envelope encryption), so this runs beside live
        traffic: a process holding an old wrapped key in its cache still has the same data
        key, and one that reads the new wrapping unwraps it with the new master key. A key
        that cannot be unwrapped is counted and skipped, never the end of the run.
        """
        report = RotationReport()
        async for doc in self.collection.find({}):
            report.total += 1
            account_id = str(doc["_id"])
            try:
                wrapped = WrappedKey.from_doc(doc)
                if not self.keyring.needs_rewrap(wrapped):
                    report.current += 1
                    continue
                fresh: WrappedKey | None = self.keyring.rewrap(account_id, wrapped)
            except DecryptionError:
                fresh = None
            if fresh is None:
                key_id = str(doc.get("kid", ""))[:64]
                report.unreadable[key_id] = report.unreadable.get(key_id, 0) + 1
                log.error("keys.unreadable", account_id=account_id, key_id=key_id)
                continue
            await self.collection.update_one(
                {"_id": account_id, "kid": wrapped.master_key_id},
                {"$set": {**fresh.to_doc(), "rotated_at": utcnow()}},
            )
            report.rewrapped += 1
        return report

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

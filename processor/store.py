"""MongoDB: accounts, keys, token caches, subscriptions and leases.

Nothing personal is stored in plaintext (CONTRACT §4): Microsoft's identifiers are kept as
keyed hashes for lookup and as ciphertext where they are needed back; every ciphertext's
associated data names its collection, account, record and field.

FerretDB (the test database) updates documents by read-modify-write without re-checking
the filter, so nothing here relies on an update being atomic against a concurrent writer:
compare-and-swap and locks are built on unique-key inserts, and one account's event writes
are serialized by the shard queues (see :mod:`processor.topology`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from crypto import CipherCache, DataCipher, DecryptionError, Hasher, KeyRing, WrappedKey
from handlers.records import Account
from processor.errors import AccountUnavailable, KeyUnreadable
from processor.interfaces import SubscriptionRecord
from processor.logs import get_logger
from processor.timeutil import as_utc, utcnow

log = get_logger(__name__)

SCHEMA_VERSION = 1
#: Erased accounts waiting for their second sweep (:meth:`Store.resweep_due`).
ERASURE_RESWEEPS = "erasure_resweeps"

#: Collections whose documents carry ``expires_at`` and are removed by the sweeper
#: (FerretDB has no TTL indexes). Modules that add such a collection list it here.
EXPIRING_COLLECTIONS: list[str] = [
    "leases",
    "lease_takeovers",
    "events",
    # Connect and consent (subscriptions/connect.py, consent.py, links.py).
    "used_links",
    "connect_flows",
    "consent_flows",
    # Worker heartbeats (processor/balance.py).
    "workers",
]

Document = dict[str, Any]

#: A lease of ours with longer than this to live cannot change hands before we delete or
#: extend it (clocks of the processes sharing leases are assumed to agree to well within
#: this); nearer its end it is left to expire.
LEASE_RELEASE_MARGIN = timedelta(seconds=10)
#: How long the record of a takeover of an expired lease is kept (see ``try_lease``).
LEASE_TAKEOVER_CLAIM_TTL = timedelta(minutes=10)


def _token_cache_id(account_id: str, version: int) -> str:
    return f"{account_id}:{version}"


def aad(*parts: str) -> bytes:
    """Associated data binding a ciphertext to its place: ``collection|account|record|field``."""
    return "|".join(parts).encode("utf-8")


@dataclass(frozen=True)
class AccountIdentity:
    """The Microsoft identity an account is bound to (decrypted)."""

    user_id: str
    tenant_id: str


@dataclass
class RotationReport:
    """What ``keys rotate`` covered: every data key is in exactly one of the three counts."""

    total: int = 0
    rewrapped: int = 0
    current: int = 0  # already under the active master key
    #: Data keys whose master key is not in the key ring, by master key id.
    unreadable: dict[str, int] = field(default_factory=dict)


class Store:
    """The service's MongoDB collections, behind methods that encrypt and hash."""

    def __init__(
        self,
        *,
        db: AsyncDatabase[Document],
        keyring: KeyRing,
        hasher: Hasher,
        cipher_cache: CipherCache | None = None,
        subscription_cache_ttl_s: float = 2.0,
        on_key_unreadable: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self._on_key_unreadable = on_key_unreadable
        self.keyring = keyring
        self.hasher = hasher
        self._ciphers = cipher_cache or CipherCache()
        self.accounts = db["accounts"]
        # Data keys live apart from the account document: only creation, rotation and
        # erasure write them, so a rotation never races a status update (FerretDB's
        # updates are not atomic against concurrent writers).
        self.data_keys = db["data_keys"]
        self.token_caches = db["token_caches"]
        # Per account, the version of its newest token cache (a hint: see load_token_cache).
        self.token_cache_heads = db["token_cache_heads"]
        self.subscriptions = db["subscriptions"]
        self.events = db["events"]
        self.leases = db["leases"]
        self.lease_takeovers = db["lease_takeovers"]
        self._subscription_cache: dict[str, tuple[float, SubscriptionRecord | None]] = {}
        self._subscription_cache_ttl_s = subscription_cache_ttl_s

    async def ensure_indexes(self) -> None:
        """Create the indexes (idempotent). No TTL or partial indexes: FerretDB lacks them."""
        await self.token_caches.create_index(
            [("account_id", ASCENDING), ("version", ASCENDING)], unique=True
        )
        await self.subscriptions.create_index("account_id")
        await self.events.create_index([("account_id", ASCENDING), ("start", ASCENDING)])
        # Outbound links and parked messages are read and erased by account.
        await self.db["links"].create_index("account_id")
        await self.db["parked"].create_index("account_id")
        await self.events.create_index("expires_at")
        await self.leases.create_index("expires_at")

    # ------------------------------------------------------------------ accounts and keys

    async def create_account(self, account_id: str) -> DataCipher:
        """Create the account with a fresh data key, or return the existing account's cipher."""
        wrapped, cipher = self.keyring.new_data_key(account_id)
        now = utcnow()
        try:
            await self.data_keys.insert_one(
                {"_id": account_id, "schema": SCHEMA_VERSION, **wrapped.to_doc(), "created_at": now}
            )
        except DuplicateKeyError:
            cipher = await self.cipher_for(account_id)
        else:
            self._ciphers.put(account_id, cipher)
        # Reconnecting keeps the account, its data and its mapping.
        with contextlib.suppress(DuplicateKeyError):
            await self.accounts.insert_one(
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

    async def get_account(self, account_id: str) -> Document | None:
        """The raw account document (ciphertext fields stay encrypted)."""
        return await self.accounts.find_one({"_id": account_id})

    async def account(self, account_id: str) -> Account | None:
        """The account's record for the sync handlers (status, whether a user is bound)."""
        doc = await self.get_account(account_id)
        if doc is None:
            return None
        status = doc.get("status")
        return Account(
            account_id=account_id,
            status=status if isinstance(status, str) else None,
            bound="user_ct" in doc,
        )

    async def cipher_for(self, account_id: str) -> DataCipher:
        """The account's data cipher; :class:`AccountUnavailable` once it is erased."""
        cached = self._ciphers.get(account_id)
        if cached is not None:
            return cached
        doc = await self.data_keys.find_one({"_id": account_id})
        if doc is None:
            raise AccountUnavailable(account_id, "erased")
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
        async for doc in self.data_keys.find({}, {"kid": 1}):
            key_id = str(doc.get("kid", ""))
            if key_id not in known:
                missing[key_id] = missing.get(key_id, 0) + 1
        return missing

    async def rotate_data_keys(self) -> RotationReport:
        """Rewrap every data key not under the active master key; says what it covered.

        Data ciphertext is untouched (envelope encryption), so this runs beside live
        traffic: a process holding an old wrapped key in its cache still has the same data
        key, and one that reads the new wrapping unwraps it with the new master key. A key
        that cannot be unwrapped is counted and skipped, never the end of the run.
        """
        report = RotationReport()
        async for doc in self.data_keys.find({}):
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
            await self.data_keys.update_one(
                {"_id": account_id, "kid": wrapped.master_key_id},
                {"$set": {**fresh.to_doc(), "rotated_at": utcnow()}},
            )
            report.rewrapped += 1
        return report

    async def destroy_data_key(self, account_id: str) -> None:
        """Crypto-shred the account: without its data key none of its ciphertext reads."""
        await self.data_keys.delete_one({"_id": account_id})
        self._ciphers.evict(account_id)

    def forget_cipher(self, account_id: str) -> None:
        """Drop the cached key (after erasure or rotation)."""
        self._ciphers.evict(account_id)

    async def bind_identity(self, account_id: str, *, user_id: str, tenant_id: str) -> None:
        """Record the Microsoft user and tenant the account is connected as."""
        cipher = await self.cipher_for(account_id)
        await self.accounts.update_one(
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
        return await self.identity_of(account_id, await self.get_account(account_id))

    async def identity_of(self, account_id: str, doc: Document | None) -> AccountIdentity:
        """:meth:`identity` from the account document already read (with ``user_ct`` and
        ``tenant_ct``)."""
        if doc is None or "user_ct" not in doc:
            raise AccountUnavailable(account_id, "not connected")
        cipher = await self.cipher_for(account_id)
        return AccountIdentity(
            user_id=cipher.decrypt_str(doc["user_ct"], aad("accounts", account_id, "user")),
            tenant_id=cipher.decrypt_str(doc["tenant_ct"], aad("accounts", account_id, "tenant")),
        )

    async def set_status(self, account_id: str, status: str, reason: str = "") -> bool:
        """Set the account's status; returns True when it changed."""
        doc = await self.accounts.find_one({"_id": account_id}, {"status": 1})
        if doc is None or (doc.get("status") == status and status == "connected"):
            return False
        changed = doc.get("status") != status
        await self.accounts.update_one(
            {"_id": account_id},
            {"$set": {"status": status, "status_reason": reason, "updated_at": utcnow()}},
        )
        return changed

    # ------------------------------------------------------------------ token caches

    async def load_token_cache(self, account_id: str) -> tuple[str, int] | None:
        """The newest serialized MSAL cache and its version, decrypted."""
        doc = await self._newest_token_cache(account_id)
        if doc is None:
            return None
        cipher = await self.cipher_for(account_id)
        version = int(doc["version"])
        text = cipher.decrypt_str(
            doc["cache_ct"], aad("token_caches", account_id, str(version), "cache")
        )
        return text, version

    async def _newest_token_cache(self, account_id: str) -> Document | None:
        """The newest cache document, found by ``_id`` where possible.

        FerretDB pushes only ``_id`` equality down to SQL: a query on ``account_id``
        decodes every account's caches (several kB each), which made the first token of
        each of n accounts cost O(n) on the slow path. The
        head names the newest version; it may lag behind a concurrent save (updates are
        not atomic), so the versions after it are looked up too (a save always adds the
        version after one that exists). Without a head, or with one whose version is
        gone, the query on ``account_id`` decides, as it always did.
        """
        head = await self.token_cache_heads.find_one({"_id": account_id})
        if head is not None and isinstance(head.get("version"), int):
            version = int(head["version"])
            doc = await self.token_caches.find_one({"_id": _token_cache_id(account_id, version)})
            while doc is not None:
                newer = await self.token_caches.find_one(
                    {"_id": _token_cache_id(account_id, version + 1)}
                )
                if newer is None:
                    return doc
                doc, version = newer, version + 1
        return await self.token_caches.find_one(
            {"account_id": account_id}, sort=[("version", DESCENDING)]
        )

    async def save_token_cache(
        self, account_id: str, serialized: str, expected_version: int
    ) -> bool:
        """Compare-and-swap: store version ``expected_version + 1`` unless someone did first.

        Built on a unique (account_id, version) insert, which is atomic on FerretDB too,
        where a conditional update is not.
        """
        cipher = await self.cipher_for(account_id)
        version = expected_version + 1
        try:
            await self.token_caches.insert_one(
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
            await self.token_cache_heads.update_one(
                {"_id": account_id},
                {"$set": {"version": version, "updated_at": utcnow()}},
                upsert=True,
            )
        # Older versions hold superseded refresh tokens: keep one back for readers mid-swap.
        await self.token_caches.delete_many(
            {"account_id": account_id, "version": {"$lt": version - 1}}
        )
        return True

    async def delete_token_cache(self, account_id: str) -> None:
        """Remove every stored token cache of the account."""
        await self.token_caches.delete_many({"account_id": account_id})
        await self.token_cache_heads.delete_one({"_id": account_id})

    # ------------------------------------------------------------------ subscriptions

    async def save_subscription(
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

        ``granted_at``: when the expiry was asked for (see :meth:`set_subscription_expiry`),
        recorded in the same write.
        """
        cipher = await self.cipher_for(account_id)
        sub_hash = self.hasher.hash_id("subscription", subscription_id)
        now = utcnow()
        granted = {} if granted_at is None else {"granted_at": granted_at}
        await self.subscriptions.replace_one(
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
        self._subscription_cache.pop(sub_hash, None)
        return sub_hash

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        """Our record of a subscription (briefly cached: the receiver asks on every item)."""
        now = time.monotonic()
        hit = self._subscription_cache.get(subscription_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        doc = await self.subscriptions.find_one({"_id": subscription_hash})
        record = None
        if doc is not None:
            record = SubscriptionRecord(
                subscription_hash=subscription_hash,
                account_id=doc["account_id"],
                client_state_hash=doc["client_state_hash"],
                tenant_hash=doc["tenant_hash"],
                user_hash=doc["user_hash"],
                expires_at=doc["expires_at"],
            )
        if len(self._subscription_cache) > 50_000:
            self._subscription_cache.clear()
        self._subscription_cache[subscription_hash] = (now + self._subscription_cache_ttl_s, record)
        return record

    async def subscription_of(self, account_id: str, subscription_hash: str) -> Document | None:
        """The account's subscription record; None if there is none or it is another's."""
        # By ``_id`` alone, the account compared here: FerretDB pushes only a filter that is
        # exactly ``{_id: x}`` down to SQL; with ``account_id`` it decodes every record.
        doc = await self.subscriptions.find_one({"_id": subscription_hash})
        return doc if doc is not None and doc.get("account_id") == account_id else None

    async def subscription_id(self, account_id: str, subscription_hash: str) -> str | None:
        """Graph's id of one of the account's subscriptions, decrypted."""
        doc = await self.subscription_of(account_id, subscription_hash)
        return None if doc is None else await self.subscription_id_of(account_id, doc)

    async def subscription_id_of(self, account_id: str, doc: Document) -> str | None:
        """Graph's id from a subscription record already read (with ``subscription_ct``);
        None when the record is not the account's."""
        if doc.get("account_id") != account_id:
            return None
        cipher = await self.cipher_for(account_id)
        return cipher.decrypt_str(
            doc["subscription_ct"], aad("subscriptions", account_id, str(doc["_id"]), "id")
        )

    async def delete_subscription(self, subscription_hash: str) -> None:
        """Forget a subscription record."""
        await self.subscriptions.delete_one({"_id": subscription_hash})
        self._subscription_cache.pop(subscription_hash, None)

    # ------------------------------------------------------------------ leases

    async def try_lease(self, name: str, owner: str, *, ttl_s: float) -> bool:
        """Take the named lease for ``ttl_s`` unless someone else holds a live one.

        Unique-key inserts decide every race, and a lease is only ever removed by a party
        that won one, because FerretDB's deletes and updates read the matching documents
        first and then write by ``_id``: a delete "by exact expiry" can still remove the
        lease someone inserted in between. So:

        - The insert is tried first; a free lease (the usual case) costs one insert, which
          FerretDB checks against its unique index (a read by ``_id`` goes through every
          lease).
        - Our own lease is extended only while it has more than ``LEASE_RELEASE_MARGIN``
          to live (nobody can take it over before it expires); nearer its end we wait for
          it to expire like anyone else.
        - An expired lease is taken over only by the one who first inserts its takeover
          claim (``lease_takeovers``, keyed by the lease and its exact expiry); the sweeper
          claims the same way before it removes one.
        """
        now = utcnow()
        lease = {"_id": name, "owner": owner, "expires_at": now + timedelta(seconds=ttl_s)}
        with contextlib.suppress(DuplicateKeyError):
            await self.leases.insert_one(lease)
            return True
        current = await self.leases.find_one({"_id": name})
        if current is None:
            return False  # given back meanwhile: this race is lost, as any other
        left = as_utc(current["expires_at"]) - now
        if current["owner"] == owner and left > LEASE_RELEASE_MARGIN:
            await self.leases.update_one(
                {"_id": name}, {"$set": {"expires_at": lease["expires_at"]}}
            )
            return True
        if left > timedelta(0) or not await self._claim_expired(current):
            return False
        try:
            await self.leases.insert_one(lease)
        except DuplicateKeyError:
            return False  # someone's insert-first came between our delete and our insert
        return True

    async def take_lease(
        self, name: str, owner: str, *, ttl_s: float, wait_s: float, poll_s: float = 0.1
    ) -> bool:
        """:meth:`try_lease`, tried again every ``poll_s`` for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while not await self.try_lease(name, owner, ttl_s=ttl_s):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def _claim_expired(self, lease: Document) -> bool:
        """Remove an expired lease if we are the first to claim it (see :meth:`try_lease`)."""
        claim = f"{lease['_id']}@{as_utc(lease['expires_at']).isoformat()}"
        try:
            await self.lease_takeovers.insert_one(
                {"_id": claim, "expires_at": utcnow() + LEASE_TAKEOVER_CLAIM_TTL}
            )
        except DuplicateKeyError:
            return False
        # Nobody else deletes this lease: its owner no longer releases it, and only the
        # claim's winner removes it. Its exact expiry stays in the filter, so a claim that
        # wakes up long after (its record swept) matches nothing.
        await self.leases.delete_one({"_id": lease["_id"], "expires_at": lease["expires_at"]})
        return True

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease back if we still hold it.

        Only while it has more than ``LEASE_RELEASE_MARGIN`` to live: until it expires
        nobody else can take it or remove it, so the delete by ``_id`` alone (the one
        filter FerretDB looks up without reading every lease) removes ours. Nearer its end
        it is left to expire (and to the takeover claim of :meth:`try_lease`).
        """
        current = await self.leases.find_one({"_id": name})
        if current is None or current.get("owner") != owner:
            return
        if as_utc(current["expires_at"]) - utcnow() > LEASE_RELEASE_MARGIN:
            await self.leases.delete_one({"_id": name})

    # ------------------------------------------------------------------ erasure fence

    async def fenced(self, account_id: str) -> bool:
        """Whether writes for the account must stop: it is erased or being erased.

        Erasure marks the account ``disconnected`` before anything else and removes the
        document last, so a pass that began earlier sees one of the two before each write.
        """
        account = await self.accounts.find_one({"_id": account_id}, {"status": 1})
        return account is None or account.get("status") == "disconnected"

    async def delete_account_documents(self, account_id: str) -> int:
        """Every document of the account except the account document itself, with its
        leases (``<purpose>:<id>``, slots, takeover claims); returns how many."""
        total = 0
        lease_names = re.compile(f"^[^:]+:{re.escape(account_id)}([:@]|$)")
        for name in sorted(await self.db.list_collection_names()):
            if name.startswith("system.") or name == ERASURE_RESWEEPS:
                continue
            collection = self.db[name]
            total += (await collection.delete_many({"account_id": account_id})).deleted_count
            if name != "accounts":
                total += (await collection.delete_many({"_id": account_id})).deleted_count
            if name in ("leases", "lease_takeovers"):
                total += (
                    await collection.delete_many({"_id": {"$regex": lease_names.pattern}})
                ).deleted_count
        return total

    async def schedule_resweep(self, account_id: str, *, after_s: float) -> None:
        """Sweep the account's documents once more after ``after_s`` (see :meth:`resweep_due`).

        The record names the account only as ciphertext under the service's own key, so
        that no readable trace of an erased account is left while it waits.
        """
        cipher = await self.service_cipher("erasure")
        record_id = uuid.uuid4().hex
        await self.db[ERASURE_RESWEEPS].insert_one(
            {
                "_id": record_id,
                "account_ct": cipher.encrypt_str(account_id, aad=_resweep_aad(record_id)),
                "due_at": utcnow() + timedelta(seconds=after_s),
            }
        )

    async def resweep_due(self) -> int:
        """The second sweep of erased accounts whose longest possible pass is over.

        A delta pass that began before the erasure may have written between its last
        fence check and the first sweep; this removes that. An account connected again
        since (its document exists) is left alone: its documents are new.
        """
        swept = 0
        resweeps = self.db[ERASURE_RESWEEPS]
        due = [doc async for doc in resweeps.find({"due_at": {"$lt": utcnow()}})]
        if not due:
            return 0
        cipher = await self.service_cipher("erasure")
        for doc in due:
            record_id = str(doc["_id"])
            try:
                account_id = cipher.decrypt_str(doc["account_ct"], aad=_resweep_aad(record_id))
            except (DecryptionError, KeyError, TypeError):
                log.warning("erasure.resweep_unreadable", record=record_id)
                account_id = None
            if account_id and await self.accounts.find_one({"_id": account_id}, {"_id": 1}) is None:
                swept += await self.delete_account_documents(account_id)
            await resweeps.delete_one({"_id": record_id})
        return swept

    async def sweep_expired(self) -> dict[str, int]:
        """Remove expired records (FerretDB has no TTL indexes); returns counts per collection.

        Expired leases go through the same takeover claim as :meth:`try_lease`, so the
        sweeper never removes a lease that someone took over a moment before.
        """
        now = utcnow()
        counts = {}
        for name in EXPIRING_COLLECTIONS:
            if name == "leases":
                expired = [doc async for doc in self.leases.find({"expires_at": {"$lt": now}})]
                counts[name] = sum([await self._claim_expired(doc) for doc in expired])
                continue
            result = await self.db[name].delete_many({"expires_at": {"$lt": now}})
            counts[name] = result.deleted_count
        return counts

    # ------------------------------------------------------------------ service keys

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
        if await self.data_keys.find_one({"_id": key_id}, {"_id": 1}) is None:
            wrapped, cipher = self.keyring.new_data_key(key_id)
            try:
                await self.data_keys.insert_one(
                    {
                        "_id": key_id,
                        "schema": SCHEMA_VERSION,
                        **wrapped.to_doc(),
                        "created_at": utcnow(),
                    }
                )
            except DuplicateKeyError:
                pass
            else:
                self._ciphers.put(key_id, cipher)
                return cipher
        return await self.cipher_for(key_id)

    # ------------------------------------------------------------------ subscription renewals

    async def set_subscription_expiry(
        self, subscription_hash: str, *, expires_at: datetime, granted_at: datetime
    ) -> None:
        """Record a granted expiry and when it was granted (the lifetime renewals go by).

        Written only by the subscription manager holding the account's lease.
        """
        await self.subscriptions.update_one(
            {"_id": subscription_hash},
            {"$set": {"expires_at": expires_at, "granted_at": granted_at, "updated_at": utcnow()}},
        )
        self._subscription_cache.pop(subscription_hash, None)


async def wait_for_database(db: AsyncDatabase[Document], *, timeout_s: float) -> None:
    """Ping until the database answers or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await db.command("ping")
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
        else:
            return


def _resweep_aad(record_id: str) -> bytes:
    return f"{ERASURE_RESWEEPS}|{record_id}|account".encode()

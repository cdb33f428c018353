"""The service's MongoDB repositories, built together over one database.

Each concern has its repository in :mod:`processor.repositories`; :class:`Store` is only
their composition (and the index setup), so that the runtime wires one object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from crypto import CipherCache, DataCipher, Hasher, KeyRing
from handlers.records import Account
from processor.repositories.accounts import AccountRepository, identity_check
from processor.repositories.base import Document
from processor.repositories.erasures import ErasureResweeps
from processor.repositories.keys import KeyRepository
from processor.repositories.leases import LeaseRepository
from processor.repositories.renewals import RenewalStateRepository
from processor.repositories.sign_in import FlowRepository, TenantRepository, UsedLinkRepository
from processor.repositories.subscriptions import SubscriptionRepository
from processor.repositories.sync_state import SyncStateRepository
from processor.repositories.token_caches import TokenCacheRepository
from subscriptions.connect import CONNECT_FLOWS
from subscriptions.consent import CONSENT_FLOWS
from subscriptions.ports import AccountIdentity

__all__ = [
    "Store",
    "wait_for_database",
]


class Store:
    """The repositories of one database: keys, accounts, erasure resweeps, token caches,
    subscriptions, the manager's renewal state, leases, each account's sync state, and the
    records of connect and admin consent (flows in progress, used links, approvals)."""

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
        self.hasher = hasher
        self.keys = KeyRepository(
            db=db,
            keyring=keyring,
            cipher_cache=cipher_cache,
            on_key_unreadable=on_key_unreadable,
        )
        self.accounts = AccountRepository(db=db, keys=self.keys, hasher=hasher)
        self.erasures = ErasureResweeps(db=db, keys=self.keys, accounts=self.accounts)
        self.token_caches = TokenCacheRepository(db=db, keys=self.keys)
        self.subscriptions = SubscriptionRepository(
            db=db, keys=self.keys, hasher=hasher, cache_ttl_s=subscription_cache_ttl_s
        )
        self.renewals = RenewalStateRepository(db=db)
        self.leases = LeaseRepository(db=db)
        self.sync_state = SyncStateRepository(db=db)
        self.connect_flows = FlowRepository(db=db, name=CONNECT_FLOWS)
        self.consent_flows = FlowRepository(db=db, name=CONSENT_FLOWS)
        self.used_links = UsedLinkRepository(db=db)
        self.tenants = TenantRepository(db=db)

    async def ensure_indexes(self) -> None:
        """Create the indexes (idempotent). No TTL or partial indexes: FerretDB lacks them."""
        await self.token_caches.ensure_indexes()
        await self.db["subscriptions"].create_index("account_id")
        await self.db["events"].create_index([("account_id", ASCENDING), ("start", ASCENDING)])
        # Outbound links and parked messages are read and erased by account.
        await self.db["links"].create_index("account_id")
        await self.db["parked"].create_index("account_id")
        await self.db["events"].create_index("expires_at")
        await self.db["leases"].create_index("expires_at")

    # Transitional: handlers/ still calls these on the composition; it moves to its own
    # ports (issue 13), after which they go.

    async def get_account(self, account_id: str) -> Document | None:
        """:meth:`AccountRepository.get_document`."""
        return await self.accounts.get_document(account_id)

    async def account(self, account_id: str) -> Account | None:
        """:meth:`AccountRepository.get` (the account's record, its identity sealed)."""
        return await self.accounts.get(account_id)

    async def identity(self, account_id: str) -> AccountIdentity:
        """:meth:`AccountRepository.identity`."""
        return await self.accounts.identity(account_id)

    async def cipher_for(self, account_id: str, account: Account | None = None) -> DataCipher:
        """:meth:`KeyRepository.cipher_for`, checked against ``account``'s sealed identity."""
        check = None
        if account is not None and account.sealed_identity is not None:
            check = identity_check(account_id, account.sealed_identity[0])
        return await self.keys.cipher_for(account_id, check=check)

    async def fenced(self, account_id: str, cipher: DataCipher | None = None) -> bool:
        """:meth:`AccountRepository.fenced`."""
        return await self.accounts.fenced(account_id, cipher)


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

"""Connect and admin consent: sign-ins in progress, used link ids and tenant approvals.

What goes into these documents (hashes, ciphertext) is decided in ``subscriptions/``;
these repositories only keep them, and unique-key inserts and deletes decide every race.
"""

from __future__ import annotations

from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contract.storage import SCHEMA_VERSION
from handlers.timeutil import utcnow
from processor.repositories.base import Document
from subscriptions.consent import TENANTS
from subscriptions.links import USED_LINKS


class FlowRepository:
    """A collection of sign-ins in progress (``connect_flows`` or ``consent_flows``)."""

    def __init__(self, *, db: AsyncDatabase[Document], name: str) -> None:
        self._name = name
        self.collection = db[name]

    @property
    def name(self) -> str:
        """The collection's name."""
        return self._name

    async def ensure_indexes(self) -> None:
        """The sweeper removes expired flows by ``expires_at``."""
        await self.collection.create_index("expires_at")

    async def insert(self, record: Document) -> None:
        """Keep a new record."""
        await self.collection.insert_one(record)

    async def get(self, key: str) -> Document | None:
        """The record kept under ``key``, or None."""
        return await self.collection.find_one({"_id": key})

    async def remove(self, key: str) -> bool:
        """Remove the record; the delete's count makes exactly one concurrent caller win."""
        return (await self.collection.delete_one({"_id": key})).deleted_count == 1


class UsedLinkRepository:
    """``used_links``: one document per consumed ``jti`` (keyed hash), with ``expires_at``."""

    def __init__(self, *, db: AsyncDatabase[Document]) -> None:
        self.collection = db[USED_LINKS]

    async def ensure_indexes(self) -> None:
        """The sweeper removes expired records by ``expires_at``."""
        await self.collection.create_index("expires_at")

    async def consume(self, link_hash: str, *, expires_at: datetime) -> bool:
        """Record the id; False when it was recorded before (a replay). A unique-key
        insert: exactly one concurrent caller wins."""
        try:
            await self.collection.insert_one(
                {
                    "_id": link_hash,
                    "schema": SCHEMA_VERSION,
                    "used_at": utcnow(),
                    "expires_at": expires_at,
                }
            )
        except DuplicateKeyError:
            return False
        return True


class TenantRepository:
    """``tenants``: organisations whose administrator approved the app, by keyed hash."""

    def __init__(self, *, db: AsyncDatabase[Document]) -> None:
        self.collection = db[TENANTS]

    async def record_approval(self, tenant_hash: str, *, at: datetime) -> None:
        """Note an approval ``at``; the first approval's time is kept."""
        for _ in range(2):  # an upsert race ends in a duplicate key on FerretDB: retry once
            try:
                await self.collection.update_one(
                    {"_id": tenant_hash},
                    {
                        "$set": {"approved_at": at, "schema": SCHEMA_VERSION},
                        "$setOnInsert": {"first_approved_at": at},
                    },
                    upsert=True,
                )
            except DuplicateKeyError:
                continue
            return

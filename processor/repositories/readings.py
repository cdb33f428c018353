"""Read-only scans for the operator's view and the checks of the demo and the tests.

They read whole collections, so nothing on the sync path uses them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase

from processor.repositories.base import Document


class OperatorReadings:
    """What ``m365sync status`` counts: account statuses and subscription expiries."""

    def __init__(self, *, db: AsyncDatabase[Document]) -> None:
        self._accounts = db["accounts"]
        self._subscriptions = db["subscriptions"]

    async def account_statuses(self) -> list[str | None]:
        """The status of every account (None where a document has none)."""
        cursor = self._accounts.find({}, {"status": 1})
        return [doc.get("status") async for doc in cursor]

    async def subscription_expiries(self) -> list[tuple[str, datetime | None]]:
        """(account id, expiry) of every subscription record (None where it has no date)."""
        cursor = self._subscriptions.find({}, {"account_id": 1, "expires_at": 1})
        return [
            (
                str(doc.get("account_id")),
                doc["expires_at"] if isinstance(doc.get("expires_at"), datetime) else None,
            )
            async for doc in cursor
        ]


class DatabaseScan:
    """Every document of every collection, for the check that nothing is stored in
    plaintext."""

    def __init__(self, *, db: AsyncDatabase[Document]) -> None:
        self._db = db

    async def documents(self) -> AsyncIterator[tuple[str, Document]]:
        """(collection name, document) for each document in the database."""
        for name in await self._db.list_collection_names():
            async for doc in self._db[name].find({}):
                yield name, doc

"""The subscription manager's own state per account (whether it saw the account paused)."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from handlers.timeutil import utcnow
from processor.repositories.base import Document

RENEWAL_STATE_COLLECTION = "subscription_state"


class RenewalStateRepository:
    """``subscription_state``: one document per account, written under the account's lease."""

    def __init__(self, *, db: AsyncDatabase[Document]) -> None:
        self.collection = db[RENEWAL_STATE_COLLECTION]

    async def get(self, account_id: str) -> Document:
        """The account's state (empty when there is none)."""
        return await self.collection.find_one({"_id": account_id}) or {}

    async def get_many(self, account_ids: list[str] | None = None) -> dict[str, Document]:
        """The state of the named accounts (every account's when None), one query."""
        query: Document = {} if account_ids is None else {"_id": {"$in": account_ids}}
        return {str(doc["_id"]): doc async for doc in self.collection.find(query)}

    async def update(self, account_id: str, **fields: Any) -> None:
        """Set ``fields`` of the account's state."""
        await self.collection.update_one(
            {"_id": account_id}, {"$set": {**fields, "updated_at": utcnow()}}, upsert=True
        )

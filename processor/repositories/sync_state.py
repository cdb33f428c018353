"""Each account's ``sync_state`` document: its last sync step and its delta link."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from pymongo.asynchronous.database import AsyncDatabase

from contract.storage import aad
from crypto import DataCipher
from handlers.timeutil import utcnow
from processor.repositories.base import Document

SYNC_STATE: Final = "sync_state"


class SyncStateRepository:
    """``sync_state``: one document per account, written only by the account's shard owner."""

    def __init__(self, *, db: AsyncDatabase[Document]) -> None:
        self.collection = db[SYNC_STATE]

    async def get(self, account_id: str) -> Document:
        """The account's document (empty when there is none)."""
        return await self.collection.find_one({"_id": account_id}) or {}

    async def record_sync(self, account_id: str, *, error: str | None = None) -> None:
        """Note a finished sync step (``error``: what stopped it, None when it succeeded)."""
        fields: dict[str, Any] = {"last_error": error, "updated_at": utcnow()}
        if error is None:
            fields["last_sync_at"] = utcnow()
        await self.collection.update_one({"_id": account_id}, {"$set": fields}, upsert=True)

    async def load(self, account_id: str, cipher: DataCipher) -> tuple[str, datetime | None] | None:
        """The decrypted delta link and its window's start; raises ``DecryptionError`` if
        unreadable."""
        doc = await self.collection.find_one({"_id": account_id})
        if doc is None or "delta_ct" not in doc:
            return None
        window_start = doc.get("delta_window_start")
        link = cipher.decrypt_str(doc["delta_ct"], aad(SYNC_STATE, account_id, "delta_link"))
        return link, window_start if isinstance(window_start, datetime) else None

    async def save(
        self,
        account_id: str,
        cipher: DataCipher,
        link: str,
        *,
        start: datetime,
        end: datetime,
        at: datetime,
    ) -> None:
        """Keep the delta link of a round over ``[start, end)`` that finished ``at``."""
        await self.collection.update_one(
            {"_id": account_id},
            {
                "$set": {
                    "delta_ct": cipher.encrypt_str(link, aad(SYNC_STATE, account_id, "delta_link")),
                    "delta_window_start": start,
                    "delta_window_end": end,
                    "delta_at": at,
                    "updated_at": utcnow(),
                }
            },
            upsert=True,
        )

    async def clear(self, account_id: str) -> None:
        """Forget the delta link: the next pass is a full round."""
        await self.collection.update_one(
            {"_id": account_id},
            {"$unset": {"delta_ct": "", "delta_window_start": "", "delta_window_end": ""}},
        )

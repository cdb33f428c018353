"""The second sweep of erased accounts (the erasure fence's backstop)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import structlog
from pymongo.asynchronous.database import AsyncDatabase

from crypto import DecryptionError
from handlers.timeutil import utcnow
from processor.repositories.accounts import AccountRepository
from processor.repositories.base import ERASURE_RESWEEPS, Document
from processor.repositories.keys import KeyRepository

log = structlog.get_logger(__name__)


def _resweep_aad(record_id: str) -> bytes:
    return f"{ERASURE_RESWEEPS}|{record_id}|account".encode()


class ErasureResweeps:
    """``erasure_resweeps``: accounts to sweep once more, named only as ciphertext."""

    def __init__(
        self, *, db: AsyncDatabase[Document], keys: KeyRepository, accounts: AccountRepository
    ) -> None:
        self._keys = keys
        self._accounts = accounts
        self.collection = db[ERASURE_RESWEEPS]

    async def schedule_resweep(self, account_id: str, *, after_s: float) -> None:
        """Sweep the account's documents once more after ``after_s`` (see :meth:`resweep_due`).

        The record names the account only as ciphertext under the service's own key, so
        that no readable trace of an erased account is left while it waits.
        """
        cipher = await self._keys.service_cipher("erasure")
        record_id = uuid.uuid4().hex
        await self.collection.insert_one(
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
        due = [doc async for doc in self.collection.find({"due_at": {"$lt": utcnow()}})]
        if not due:
            return 0
        cipher = await self._keys.service_cipher("erasure")
        for doc in due:
            record_id = str(doc["_id"])
            try:
                account_id = cipher.decrypt_str(doc["account_ct"], aad=_resweep_aad(record_id))
            except (DecryptionError, KeyError, TypeError):
                log.warning("erasure.resweep_unreadable", record=record_id)
                account_id = None
            if account_id and await self._accounts.get_document(account_id) is None:
                swept += await self._accounts.delete_other_documents(account_id)
            await self.collection.delete_one({"_id": record_id})
        return swept

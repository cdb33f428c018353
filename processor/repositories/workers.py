"""Worker heartbeats: each process of a role announces itself (see :mod:`processor.balance`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from pymongo.asynchronous.database import AsyncDatabase

from handlers.timeutil import as_utc, utcnow

#: The heartbeat documents (``expires_at`` is swept like every other expiring record).
WORKERS: Final = "workers"
#: A process whose heartbeat is older than this is taken for gone.
HEARTBEAT_TTL_S: Final = 10.0


class Registry:
    """Heartbeats of the processes of each role in MongoDB (one writer per document)."""

    def __init__(
        self, db: AsyncDatabase[dict[str, Any]], *, clock: Callable[[], datetime] = utcnow
    ):
        self._collection = db[WORKERS]
        self._clock = clock

    async def beat(self, role: str, member: str, report: Mapping[str, Any] | None = None) -> None:
        now = self._clock()
        fields: dict[str, Any] = {
            "role": role,
            "member": member,
            "seen_at": now,
            "expires_at": now + timedelta(seconds=HEARTBEAT_TTL_S),
        }
        if report is not None:
            fields["report"] = dict(report)
        await self._collection.update_one(
            {"_id": f"{role}/{member}"}, {"$set": fields}, upsert=True
        )

    async def reports(self, role: str) -> list[dict[str, Any]]:
        """The ``report`` of each live process of ``role`` (:class:`processor.lag.LagTracker`)."""
        now = self._clock()
        return [
            dict(doc.get("report") or {})
            async for doc in self._collection.find({"role": role})
            if doc.get("expires_at") is not None and as_utc(doc["expires_at"]) > now
        ]

    async def live(self, role: str) -> list[str]:
        now = self._clock()
        docs = [doc async for doc in self._collection.find({"role": role})]
        return sorted(
            str(doc["member"])
            for doc in docs
            if doc.get("expires_at") is not None and as_utc(doc["expires_at"]) > now
        )

    async def leave(self, role: str, member: str) -> None:
        await self._collection.delete_one({"_id": f"{role}/{member}"})

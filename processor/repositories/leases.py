"""Leases: named locks with an expiry, and the sweeper of expired records."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from handlers.timeutil import as_utc, utcnow
from processor.repositories.base import EXPIRING_COLLECTIONS, Document

#: A lease of ours with longer than this to live cannot change hands before we delete or
#: extend it (clocks of the processes sharing leases are assumed to agree to well within
#: this); nearer its end it is left to expire.
LEASE_RELEASE_MARGIN = timedelta(seconds=10)
#: How long the record of a takeover of an expired lease is kept (see ``try_take``).
LEASE_TAKEOVER_CLAIM_TTL = timedelta(minutes=10)


class LeaseRepository:
    """``leases`` and ``lease_takeovers``; unique-key inserts decide every race."""

    def __init__(self, *, db: AsyncDatabase[Document]) -> None:
        self._db = db
        self.collection = db["leases"]
        self.takeovers = db["lease_takeovers"]

    async def try_take(self, name: str, owner: str, *, ttl_s: float) -> bool:
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
            await self.collection.insert_one(lease)
            return True
        current = await self.collection.find_one({"_id": name})
        if current is None:
            return False  # given back meanwhile: this race is lost, as any other
        left = as_utc(current["expires_at"]) - now
        if current["owner"] == owner and left > LEASE_RELEASE_MARGIN:
            await self.collection.update_one(
                {"_id": name}, {"$set": {"expires_at": lease["expires_at"]}}
            )
            return True
        if left > timedelta(0) or not await self._claim_expired(current):
            return False
        try:
            await self.collection.insert_one(lease)
        except DuplicateKeyError:
            return False  # someone's insert-first came between our delete and our insert
        return True

    async def take(
        self, name: str, owner: str, *, ttl_s: float, wait_s: float, poll_s: float = 0.1
    ) -> bool:
        """:meth:`try_take`, tried again every ``poll_s`` for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while not await self.try_take(name, owner, ttl_s=ttl_s):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def is_held(self, name: str) -> bool:
        """Whether the named lease exists and has not expired."""
        lease = await self.collection.find_one({"_id": name})
        return lease is not None and as_utc(lease["expires_at"]) > utcnow()

    async def _claim_expired(self, lease: Document) -> bool:
        """Remove an expired lease if we are the first to claim it (see :meth:`try_take`)."""
        claim = f"{lease['_id']}@{as_utc(lease['expires_at']).isoformat()}"
        try:
            await self.takeovers.insert_one(
                {"_id": claim, "expires_at": utcnow() + LEASE_TAKEOVER_CLAIM_TTL}
            )
        except DuplicateKeyError:
            return False
        # Nobody else deletes this lease: its owner no longer releases it, and only the
        # claim's winner removes it. Its exact expiry stays in the filter, so a claim that
        # wakes up long after (its record swept) matches nothing.
        await self.collection.delete_one({"_id": lease["_id"], "expires_at": lease["expires_at"]})
        return True

    async def release(self, name: str, owner: str) -> None:
        """Give the lease back if we still hold it.

        Only while it has more than ``LEASE_RELEASE_MARGIN`` to live: until it expires
        nobody else can take it or remove it, so the delete by ``_id`` alone (the one
        filter FerretDB looks up without reading every lease) removes ours. Nearer its end
        it is left to expire (and to the takeover claim of :meth:`try_take`).
        """
        current = await self.collection.find_one({"_id": name})
        if current is None or current.get("owner") != owner:
            return
        if as_utc(current["expires_at"]) - utcnow() > LEASE_RELEASE_MARGIN:
            await self.collection.delete_one({"_id": name})

    async def sweep_expired(self) -> dict[str, int]:
        """Remove expired records (FerretDB has no TTL indexes); returns counts per collection.

        Expired leases go through the same takeover claim as :meth:`try_take`, so the
        sweeper never removes a lease that someone took over a moment before.
        """
        now = utcnow()
        counts = {}
        for name in EXPIRING_COLLECTIONS:
            if name == "leases":
                expired = [doc async for doc in self.collection.find({"expires_at": {"$lt": now}})]
                counts[name] = sum([await self._claim_expired(doc) for doc in expired])
                continue
            result = await self._db[name].delete_many({"expires_at": {"$lt": now}})
            counts[name] = result.deleted_count
        return counts

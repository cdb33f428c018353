"""Synced events in MongoDB: encrypted, version-guarded, with an outbox mark per change.

Only the inbound worker that is the single active consumer of an account's shard writes
that account's event documents, so these writes never race each other (FerretDB's
updates are not atomic against concurrent writers). The version guard in the filter is a
second line of defence that holds on MongoDB even if two writers ever overlap.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from crypto import DataCipher, Hasher
from processor.store import SCHEMA_VERSION, Document, aad
from processor.timeutil import parse_graph_datetime, utcnow
from processor.timezones import event_time_to_utc

#: The event fields the service keeps (and asks Graph for with ``$select``).
KEPT_FIELDS: tuple[str, ...] = (
    "subject",
    "body",
    "start",
    "end",
    "isAllDay",
    "location",
    "attendees",
    "organizer",
    "showAs",
    "sensitivity",
    "recurrence",
    "type",
    "seriesMasterId",
    "iCalUId",
    "lastModifiedDateTime",
    "changeKey",
    "webLink",
    "isCancelled",
    "isOrganizer",
)


#: A stored event's version: (``lm``, keyed hash of the changeKey), as read back.
StoredVersion = tuple[datetime | None, str | None]


@dataclass(frozen=True)
class Change:
    """A real change written to the database, waiting to be announced to 1Relation."""

    account_id: str
    event_key: str
    change: str  # "upserted" | "deleted"
    last_modified: datetime | None
    seq: int
    relation_event_id: str | None = None


class EventStore:
    """Reads and writes the ``events`` collection."""

    def __init__(
        self, *, db: AsyncDatabase[Document], hasher: Hasher, tombstone_ttl_s: float
    ) -> None:
        self.collection = db["events"]
        self._hasher = hasher
        self._tombstone_ttl_s = tombstone_ttl_s

    def event_key(self, account_id: str, graph_id: str) -> str:
        """The service's stable identifier of a synced event (a keyed hash of Graph's id)."""
        return self._hasher.hash_id("event", account_id, graph_id)

    async def upsert_version(
        self,
        account_id: str,
        event: Mapping[str, Any],
        *,
        cipher: DataCipher,
        announce: bool = True,
        relation_event_id: str | None = None,
        known: dict[str, StoredVersion] | None = None,
    ) -> Change | None:
        """Store ``event`` unless the stored version is the same or newer; None when stale.

        Version order (DESIGN): ``lastModifiedDateTime`` first; on an equal timestamp a
        different ``changeKey`` wins, because this fetch is later than the stored one.
        ``known`` (from :meth:`stored_versions`, kept up to date here) saves the read of
        the stored version: a key missing from it is taken as not stored.
        """
        graph_id = str(event["id"])
        key = self.event_key(account_id, graph_id)
        last_modified = parse_graph_datetime(str(event["lastModifiedDateTime"]))
        change_key = self._hasher.hash_id("change_key", account_id, str(event.get("changeKey", "")))
        content = {field: event[field] for field in KEPT_FIELDS if field in event}
        start = event_time_to_utc(event.get("start"))
        end = event_time_to_utc(event.get("end"))
        series_id = event.get("seriesMasterId")
        seq = time.time_ns()
        fields: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "account_id": account_id,
            "gid_ct": cipher.encrypt_str(graph_id, aad("events", account_id, key, "gid")),
            "doc_ct": cipher.encrypt_json(content, aad("events", account_id, key, "doc")),
            "lm": last_modified,
            "ck": change_key,
            "deleted": False,
            "start": start,
            "end": end,
            "type": event.get("type", "singleInstance"),
            "series": self.event_key(account_id, str(series_id)) if series_id else None,
            "relation_event_id": relation_event_id,
            "updated_at": utcnow(),
        }
        unset: dict[str, str] = {"expires_at": ""}
        if announce:
            fields["announce"] = {
                "seq": seq,
                "change": "upserted",
                "last_modified": last_modified,
                "relation_event_id": relation_event_id,
            }
        # Without a mark the write is our own echo: nothing to tell 1Relation (an older
        # change's unannounced mark, if any, is left for the outbox to send).
        if not await self._write_if_newer(
            key, last_modified, change_key, fields, unset, known=known
        ):
            return None
        if not announce:
            return None
        return Change(account_id, key, "upserted", last_modified, seq, relation_event_id)

    async def _write_if_newer(
        self,
        key: str,
        last_modified: datetime,
        change_key: str,
        fields: dict[str, Any],
        unset: dict[str, str],
        *,
        known: dict[str, StoredVersion] | None = None,
    ) -> bool:
        """Write unless the stored version is the same or newer; False when stale.

        FerretDB's SQLite backend pushes a filter down only when it is exactly ``{_id: …}``:
        the version guard inside the upsert's filter (``$or``) made every write scan the
        whole collection (seconds per write at a few thousand events). So the stored version
        is read by ``_id`` (or taken from ``known``), compared here, and a new event is an
        insert; an existing one is updated with a compare-and-swap on the version read
        (atomic on MongoDB; on FerretDB that filter still scans, and the account's shard
        owner is the only writer anyway). A lost race decides again.
        """
        # BSON keeps milliseconds: compare at the precision the stored value has.
        wanted = last_modified.replace(microsecond=last_modified.microsecond // 1000 * 1000)
        for attempt in range(3):
            if attempt == 0 and known is not None:
                hint = known.get(key)
                stored = None if hint is None else {"lm": hint[0], "ck": hint[1]}
            else:
                stored = await self.collection.find_one({"_id": key}, {"lm": 1, "ck": 1})
            if stored is not None:
                stored_lm = stored.get("lm")
                if isinstance(stored_lm, datetime):
                    if stored_lm.tzinfo is None:
                        stored_lm = stored_lm.replace(tzinfo=UTC)
                    if stored_lm > wanted or (
                        stored_lm == wanted and stored.get("ck") == change_key
                    ):
                        return False
            try:
                if stored is None:
                    await self.collection.insert_one({"_id": key, **fields})
                    if known is not None:
                        known[key] = (wanted, change_key)
                    return True
                result = await self.collection.update_one(
                    {"_id": key, "lm": stored.get("lm"), "ck": stored.get("ck")},
                    {"$set": fields, "$unset": unset},
                )
            except DuplicateKeyError:
                continue  # inserted meanwhile: decide again against that version
            if result.matched_count:
                if known is not None:
                    known[key] = (wanted, change_key)
                return True
        return False

    async def stored_versions(self, account_id: str) -> dict[str, StoredVersion]:
        """The stored version of every event of the account, tombstones included.

        One scan for a bulk pass: on FerretDB's SQLite backend a read by ``_id`` that finds
        nothing scans the whole collection, so a backfill must not read once per event.
        """
        cursor = self.collection.find({"account_id": account_id}, {"lm": 1, "ck": 1})
        return {str(doc["_id"]): (doc.get("lm"), doc.get("ck")) async for doc in cursor}

    async def mark_deleted(self, account_id: str, event_key: str) -> Change | None:
        """Turn a live event into a tombstone (content erased); None if absent or deleted.

        The tombstone keeps the last version, so a late fetch of that version or an older
        one cannot resurrect the event; it expires after the tombstone TTL.
        """
        doc = await self.collection.find_one(
            {"_id": event_key, "account_id": account_id},
            {"deleted": 1, "lm": 1, "relation_event_id": 1},
        )
        if doc is None or doc.get("deleted"):
            return None
        seq = time.time_ns()
        now = utcnow()
        await self.collection.update_one(
            {"_id": event_key, "account_id": account_id},
            {
                "$set": {
                    "deleted": True,
                    "expires_at": now + timedelta(seconds=self._tombstone_ttl_s),
                    "announce": {
                        "seq": seq,
                        "change": "deleted",
                        "last_modified": doc.get("lm"),
                        "relation_event_id": doc.get("relation_event_id"),
                    },
                    "updated_at": now,
                },
                "$unset": {"doc_ct": ""},
            },
        )
        return Change(
            account_id, event_key, "deleted", doc.get("lm"), seq, doc.get("relation_event_id")
        )

    async def series_instance_keys(self, account_id: str, series_key: str) -> set[str]:
        """Keys of the live stored occurrences and exceptions of a series."""
        cursor = self.collection.find(
            {"account_id": account_id, "series": series_key, "deleted": False}, {"_id": 1}
        )
        return {doc["_id"] async for doc in cursor}

    async def live_keys(self, account_id: str) -> set[str]:
        """Keys of every live (not deleted) event of the account."""
        cursor = self.collection.find({"account_id": account_id, "deleted": False}, {"_id": 1})
        return {doc["_id"] async for doc in cursor}

    async def count_live(self, account_id: str) -> int:
        """How many live events the account has."""
        return await self.collection.count_documents({"account_id": account_id, "deleted": False})

    async def pending_announcements(self, account_id: str) -> list[Change]:
        """Changes of the account written but not yet announced (the outbox)."""
        cursor = self.collection.find(
            {"account_id": account_id, "announce": {"$exists": True}}, {"announce": 1}
        )
        return [
            Change(
                account_id,
                doc["_id"],
                doc["announce"]["change"],
                doc["announce"].get("last_modified"),
                int(doc["announce"]["seq"]),
                doc["announce"].get("relation_event_id"),
            )
            async for doc in cursor
        ]

    async def accounts_with_pending_announcements(self, *, older_than_s: float) -> set[str]:
        """Accounts whose outbox holds a change older than ``older_than_s`` seconds."""
        cutoff = time.time_ns() - int(older_than_s * 1e9)
        cursor = self.collection.find(
            {"announce.seq": {"$lt": cutoff}}, {"account_id": 1, "announce": 1}
        )
        return {doc["account_id"] async for doc in cursor}

    async def clear_announcement(self, change: Change) -> None:
        """Remove the outbox mark of ``change`` unless a newer change replaced it."""
        await self.collection.update_one(
            {"_id": change.event_key, "announce.seq": change.seq}, {"$unset": {"announce": ""}}
        )

    async def find_live_in_window(
        self, account_id: str, start: datetime, end: datetime
    ) -> list[Document]:
        """Live events overlapping ``[start, end)``."""
        cursor = self.collection.find(
            {
                "account_id": account_id,
                "deleted": False,
                "start": {"$lt": end},
                "end": {"$gt": start},
            }
        )
        return [doc async for doc in cursor]

    def decrypt(self, doc: Mapping[str, Any], cipher: DataCipher) -> tuple[str, dict[str, Any]]:
        """Graph's id and the kept fields of a stored event."""
        account_id = str(doc["account_id"])
        key = str(doc["_id"])
        graph_id = cipher.decrypt_str(doc["gid_ct"], aad("events", account_id, key, "gid"))
        content = cipher.decrypt_json(doc["doc_ct"], aad("events", account_id, key, "doc"))
        assert isinstance(content, dict)
        return graph_id, content

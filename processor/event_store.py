"""Synced events in MongoDB: encrypted, version-guarded, with an outbox mark per change.

Only the inbound worker that is the single active consumer of an account's shard writes
that account's event documents, so these writes never race each other (FerretDB's
updates are not atomic against concurrent writers). The version guard in the filter is a
second line of defence that holds on MongoDB even if two writers ever overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contract.storage import SCHEMA_VERSION, aad
from crypto import DataCipher, Hasher
from handlers.decisions import Version, is_newer
from handlers.records import KEPT_FIELDS, Change, StoredVersion, next_sequence
from handlers.timeutil import parse_graph_datetime, utcnow
from handlers.timezones import event_time_to_utc
from processor.repositories.base import Document


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

        Version order (docs/design.md): ``lastModifiedDateTime`` first; on an equal timestamp a
        different ``changeKey`` wins, because this fetch is later than the stored one.
        ``known`` (from :meth:`stored_versions`, kept up to date here) saves the read of
        the stored version: a key missing from it is taken as not stored.
        """
        graph_id = str(event["id"])
        key = self.event_key(account_id, graph_id)
        lm_text = str(event["lastModifiedDateTime"])
        last_modified = parse_graph_datetime(lm_text)
        change_key = self.change_key_hash(account_id, str(event.get("changeKey", "")))
        content = {field: event[field] for field in KEPT_FIELDS if field in event}
        start = event_time_to_utc(event.get("start"))
        end = event_time_to_utc(event.get("end"))
        series_id = event.get("seriesMasterId")
        fields: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "account_id": account_id,
            "gid_ct": cipher.encrypt_str(graph_id, aad("events", account_id, key, "gid")),
            "doc_ct": cipher.encrypt_json(content, aad("events", account_id, key, "doc")),
            "lm": last_modified,
            "lm_text": lm_text,
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

        def mark(previous_seq: Any) -> int | None:
            # Without a mark the write is our own echo: nothing to tell 1Relation (an
            # older change's unannounced mark, if any, is left for the outbox to send).
            if not announce:
                return None
            seq = next_sequence(previous_seq)
            fields["aseq"] = seq
            fields["announce"] = {
                "seq": seq,
                "change": "upserted",
                "last_modified": last_modified,
                "last_modified_text": lm_text,
                "relation_event_id": relation_event_id,
            }
            return seq

        written = await self._write_if_newer(
            key, Version(last_modified, change_key), fields, unset, mark, known=known
        )
        if written is None or not announce:
            return None
        return Change(
            account_id, key, "upserted", last_modified, written, relation_event_id, lm_text
        )

    async def _write_if_newer(
        self,
        key: str,
        fetched: Version,
        fields: dict[str, Any],
        unset: dict[str, str],
        mark: Callable[[Any], int | None],
        *,
        known: dict[str, StoredVersion] | None = None,
    ) -> int | None:
        """Write unless the stored version is the same or newer (:func:`is_newer`); None when
        stale, else the announcement's sequence (0 when the write announces nothing).

        The stored version is read by ``_id`` (or taken from ``known``) and compared here; a
        new event is an insert, an existing one an update with a compare-and-swap on the
        version read (FerretDB's SQLite backend pushed down only ``{_id: …}``, so a version
        guard inside the filter scanned the collection). A lost race decides again.
        """
        # BSON keeps milliseconds: compare at the precision the stored value has.
        lm = fetched.last_modified
        fetched = Version(lm.replace(microsecond=lm.microsecond // 1000 * 1000), fetched.change_key)
        for attempt in range(3):
            stored: Mapping[str, Any] | None
            if attempt == 0 and known is not None:
                hint = known.get(key)
                stored = None if hint is None else {"lm": hint[0], "ck": hint[1], "aseq": hint[2]}
            else:
                stored = await self.collection.find_one({"_id": key}, {"lm": 1, "ck": 1, "aseq": 1})
            if stored is not None and not is_newer(_version_of(stored), fetched):
                return None
            seq = mark(None if stored is None else stored.get("aseq"))
            try:
                if stored is None:
                    await self.collection.insert_one({"_id": key, **fields})
                    result_matched = 1
                else:
                    result = await self.collection.update_one(
                        {"_id": key, "lm": stored.get("lm"), "ck": stored.get("ck")},
                        {"$set": fields, "$unset": unset},
                    )
                    result_matched = result.matched_count
            except DuplicateKeyError:
                continue  # inserted meanwhile: decide again against that version
            if result_matched:
                if known is not None:
                    previous = 0 if stored is None else int(stored.get("aseq") or 0)
                    known[key] = (fetched.last_modified, fetched.change_key, seq or previous)
                return seq or 0
        return None

    async def stored_versions(self, account_id: str) -> dict[str, StoredVersion]:
        """The stored version of every event of the account, tombstones included.

        One scan for a bulk pass: on FerretDB's SQLite backend a read by ``_id`` that finds
        nothing scans the whole collection, so a backfill must not read once per event.
        """
        cursor = self.collection.find({"account_id": account_id}, {"lm": 1, "ck": 1, "aseq": 1})
        return {
            str(doc["_id"]): (doc.get("lm"), doc.get("ck"), int(doc.get("aseq") or 0))
            async for doc in cursor
        }

    async def mark_deleted(
        self, account_id: str, event_key: str, *, announce: bool = True
    ) -> Change | None:
        """Turn a live event into a tombstone (content erased); None if absent or deleted,
        or when ``announce`` is False (the service's own deletion: nothing to tell).

        The tombstone keeps the last version, so a late fetch of that version or an older
        one cannot resurrect the event; it expires after the tombstone TTL.
        """
        doc = await self.collection.find_one(
            {"_id": event_key, "account_id": account_id},
            {"deleted": 1, "lm": 1, "lm_text": 1, "relation_event_id": 1, "aseq": 1},
        )
        if doc is None or doc.get("deleted"):
            return None
        now = utcnow()
        fields: dict[str, Any] = {
            "deleted": True,
            "expires_at": now + timedelta(seconds=self._tombstone_ttl_s),
            "updated_at": now,
        }
        seq = next_sequence(doc.get("aseq"))
        if announce:
            fields["aseq"] = seq
            fields["announce"] = {
                "seq": seq,
                "change": "deleted",
                "last_modified": doc.get("lm"),
                "last_modified_text": doc.get("lm_text"),
                "relation_event_id": doc.get("relation_event_id"),
            }
        await self.collection.update_one(
            {"_id": event_key, "account_id": account_id},
            {"$set": fields, "$unset": {"doc_ct": ""}},
        )
        if not announce:
            return None
        return Change(
            account_id,
            event_key,
            "deleted",
            doc.get("lm"),
            seq,
            doc.get("relation_event_id"),
            doc.get("lm_text"),
        )

    async def stored_version(self, account_id: str, event_key: str) -> tuple[str | None, bool]:
        """The stored event's change key hash and whether it is a tombstone (None: absent)."""
        doc = await self.collection.find_one(
            {"_id": event_key, "account_id": account_id}, {"ck": 1, "deleted": 1}
        )
        if doc is None:
            return None, False
        return doc.get("ck"), bool(doc.get("deleted"))

    def change_key_hash(self, account_id: str, change_key: str) -> str:
        """The keyed hash under which a change key is stored (``ck``)."""
        return self._hasher.hash_id("change_key", account_id, change_key)

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
                doc["announce"].get("last_modified_text"),
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

    async def page_in_window(
        self,
        account_id: str,
        start: datetime,
        end: datetime,
        *,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Document]:
        """Up to ``limit`` live events overlapping ``[start, end)`` in (start, key) order,
        those after the cursor ``after`` (the last page's start and key) only."""
        query: dict[str, Any] = {
            "account_id": account_id,
            "deleted": False,
            "start": {"$lt": end},
            "end": {"$gt": start},
        }
        if after is not None:
            query["$or"] = [
                {"start": {"$gt": after[0]}},
                {"start": after[0], "_id": {"$gt": after[1]}},
            ]
        cursor = self.collection.find(query).sort([("start", 1), ("_id", 1)]).limit(limit)
        return await cursor.to_list()

    async def live_docs(
        self, account_id: str, keys: Sequence[str] | None = None
    ) -> dict[str, Document]:
        """The account's live events (only those of ``keys`` when given): their extent,
        series and encrypted Graph id."""
        fields = {"start": 1, "end": 1, "series": 1, "type": 1, "gid_ct": 1}
        if keys is None:
            cursor = self.collection.find({"account_id": account_id, "deleted": False}, fields)
            return {str(doc["_id"]): doc async for doc in cursor}
        found: dict[str, Document] = {}
        for key in sorted(keys):  # by _id each: served by the primary key everywhere
            doc = await self.collection.find_one(
                {"_id": key, "account_id": account_id, "deleted": False}, fields
            )
            if doc is not None:
                found[key] = doc
        return found

    async def live_documents(self, account_id: str) -> list[Document]:
        """The account's live events, whole (for :meth:`decrypt`)."""
        cursor = self.collection.find({"account_id": account_id, "deleted": False})
        return [doc async for doc in cursor]

    def graph_id_of(self, account_id: str, doc: Mapping[str, Any], cipher: DataCipher) -> str:
        """Graph's id of a stored event of the account (a document of :meth:`live_docs`)."""
        key = str(doc["_id"])
        return cipher.decrypt_str(doc["gid_ct"], aad("events", account_id, key, "gid"))

    async def live_state(
        self, event_key: str, cipher: DataCipher
    ) -> tuple[dict[str, Any], datetime | None] | None:
        """The kept fields and stored ``lastModified`` of a live event; None if absent."""
        doc = await self.collection.find_one({"_id": event_key, "deleted": False})
        if doc is None:
            return None
        return self.decrypt(doc, cipher)[1], doc.get("lm")

    def decrypt(self, doc: Mapping[str, Any], cipher: DataCipher) -> tuple[str, dict[str, Any]]:
        """Graph's id and the kept fields of a stored event."""
        account_id = str(doc["account_id"])
        key = str(doc["_id"])
        graph_id = cipher.decrypt_str(doc["gid_ct"], aad("events", account_id, key, "gid"))
        content = cipher.decrypt_json(doc["doc_ct"], aad("events", account_id, key, "doc"))
        assert isinstance(content, dict)
        return graph_id, content


def _version_of(stored: Mapping[str, Any]) -> Version | None:
    """The stored version as :func:`is_newer` takes it (None: no readable version)."""
    stored_lm = stored.get("lm")
    if not isinstance(stored_lm, datetime):
        return None
    if stored_lm.tzinfo is None:
        stored_lm = stored_lm.replace(tzinfo=UTC)
    return Version(stored_lm, str(stored.get("ck")))

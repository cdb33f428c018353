"""Links between 1Relation's events and Graph's, with what is needed to suppress echoes.

A link is written only by the outbound consumer that is the single active consumer of the
account's outbound shard. The inbound worker only reads links: to recognise the
notification about the service's own write (an *echo*) and to name the
``relation_event_id`` in announcements. No document is written by two roles.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contract.storage import SCHEMA_VERSION, aad
from crypto import DataCipher, DecryptionError, Hasher
from handlers.decisions import comparable
from handlers.records import Link
from handlers.timeutil import utcnow
from processor.repositories.base import Document

#: How long a write in flight makes a matching notification count as our echo.
PENDING_ECHO_WINDOW_S = 120.0
#: How many of our own change keys a link remembers.
ECHO_MEMORY = 10


class LinkStore:
    """The ``links`` collection and its ``link_index`` (event key → link)."""

    def __init__(self, *, db: AsyncDatabase[Document], hasher: Hasher) -> None:
        self.links = db["links"]
        self.index = db["link_index"]
        self.parked = db["parked"]
        self._hasher = hasher

    def link_id(self, account_id: str, relation_event_id: str) -> str:
        """The link's key: a keyed hash of account and 1Relation event id."""
        return self._hasher.hash_id("link", account_id, relation_event_id)

    async def get(self, account_id: str, relation_event_id: str, cipher: DataCipher) -> Link:
        """The link, or a fresh empty one (not yet stored)."""
        link_id = self.link_id(account_id, relation_event_id)
        doc = await self.links.find_one({"_id": link_id})
        if doc is None:
            return Link(
                link_id, account_id, relation_event_id, -1, None, None, {}, None, False, -1, 0
            )
        return self._decode(doc, cipher)

    def _decode(self, doc: Mapping[str, Any], cipher: DataCipher) -> Link:
        account_id = str(doc["account_id"])
        link_id = str(doc["_id"])
        graph_id = None
        if doc.get("gid_ct"):
            graph_id = cipher.decrypt_str(doc["gid_ct"], aad("links", account_id, link_id, "gid"))
        state: dict[str, Any] = {}
        if doc.get("state_ct"):
            state = cipher.decrypt_json(doc["state_ct"], aad("links", account_id, link_id, "state"))
        return Link(
            link_id=link_id,
            account_id=account_id,
            relation_event_id=str(doc["relation_event_id"]),
            applied_revision=int(doc.get("applied_revision", -1)),
            graph_id=graph_id,
            event_key=doc.get("event_key"),
            state=state,
            base_lm=doc.get("base_lm"),
            deleted=bool(doc.get("deleted")),
            deleted_revision=int(doc.get("deleted_revision", -1)),
            generation=int(doc.get("generation", 0)),
        )

    async def record_intent(
        self,
        link: Link,
        *,
        revision: int,
        intended: Mapping[str, Any],
        cipher: DataCipher,
        op: str = "upsert",
        transaction_id: str | None = None,
    ) -> None:
        """Before a Graph write: remember what is about to be written (its notification may
        be handled before the write's answer is).

        A create names its ``transactionId``: the inbound worker finds the link through it
        before the new event's id is known here. A delete names the event it removes.
        """
        pending: dict[str, Any] = {
            "revision": revision,
            "op": op,
            "started_at": utcnow(),
            "intended_ct": cipher.encrypt_json(
                dict(intended), aad("links", link.account_id, link.link_id, "pending")
            ),
        }
        if op == "delete" and link.event_key:
            pending["event_key"] = link.event_key
        await self.links.update_one(
            {"_id": link.link_id},
            {
                "$set": {
                    "schema": SCHEMA_VERSION,
                    "account_id": link.account_id,
                    "relation_event_id": link.relation_event_id,
                    "pending": pending,
                },
                "$setOnInsert": {"applied_revision": -1, "generation": link.generation},
            },
            upsert=True,
        )
        if transaction_id is not None:
            with contextlib.suppress(DuplicateKeyError):  # a retry of the same create
                await self.index.insert_one(
                    {
                        "_id": self.transaction_key(link.account_id, transaction_id),
                        "link_id": link.link_id,
                        "account_id": link.account_id,
                    }
                )

    def transaction_key(self, account_id: str, transaction_id: str) -> str:
        """The ``link_index`` key of a create's ``transactionId``."""
        return self._hasher.hash_id("transaction", account_id, transaction_id)

    def change_key_hash(self, account_id: str, change_key: str) -> str:
        """The keyed hash under which change keys are stored and compared."""
        return self._hasher.hash_id("change_key", account_id, change_key)

    async def record_written(
        self,
        link: Link,
        *,
        revision: int,
        graph_id: str,
        event_key: str,
        state: Mapping[str, Any],
        change_key: str | None,
        last_modified: datetime | None,
        cipher: DataCipher,
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        """After a Graph write: the mapping, the new base state, our change key and Graph's
        answer (the event as written, which the inbound worker stores instead of a GET)."""
        doc = await self.links.find_one({"_id": link.link_id}, {"echo": 1})
        echo = list((doc or {}).get("echo") or [])
        written: dict[str, Any] = {}
        if change_key:
            written["written_ck"] = self.change_key_hash(link.account_id, change_key)
            echo.append(written["written_ck"])
            if answer is not None:
                written["written_ct"] = cipher.encrypt_json(
                    dict(answer), aad("links", link.account_id, link.link_id, "written")
                )
        await self.links.update_one(
            {"_id": link.link_id},
            {
                "$set": {
                    **written,
                    "applied_revision": revision,
                    "gid_ct": cipher.encrypt_str(
                        graph_id, aad("links", link.account_id, link.link_id, "gid")
                    ),
                    "event_key": event_key,
                    "state_ct": cipher.encrypt_json(
                        dict(state), aad("links", link.account_id, link.link_id, "state")
                    ),
                    "base_lm": last_modified,
                    "echo": echo[-ECHO_MEMORY:],
                    "deleted": False,
                    "updated_at": utcnow(),
                },
                "$unset": {"pending": "", "expires_at": ""},
            },
        )
        with contextlib.suppress(DuplicateKeyError):  # already indexed
            await self.index.insert_one(
                {"_id": event_key, "link_id": link.link_id, "account_id": link.account_id}
            )

    async def record_revision(self, link: Link, revision: int) -> None:
        """A revision that needed no Graph write (nothing changed) is still applied."""
        await self.links.update_one(
            {"_id": link.link_id},
            {
                "$set": {"applied_revision": revision, "updated_at": utcnow()},
                "$unset": {"pending": ""},
            },
        )

    async def record_deleted(
        self, link: Link, revision: int, *, tombstone_ttl_s: float, by_us: bool = True
    ) -> None:
        """The event is gone: keep a tombstone so an older upsert cannot resurrect it.

        ``by_us``: the service deleted it for 1Relation, so Graph's notification of the
        deletion is our echo; the index entry stays so that the inbound worker finds it.
        """
        deleted_keys: list[str] = []
        if by_us and link.event_key:
            doc = await self.links.find_one({"_id": link.link_id}, {"deleted_keys": 1})
            deleted_keys = [*((doc or {}).get("deleted_keys") or []), link.event_key]
        await self.links.update_one(
            {"_id": link.link_id},
            {
                "$set": {
                    "schema": SCHEMA_VERSION,
                    "account_id": link.account_id,
                    "relation_event_id": link.relation_event_id,
                    "applied_revision": revision,
                    "deleted": True,
                    "deleted_revision": revision,
                    "deleted_keys": deleted_keys[-ECHO_MEMORY:],
                    "generation": link.generation + 1,
                    "expires_at": utcnow() + timedelta(seconds=tombstone_ttl_s),
                    "updated_at": utcnow(),
                },
                "$unset": {
                    "pending": "",
                    "state_ct": "",
                    "gid_ct": "",
                    "written_ct": "",
                    "written_ck": "",
                },
            },
            upsert=True,
        )
        if link.event_key and not by_us:
            await self.index.delete_one({"_id": link.event_key})

    # ------------------------------------------------------------------ read by inbound

    async def doc_for(
        self, account_id: str, event_key: str, transaction_id: str | None = None
    ) -> Document | None:
        """The link of a synced event, found by its key or else by its create's
        ``transactionId`` (known before Graph's answer to the create is)."""
        entry = await self.index.find_one({"_id": event_key})
        if entry is None and transaction_id:
            entry = await self.index.find_one(
                {"_id": self.transaction_key(account_id, transaction_id)}
            )
        if entry is None or entry.get("account_id") != account_id:
            return None
        return await self.links.find_one({"_id": entry["link_id"]})

    def is_echo(
        self,
        doc: Mapping[str, Any] | None,
        account_id: str,
        event: Mapping[str, Any],
        cipher: DataCipher,
    ) -> bool:
        """Whether ``event`` (as fetched) is a version the service itself wrote."""
        if doc is None:
            return False
        change_key = event.get("changeKey")
        if change_key and self.change_key_hash(account_id, str(change_key)) in (
            doc.get("echo") or []
        ):
            return True
        pending = doc.get("pending")
        if (
            pending
            and pending.get("op", "upsert") == "upsert"
            and (utcnow() - _aware(pending["started_at"])).total_seconds() < PENDING_ECHO_WINDOW_S
        ):
            intended = cipher.decrypt_json(
                pending["intended_ct"], aad("links", account_id, str(doc["_id"]), "pending")
            )
            fetched = comparable({k: event.get(k) for k in intended})
            if fetched == comparable(intended):
                return True
        return False

    @staticmethod
    def deleted_by_us(doc: Mapping[str, Any] | None, event_key: str) -> bool:
        """Whether the service deleted (or is deleting) this event for 1Relation."""
        if doc is None:
            return False
        if event_key in (doc.get("deleted_keys") or []):
            return True
        pending = doc.get("pending") or {}
        return bool(pending.get("op") == "delete" and pending.get("event_key") == event_key)

    @staticmethod
    def echo_hashes(doc: Mapping[str, Any] | None) -> set[str]:
        """Hashes of the change keys of the service's own writes to this event."""
        return set((doc or {}).get("echo") or [])

    def written(
        self, doc: Mapping[str, Any] | None, account_id: str, cipher: DataCipher
    ) -> tuple[str, dict[str, Any]] | None:
        """The service's last write to the event as Graph answered it, with its change key hash."""
        if doc is None or not doc.get("written_ct") or not doc.get("written_ck"):
            return None
        try:
            answer = cipher.decrypt_json(
                doc["written_ct"], aad("links", account_id, str(doc["_id"]), "written")
            )
        except DecryptionError:
            return None
        return str(doc["written_ck"]), answer

    async def indexed_keys(self, account_id: str) -> set[str]:
        """Every ``link_index`` key of the account (event keys and create transactions)."""
        cursor = self.index.find({"account_id": account_id}, {"_id": 1})
        return {str(doc["_id"]) async for doc in cursor}

    async def relation_ids(self, account_id: str, event_keys: list[str]) -> dict[str, str]:
        """The 1Relation event linked to each of ``event_keys`` (written by the outbound role)."""
        if not event_keys:
            return {}
        cursor = self.links.find(
            {"account_id": account_id, "event_key": {"$in": event_keys}, "deleted": {"$ne": True}},
            {"event_key": 1, "relation_event_id": 1},
        )
        return {
            str(doc["event_key"]): str(doc["relation_event_id"])
            async for doc in cursor
            if doc.get("relation_event_id") is not None
        }

    async def echo_of(
        self,
        account_id: str,
        event_key: str,
        event: Mapping[str, Any],
        cipher: DataCipher,
    ) -> tuple[bool, str | None]:
        """Whether ``event`` (as just fetched) is our own write, and the linked 1Relation id."""
        doc = await self.doc_for(account_id, event_key, _str_or_none(event.get("transactionId")))
        if doc is None:
            return False, None
        return self.is_echo(doc, account_id, event, cipher), str(doc["relation_event_id"])

    # ------------------------------------------------------------------ parked messages

    async def park(
        self, account_id: str, relation_event_id: str, revision: int, body: Mapping[str, Any]
    ) -> None:
        """Keep a message of an account that cannot write; replayed in order on reconnect.

        ``body`` is the shard message, whose event content is already ciphertext.
        """
        with contextlib.suppress(DuplicateKeyError):  # a redelivery of a parked message
            await self.parked.insert_one(
                {
                    "_id": self._hasher.hash_id(
                        "parked", account_id, relation_event_id, str(revision)
                    ),
                    "account_id": account_id,
                    "relation_event_id": relation_event_id,
                    "revision": revision,
                    "seq": time.time_ns(),
                    "body": dict(body),
                    "parked_at": utcnow(),
                }
            )

    async def parked_for(self, account_id: str) -> list[Document]:
        """The account's parked messages, oldest first."""
        cursor = self.parked.find({"account_id": account_id}).sort("seq", 1)
        return [doc async for doc in cursor]

    async def unpark(self, parked_id: str) -> None:
        """Remove a parked message once it has been applied."""
        await self.parked.delete_one({"_id": parked_id})

    async def count_parked(self, account_id: str) -> int:
        """How many of the account's messages wait."""
        return await self.parked.count_documents({"account_id": account_id})

    async def take_expired_parked(self, account_id: str, parked_before: datetime) -> list[Document]:
        """Remove and return the account's messages parked before ``parked_before``.

        Each is returned by the one caller whose delete removed it, so a message dropped
        while two processes sweep is reported once.
        """
        cursor = self.parked.find(
            {"account_id": account_id, "parked_at": {"$lt": parked_before}},
            {"relation_event_id": 1, "revision": 1},
        )
        taken = []
        async for doc in cursor:
            result = await self.parked.delete_one({"_id": doc["_id"]})
            if result.deleted_count:
                taken.append(doc)
        return taken

    async def oldest_parked(self) -> dict[str, datetime]:
        """Accounts that have messages waiting, with when their oldest was parked."""
        oldest: dict[str, datetime] = {}
        async for doc in self.parked.find({}, {"account_id": 1, "parked_at": 1}):
            account_id, parked_at = str(doc["account_id"]), _aware(doc["parked_at"])
            if account_id not in oldest or parked_at < oldest[account_id]:
                oldest[account_id] = parked_at
        return oldest


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None

"""Checks that the database says what Microsoft 365 says: used by the demo and the tests.

Reads the account's documents, decrypts them, and compares them field by field with the
simulator's ground truth; also scans every collection for plaintext that must not be
there. Nothing here is imported by the service roles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bson import Binary

from handlers.records import KEPT_FIELDS
from processor.event_store import EventStore
from processor.repositories.readings import DatabaseScan
from processor.store import Store


@dataclass
class Diff:
    """How the database differs from the ground truth."""

    missing: list[str] = field(default_factory=list)  # in Graph, not (live) in the database
    unexpected: list[str] = field(default_factory=list)  # live in the database, not in Graph
    mismatched: list[tuple[str, str]] = field(default_factory=list)  # (graph id, field)
    compared: int = 0

    @property
    def ok(self) -> bool:
        """True when the database equals the ground truth."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line for logs and assertion messages."""
        return (
            f"compared={self.compared} missing={len(self.missing)} "
            f"unexpected={len(self.unexpected)} mismatched={self.mismatched[:5]}"
        )


def expected_events(
    masters_and_singles: Iterable[Mapping[str, Any]], calendar_view: Iterable[Mapping[str, Any]]
) -> dict[str, Mapping[str, Any]]:
    """What the database should hold: every single and series master, plus the window's
    occurrences and exceptions (a calendar view expands series, it has no masters)."""
    expected = {str(e["id"]): e for e in masters_and_singles}
    for instance in calendar_view:
        if instance.get("type") in ("occurrence", "exception"):
            expected[str(instance["id"])] = instance
    return expected


async def diff_account(
    store: Store,
    events: EventStore,
    account_id: str,
    expected: Mapping[str, Mapping[str, Any]],
) -> Diff:
    """Compare the account's live events, decrypted, with ``expected`` (by Graph id)."""
    cipher = await store.keys.cipher_for(account_id)
    diff = Diff()
    seen: set[str] = set()
    for doc in await events.live_documents(account_id):
        graph_id, content = events.decrypt(doc, cipher)
        seen.add(graph_id)
        truth = expected.get(graph_id)
        if truth is None:
            diff.unexpected.append(graph_id)
            continue
        diff.compared += 1
        for name in KEPT_FIELDS:
            if name in truth and content.get(name) != truth[name]:
                diff.mismatched.append((graph_id, name))
    diff.missing = sorted(set(expected) - seen)
    return diff


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes | Binary):
        yield bytes(value).decode("latin-1")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, datetime | int | float | bool) or value is None:
        return
    else:
        yield str(value)


async def plaintext_findings(store: Store, secrets: Iterable[str]) -> list[tuple[str, str]]:
    """(collection, needle) for every forbidden value found anywhere in the database."""
    needles = {s for s in secrets if s and len(s) >= 4}
    findings: list[tuple[str, str]] = []
    async for name, doc in DatabaseScan(db=store.db).documents():
        text = "\x00".join(_strings(doc))
        findings.extend((name, needle) for needle in needles if needle in text)
    return findings


def sensitive_values(events: Iterable[Mapping[str, Any]]) -> set[str]:
    """Subjects, bodies, locations, addresses and Microsoft ids of ``events``."""
    values: set[str] = set()
    for event in events:
        values.add(str(event.get("id", "")))
        values.add(str(event.get("subject") or ""))
        values.add(str((event.get("body") or {}).get("content") or ""))
        values.add(str((event.get("location") or {}).get("displayName") or ""))
        values.add(str(event.get("iCalUId") or ""))
        for person in [*(event.get("attendees") or []), event.get("organizer") or {}]:
            address = (person.get("emailAddress") or {}).get("address")
            if address:
                values.add(str(address))
    return {v for v in values if len(v) >= 4}

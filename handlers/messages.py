"""Message shapes the sync domain reads and writes: inbound work and 1Relation's event changes."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from handlers.timeutil import isoformat_z

INBOUND_SCHEMA = "m365sync.inbound.v1"
EVENT_CHANGE_SCHEMA = "m365sync.event-change.v1"
LIFECYCLE_SCHEMA = "m365sync.lifecycle.v1"
#: Seal purposes (crypto.seal_message): a message of one queue never passes as another's.
INBOUND_SEAL = "m365sync.inbound"
OUTBOUND_SEAL = "m365sync.outbound"


def event_ref_aad(account_id: str, event_hash: str) -> bytes:
    """Associated data of a sealed change message's ``event_ref``: account and event."""
    return f"inbound|{account_id}|{event_hash}|event_ref".encode()


def legacy_event_ref_aad(account_id: str) -> bytes:
    """``event_ref``'s associated data in unsealed messages from before sealing."""
    return f"inbound|{account_id}|event_ref".encode()


def b64(data: bytes) -> str:
    """Bytes as standard base64 text (ciphertext travels in JSON this way)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """The inverse of :func:`b64`; raises ``ValueError`` on malformed input."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def event_change_body(
    *,
    account_id: str,
    event_key: str,
    change: str,
    origin: str,
    last_modified: datetime | str | None,
    relation_event_id: str | None,
    sequence: int | None = None,
) -> dict[str, Any]:
    """docs/contract.md §3 ``m365sync.event-change.v1``: identifiers and versions only, no content.

    ``last_modified`` given as text is Graph's own ``lastModifiedDateTime`` (its full
    precision); ``sequence`` grows with every announcement for one ``event_key``.
    """
    lm: str | None = None
    if isinstance(last_modified, str):
        lm = last_modified
    elif last_modified is not None:
        lm = isoformat_z(last_modified)
    body: dict[str, Any] = {
        "schema": EVENT_CHANGE_SCHEMA,
        "account_id": account_id,
        "event_key": event_key,
        "change": change,
        "origin": origin,
        "last_modified": lm,
    }
    if sequence is not None:
        body["sequence"] = sequence
    if relation_event_id is not None:
        body["relation_event_id"] = relation_event_id
    return body

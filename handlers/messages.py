"""Message shapes the sync domain reads and writes: inbound work and 1Relation's event changes."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from handlers.timeutil import isoformat_z

INBOUND_SCHEMA = "m365sync.inbound.v1"
EVENT_CHANGE_SCHEMA = "m365sync.event-change.v1"


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
    """CONTRACT §3 ``m365sync.event-change.v1``: identifiers and versions only, no content.

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

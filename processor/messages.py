"""Shapes of the messages the service publishes for itself and to 1Relation."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from processor.timeutil import isoformat_z

INBOUND_SCHEMA = "m365sync.inbound.v1"
LIFECYCLE_SCHEMA = "m365sync.lifecycle.v1"
EVENT_CHANGE_SCHEMA = "m365sync.event-change.v1"

InboundKind = Literal["change", "changes", "resync"]
#: The most items a ``changes`` message may carry; more is not from our receiver.
MAX_CHANGES_ITEMS = 1000
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


def change_message(
    *,
    account_id: str,
    change_type: str,
    event_hash: str,
    event_ref_ct: bytes,
    received_at: datetime,
    etag_hash: str | None = None,
) -> dict[str, Any]:
    """A validated change notification: a hint to fetch one event's current state.

    The Graph event id travels encrypted under the account's key (``event_ref``); the keyed
    hash (``event_hash``) lets the worker coalesce duplicates without decrypting, and the
    keyed hash of the version's ``changeKey`` (``etag_hash``) lets it skip a fetch of a
    version it already has.
    """
    body = {
        "schema": INBOUND_SCHEMA,
        "kind": "change",
        "account_id": account_id,
        "change_type": change_type,
        "event_hash": event_hash,
        "event_ref": b64(event_ref_ct),
        "received_at": isoformat_z(received_at),
    }
    if etag_hash is not None:
        body["etag_hash"] = etag_hash
    return body


def changes_message(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several change messages in one (the receiver's group commit, one per shard queue).

    Each item is a whole :func:`change_message` body, so that the worker handles it exactly
    as it handles a change message of its own.
    """
    return {"schema": INBOUND_SCHEMA, "kind": "changes", "items": list(items)}


def split_changes(body: Mapping[str, Any]) -> list[Any] | None:
    """The items of a ``changes`` message; None for any other message.

    Raises ``ValueError`` when it is a ``changes`` message without a usable item list.
    The items are returned unchecked: each is validated on its own, so one bad item does
    not cost the others.
    """
    if body.get("kind") != "changes":
        return None
    items = body.get("items")
    if not isinstance(items, list) or not items or len(items) > MAX_CHANGES_ITEMS:
        raise ValueError("changes without a list of 1 to 1000 items")
    return items


def resync_message(
    *, account_id: str, reason: str, full: bool, requested_at: datetime
) -> dict[str, Any]:
    """A request to run a delta pass for an account (``full`` drops the stored delta link)."""
    return {
        "schema": INBOUND_SCHEMA,
        "kind": "resync",
        "account_id": account_id,
        "reason": reason,
        "full": full,
        "received_at": isoformat_z(requested_at),
    }


def lifecycle_message(
    *, account_id: str, subscription_hash: str, lifecycle_event: str, received_at: datetime
) -> dict[str, Any]:
    """A validated lifecycle notification for the subscription manager."""
    return {
        "schema": LIFECYCLE_SCHEMA,
        "account_id": account_id,
        "subscription_hash": subscription_hash,
        "lifecycle_event": lifecycle_event,
        "received_at": isoformat_z(received_at),
    }


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

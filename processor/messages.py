"""Shapes of the messages the service publishes for itself and to 1Relation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from handlers.messages import (
    INBOUND_SCHEMA,
    LIFECYCLE_SCHEMA,
    b64,
)
from handlers.timeutil import isoformat_z

__all__ = [
    "MAX_CHANGES_ITEMS",
    "change_message",
    "changes_message",
    "lifecycle_message",
    "resync_message",
    "split_changes",
]

InboundKind = Literal["change", "changes", "resync"]
#: The most items a ``changes`` message may carry; more is not from our receiver.
MAX_CHANGES_ITEMS = 1000


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

"""Checks of Graph change and lifecycle notifications (docs/design.md "What must always hold" 6, 7).

Pure: no I/O except through the given :class:`SubscriptionLookup`. A notification proves
nothing by itself: its subscription must be ours, its ``clientState`` must match the stored
hash (constant-time compare), its tenant must be the subscription's, and the mailbox in its
resource path must be the subscription's mailbox. What to fetch afterwards comes from our
record (``account_id``), never from the notification.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from crypto import Hasher, constant_time_equal
from handlers.ports import SubscriptionLookup, SubscriptionRecord

__all__ = [
    "CHANGE_TYPES",
    "DEFAULT_MAX_ITEMS",
    "LIFECYCLE_EVENTS",
    "Accepted",
    "AcceptedLifecycle",
    "MalformedBody",
    "Rejected",
    "change_key_of",
    "check_change",
    "check_lifecycle",
    "parse_collection",
]

DEFAULT_MAX_ITEMS: Final = 1000
CHANGE_TYPES: Final = frozenset({"created", "updated", "deleted"})
LIFECYCLE_EVENTS: Final = frozenset({"reauthorizationRequired", "subscriptionRemoved", "missed"})

# Bounds on what is hashed: Graph's ids are GUIDs or ~150-character event ids and
# clientState is at most 128 characters; anything far longer is not from Graph.
_MAX_FIELD_CHARS: Final = 512
_MAX_RESOURCE_CHARS: Final = 2048

# ``Users/{userId}/Events/{eventId}``: the words in any case (Graph's examples use both
# ``Users/…/Events/…`` and ``users/…/events/…``), the ids verbatim (Graph ids are
# case-sensitive). The OData key form ``Users('…')/Events('…')`` is accepted too.
_RESOURCE = re.compile(
    r"/?users(?:/(?P<user>[^/'()?#]+)|\('(?P<user_q>[^/'()?#]+)'\))"
    r"/events(?:/(?P<event>[^/'()?#]+)|\('(?P<event_q>[^/'()?#]+)'\))",
    re.IGNORECASE,
)


class MalformedBody(ValueError):
    """The request body is not a change-notification collection; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Accepted:
    """A change notification that passed every check: fetch ``event_id`` of ``account_id``."""

    account_id: str
    change_type: str
    event_id: str = field(repr=False)  # a Graph id: kept out of reprs and logs
    subscription_hash: str
    #: The ``changeKey`` of the version that caused the notification (from
    #: ``resourceData.@odata.etag``), None when Graph sent none or it is unusable.
    change_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AcceptedLifecycle:
    """A lifecycle notification that passed every check."""

    account_id: str
    lifecycle_event: str
    subscription_hash: str


@dataclass(frozen=True)
class Rejected:
    """An item that is dropped; ``reason`` is a short machine word for counters and logs."""

    reason: str
    subscription_hash: str | None = None


def parse_collection(body: bytes, *, max_items: int = DEFAULT_MAX_ITEMS) -> list[Any]:
    """The ``value`` list of a changeNotificationCollection, or raise :class:`MalformedBody`.

    The items are returned as they are: an item that is not an object is rejected on its
    own by :func:`check_change` so that one bad item does not cost the others.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, bad UTF-8 and over-long integers;
        # RecursionError a deeply nested document.
        raise MalformedBody("invalid_json") from None
    if not isinstance(document, dict):
        raise MalformedBody("not_an_object")
    items = document.get("value")
    if not isinstance(items, list):
        raise MalformedBody("missing_value")
    if len(items) > max_items:
        raise MalformedBody("too_many_items")
    return items


def _string_fields(item: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str] | Rejected:
    values: dict[str, str] = {}
    for name in names:
        value = item.get(name)
        if value is None or value == "":
            return Rejected("missing_field")
        limit = _MAX_RESOURCE_CHARS if name == "resource" else _MAX_FIELD_CHARS
        if not isinstance(value, str) or len(value) > limit:
            return Rejected("malformed_item")
        values[name] = value
    return values


async def _our_subscription(
    fields: Mapping[str, str], *, lookup: SubscriptionLookup, hasher: Hasher
) -> SubscriptionRecord | Rejected:
    """The subscription record when the item's subscription, clientState and tenant match."""
    subscription_hash = hasher.hash_id("subscription", fields["subscriptionId"])
    record = await lookup.find_subscription(subscription_hash)
    if record is None:
        return Rejected("unknown_subscription", subscription_hash)
    client_state_hash = hasher.hash_id("client_state", fields["clientState"])
    if not constant_time_equal(client_state_hash, record.client_state_hash):
        return Rejected("client_state_mismatch", subscription_hash)
    if not constant_time_equal(hasher.hash_id("tenant", fields["tenantId"]), record.tenant_hash):
        return Rejected("tenant_mismatch", subscription_hash)
    return record


def _parse_resource(resource: str) -> tuple[str, str] | None:
    match = _RESOURCE.fullmatch(resource)
    if match is None:
        return None
    user = match.group("user") or match.group("user_q")
    event = match.group("event") or match.group("event_q")
    return user, event


async def check_change(
    item: object, *, lookup: SubscriptionLookup, hasher: Hasher
) -> Accepted | Rejected:
    """Accept a change notification only if it is well formed and provably for our subscription."""
    if not isinstance(item, Mapping):
        return Rejected("malformed_item")
    fields = _string_fields(
        item, ("subscriptionId", "clientState", "tenantId", "changeType", "resource")
    )
    if isinstance(fields, Rejected):
        return fields
    if fields["changeType"] not in CHANGE_TYPES:
        return Rejected("bad_change_type")
    parsed = _parse_resource(fields["resource"])
    if parsed is None:
        return Rejected("bad_resource")
    user_id, event_id = parsed
    resource_data = item.get("resourceData")
    if resource_data is not None:
        if not isinstance(resource_data, Mapping):
            return Rejected("malformed_item")
        data_id = resource_data.get("id")
        if data_id is not None and data_id != event_id:
            return Rejected("resource_mismatch")
        change_key = change_key_of(resource_data.get("@odata.etag"))
    else:
        change_key = None

    record = await _our_subscription(fields, lookup=lookup, hasher=hasher)
    if isinstance(record, Rejected):
        return record
    if not constant_time_equal(hasher.hash_id("user", user_id.lower()), record.user_hash):
        return Rejected("foreign_mailbox", record.subscription_hash)
    return Accepted(
        account_id=record.account_id,
        change_type=fields["changeType"],
        event_id=event_id,
        subscription_hash=record.subscription_hash,
        change_key=change_key,
    )


def change_key_of(etag: object) -> str | None:
    """The ``changeKey`` inside an event's ``@odata.etag`` (``W/"…"``); None if unusable.

    An unusable etag only costs the worker a fetch, so it does not reject the item.
    """
    if not isinstance(etag, str) or len(etag) > _MAX_FIELD_CHARS:
        return None
    value = etag[2:] if etag.startswith("W/") else etag
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value or None


async def check_lifecycle(
    item: object, *, lookup: SubscriptionLookup, hasher: Hasher
) -> AcceptedLifecycle | Rejected:
    """Accept a lifecycle notification only if it is well formed and for our subscription."""
    if not isinstance(item, Mapping):
        return Rejected("malformed_item")
    fields = _string_fields(item, ("subscriptionId", "clientState", "tenantId", "lifecycleEvent"))
    if isinstance(fields, Rejected):
        return fields
    if fields["lifecycleEvent"] not in LIFECYCLE_EVENTS:
        return Rejected("bad_lifecycle_event")
    record = await _our_subscription(fields, lookup=lookup, hasher=hasher)
    if isinstance(record, Rejected):
        return record
    return AcceptedLifecycle(
        account_id=record.account_id,
        lifecycle_event=fields["lifecycleEvent"],
        subscription_hash=record.subscription_hash,
    )

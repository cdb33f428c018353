"""Checks of Graph change and lifecycle notifications (handlers.notifications)."""

from __future__ import annotations

import json
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto import Hasher
from handlers.notifications import (
    DEFAULT_MAX_ITEMS,
    Accepted,
    AcceptedLifecycle,
    MalformedBody,
    Rejected,
    change_key_of,
    check_change,
    check_lifecycle,
    parse_collection,
)
from handlers.ports import SubscriptionRecord

T = TypeVar("T")

HASHER = Hasher(b"h" * 32)
SUB_ID = "3f1c9a52-7d0e-4b8a-9c11-5e2f6a7b8c90"
CLIENT_STATE = "sub-secret-7f3e91"
TENANT = "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"
USER = "6d2b7e10-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
EVENT = "AAMkAGEXAMPLE-event-one="
ACCOUNT = "acc-42"
SUB_HASH = HASHER.hash_id("subscription", SUB_ID)


def record(**overrides: str) -> SubscriptionRecord:
    values = {
        "subscription_hash": SUB_HASH,
        "account_id": ACCOUNT,
        "client_state_hash": HASHER.hash_id("client_state", CLIENT_STATE),
        "tenant_hash": HASHER.hash_id("tenant", TENANT),
        "user_hash": HASHER.hash_id("user", USER.lower()),
    }
    values.update(overrides)
    return SubscriptionRecord(expires_at=datetime(2031, 5, 14, tzinfo=UTC), **values)


class FakeLookup:
    """In-memory subscription store keyed by subscription hash."""

    def __init__(self, *records: SubscriptionRecord) -> None:
        self.records = {r.subscription_hash: r for r in records}
        self.calls: list[str] = []

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        self.calls.append(subscription_hash)
        return self.records.get(subscription_hash)


def change_item(**overrides: Any) -> dict[str, Any]:
    resource = f"Users/{USER}/Events/{EVENT}"
    item: dict[str, Any] = {
        "subscriptionId": SUB_ID,
        "subscriptionExpirationDateTime": "2031-05-14T09:30:00.0000000+00:00",
        "changeType": "updated",
        "resource": resource,
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Event",
            "@odata.id": resource,
            "@odata.etag": 'W/"DwAAABYAAABexampleChangeKey01"',
            "id": EVENT,
        },
        "clientState": CLIENT_STATE,
        "tenantId": TENANT,
    }
    item.update(overrides)
    return item


def lifecycle_item(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "subscriptionId": SUB_ID,
        "subscriptionExpirationDateTime": "2031-05-14T09:30:00.0000000+00:00",
        "tenantId": TENANT,
        "clientState": CLIENT_STATE,
        "lifecycleEvent": "missed",
    }
    item.update(overrides)
    return item


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (the fakes do not) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine suspended")


async def check(item: object, lookup: FakeLookup | None = None) -> Accepted | Rejected:
    return await check_change(item, lookup=lookup or FakeLookup(record()), hasher=HASHER)


# -- parse_collection ----------------------------------------------------------------------


def test_parse_returns_the_value_items() -> None:
    """A changeNotificationCollection yields its value list, extra members ignored."""
    body = json.dumps({"value": [change_item(), 3], "validationTokens": ["x"]}).encode()
    assert parse_collection(body) == [change_item(), 3]


def test_parse_accepts_an_empty_value_list() -> None:
    """An empty value list is well formed."""
    assert parse_collection(b'{"value": []}') == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "invalid_json"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        (b"1" * 5000, "invalid_json"),
        (b"[]", "not_an_object"),
        (b'"value"', "not_an_object"),
        (b"null", "not_an_object"),
        (b"{}", "missing_value"),
        (b'{"value": {"a": 1}}', "missing_value"),
        (b'{"value": null}', "missing_value"),
    ],
)
def test_parse_rejects_what_is_not_a_collection(body: bytes, reason: str) -> None:
    """Broken JSON, a non-object, or a missing or non-list value raise MalformedBody with a reason."""
    with pytest.raises(MalformedBody) as caught:
        parse_collection(body)
    assert caught.value.reason == reason


def test_parse_limits_the_number_of_items() -> None:
    """More items than the limit (default 1000) is a malformed body."""
    assert len(parse_collection(json.dumps({"value": [{}] * DEFAULT_MAX_ITEMS}).encode())) == 1000
    with pytest.raises(MalformedBody) as caught:
        parse_collection(json.dumps({"value": [{}] * (DEFAULT_MAX_ITEMS + 1)}).encode())
    assert caught.value.reason == "too_many_items"
    with pytest.raises(MalformedBody):
        parse_collection(b'{"value": [1, 2, 3]}', max_items=2)


# -- check_change ----------------------------------------------------------------------------


async def test_valid_change_is_accepted_with_our_account() -> None:
    """A well-formed item for our subscription is accepted with the record's account."""
    result = await check(change_item(changeType="deleted"))
    assert result == Accepted(
        account_id=ACCOUNT,
        change_type="deleted",
        event_id=EVENT,
        subscription_hash=SUB_HASH,
        change_key="DwAAABYAAABexampleChangeKey01",
    )


@pytest.mark.parametrize(
    ("etag", "expected"),
    [
        ('W/"abc=="', "abc=="),
        ('"abc"', "abc"),
        ("abc", "abc"),
        ('W/""', None),
        (17, None),
        ("x" * 600, None),
    ],
)
def test_the_change_key_is_read_from_the_etag_and_an_unusable_one_is_none(
    etag: object, expected: str | None
) -> None:
    """resourceData.@odata.etag yields the changeKey (weak or strong form); anything else is
    None, which only costs the worker a fetch."""
    assert change_key_of(etag) == expected


async def test_accepted_repr_hides_the_event_id() -> None:
    """An Accepted's repr leaves the Graph event id out, so it cannot leak into logs."""
    result = await check(change_item())
    assert EVENT not in repr(result)


@pytest.mark.parametrize(
    "resource",
    [
        f"users/{USER}/events/{EVENT}",
        f"/Users/{USER}/Events/{EVENT}",
        f"USERS/{USER.upper()}/EVENTS/{EVENT}",
        f"Users('{USER}')/Events('{EVENT}')",
    ],
)
async def test_resource_forms_are_accepted(resource: str) -> None:
    """The words Users/Events match in any case and the user id case-insensitively."""
    result = await check(change_item(resource=resource))
    assert isinstance(result, Accepted)
    assert result.event_id == EVENT


async def test_item_without_resource_data_is_accepted() -> None:
    """resourceData is optional: the event id comes from the resource path."""
    item = change_item()
    del item["resourceData"]
    assert isinstance(await check(item), Accepted)


async def test_event_id_is_kept_verbatim() -> None:
    """Graph ids are case-sensitive: the event id is not folded."""
    event = "AAMkAbCdEf_-x="
    result = await check(
        change_item(resource=f"Users/{USER}/Events/{event}", resourceData={"id": event})
    )
    assert isinstance(result, Accepted)
    assert result.event_id == event


async def test_unknown_subscription_is_rejected() -> None:
    """An item whose subscription is not ours is rejected as unknown_subscription."""
    result = await check(change_item(subscriptionId="not-ours"))
    assert result == Rejected("unknown_subscription", HASHER.hash_id("subscription", "not-ours"))


async def test_forged_client_state_is_rejected() -> None:
    """A clientState that does not match the stored hash is rejected."""
    result = await check(change_item(clientState="guess"))
    assert result == Rejected("client_state_mismatch", SUB_HASH)


async def test_other_tenant_is_rejected() -> None:
    """A tenantId other than the subscription's is rejected."""
    result = await check(change_item(tenantId="11111111-2222-3333-4444-555555555555"))
    assert result == Rejected("tenant_mismatch", SUB_HASH)


async def test_resource_of_another_mailbox_is_rejected() -> None:
    """An item whose resource names another mailbox than the subscription's is foreign_mailbox."""
    other = "99999999-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
    result = await check(
        change_item(resource=f"Users/{other}/Events/{EVENT}", resourceData={"id": EVENT})
    )
    assert result == Rejected("foreign_mailbox", SUB_HASH)


@pytest.mark.parametrize("item", [None, 3, "text", [change_item()], [], True])
async def test_non_object_item_is_malformed(item: object) -> None:
    """An item that is not a JSON object is malformed_item."""
    assert await check(item) == Rejected("malformed_item")


@pytest.mark.parametrize(
    "name", ["subscriptionId", "clientState", "tenantId", "changeType", "resource"]
)
async def test_missing_required_field_is_rejected(name: str) -> None:
    """An item lacking any required field (or with it empty) is missing_field."""
    item = change_item()
    del item[name]
    assert await check(item) == Rejected("missing_field")
    assert await check(change_item(**{name: ""})) == Rejected("missing_field")


@pytest.mark.parametrize(
    "overrides",
    [
        {"subscriptionId": 42},
        {"clientState": ["x"]},
        {"tenantId": {"id": TENANT}},
        {"changeType": True},
        {"resource": 1.5},
        {"clientState": "x" * 10_000},
        {"resourceData": "not an object"},
    ],
)
async def test_wrongly_typed_field_is_malformed(overrides: dict[str, Any]) -> None:
    """A non-string or absurdly long required field, or a non-object resourceData, is malformed_item."""
    lookup = FakeLookup(record())
    assert await check(change_item(**overrides), lookup) == Rejected("malformed_item")
    assert lookup.calls == []


@pytest.mark.parametrize("change_type", ["Updated", "missed", "created,updated", "patched"])
async def test_unknown_change_type_is_rejected(change_type: str) -> None:
    """changeType must be exactly created, updated or deleted."""
    assert await check(change_item(changeType=change_type)) == Rejected("bad_change_type")


@pytest.mark.parametrize(
    "resource",
    [
        f"me/events/{EVENT}",
        f"Users/{USER}/Messages/{EVENT}",
        f"Users/{USER}/Events",
        f"Users/{USER}/Events/{EVENT}/attachments/x",
        f"Users/{USER}/Calendars/c/Events/{EVENT}",
        f"Users/{USER}/Events/{EVENT}?$select=subject",
        f"https://graph.microsoft.com/v1.0/Users/{USER}/Events/{EVENT}",
        f"Users//Events/{EVENT}",
    ],
)
async def test_unexpected_resource_is_rejected(resource: str) -> None:
    """Anything but Users/{user}/Events/{event} is bad_resource, before any lookup."""
    lookup = FakeLookup(record())
    item = change_item(resource=resource)
    del item["resourceData"]
    assert await check(item, lookup) == Rejected("bad_resource")
    assert lookup.calls == []


async def test_resource_data_id_must_match_the_path() -> None:
    """A resourceData.id other than the path's event id is resource_mismatch."""
    result = await check(change_item(resourceData={"id": "AAMkAGEXAMPLE-event-ONE="}))
    assert result == Rejected("resource_mismatch")


# -- check_lifecycle -------------------------------------------------------------------------


@pytest.mark.parametrize("event", ["reauthorizationRequired", "subscriptionRemoved", "missed"])
async def test_lifecycle_item_is_accepted(event: str) -> None:
    """A lifecycle item for our subscription is accepted with the record's account."""
    result = await check_lifecycle(
        lifecycle_item(lifecycleEvent=event), lookup=FakeLookup(record()), hasher=HASHER
    )
    assert result == AcceptedLifecycle(
        account_id=ACCOUNT, lifecycle_event=event, subscription_hash=SUB_HASH
    )


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (lifecycle_item(lifecycleEvent="deleted"), Rejected("bad_lifecycle_event")),
        (lifecycle_item(lifecycleEvent=None), Rejected("missing_field")),
        (lifecycle_item(clientState=None), Rejected("missing_field")),
        (lifecycle_item(tenantId=7), Rejected("malformed_item")),
        (
            lifecycle_item(subscriptionId="x"),
            Rejected("unknown_subscription", HASHER.hash_id("subscription", "x")),
        ),
        (lifecycle_item(clientState="forged"), Rejected("client_state_mismatch", SUB_HASH)),
        (lifecycle_item(tenantId="other"), Rejected("tenant_mismatch", SUB_HASH)),
        ("missed", Rejected("malformed_item")),
    ],
)
async def test_lifecycle_item_is_rejected(item: object, expected: Rejected) -> None:
    """A lifecycle item with a bad event, a missing field or a foreign subscription is rejected."""
    result = await check_lifecycle(item, lookup=FakeLookup(record()), hasher=HASHER)
    assert result == expected


# -- properties ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(json_values)
def test_parse_of_any_json_value_only_raises_malformed_body(value: object) -> None:
    """Any JSON value either parses to a list or raises MalformedBody, nothing else."""
    body = json.dumps(value).encode()
    try:
        items = parse_collection(body)
    except MalformedBody:
        return
    assert isinstance(items, list)


@given(st.binary(max_size=200))
def test_parse_of_any_bytes_only_raises_malformed_body(body: bytes) -> None:
    """Arbitrary bytes either parse to a list or raise MalformedBody, nothing else."""
    try:
        items = parse_collection(body)
    except MalformedBody:
        return
    assert isinstance(items, list)


small_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def mutated_items(draw: st.DrawFn) -> dict[str, Any]:
    """A valid change or lifecycle item with none, some or all of its fields spoiled."""
    item = dict(draw(st.sampled_from([change_item(), lifecycle_item()])))
    keys = sorted(set(item) | {"lifecycleEvent", "resourceData"})
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        replacement = draw(
            st.none()
            | small_json
            | st.builds(lambda u, e: f"users/{u}/events/{e}", st.text(max_size=8), st.text())
            | st.just(str(item.get(key, "")).upper())
        )
        if replacement is None:
            item.pop(key, None)
        else:
            item[key] = replacement
    return item


item_strategy = mutated_items() | st.dictionaries(st.text(max_size=15), small_json, max_size=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(item_strategy)
def test_arbitrary_items_never_raise_and_never_pass_without_our_record(
    item: dict[str, Any],
) -> None:
    """For any dict, the checks return Accepted/Rejected (never raise) and accept only matching items."""
    change = run_sync(check_change(item, lookup=FakeLookup(record()), hasher=HASHER))
    assert isinstance(change, Accepted | Rejected)
    if isinstance(change, Accepted):
        assert item["subscriptionId"] == SUB_ID
        assert item["clientState"] == CLIENT_STATE
        assert item["tenantId"] == TENANT
        assert item["resource"].lower() == f"users/{USER}/events/{EVENT}".lower()
    lifecycle = run_sync(check_lifecycle(item, lookup=FakeLookup(record()), hasher=HASHER))
    assert isinstance(lifecycle, AcceptedLifecycle | Rejected)
    if isinstance(lifecycle, AcceptedLifecycle):
        assert (item["subscriptionId"], item["clientState"], item["tenantId"]) == (
            SUB_ID,
            CLIENT_STATE,
            TENANT,
        )
    # Without any record nothing is ever accepted.
    assert isinstance(run_sync(check_change(item, lookup=FakeLookup(), hasher=HASHER)), Rejected)
    assert isinstance(run_sync(check_lifecycle(item, lookup=FakeLookup(), hasher=HASHER)), Rejected)

"""Validation of 1Relation's outbound messages (handlers.outbound validate_message), by example and by property."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from handlers.outbound import (
    MAX_ATTENDEES,
    MAX_SUBJECT,
    SCHEMA,
    InvalidMessage,
    OutboundChange,
    validate_message,
)
from handlers.timezones import windows_name

# Distinctive content: a rejection reason must never repeat any of it.
SECRET_SUBJECT = "Confidential merger talk 7f3e91c2"
SECRET_CONTENT = "Private agenda: layoffs 5b8d0a14"
SECRET_LOCATION = "Board room 9c1a66e0"
SECRET_ADDRESS = "ceo.private.4d2f@example.org"
SECRET_NAME = "Alice Secretname 0e7b"
SECRETS = (SECRET_SUBJECT, SECRET_CONTENT, SECRET_LOCATION, SECRET_ADDRESS, SECRET_NAME)

ZONES = (
    "Europe/Copenhagen",
    "Romance Standard Time",
    "America/New_York",
    "Eastern Standard Time",
    "Asia/Tokyo",
    "UTC",
    "Pacific/Kiritimati",
    "Dateline Standard Time",
)


def secret_event(**overrides: Any) -> dict[str, Any]:
    """A complete, valid event whose content is the distinctive secrets above."""
    event: dict[str, Any] = {
        "subject": SECRET_SUBJECT,
        "body": {"contentType": "text", "content": SECRET_CONTENT},
        "start": {"dateTime": "2026-12-03T10:00:00", "timeZone": "Europe/Copenhagen"},
        "end": {"dateTime": "2026-12-03T11:00:00", "timeZone": "Europe/Copenhagen"},
        "isAllDay": False,
        "location": {"displayName": SECRET_LOCATION},
        "attendees": [
            {"emailAddress": {"address": SECRET_ADDRESS, "name": SECRET_NAME}, "type": "required"}
        ],
        "showAs": "busy",
        "sensitivity": "private",
        "recurrence": None,
        "categories": ["Sales"],
    }
    event.update(overrides)
    return event


def secret_message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "op": "upsert",
        "account_id": "acc-42",
        "relation_event_id": "rel-evt-9001",
        "revision": 7,
        "occurred_at": "2026-12-01T08:15:00Z",
        "event": secret_event(),
    }
    body.update(overrides)
    return body


def reason_of(body: Any) -> str:
    with pytest.raises(InvalidMessage) as caught:
        validate_message(body)
    return caught.value.reason


def assert_readable(reason: str) -> None:
    """A person can read it: short, one printable line, words rather than a traceback."""
    assert isinstance(reason, str)
    assert 0 < len(reason) <= 300, reason
    assert reason.isprintable(), repr(reason)
    assert "Traceback" not in reason


def assert_no_content(reason: str) -> None:
    for secret in SECRETS:
        assert secret not in reason, (secret, reason)


# -- examples -----------------------------------------------------------------------------------


def test_the_contract_example_is_valid() -> None:
    """docs/contract.md §3's example validates; its IANA zone becomes the Windows name Graph accepts."""
    change = validate_message(secret_message())
    assert isinstance(change, OutboundChange)
    assert (change.account_id, change.relation_event_id, change.revision, change.op) == (
        "acc-42",
        "rel-evt-9001",
        7,
        "upsert",
    )
    assert change.occurred_at == datetime(2026, 12, 1, 8, 15, tzinfo=UTC)
    assert change.event is not None
    assert change.event["start"] == {
        "dateTime": "2026-12-03T10:00:00",
        "timeZone": "Romance Standard Time",
    }
    assert change.event["subject"] == SECRET_SUBJECT
    assert change.event["recurrence"] is None


def test_a_delete_carries_no_event() -> None:
    """A delete needs no event and yields none, even if one is sent."""
    body = secret_message(op="delete")
    del body["event"]
    assert validate_message(body).event is None
    assert validate_message(secret_message(op="delete")).event is None


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda m: m.update(schema="onerelation.event.v0"), "schema"),
        (lambda m: m.update(op="patch"), "op must be"),
        (lambda m: m.update(account_id=""), "account_id"),
        (lambda m: m.update(account_id="acc 42"), "account_id"),
        (lambda m: m.pop("relation_event_id"), "relation_event_id"),
        (lambda m: m.update(revision=-1), "revision"),
        (lambda m: m.update(revision=True), "revision"),
        (lambda m: m.update(revision=1.5), "revision"),
        (lambda m: m.update(revision=2**60), "revision is too large"),
        (lambda m: m.update(occurred_at="2026-12-01T08:15:00"), "occurred_at"),
        (lambda m: m.update(occurred_at="yesterday"), "occurred_at"),
        (lambda m: m.update(occurred_at="9999-12-31T23:59:59-12:00"), "occurred_at"),
        (lambda m: m.update(occurred_at="0001-01-01T00:00:00+14:00"), "occurred_at"),
        (lambda m: m.pop("event"), "event"),
        (lambda m: m.update(event=[1]), "event"),
        (lambda m: m["event"].update(webLink="https://x"), "does not manage"),
        (lambda m: m["event"].update(start=None), "cannot be cleared"),
        (lambda m: m["event"].pop("end"), "together"),
        (lambda m: m["event"]["end"].update(dateTime="2026-12-03T09:00:00"), "after"),
        (lambda m: m["event"]["start"].update(timeZone="Mars/Olympus_Mons"), "time zone"),
        (lambda m: m["event"]["start"].update(dateTime="2026-02-30T10:00:00"), "real date"),
        (lambda m: m["event"]["end"].update(dateTime="2036-12-03T10:00:00"), "five years"),
        (lambda m: m["event"].update(isAllDay=True), "midnight"),
        (lambda m: m["event"].update(showAs="sleeping"), "showAs"),
        (lambda m: m["event"].update(recurrence={"pattern": {}}), "recurrence"),
        (lambda m: m["event"].update(categories="Sales"), "categories"),
    ],
)
def test_each_problem_has_its_own_readable_reason(mutate: Any, fragment: str) -> None:
    """Every kind of problem is rejected with InvalidMessage and a reason that names it."""
    body = secret_message()
    mutate(body)
    reason = reason_of(body)
    assert fragment in reason
    assert_readable(reason)
    assert_no_content(reason)


def test_times_at_the_edge_of_the_calendar_are_rejected_not_crashed() -> None:
    """A local time that is out of range once converted to UTC is InvalidMessage, not OverflowError."""
    for zone, day in (("Dateline Standard Time", "9999-12-31"), ("Etc/GMT+12", "9999-12-31")):
        event = secret_event(
            start={"dateTime": f"{day}T00:00:00", "timeZone": zone},
            end={"dateTime": f"{day}T23:00:00", "timeZone": zone},
        )
        assert_readable(reason_of(secret_message(event=event)))


@pytest.mark.parametrize(
    "event",
    [
        secret_event(subject=SECRET_SUBJECT * 10),
        secret_event(subject=[SECRET_SUBJECT]),
        secret_event(body={"contentType": "rtf", "content": SECRET_CONTENT}),
        secret_event(body={"contentType": "text", "content": SECRET_CONTENT, "x": 1}),
        secret_event(body=SECRET_CONTENT),
        secret_event(location={"displayName": SECRET_LOCATION, "address": SECRET_ADDRESS}),
        secret_event(location={"displayName": SECRET_LOCATION * 60}),
        secret_event(location=SECRET_LOCATION),
        secret_event(attendees=[{"emailAddress": {"address": SECRET_NAME}}]),
        secret_event(
            attendees=[{"emailAddress": {"address": SECRET_ADDRESS, "name": SECRET_NAME * 60}}]
        ),
        secret_event(
            attendees=[{"emailAddress": {"address": SECRET_ADDRESS}, "type": SECRET_NAME}]
        ),
        secret_event(attendees=[SECRET_ADDRESS]),
        secret_event(attendees={"emailAddress": {"address": SECRET_ADDRESS}}),
        secret_event(
            attendees=[{"emailAddress": {"address": SECRET_ADDRESS}}] * (MAX_ATTENDEES + 1)
        ),
        secret_event(categories=[SECRET_SUBJECT * 10]),
    ],
)
def test_bad_content_is_rejected_without_repeating_it(event: dict[str, Any]) -> None:
    """A content field of the wrong shape is named in the reason; its value never is."""
    reason = reason_of(secret_message(event=event))
    assert_readable(reason)
    assert_no_content(reason)


def test_unknown_field_names_are_shown_short_and_printable() -> None:
    """Names of fields 1Relation does not manage are listed, but cut short and escaped."""
    reason = reason_of(secret_message(event=secret_event(**{"x\n" * 500: 1, "\x00bell\x07": 2})))
    assert "does not manage" in reason
    assert_readable(reason)


# -- properties ---------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["schema", "op", "event", "subject", "start", "dateTime", "timeZone", "attendees"]
            )
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def _local(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    """Any event 1Relation may send: any subset of managed fields, times in order."""
    event: dict[str, Any] = {}
    if draw(st.booleans()):
        event["subject"] = draw(st.text(max_size=MAX_SUBJECT))
    if draw(st.booleans()):
        event["body"] = {
            "contentType": draw(st.sampled_from(["text", "html"])),
            "content": draw(st.text(max_size=200)),
        }
    if draw(st.booleans()):
        all_day = draw(st.booleans())
        zone = draw(st.sampled_from(ZONES))
        day = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1)))
        if all_day:
            start = day.replace(hour=0, minute=0, second=0, microsecond=0)
            end = start + timedelta(days=draw(st.integers(1, 30)))
        else:
            start = day.replace(microsecond=0)
            end = start + timedelta(minutes=draw(st.integers(15, 60 * 24 * 30)))
        event["start"] = {"dateTime": _local(start), "timeZone": zone}
        event["end"] = {"dateTime": _local(end), "timeZone": zone}
        event["isAllDay"] = all_day
    if draw(st.booleans()):
        event["location"] = draw(
            st.none() | st.builds(lambda n: {"displayName": n}, st.text(max_size=50))
        )
    if draw(st.booleans()):
        address = st.from_regex(r"[a-z0-9._-]{1,20}@[a-z0-9-]{1,20}\.[a-z]{2,6}", fullmatch=True)
        event["attendees"] = draw(
            st.lists(
                st.builds(
                    lambda a, n, t: {"emailAddress": {"address": a, "name": n}, "type": t},
                    address,
                    st.text(max_size=20),
                    st.sampled_from(["required", "optional", "resource"]),
                ),
                max_size=5,
            )
        )
    if draw(st.booleans()):
        event["showAs"] = draw(st.sampled_from(["free", "busy", "tentative", "oof"]))
    if draw(st.booleans()):
        event["sensitivity"] = draw(st.sampled_from(["normal", "private"]))
    if draw(st.booleans()):
        event["categories"] = draw(st.lists(st.text(max_size=20), max_size=3))
    if draw(st.booleans()):
        event["recurrence"] = draw(
            st.none()
            | st.just(
                {
                    "pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"]},
                    "range": {
                        "type": "numbered",
                        "startDate": "2026-12-07",
                        "numberOfOccurrences": 4,
                    },
                }
            )
        )
    return event


identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,40}", fullmatch=True)
aware_times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2090, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-11))]),
)


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(["upsert", "delete"]))
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "op": op,
        "account_id": draw(identifiers),
        "relation_event_id": draw(identifiers),
        "revision": draw(st.integers(0, 2**53)),
        "occurred_at": draw(aware_times).isoformat().replace("+00:00", "Z"),
    }
    if op == "upsert":
        body["event"] = draw(valid_events())
    return body


@st.composite
def spoiled_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message with one to three values anywhere inside replaced or removed."""
    body = copy.deepcopy(draw(valid_messages()))
    for _ in range(draw(st.integers(1, 3))):
        node: Any = body
        while True:  # walk down to a random container
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            if isinstance(node, dict) and draw(st.booleans()):
                del node[key]
            else:
                node[key] = draw(json_values)
            break
    return body


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | spoiled_messages())
@example(
    {
        "schema": SCHEMA,
        "op": "delete",
        "account_id": "a",
        "relation_event_id": "r",
        "revision": 1,
        "occurred_at": "9999-12-31T23:59:59-12:00",
    }
)
# Unhashable values where a name from a closed list belongs (hypothesis found the first).
@example(secret_message(event=secret_event(showAs=[])))
@example(
    secret_message(
        event=secret_event(
            attendees=[{"emailAddress": {"address": "ann@example.com"}, "type": ["required"]}]
        )
    )
)
@example(
    secret_message(
        event=secret_event(recurrence={"pattern": {"type": {}}, "range": {"type": "noEnd"}})
    )
)
def test_any_json_only_ever_raises_invalid_message_with_a_readable_reason(body: Any) -> None:
    """Whatever JSON arrives, validation either succeeds or raises InvalidMessage, whose
    reason is one short printable line."""
    json.dumps(body)  # it is JSON (the consumer only ever hands decoded JSON over)
    try:
        change = validate_message(body)
    except InvalidMessage as exc:
        assert_readable(exc.reason)
        return
    assert isinstance(change, OutboundChange)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages())
def test_valid_messages_round_trip(body: dict[str, Any]) -> None:
    """A valid message keeps its identity, revision and every field it sent; zones become
    Windows names; validating the result again changes nothing (the shard body is stable)."""
    change = validate_message(body)
    assert (change.account_id, change.relation_event_id, change.revision, change.op) == (
        body["account_id"],
        body["relation_event_id"],
        body["revision"],
        body["op"],
    )
    assert change.occurred_at.tzinfo is not None
    if body["op"] == "delete":
        assert change.event is None
        return
    assert change.event is not None
    sent = body["event"]
    assert set(change.event) == set(sent)
    for name, value in sent.items():
        if name in ("start", "end"):
            assert change.event[name] == {
                "dateTime": value["dateTime"],
                "timeZone": windows_name(value["timeZone"]),
            }
        else:
            assert change.event[name] == value
    again = validate_message({**body, "event": change.event})
    assert again.event == change.event


content_spoilers = st.sampled_from(
    [
        lambda e: e.update(subject=SECRET_SUBJECT * 8),
        lambda e: e.update(subject={"text": SECRET_SUBJECT}),
        lambda e: e["body"].update(contentType=SECRET_CONTENT),
        lambda e: e["body"].update(content=[SECRET_CONTENT]),
        lambda e: e["location"].update(displayName={"v": SECRET_LOCATION}),
        lambda e: e["location"].update(street=SECRET_LOCATION),
        lambda e: e["attendees"][0]["emailAddress"].update(address=SECRET_NAME),
        lambda e: e["attendees"][0]["emailAddress"].update(
            address=SECRET_ADDRESS + " " + SECRET_NAME
        ),
        lambda e: e["attendees"][0]["emailAddress"].update(name=[SECRET_NAME]),
        lambda e: e["attendees"][0].update(type=SECRET_ADDRESS),
        lambda e: e["attendees"].append(SECRET_ADDRESS),
        lambda e: e.update(showAs=SECRET_SUBJECT),
        lambda e: e.update(sensitivity=SECRET_CONTENT),
        lambda e: e.update(categories=SECRET_SUBJECT),
    ]
)
structure_spoilers = st.sampled_from(
    [
        lambda m: m.update(schema="v0"),
        lambda m: m.update(op="merge"),
        lambda m: m.update(revision="7"),
        lambda m: m.update(account_id="a b"),
        lambda m: m.update(occurred_at="now"),
        lambda m: m["event"]["start"].update(timeZone="Nowhere/Land"),
        lambda m: m["event"]["end"].update(dateTime="2026-12-03T09:00:00"),
        lambda m: m["event"].update(webLink="https://outlook.example"),
    ]
)


@settings(max_examples=200)
@given(st.lists(content_spoilers, min_size=0, max_size=3), st.lists(structure_spoilers, max_size=2))
def test_rejection_reasons_never_carry_the_events_content(
    content: list[Any], structure: list[Any]
) -> None:
    """Whatever is wrong, with the content or around it, the reason (which goes to logs, the
    dead-letter header and event.rejected) never repeats the subject, body, location,
    attendee addresses or names."""
    body = secret_message()
    for spoil in content:
        spoil(body["event"])
    for spoil in structure:
        spoil(body)
    if not content and not structure:
        validate_message(body)
        return
    reason = reason_of(body)
    assert_readable(reason)
    assert_no_content(reason)

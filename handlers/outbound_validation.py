"""Checking 1Relation's ``onerelation.event.v1`` messages (CONTRACT §3) before anything runs.

Every problem is reported in words a person can act on; a message with one is never
retried blindly: it is dead-lettered with the reason and reported as ``event.rejected``.
Time zones are converted here to the Windows names Graph accepts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from processor.timeutil import parse_graph_datetime
from processor.timezones import windows_name, zone_for

SCHEMA = "onerelation.event.v1"
MAX_MESSAGE_BYTES = 1_048_576
MAX_SUBJECT = 255
MAX_BODY = 512 * 1024
MAX_ATTENDEES = 500
MAX_TEXT = 1024

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_EMAIL = re.compile(r"^[^@\s<>\"]{1,64}@[^@\s<>\"]{1,255}\.[^@\s<>\".]{1,63}$")
_LOCAL_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?$")

MANAGED_FIELDS: frozenset[str] = frozenset(
    {
        "subject",
        "body",
        "start",
        "end",
        "isAllDay",
        "location",
        "attendees",
        "showAs",
        "sensitivity",
        "recurrence",
        "categories",
    }
)
#: Field groups for conflict resolution (the newest change wins per group).
FIELD_GROUPS: Mapping[str, frozenset[str]] = {
    "time": frozenset({"start", "end", "isAllDay", "recurrence"}),
    "content": frozenset({"subject", "body", "location", "showAs", "sensitivity", "categories"}),
    "attendees": frozenset({"attendees"}),
}
SHOW_AS = frozenset({"free", "tentative", "busy", "oof", "workingElsewhere", "unknown"})
SENSITIVITY = frozenset({"normal", "personal", "private", "confidential"})
ATTENDEE_TYPES = frozenset({"required", "optional", "resource"})
RECURRENCE_PATTERNS = frozenset(
    {"daily", "weekly", "absoluteMonthly", "relativeMonthly", "absoluteYearly", "relativeYearly"}
)
RANGE_TYPES = frozenset({"endDate", "noEnd", "numbered"})


class InvalidMessage(ValueError):
    """The message breaks ``onerelation.event.v1``; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OutboundChange:
    """A validated outbound change; ``event`` holds only the fields 1Relation sent."""

    account_id: str
    relation_event_id: str
    revision: int
    op: str
    occurred_at: datetime
    event: dict[str, Any] | None


def validate_message(body: Any) -> OutboundChange:
    """Validate a decoded message; raises :class:`InvalidMessage` with the first problem."""
    if not isinstance(body, dict):
        raise InvalidMessage("the message is not a JSON object")
    if body.get("schema") != SCHEMA:
        raise InvalidMessage(f"schema must be {SCHEMA!r}, got {_show(body.get('schema'))}")
    op = body.get("op")
    if op not in ("upsert", "delete"):
        raise InvalidMessage(f"op must be 'upsert' or 'delete', got {_show(op)}")
    account_id = _identifier(body, "account_id")
    relation_event_id = _identifier(body, "relation_event_id")
    revision = body.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise InvalidMessage(f"revision must be a non-negative integer, got {_show(revision)}")
    if revision > 2**53:
        raise InvalidMessage("revision is too large")
    occurred_raw = body.get("occurred_at")
    if not isinstance(occurred_raw, str):
        raise InvalidMessage("occurred_at must be an ISO 8601 timestamp with a time zone")
    occurred_at = _aware_timestamp(occurred_raw)
    event = None
    if op == "upsert":
        raw_event = body.get("event")
        if not isinstance(raw_event, dict):
            raise InvalidMessage("an upsert must carry an 'event' object")
        event = validate_event(raw_event)
    return OutboundChange(account_id, relation_event_id, revision, op, occurred_at, event)


def _aware_timestamp(text: str) -> datetime:
    problem = f"occurred_at is not an ISO 8601 timestamp with a time zone: {_show(text)}"
    if not re.search(r"(Z|[+-]\d{2}:?\d{2})$", text):
        raise InvalidMessage(problem)
    try:
        return parse_graph_datetime(text)
    except ValueError:
        raise InvalidMessage(problem) from None


def validate_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Check the event's fields and convert time zones; returns the Graph-ready fields."""
    unknown = sorted(set(event) - MANAGED_FIELDS)
    if unknown:
        # Names are 1Relation's input too: shown escaped and cut short, like any value.
        shown = ", ".join(_show(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidMessage(f"event has fields 1Relation does not manage: {shown}{more}")
    out: dict[str, Any] = {}
    for name, value in event.items():
        if value is None:
            if name in ("start", "end", "isAllDay"):
                raise InvalidMessage(f"event.{name} cannot be cleared")
            out[name] = None
            continue
        out[name] = _FIELD_CHECKS[name](value)
    if ("start" in out) != ("end" in out):
        raise InvalidMessage("event.start and event.end must be sent together")
    if "start" in out:
        _check_times(out["start"], out["end"], bool(out.get("isAllDay")))
    return out


def _check_subject(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_SUBJECT:
        raise InvalidMessage(f"event.subject must be text of at most {MAX_SUBJECT} characters")
    return value


def _check_body(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - {"contentType", "content"}:
        raise InvalidMessage("event.body must be {contentType, content}")
    if value.get("contentType") not in ("text", "html"):
        raise InvalidMessage("event.body.contentType must be 'text' or 'html'")
    content = value.get("content")
    if not isinstance(content, str) or len(content) > MAX_BODY:
        raise InvalidMessage(f"event.body.content must be text of at most {MAX_BODY} characters")
    return {"contentType": value["contentType"], "content": content}


def _check_time(name: str) -> Any:
    def check(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or set(value) != {"dateTime", "timeZone"}:
            raise InvalidMessage(f"event.{name} must be {{dateTime, timeZone}}")
        local = value["dateTime"]
        if not isinstance(local, str) or not _LOCAL_DATETIME.match(local):
            raise InvalidMessage(
                f"event.{name}.dateTime must be a local time like 2026-12-03T10:00:00"
            )
        try:
            datetime.fromisoformat(local[:19] if len(local) > 19 else local)
        except ValueError:
            raise InvalidMessage(f"event.{name}.dateTime is not a real date") from None
        zone = value["timeZone"]
        windows = windows_name(zone) if isinstance(zone, str) else None
        if windows is None or zone_for(windows) is None:
            raise InvalidMessage(f"event.{name}.timeZone is not a known time zone: {_show(zone)}")
        return {"dateTime": local, "timeZone": windows}

    return check


def _check_times(start: Mapping[str, str], end: Mapping[str, str], all_day: bool) -> None:
    from processor.timezones import event_time_to_utc  # noqa: PLC0415  avoids a cycle

    start_utc = event_time_to_utc(start)
    end_utc = event_time_to_utc(end)
    if start_utc is None or end_utc is None:
        raise InvalidMessage("event.start or event.end is outside the supported range of dates")
    if end_utc <= start_utc:
        raise InvalidMessage("event.end must be after event.start")
    if (end_utc - start_utc).days > 366 * 5:
        raise InvalidMessage("event lasts more than five years")
    if all_day:
        for name, value in (("start", start), ("end", end)):
            if not value["dateTime"][11:].startswith("00:00"):
                raise InvalidMessage(f"an all-day event's {name} must be at midnight")


def _check_bool(name: str) -> Any:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidMessage(f"event.{name} must be true or false")
        return value

    return check


def _check_location(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - {"displayName"}:
        raise InvalidMessage("event.location must be {displayName}")
    name = value.get("displayName", "")
    if not isinstance(name, str) or len(name) > MAX_TEXT:
        raise InvalidMessage(f"event.location.displayName must be text of at most {MAX_TEXT}")
    return {"displayName": name}


def _check_attendees(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_ATTENDEES:
        raise InvalidMessage(f"event.attendees must be a list of at most {MAX_ATTENDEES}")
    out = []
    for i, attendee in enumerate(value):
        if not isinstance(attendee, dict) or not isinstance(attendee.get("emailAddress"), dict):
            raise InvalidMessage(f"event.attendees[{i}] must be {{emailAddress, type}}")
        address = attendee["emailAddress"].get("address")
        if not isinstance(address, str) or not _EMAIL.match(address):
            raise InvalidMessage(f"event.attendees[{i}].emailAddress.address is not an address")
        name = attendee["emailAddress"].get("name", "")
        if not isinstance(name, str) or len(name) > MAX_TEXT:
            raise InvalidMessage(f"event.attendees[{i}].emailAddress.name must be short text")
        kind = attendee.get("type", "required")
        if not _one_of(kind, ATTENDEE_TYPES):
            raise InvalidMessage(
                f"event.attendees[{i}].type must be required, optional or resource"
            )
        out.append({"emailAddress": {"address": address, "name": name}, "type": kind})
    return out


def _check_choice(name: str, allowed: frozenset[str]) -> Any:
    def check(value: Any) -> str:
        if not _one_of(value, allowed):
            raise InvalidMessage(f"event.{name} must be one of {', '.join(sorted(allowed))}")
        return str(value)

    return check


def _one_of(value: Any, allowed: frozenset[str]) -> bool:
    """Membership that a list or dict from the message cannot turn into a TypeError."""
    return isinstance(value, str) and value in allowed


def _check_recurrence(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"pattern", "range"}:
        raise InvalidMessage("event.recurrence must be {pattern, range} or null")
    pattern, range_ = value["pattern"], value["range"]
    if not isinstance(pattern, dict) or not _one_of(pattern.get("type"), RECURRENCE_PATTERNS):
        raise InvalidMessage("event.recurrence.pattern.type is not a Graph recurrence pattern")
    interval = pattern.get("interval", 1)
    if not isinstance(interval, int) or isinstance(interval, bool) or not 1 <= interval <= 99:
        raise InvalidMessage("event.recurrence.pattern.interval must be 1 to 99")
    if not isinstance(range_, dict) or not _one_of(range_.get("type"), RANGE_TYPES):
        raise InvalidMessage("event.recurrence.range.type must be endDate, noEnd or numbered")
    if not isinstance(range_.get("startDate"), str):
        raise InvalidMessage("event.recurrence.range.startDate is required")
    return dict(value)


def _check_categories(value: Any) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > 50
        or not all(isinstance(c, str) and len(c) <= 255 for c in value)
    ):
        raise InvalidMessage("event.categories must be a list of at most 50 short texts")
    return list(value)


_FIELD_CHECKS: dict[str, Any] = {
    "subject": _check_subject,
    "body": _check_body,
    "start": _check_time("start"),
    "end": _check_time("end"),
    "isAllDay": _check_bool("isAllDay"),
    "location": _check_location,
    "attendees": _check_attendees,
    "showAs": _check_choice("showAs", SHOW_AS),
    "sensitivity": _check_choice("sensitivity", SENSITIVITY),
    "recurrence": _check_recurrence,
    "categories": _check_categories,
}


def _identifier(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidMessage(
            f"{name} must be 1-128 letters, digits or . _ : @ -, got {_show(value)}"
        )
    return value


def _show(value: Any) -> str:
    """A short, safe rendering of an offending value for a reason text."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

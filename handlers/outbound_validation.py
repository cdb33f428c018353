"""Checking 1Relation's ``onerelation.event.v1`` messages (docs/contract.md §3) before work.

The structure is checked by the published JSON Schema (``docs/schemas``), so the document
and the service cannot disagree; its ``x-reason`` annotations give each failure words a
person can act on. What a schema cannot say is checked here: a real date, a known time
zone, end after start, at most five years, all-day at midnight, a real ``occurred_at``.
A message with a problem is never retried blindly: it is dead-lettered with the reason and
reported as ``event.rejected``. Time zones are converted to the Windows names Graph accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jsonschema import ValidationError

from contract import load_schema, validator_for
from handlers.timeutil import parse_graph_datetime
from handlers.timezones import event_time_to_utc, windows_name, zone_for

SCHEMA = "onerelation.event.v1"
MAX_MESSAGE_BYTES = 1_048_576

_DOCUMENT = load_schema(SCHEMA)
_EVENT = _DOCUMENT["$defs"]["event"]
_FIELDS: Mapping[str, Any] = _EVENT["properties"]
MAX_SUBJECT: int = _FIELDS["subject"]["maxLength"]
MAX_BODY: int = _FIELDS["body"]["properties"]["content"]["maxLength"]
MAX_ATTENDEES: int = _FIELDS["attendees"]["maxItems"]
MANAGED_FIELDS: frozenset[str] = frozenset(_FIELDS)
#: Field groups for conflict resolution (the newest change wins per group).
FIELD_GROUPS: Mapping[str, frozenset[str]] = {
    "time": frozenset({"start", "end", "isAllDay", "recurrence"}),
    "content": frozenset({"subject", "body", "location", "showAs", "sensitivity", "categories"}),
    "attendees": frozenset({"attendees"}),
}
_ROOT_ORDER = list(_DOCUMENT["properties"])
_EVENT_ORDER = list(_FIELDS)


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
    errors = list(validator_for(SCHEMA).iter_errors(body))
    if errors:
        raise InvalidMessage(_reason(min(errors, key=_rank)))
    occurred_at = _aware_timestamp(body["occurred_at"])
    event = _graph_ready(body["event"]) if body["op"] == "upsert" else None
    return OutboundChange(
        body["account_id"],
        body["relation_event_id"],
        body["revision"],
        body["op"],
        occurred_at,
        event,
    )


def _aware_timestamp(text: str) -> datetime:
    try:
        return parse_graph_datetime(text)
    except (ValueError, OverflowError):
        raise InvalidMessage(
            f"occurred_at is not an ISO 8601 timestamp with a time zone: {_show(text)}"
        ) from None


def _graph_ready(event: Mapping[str, Any]) -> dict[str, Any]:
    """The schema-valid event with its dates and zones checked, zones in Windows names and
    optional parts filled in as Graph expects them."""
    out: dict[str, Any] = {}
    for name, value in event.items():
        if value is None:
            out[name] = None
        elif name in ("start", "end"):
            out[name] = _time(name, value)
        elif name == "body":
            out[name] = {"contentType": value["contentType"], "content": value["content"]}
        elif name == "location":
            out[name] = {"displayName": value.get("displayName", "")}
        elif name == "attendees":
            out[name] = [
                {
                    "emailAddress": {
                        "address": a["emailAddress"]["address"],
                        "name": a["emailAddress"].get("name", ""),
                    },
                    "type": a.get("type", "required"),
                }
                for a in value
            ]
        elif isinstance(value, dict | list):
            out[name] = type(value)(value)
        else:
            out[name] = value
    if "start" in out:
        _check_times(out["start"], out["end"], bool(out.get("isAllDay")))
    return out


def _time(name: str, value: Mapping[str, str]) -> dict[str, str]:
    local = value["dateTime"]
    try:
        datetime.fromisoformat(local[:19])
    except ValueError:
        raise InvalidMessage(f"event.{name}.dateTime is not a real date") from None
    zone = value["timeZone"]
    windows = windows_name(zone)
    if windows is None or zone_for(windows) is None:
        raise InvalidMessage(f"event.{name}.timeZone is not a known time zone: {_show(zone)}")
    return {"dateTime": local, "timeZone": windows}


def _check_times(start: Mapping[str, str], end: Mapping[str, str], all_day: bool) -> None:
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


# ---- from a schema failure to words -------------------------------------------------------


def _missing(error: ValidationError) -> str | None:
    """The property a ``required`` failure is about (the first one absent)."""
    names = error.validator_value
    if error.validator != "required" or not isinstance(error.instance, dict):
        return None
    if not isinstance(names, list):
        return None
    return next((str(name) for name in names if name not in error.instance), None)


def _rank(error: ValidationError) -> tuple[int, int, int]:
    """Report problems in the order of the document's fields, as a reader checks them."""
    path = list(error.absolute_path)
    top = path[0] if path else _missing(error)
    root = _ROOT_ORDER.index(top) if top in _ROOT_ORDER else -1
    field = -3
    if path == ["event"]:
        field = {"type": -2, "additionalProperties": -1}.get(str(error.validator), 99)
    elif len(path) >= 2 and path[0] == "event" and path[1] in _EVENT_ORDER:
        field = _EVENT_ORDER.index(path[1])
    return root, field, len(path)


def _resolve(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if "x-reason" not in schema and isinstance(ref, str) and ref.startswith("#/$defs/"):
        resolved: Mapping[str, Any] = _DOCUMENT["$defs"][ref.removeprefix("#/$defs/")]
        return resolved
    return schema


def _reason(error: ValidationError) -> str:
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    path = _path(error.absolute_path)
    value: Any = error.instance
    reasons = schema.get("x-reasons", {})
    template = reasons.get(str(error.validator))
    if template is None and error.validator == "type" and value is None:
        template = reasons.get("null")
    missing = _missing(error)
    if template is None and missing is not None:
        sub = _resolve(schema.get("properties", {}).get(missing, {}))
        if "x-reason" in sub:
            template, value = sub["x-reason"], None
            path = f"{path}.{missing}" if path else missing
    if template is None:
        template = schema.get("x-reason", "{path} is not valid here")
    fields = ""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        # Names are 1Relation's input too: shown escaped and cut short, like any value.
        unknown = sorted(set(error.instance) - set(schema.get("properties", {})))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        fields = ", ".join(_show(name) for name in unknown[:5]) + more
    return (
        str(template)
        .replace("{path}", path or "the message")
        .replace("{value}", _show(value))
        .replace("{fields}", fields)
    )


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _show(value: Any) -> str:
    """A short, safe rendering of an offending value for a reason text."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

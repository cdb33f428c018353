"""Tenants, users (mailboxes), events with recurrence, and the change log delta queries read."""

from __future__ import annotations

import calendar
import copy
import datetime as dt
import itertools
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .clock import SimClock
from .errors import GraphError
from .ids import change_key, ical_uid, make_id, parse_id
from .timezones import (
    TimeZoneError,
    canonical_windows_name,
    format_local,
    format_utc,
    parse_local,
    zone,
)

InstanceKey = tuple[bytes, int | None]
ChangeListener = Callable[[str, str, "EventRecord"], None]

WRITABLE = {
    "subject",
    "body",
    "start",
    "end",
    "isAllDay",
    "location",
    "locations",
    "attendees",
    "showAs",
    "sensitivity",
    "recurrence",
    "categories",
    "importance",
    "isReminderOn",
    "reminderMinutesBeforeStart",
    "responseRequested",
    "allowNewTimeProposals",
    "isOnlineMeeting",
    "onlineMeetingProvider",
    "hideAttendees",
    "transactionId",
    "singleValueExtendedProperties",
}
READ_ONLY = {
    "id",
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "iCalUId",
    "type",
    "seriesMasterId",
    "webLink",
    "organizer",
    "isOrganizer",
    "bodyPreview",
    "isCancelled",
    "originalStart",
    "originalStartTimeZone",
    "originalEndTimeZone",
    "responseStatus",
    "hasAttachments",
    "isDraft",
    "onlineMeeting",
    "onlineMeetingUrl",
    "uid",
}
SELECTABLE = (WRITABLE | READ_ONLY) - {"singleValueExtendedProperties"}
ENUMS = {
    "showAs": {"free", "tentative", "busy", "oof", "workingElsewhere", "unknown"},
    "sensitivity": {"normal", "personal", "private", "confidential"},
    "importance": {"low", "normal", "high"},
}
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MAX_EXPANSION_STEPS = 40_000


@dataclass
class Tenant:
    id: str
    domains: list[str]
    consented: bool = True
    display_name: str = "Contoso"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "domains": self.domains,
            "consented": self.consented,
            "displayName": self.display_name,
        }


@dataclass
class User:
    id: str
    upn: str
    display_name: str
    tenant_id: str
    mail: str

    def to_graph(self) -> dict[str, Any]:
        given, _, surname = self.display_name.partition(" ")
        return {
            "businessPhones": [],
            "displayName": self.display_name,
            "givenName": given or None,
            "jobTitle": None,
            "mail": self.mail,
            "mobilePhone": None,
            "officeLocation": None,
            "preferredLanguage": "en-US",
            "surname": surname or None,
            "userPrincipalName": self.upn,
            "id": self.id,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "userPrincipalName": self.upn,
            "mail": self.mail,
            "displayName": self.display_name,
            "tenantId": self.tenant_id,
        }


@dataclass
class Override:
    """The stored differences of one exception occurrence."""

    fields: dict[str, Any]
    start: dt.datetime
    end: dt.datetime
    start_tz: str
    end_tz: str
    modified: dt.datetime
    change_key: str


@dataclass
class EventRecord:
    key: bytes
    user_id: str
    created: dt.datetime
    modified: dt.datetime
    change_key: str
    series_modified: dt.datetime
    series_change_key: str
    fields: dict[str, Any]
    start: dt.datetime
    end: dt.datetime
    start_tz: str
    end_tz: str
    ext_props: dict[str, tuple[str, str]] = field(default_factory=dict)
    transaction_id: str | None = None
    exceptions: dict[int, Override] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    deleted: bool = False

    @property
    def is_master(self) -> bool:
        return self.fields.get("recurrence") is not None


@dataclass
class Mailbox:
    user: User
    events: dict[bytes, EventRecord] = field(default_factory=dict)
    transactions: dict[str, bytes] = field(default_factory=dict)
    seq: int = 0
    changelog: list[tuple[int, list[InstanceKey]]] = field(default_factory=list)


@dataclass
class Instance:
    """One item of a calendar view: a single event, an occurrence or an exception."""

    record: EventRecord
    orig: int | None
    start: dt.datetime
    end: dt.datetime

    @property
    def ikey(self) -> InstanceKey:
        return (self.record.key, self.orig)

    @property
    def version(self) -> str:
        rec = self.record
        if self.orig is None:
            return rec.change_key
        ov = rec.exceptions.get(self.orig)
        return ov.change_key if ov else rec.series_change_key


def _bad(message: str, code: str = "ErrorInvalidRequest") -> GraphError:
    return GraphError(400, code, message)


def overlaps(start: dt.datetime, end: dt.datetime, ws: dt.datetime, we: dt.datetime) -> bool:
    """Calendar-view overlap; a zero-length item counts when it starts inside the window."""
    if start == end:
        return ws <= start < we
    return start < we and end > ws


def _parse_dtz(value: Any, name: str) -> tuple[dt.datetime, str]:
    if not isinstance(value, dict) or not isinstance(value.get("dateTime"), str):
        raise _bad(
            f"The property '{name}' must be a dateTimeTimeZone with a dateTime.", "RequestBodyRead"
        )
    tz_name = value.get("timeZone") or "UTC"
    if not isinstance(tz_name, str):
        raise _bad("A valid TimeZone value must be specified.", "ErrorTimeZoneNotSupported")
    try:
        canon = canonical_windows_name(tz_name)
        return parse_local(value["dateTime"], canon), canon
    except TimeZoneError as exc:
        raise _bad(str(exc), "ErrorTimeZoneNotSupported") from exc
    except ValueError as exc:
        raise _bad(str(exc), "RequestBodyRead") from exc


def _parse_date(value: Any, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError as exc:
        raise _bad(f"Invalid {name} '{value}' in recurrence range.") from exc


def validate_recurrence(value: Any) -> dict[str, Any] | None:
    """Normalise a patternedRecurrence; raises a 400 for what Graph would refuse."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("recurrence must be an object.", "RequestBodyRead")
    pattern = dict(value.get("pattern") or {})
    rng = dict(value.get("range") or {})
    ptype = pattern.get("type")
    if ptype not in {"daily", "weekly", "absoluteMonthly", "absoluteYearly"}:
        raise _bad(
            f"The recurrence pattern type '{ptype}' is not supported (graphsim supports "
            "daily, weekly, absoluteMonthly, absoluteYearly)."
        )
    interval = pattern.get("interval", 1)
    if not isinstance(interval, int) or interval < 1 or interval > 99:
        raise _bad("The recurrence pattern interval must be between 1 and 99.")
    days = [str(d).lower() for d in pattern.get("daysOfWeek") or []]
    if any(d not in WEEKDAYS for d in days):
        raise _bad(f"Invalid daysOfWeek {days}.")
    if ptype == "weekly" and not days:
        raise _bad("A weekly recurrence pattern needs daysOfWeek.")
    first = str(pattern.get("firstDayOfWeek") or "sunday").lower()
    if first not in WEEKDAYS:
        raise _bad(f"Invalid firstDayOfWeek {first}.")
    day_of_month = int(pattern.get("dayOfMonth") or 0)
    month = int(pattern.get("month") or 0)
    if ptype in {"absoluteMonthly", "absoluteYearly"} and not 1 <= day_of_month <= 31:
        raise _bad("dayOfMonth must be between 1 and 31.")
    if ptype == "absoluteYearly" and not 1 <= month <= 12:
        raise _bad("month must be between 1 and 12.")
    rtype = rng.get("type")
    if rtype not in {"endDate", "noEnd", "numbered"}:
        raise _bad(f"The recurrence range type '{rtype}' is invalid.")
    start_date = _parse_date(rng.get("startDate"), "startDate")
    end_date = None
    number = 0
    if rtype == "endDate":
        end_date = _parse_date(rng.get("endDate"), "endDate")
        if end_date < start_date:
            raise _bad("The recurrence range endDate is before its startDate.")
    if rtype == "numbered":
        number = rng.get("numberOfOccurrences")
        if not isinstance(number, int) or number < 1:
            raise _bad("numberOfOccurrences must be a positive integer.")
    rtz = rng.get("recurrenceTimeZone") or ""
    return {
        "pattern": {
            "type": ptype,
            "interval": interval,
            "month": month,
            "dayOfMonth": day_of_month,
            "daysOfWeek": days,
            "firstDayOfWeek": first,
            "index": "first",
        },
        "range": {
            "type": rtype,
            "startDate": start_date.isoformat(),
            "endDate": end_date.isoformat() if end_date else "0001-01-01",
            "recurrenceTimeZone": rtz,
            "numberOfOccurrences": number,
        },
    }


def _candidate_dates(rec: dict[str, Any]) -> Iterator[dt.date]:
    pattern, rng = rec["pattern"], rec["range"]
    start = dt.date.fromisoformat(rng["startDate"])
    interval = pattern["interval"]
    ptype = pattern["type"]
    if ptype == "daily":
        for k in itertools.count():
            yield start + dt.timedelta(days=k * interval)
    elif ptype == "weekly":
        first = WEEKDAYS.index(pattern["firstDayOfWeek"])
        week0 = start - dt.timedelta(days=(start.weekday() - first) % 7)
        offsets = sorted((WEEKDAYS.index(d) - first) % 7 for d in pattern["daysOfWeek"])
        for k in itertools.count():
            base = week0 + dt.timedelta(weeks=k * interval)
            for off in offsets:
                day = base + dt.timedelta(days=off)
                if day >= start:
                    yield day
    elif ptype == "absoluteMonthly":
        for k in itertools.count():
            months = start.month - 1 + k * interval
            year, month = start.year + months // 12, months % 12 + 1
            if pattern["dayOfMonth"] <= calendar.monthrange(year, month)[1]:
                day = dt.date(year, month, pattern["dayOfMonth"])
                if day >= start:
                    yield day
    else:
        for k in itertools.count():
            year = start.year + k * interval
            month = pattern["month"]
            if pattern["dayOfMonth"] <= calendar.monthrange(year, month)[1]:
                day = dt.date(year, month, pattern["dayOfMonth"])
                if day >= start:
                    yield day


def pattern_starts(
    record: EventRecord, ws: dt.datetime, we: dt.datetime
) -> Iterator[tuple[int, dt.datetime, dt.datetime]]:
    """(orig, start, end) of every pattern occurrence overlapping [ws, we), ignoring edits."""
    rec = record.fields["recurrence"]
    tz = zone(record.start_tz)
    local = record.start.astimezone(tz)
    duration = record.end - record.start
    end_date = dt.date.fromisoformat(rec["range"]["endDate"])
    rtype = rec["range"]["type"]
    limit = rec["range"]["numberOfOccurrences"]
    for count, day in enumerate(_candidate_dates(rec)):
        if count >= MAX_EXPANSION_STEPS:
            return
        if rtype == "endDate" and day > end_date:
            return
        if rtype == "numbered" and count >= limit:
            return
        start = dt.datetime.combine(day, local.time().replace(tzinfo=None), tzinfo=tz)
        if start >= we and start > ws:
            return
        end = start + duration
        if overlaps(start, end, ws, we):
            yield int(start.timestamp()), start, end


class Store:
    """All tenants, mailboxes and events. Mutations call the change listener."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.tenants: dict[str, Tenant] = {}
        self.mailboxes: dict[str, Mailbox] = {}
        self.listener: ChangeListener | None = None

    # ---- directory -------------------------------------------------------------------------

    def add_tenant(
        self,
        tenant_id: str | None = None,
        domain: str = "contoso.example",
        display_name: str = "Contoso",
    ) -> Tenant:
        tenant = Tenant(
            id=tenant_id or str(uuid.uuid4()), domains=[domain.lower()], display_name=display_name
        )
        self.tenants[tenant.id] = tenant
        return tenant

    def find_tenant(self, name: str) -> Tenant | None:
        """A tenant by GUID or by one of its domains."""
        lowered = name.lower()
        if lowered in self.tenants:
            return self.tenants[lowered]
        for tenant in self.tenants.values():
            if tenant.id.lower() == lowered or lowered in tenant.domains:
                return tenant
        return None

    def add_user(
        self,
        display_name: str,
        upn: str | None = None,
        tenant_id: str | None = None,
        user_id: str | None = None,
        mail: str | None = None,
    ) -> User:
        tenant = self.tenants[tenant_id] if tenant_id else next(iter(self.tenants.values()))
        if upn is None:
            local = re.sub(r"[^a-z0-9.]", "", display_name.lower().replace(" ", "."))
            upn = f"{local or 'user'}@{tenant.domains[0]}"
        if any(m.user.upn.lower() == upn.lower() for m in self.mailboxes.values()):
            raise ValueError(f"user {upn} exists")
        user = User(
            id=user_id or str(uuid.uuid4()),
            upn=upn,
            display_name=display_name,
            tenant_id=tenant.id,
            mail=mail or upn,
        )
        self.mailboxes[user.id] = Mailbox(user=user)
        return user

    def find_user(self, id_or_upn: str) -> User | None:
        box = self.mailboxes.get(id_or_upn.lower()) or self.mailboxes.get(id_or_upn)
        if box:
            return box.user
        for box in self.mailboxes.values():
            if box.user.upn.lower() == id_or_upn.lower():
                return box.user
        return None

    def mailbox(self, user_id: str) -> Mailbox:
        return self.mailboxes[user_id]

    # ---- change bookkeeping ----------------------------------------------------------------

    def _bump(self, seed: str) -> str:
        return change_key(os.urandom(8) + seed.encode())

    def _log(self, box: Mailbox, touched: list[InstanceKey]) -> None:
        box.seq += 1
        box.changelog.append((box.seq, touched))

    def _emit(self, user_id: str, change_type: str, record: EventRecord, notify: bool) -> None:
        if notify and self.listener is not None:
            self.listener(user_id, change_type, record)

    # ---- writes ----------------------------------------------------------------------------

    def _apply(
        self, target: dict[str, Any], payload: dict[str, Any], *, occurrence: bool, creating: bool
    ) -> dict[str, Any]:
        """Validate `payload` and merge it into `target`; returns parsed start/end if given."""
        parsed: dict[str, Any] = {}
        for name, value in payload.items():
            if name.startswith("@odata.") or name in READ_ONLY:
                continue
            if name not in WRITABLE:
                raise _bad(
                    f"The property '{name}' does not exist on type 'microsoft.graph.event'. "
                    "Make sure to only use property names that are defined by the type or mark "
                    "the type as open type.",
                    "RequestBodyRead",
                )
            if name == "transactionId":
                if not creating:
                    raise _bad(
                        "The property 'transactionId' cannot be changed after creation.",
                        "ErrorInvalidPropertyForOperation",
                    )
                continue
            if name in ("start", "end"):
                parsed[name] = _parse_dtz(value, name)
            elif name == "recurrence":
                if occurrence:
                    raise _bad(
                        "An occurrence of a recurring series cannot have a recurrence.",
                        "ErrorPropertyValidationFailure",
                    )
                target["recurrence"] = validate_recurrence(value)
            elif name == "singleValueExtendedProperties":
                parsed[name] = self._parse_ext(value)
            elif name in ENUMS:
                if value not in ENUMS[name]:
                    raise _bad(f"Requested value '{value}' was not found.", "RequestBodyRead")
                target[name] = value
            elif name == "body":
                if not isinstance(value, dict) or str(
                    value.get("contentType", "text")
                ).lower() not in {"text", "html"}:
                    raise _bad(
                        "body must be an itemBody with contentType text or html.", "RequestBodyRead"
                    )
                target["body"] = {
                    "contentType": str(value.get("contentType", "text")).lower(),
                    "content": str(value.get("content") or ""),
                }
            elif name == "attendees":
                target["attendees"] = self._parse_attendees(value)
            elif name == "location":
                loc = value or {}
                if not isinstance(loc, dict):
                    raise _bad("location must be an object.", "RequestBodyRead")
                target["location"] = {
                    "displayName": "",
                    "locationType": "default",
                    "uniqueIdType": "unknown",
                    **loc,
                }
            elif name == "categories":
                if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                    raise _bad("categories must be a list of strings.", "RequestBodyRead")
                target["categories"] = list(value)
            elif name == "subject":
                target["subject"] = "" if value is None else str(value)
            elif name == "isAllDay":
                if not isinstance(value, bool):
                    raise _bad("isAllDay must be a boolean.", "RequestBodyRead")
                target["isAllDay"] = value
            else:
                target[name] = copy.deepcopy(value)
        return parsed

    @staticmethod
    def _parse_attendees(value: Any) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _bad("attendees must be a list.", "RequestBodyRead")
        out = []
        for item in value:
            email = (item or {}).get("emailAddress") or {}
            address = email.get("address")
            if not isinstance(address, str) or "@" not in address:
                raise _bad("An attendee needs emailAddress.address.", "ErrorInvalidRecipients")
            kind = item.get("type", "required")
            if kind not in {"required", "optional", "resource"}:
                raise _bad(f"Requested value '{kind}' was not found.", "RequestBodyRead")
            out.append(
                {
                    "type": kind,
                    "status": {"response": "none", "time": "0001-01-01T00:00:00Z"},
                    "emailAddress": {"name": email.get("name") or address, "address": address},
                }
            )
        return out

    @staticmethod
    def _parse_ext(value: Any) -> dict[str, tuple[str, str]]:
        if not isinstance(value, list):
            raise _bad("singleValueExtendedProperties must be a list.", "RequestBodyRead")
        out = {}
        for prop in value:
            pid, pval = (prop or {}).get("id"), (prop or {}).get("value")
            if not isinstance(pid, str) or not pid.strip():
                raise _bad("An extended property needs an id.", "ErrorInvalidExtendedProperty")
            if pval is not None and not isinstance(pval, str):
                raise _bad(
                    "An extended property value must be a string.",
                    "ErrorInvalidExtendedPropertyValue",
                )
            out[pid.lower()] = (pid, pval or "")
        return out

    @staticmethod
    def _check_times(start: dt.datetime, end: dt.datetime, all_day: bool) -> None:
        if end < start:
            raise _bad(
                "The end date occurs before the start date.",
                "ErrorCalendarEndDateIsEarlierThanStartDate",
            )
        if all_day and (start.time() != dt.time(0) or end.time() != dt.time(0) or end <= start):
            raise _bad(
                "If the event is an all-day event, start and end must be at midnight "
                "and span at least one day.",
                "ErrorPropertyValidationFailure",
            )

    def create_event(
        self, user_id: str, payload: dict[str, Any], *, notify: bool = True
    ) -> tuple[EventRecord, bool]:
        """Create an event (or series); returns (record, created). transactionId de-duplicates."""
        if not isinstance(payload, dict):
            raise _bad("The request body must be a JSON object.", "RequestBodyRead")
        box = self.mailbox(user_id)
        txn = payload.get("transactionId")
        if txn is not None:
            if not isinstance(txn, str) or not txn:
                raise _bad("transactionId must be a string.", "RequestBodyRead")
            existing = box.transactions.get(txn)
            if existing and not box.events[existing].deleted:
                return box.events[existing], False
        if "start" not in payload or "end" not in payload:
            raise _bad("Both start and end are required.", "ErrorPropertyValidationFailure")
        fields: dict[str, Any] = {
            "subject": "",
            "body": {"contentType": "html", "content": ""},
            "location": {"displayName": "", "locationType": "default", "uniqueIdType": "unknown"},
            "attendees": [],
            "showAs": "busy",
            "sensitivity": "normal",
            "importance": "normal",
            "categories": [],
            "isAllDay": False,
            "recurrence": None,
            "isReminderOn": True,
            "reminderMinutesBeforeStart": 15,
            "responseRequested": True,
            "allowNewTimeProposals": True,
            "isOnlineMeeting": False,
            "onlineMeetingProvider": "unknown",
            "hideAttendees": False,
        }
        parsed = self._apply(fields, payload, occurrence=False, creating=True)
        (start, start_tz), (end, end_tz) = parsed["start"], parsed["end"]
        self._check_times(start, end, fields["isAllDay"])
        now = self.clock.now()
        key = uuid.uuid4().bytes
        ck = self._bump("create")
        record = EventRecord(
            key=key,
            user_id=user_id,
            created=now,
            modified=now,
            change_key=ck,
            series_modified=now,
            series_change_key=ck,
            fields=fields,
            start=start,
            end=end,
            start_tz=start_tz,
            end_tz=end_tz,
            ext_props=parsed.get("singleValueExtendedProperties", {}),
            transaction_id=txn,
        )
        box.events[key] = record
        if txn is not None:
            box.transactions[txn] = key
        self._log(box, [(key, None)])
        self._emit(user_id, "created", record, notify)
        return record, True

    def resolve(self, user_id: str, event_id: str) -> tuple[EventRecord, int | None]:
        """The live record (and occurrence start) behind an id in either form; 404 otherwise."""
        parsed = parse_id(event_id)
        box = self.mailboxes.get(user_id)
        record = box.events.get(parsed[0]) if parsed and box else None
        if record is None or record.deleted or parsed is None:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        orig = parsed[1]
        if orig is not None and not self.occurrence_exists(record, orig):
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return record, orig

    def occurrence_exists(self, record: EventRecord, orig: int) -> bool:
        if not record.is_master or orig in record.cancelled:
            return False
        if orig in record.exceptions:
            return True
        at = dt.datetime.fromtimestamp(orig, dt.UTC)
        probe_end = at + dt.timedelta(seconds=1)
        return any(o == orig for o, _, _ in pattern_starts(record, at, probe_end))

    def update_event(
        self, user_id: str, event_id: str, payload: dict[str, Any], *, notify: bool = True
    ) -> tuple[EventRecord, int | None]:
        """PATCH semantics; an occurrence becomes an exception and only the master is notified."""
        if not isinstance(payload, dict):
            raise _bad("The request body must be a JSON object.", "RequestBodyRead")
        record, orig = self.resolve(user_id, event_id)
        box = self.mailbox(user_id)
        now = self.clock.now()
        if orig is not None:
            inst = self.instance(record, orig)
            ov = record.exceptions.get(orig)
            fields = copy.deepcopy(ov.fields) if ov else {}
            merged = {**record.fields, **fields}
            parsed = self._apply(merged, payload, occurrence=True, creating=False)
            if "singleValueExtendedProperties" in parsed:
                raise _bad(
                    "Extended properties of an occurrence are set on its series master.",
                    "ErrorInvalidPropertyForOperation",
                )
            for name in payload:
                if name in merged and name in WRITABLE and name != "recurrence":
                    fields[name] = merged[name]
            start, start_tz = parsed.get(
                "start", (inst.start, ov.start_tz if ov else record.start_tz)
            )
            end, end_tz = parsed.get("end", (inst.end, ov.end_tz if ov else record.end_tz))
            self._check_times(start, end, merged.get("isAllDay", False))
            record.exceptions[orig] = Override(
                fields=fields,
                start=start,
                end=end,
                start_tz=start_tz,
                end_tz=end_tz,
                modified=now,
                change_key=self._bump("exception"),
            )
            record.modified = now
            record.change_key = self._bump("master-by-exception")
            self._log(box, [(record.key, orig)])
            self._emit(user_id, "updated", record, notify)
            return record, orig
        fields = copy.deepcopy(record.fields)
        parsed = self._apply(fields, payload, occurrence=False, creating=False)
        start, start_tz = parsed.get("start", (record.start, record.start_tz))
        end, end_tz = parsed.get("end", (record.end, record.end_tz))
        self._check_times(start, end, fields["isAllDay"])
        pattern_changed = (
            fields.get("recurrence") != record.fields.get("recurrence")
            or start != record.start
            or end != record.end
        )
        record.fields = fields
        record.start, record.start_tz, record.end, record.end_tz = start, start_tz, end, end_tz
        if "singleValueExtendedProperties" in parsed:
            record.ext_props.update(parsed["singleValueExtendedProperties"])
        record.modified = now
        record.change_key = self._bump("update")
        record.series_modified = now
        record.series_change_key = record.change_key
        if pattern_changed and (record.exceptions or record.cancelled):
            # Exchange drops a series' exceptions when its pattern or times change.
            record.exceptions.clear()
            record.cancelled.clear()
        if not record.is_master:
            record.exceptions.clear()
            record.cancelled.clear()
        self._log(box, [(record.key, None)])
        self._emit(user_id, "updated", record, notify)
        return record, None

    def delete_event(self, user_id: str, event_id: str, *, notify: bool = True) -> None:
        """Delete an event or series; an occurrence is cancelled and the master notified."""
        record, orig = self.resolve(user_id, event_id)
        box = self.mailbox(user_id)
        now = self.clock.now()
        if orig is not None:
            record.cancelled.add(orig)
            record.exceptions.pop(orig, None)
            record.modified = now
            record.change_key = self._bump("cancel")
            self._log(box, [(record.key, orig)])
            self._emit(user_id, "updated", record, notify)
            return
        record.deleted = True
        record.modified = now
        touched: list[InstanceKey] = [(record.key, None)]
        touched.extend((record.key, o) for o in record.exceptions)
        self._log(box, touched)
        self._emit(user_id, "deleted", record, notify)

    # ---- reads -----------------------------------------------------------------------------

    def list_events(self, user_id: str) -> list[EventRecord]:
        """Singles and series masters, oldest first (what GET /events lists)."""
        return [r for r in self.mailbox(user_id).events.values() if not r.deleted]

    def instance(self, record: EventRecord, orig: int | None) -> Instance:
        if orig is None:
            return Instance(record, None, record.start, record.end)
        ov = record.exceptions.get(orig)
        if ov:
            return Instance(record, orig, ov.start, ov.end)
        start = dt.datetime.fromtimestamp(orig, dt.UTC).astimezone(zone(record.start_tz))
        return Instance(record, orig, start, start + (record.end - record.start))

    def expand(self, record: EventRecord, ws: dt.datetime, we: dt.datetime) -> list[Instance]:
        """Occurrences and exceptions of a series overlapping [ws, we)."""
        out = []
        for orig, start, end in pattern_starts(record, ws, we):
            if orig in record.cancelled or orig in record.exceptions:
                continue
            out.append(Instance(record, orig, start, end))
        for orig, ov in record.exceptions.items():
            if orig not in record.cancelled and overlaps(ov.start, ov.end, ws, we):
                out.append(Instance(record, orig, ov.start, ov.end))
        return out

    def calendar_view(self, user_id: str, ws: dt.datetime, we: dt.datetime) -> list[Instance]:
        """Singles, occurrences and exceptions overlapping [ws, we), by start."""
        out: list[Instance] = []
        for record in self.list_events(user_id):
            if record.is_master:
                out.extend(self.expand(record, ws, we))
            elif overlaps(record.start, record.end, ws, we):
                out.append(Instance(record, None, record.start, record.end))
        out.sort(key=lambda i: (i.start, i.record.created, i.orig or 0))
        return out

    # ---- rendering -------------------------------------------------------------------------

    def render(
        self,
        inst: Instance,
        *,
        immutable: bool = False,
        tz_name: str = "UTC",
        select: set[str] | None = None,
        expand_ext: set[str] | None = None,
    ) -> dict[str, Any]:
        """The Graph JSON of an instance, as GET would return it."""
        rec = inst.record
        box = self.mailbox(rec.user_id)
        ov = rec.exceptions.get(inst.orig) if inst.orig is not None else None
        fields = {**rec.fields, **(ov.fields if ov else {})}
        if inst.orig is None:
            kind = "seriesMaster" if rec.is_master else "singleInstance"
            modified, ck = rec.modified, rec.change_key
        else:
            kind = "exception" if ov else "occurrence"
            modified = ov.modified if ov else rec.series_modified
            ck = ov.change_key if ov else rec.series_change_key
        event_id = make_id(rec.key, inst.orig, immutable=immutable)
        start_tz = ov.start_tz if ov else rec.start_tz
        end_tz = ov.end_tz if ov else rec.end_tz
        all_day = bool(fields.get("isAllDay"))
        shown_start_tz = start_tz if all_day else tz_name
        shown_end_tz = end_tz if all_day else tz_name
        body = fields["body"]
        text = (
            re.sub(r"<[^>]+>", " ", body["content"])
            if body["contentType"] == "html"
            else body["content"]
        )
        out: dict[str, Any] = {
            "@odata.etag": f'W/"{ck}"',
            "id": event_id,
            "createdDateTime": format_utc(rec.created),
            "lastModifiedDateTime": format_utc(modified),
            "changeKey": ck,
            "categories": fields["categories"],
            "transactionId": rec.transaction_id,
            "originalStartTimeZone": rec.start_tz,
            "originalEndTimeZone": rec.end_tz,
            "iCalUId": ical_uid(rec.key, inst.orig),
            "uid": ical_uid(rec.key),
            "reminderMinutesBeforeStart": fields["reminderMinutesBeforeStart"],
            "isReminderOn": fields["isReminderOn"],
            "hasAttachments": False,
            "subject": fields["subject"],
            "bodyPreview": " ".join(text.split())[:255],
            "importance": fields["importance"],
            "sensitivity": fields["sensitivity"],
            "isAllDay": all_day,
            "isCancelled": False,
            "isOrganizer": True,
            "responseRequested": fields["responseRequested"],
            "seriesMasterId": make_id(rec.key, immutable=immutable)
            if inst.orig is not None
            else None,
            "showAs": fields["showAs"],
            "type": kind,
            "webLink": "https://outlook.office365.com/owa/?itemid="
            + quote(event_id, safe="")
            + "&exvsurl=1&path=/calendar/item",
            "onlineMeetingUrl": None,
            "isOnlineMeeting": fields["isOnlineMeeting"],
            "onlineMeetingProvider": fields["onlineMeetingProvider"],
            "allowNewTimeProposals": fields["allowNewTimeProposals"],
            "isDraft": False,
            "hideAttendees": fields["hideAttendees"],
            "responseStatus": {"response": "organizer", "time": "0001-01-01T00:00:00Z"},
            "body": body,
            "start": format_local(inst.start, shown_start_tz),
            "end": format_local(inst.end, shown_end_tz),
            "location": fields["location"],
            "locations": [fields["location"]] if fields["location"].get("displayName") else [],
            "recurrence": fields["recurrence"] if inst.orig is None else None,
            "attendees": fields["attendees"],
            "organizer": {
                "emailAddress": {"name": box.user.display_name, "address": box.user.mail}
            },
            "onlineMeeting": None,
        }
        if rec.transaction_id is None:
            del out["transactionId"]
        if inst.orig is not None:
            out["originalStart"] = format_utc(dt.datetime.fromtimestamp(inst.orig, dt.UTC))
        if select:
            keep = {"@odata.etag", "id"} | select
            out = {k: v for k, v in out.items() if k in keep}
        if expand_ext is not None:
            props = [
                {"id": pid, "value": val}
                for low, (pid, val) in rec.ext_props.items()
                if low in expand_ext
            ]
            if props:
                out["singleValueExtendedProperties"] = props
        return out

"""The two decisions that keep the sync correct, as pure functions (no I/O).

``is_newer`` decides whether a version fetched from Graph replaces the stored one;
``plan_update`` turns 1Relation's wanted state of an event into the PATCH Graph receives
and the field groups whose change lost to a newer one in Outlook, comparing fields as
``comparable`` normalises them, per group of ``FIELD_GROUPS``, against ``outlook_view``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from handlers.timezones import event_time_to_utc

#: Fields that are compared and written together when deciding conflicts.
Groups = Mapping[str, frozenset[str]]
#: Field values normalised so that what was sent equals what Graph returns for it.
Normalise = Callable[[Mapping[str, Any]], dict[str, Any]]

#: Field groups for conflict resolution (the newest change wins per group).
FIELD_GROUPS: Groups = {
    "time": frozenset({"start", "end", "isAllDay", "recurrence"}),
    "content": frozenset({"subject", "body", "location", "showAs", "sensitivity", "categories"}),
    "attendees": frozenset({"attendees"}),
}


@dataclass(frozen=True)
class Version:
    """An event version: Graph's ``lastModifiedDateTime`` and (a hash of) its ``changeKey``."""

    last_modified: datetime
    change_key: str


def is_newer(stored: Version | None, fetched: Version) -> bool:
    """Whether ``fetched`` replaces ``stored``.

    ``lastModifiedDateTime`` orders versions; on an equal timestamp a different
    ``changeKey`` wins, because the fetch is later than whatever was stored. Nothing
    stored: the fetched version is new.
    """
    if stored is None:
        return True
    if fetched.last_modified != stored.last_modified:
        return fetched.last_modified > stored.last_modified
    return fetched.change_key != stored.change_key


@dataclass(frozen=True)
class OutlookView:
    """What Outlook shows of an event the service wrote, as far as the service knows."""

    fields: dict[str, Any]
    #: Graph's ``lastModifiedDateTime`` of what Outlook shows (of the last write if unseen).
    last_modified: datetime | None
    #: When Outlook changed the event since the service's last write; None if it did not.
    changed_at: datetime | None
    #: Outlook says the account does not organise this meeting.
    not_organiser: bool


def outlook_view(
    *,
    last_written: Mapping[str, Any],
    written_at: datetime | None,
    seen: tuple[Mapping[str, Any], datetime | None] | None,
) -> OutlookView:
    """Combine the last write (``last_written`` at ``written_at``) with the stored copy of
    Outlook's version (``seen``: its fields and ``lastModifiedDateTime``, None if none)."""
    if seen is None:
        return OutlookView(dict(last_written), written_at, None, not_organiser=False)
    # Fields the store does not keep (categories) are as the service last wrote them.
    fields = {**last_written, **seen[0]}
    seen_at = seen[1]
    not_organiser = fields.get("isOrganizer") is False
    if written_at is not None and seen_at is not None and _aware(seen_at) < _aware(written_at):
        # The stored copy predates our last write (its notification is not handled yet):
        # what we wrote is what Outlook shows for those fields.
        fields = {**fields, **last_written}
    changed = written_at is not None and seen_at is not None and seen_at > written_at
    return OutlookView(fields, seen_at, seen_at if changed else None, not_organiser)


@dataclass(frozen=True)
class Plan:
    """What to write to Graph and which groups of 1Relation's change lost."""

    patch: dict[str, Any]
    lost_groups: tuple[str, ...]
    lost_fields: tuple[str, ...]


def plan_update(
    *,
    outlook: Mapping[str, Any],
    last_written: Mapping[str, Any],
    wanted: Mapping[str, Any],
    outlook_changed_at: datetime | None,
    wanted_at: datetime,
    groups: Groups,
    normalise: Normalise,
) -> Plan:
    """The PATCH that brings Outlook to ``wanted``, field by field, newest change per group.

    ``outlook`` is what Outlook shows now, ``last_written`` what the service last wrote
    (the base of both sides' changes), ``outlook_changed_at`` the time of an Outlook change
    since that write (None when there was none). Per group: when Outlook changed the
    group since the last write and that change is newer than ``wanted_at``, 1Relation's
    change to the group loses. Only fields whose value differs from Outlook's are written:
    an identical field in a PATCH would still make Exchange mail every attendee.
    """
    patch: dict[str, Any] = {}
    lost_groups: list[str] = []
    lost_fields: list[str] = []
    for group, names in groups.items():
        mine = {n: wanted[n] for n in sorted(names) if n in wanted}
        differing = {
            n: v for n, v in mine.items() if normalise({n: v}) != normalise({n: outlook.get(n)})
        }
        if not differing:
            continue
        current = {n: outlook.get(n) for n in mine}
        base = {n: last_written.get(n) for n in mine}
        theirs_changed = outlook_changed_at is not None and normalise(current) != normalise(base)
        if theirs_changed and outlook_changed_at is not None and outlook_changed_at > wanted_at:
            lost_groups.append(group)
            lost_fields.extend(mine)
            continue
        patch.update(differing)
    return Plan(patch, tuple(lost_groups), tuple(lost_fields))


def comparable(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Field values normalised so that what we sent equals what Graph returns for it."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("start", "end"):
            out[name] = event_time_to_utc(value) if value is not None else None
        elif name == "body":
            out[name] = (value or {}).get("content", "").strip() if value else None
        elif name == "attendees":
            out[name] = sorted(
                ((a.get("emailAddress") or {}).get("address", "").lower(), a.get("type"))
                for a in value or []
            )
        elif name == "location":
            out[name] = (value or {}).get("displayName", "") if value else ""
        elif name == "categories":
            out[name] = sorted(value or [])
        elif name == "recurrence":
            out[name] = _recurrence(value)
        else:
            out[name] = value
    return out


def _recurrence(value: Any) -> tuple[Any, ...] | None:
    """A recurrence as a comparable tuple: Graph answers with every default filled in
    (``firstDayOfWeek``, ``index``, ``endDate`` ``0001-01-01`` for other range types, ...)."""
    if not isinstance(value, Mapping):
        return None
    pattern = value.get("pattern") or {}
    rng = value.get("range") or {}
    rtype = rng.get("type")
    return (
        pattern.get("type"),
        pattern.get("interval") or 1,
        pattern.get("month") or 0,
        pattern.get("dayOfMonth") or 0,
        tuple(sorted(str(d).lower() for d in pattern.get("daysOfWeek") or [])),
        str(pattern.get("firstDayOfWeek") or "sunday").lower(),
        str(pattern.get("index") or "first").lower(),
        rtype,
        rng.get("startDate"),
        rng.get("endDate") if rtype == "endDate" else None,
        rng.get("numberOfOccurrences") if rtype == "numbered" else None,
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

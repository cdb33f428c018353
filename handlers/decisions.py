"""The two decisions that keep the sync correct, as pure functions (no I/O).

``is_newer`` decides whether a version fetched from Graph replaces the stored one;
``plan_update`` turns 1Relation's wanted state of an event into the PATCH Graph receives
and the field groups whose change lost to a newer one in Outlook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Fields that are compared and written together when deciding conflicts.
Groups = Mapping[str, frozenset[str]]
#: Field values normalised so that what was sent equals what Graph returns for it.
Normalise = Callable[[Mapping[str, Any]], dict[str, Any]]


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

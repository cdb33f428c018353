"""Time zones at the edge: Graph's ``dateTimeTimeZone`` in, aware UTC inside.

Graph speaks Windows zone names ("Romance Standard Time"); 1Relation may send IANA names
("Europe/Copenhagen"). The CLDR mapping between the two comes from ``tzlocal`` (a
well-kept table of Unicode's windowsZones.xml) rather than a hand-copied list.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tzlocal.windows_tz import tz_win, win_tz

from handlers.timeutil import parse_graph_datetime

_UTC_NAMES = frozenset({"utc", "etc/utc", "gmt", "etc/gmt", "z", "coordinated universal time"})


def zone_for(name: str) -> ZoneInfo | None:
    """The zone a Windows or IANA name stands for, or None if neither knows it."""
    stripped = name.strip()
    if stripped.lower() in _UTC_NAMES:
        return ZoneInfo("UTC")
    iana = win_tz.get(stripped, stripped)
    try:
        return ZoneInfo(iana)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def windows_name(name: str) -> str | None:
    """The Windows name Graph accepts for a Windows or IANA name, or None if unknown."""
    stripped = name.strip()
    if stripped.lower() in _UTC_NAMES:
        return "UTC"
    if stripped in win_tz:
        return stripped
    if stripped in tz_win:
        return tz_win[stripped]
    return None


def event_time_to_utc(value: Any) -> datetime | None:
    """Convert Graph's ``{"dateTime", "timeZone"}`` to aware UTC; None if absent or unreadable."""
    if not isinstance(value, Mapping) or not isinstance(value.get("dateTime"), str):
        return None
    try:
        local = parse_graph_datetime(value["dateTime"]).replace(tzinfo=None)
    except ValueError:
        return None
    zone = zone_for(str(value.get("timeZone") or "UTC")) or ZoneInfo("UTC")
    try:
        return local.replace(tzinfo=zone).astimezone(UTC)
    except OverflowError:  # 9999-12-31 west of UTC, 0001-01-01 east of it
        return None

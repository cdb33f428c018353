"""Windows time zone names (what Graph accepts) mapped to IANA zones, and Graph's date formats."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

# A practical subset of the Windows zones Exchange knows (CLDR windowsZones, territory 001).
WINDOWS_TO_IANA: dict[str, str] = {
    "UTC": "UTC",
    "Coordinated Universal Time": "UTC",
    "Dateline Standard Time": "Etc/GMT+12",
    "Hawaiian Standard Time": "Pacific/Honolulu",
    "Alaskan Standard Time": "America/Anchorage",
    "Pacific Standard Time": "America/Los_Angeles",
    "Mountain Standard Time": "America/Denver",
    "US Mountain Standard Time": "America/Phoenix",
    "Central Standard Time": "America/Chicago",
    "Eastern Standard Time": "America/New_York",
    "Atlantic Standard Time": "America/Halifax",
    "Newfoundland Standard Time": "America/St_Johns",
    "E. South America Standard Time": "America/Sao_Paulo",
    "Argentina Standard Time": "America/Buenos_Aires",
    "GMT Standard Time": "Europe/London",
    "Greenwich Standard Time": "Atlantic/Reykjavik",
    "W. Europe Standard Time": "Europe/Berlin",
    "Romance Standard Time": "Europe/Paris",
    "Central Europe Standard Time": "Europe/Budapest",
    "Central European Standard Time": "Europe/Warsaw",
    "E. Europe Standard Time": "Europe/Chisinau",
    "GTB Standard Time": "Europe/Bucharest",
    "FLE Standard Time": "Europe/Kiev",
    "Russian Standard Time": "Europe/Moscow",
    "Turkey Standard Time": "Europe/Istanbul",
    "Israel Standard Time": "Asia/Jerusalem",
    "South Africa Standard Time": "Africa/Johannesburg",
    "Egypt Standard Time": "Africa/Cairo",
    "Arabian Standard Time": "Asia/Dubai",
    "Pakistan Standard Time": "Asia/Karachi",
    "India Standard Time": "Asia/Kolkata",
    "Bangladesh Standard Time": "Asia/Dhaka",
    "SE Asia Standard Time": "Asia/Bangkok",
    "China Standard Time": "Asia/Shanghai",
    "Singapore Standard Time": "Asia/Singapore",
    "Taipei Standard Time": "Asia/Taipei",
    "Tokyo Standard Time": "Asia/Tokyo",
    "Korea Standard Time": "Asia/Seoul",
    "AUS Eastern Standard Time": "Australia/Sydney",
    "E. Australia Standard Time": "Australia/Brisbane",
    "Cen. Australia Standard Time": "Australia/Adelaide",
    "W. Australia Standard Time": "Australia/Perth",
    "New Zealand Standard Time": "Pacific/Auckland",
}
_LOWER = {k.lower(): k for k in WINDOWS_TO_IANA}


class TimeZoneError(ValueError):
    """A time zone name Graph would refuse."""


def canonical_windows_name(name: str) -> str:
    """The canonical spelling of a Windows zone name; raises TimeZoneError for anything else."""
    canon = _LOWER.get(name.strip().lower())
    if canon is None:
        raise TimeZoneError(
            f"A valid TimeZone value must be specified. The time zone '{name}' is not supported."
        )
    return "UTC" if canon == "Coordinated Universal Time" else canon


def zone(name: str) -> ZoneInfo:
    """The zoneinfo for a Windows zone name."""
    return ZoneInfo(WINDOWS_TO_IANA[canonical_windows_name(name)])


def parse_local(date_time: str, tz_name: str) -> dt.datetime:
    """Parse Graph's dateTimeTimeZone pair into an aware datetime."""
    zi = zone(tz_name)
    text = date_time.strip()
    if text.endswith("Z"):
        text = text[:-1]
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        naive = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(
            f"Cannot convert the literal '{date_time}' to the expected type 'Edm.DateTime'."
        ) from exc
    if naive.tzinfo is not None:
        naive = naive.astimezone(zi).replace(tzinfo=None)
    return naive.replace(tzinfo=zi)


def parse_query_instant(text: str) -> dt.datetime:
    """Parse a startDateTime/endDateTime query value; naive values are UTC."""
    raw = text.strip().replace(" ", "+")
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    if "." in raw:
        head, rest = raw.split(".", 1)
        digits = ""
        for ch in rest:
            if ch.isdigit():
                digits += ch
            else:
                break
        raw = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    value = dt.datetime.fromisoformat(raw)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def format_local(value: dt.datetime, tz_name: str) -> dict[str, str]:
    """Graph's dateTimeTimeZone for `value` shown in the Windows zone `tz_name`."""
    local = value.astimezone(zone(tz_name))
    return {
        "dateTime": local.strftime("%Y-%m-%dT%H:%M:%S") + f".{local.microsecond:06d}0",
        "timeZone": canonical_windows_name(tz_name),
    }


def format_utc(value: dt.datetime) -> str:
    """UTC ISO timestamp with 7 fractional digits and Z, as Graph writes lastModifiedDateTime."""
    utc = value.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{utc.microsecond:06d}0Z"


def format_offset(value: dt.datetime) -> str:
    """UTC timestamp with 7 fractional digits and +00:00, as in subscriptionExpirationDateTime."""
    return format_utc(value)[:-1] + "+00:00"

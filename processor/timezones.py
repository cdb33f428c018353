"""The runtime's name for :mod:`handlers.timezones` (Windows and IANA zone names)."""

from __future__ import annotations

from handlers.timezones import event_time_to_utc, windows_name, zone_for

__all__ = ["event_time_to_utc", "windows_name", "zone_for"]

"""The runtime's name for :mod:`handlers.timeutil` (time at the edges)."""

from __future__ import annotations

from handlers.timeutil import as_utc, isoformat_z, parse_graph_datetime, to_millis, utcnow

__all__ = ["as_utc", "isoformat_z", "parse_graph_datetime", "to_millis", "utcnow"]

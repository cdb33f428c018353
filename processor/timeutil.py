"""Time helpers; they live in :mod:`contract.timeutil`, beside the formats they implement."""

from contract.timeutil import as_utc, isoformat_z, parse_graph_datetime, to_millis, utcnow

__all__ = ["as_utc", "isoformat_z", "parse_graph_datetime", "to_millis", "utcnow"]

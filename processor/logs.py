"""Structured JSON logging: stable dotted event names, identifiers as context, no content."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

#: Keys whose values are never written, whatever a caller passes (defence in depth: the
#: rule is that content and secrets are not logged at all).
_REDACTED_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "client_secret",
        "secret",
        "password",
        "authorization",
        "client_state",
        "clientstate",
        "subject",
        "body",
        "content",
        "attendees",
        "location",
        "email",
        "address",
        "delta_link",
        "token_cache",
    }
)


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    """Send structlog events as one JSON object per line to ``stream`` (stdout)."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library: keep their warnings, in one line each.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)


def get_logger(name: str) -> Any:
    """Return a bound structlog logger for a module."""
    return structlog.get_logger(name)


def new_correlation_id() -> str:
    """A fresh correlation id for a request or message."""
    return uuid.uuid4().hex


@contextmanager
def correlation(correlation_id: str | None = None, **identifiers: Any) -> Iterator[str]:
    """Bind a correlation id (and identifiers) to every log event inside the block."""
    cid = correlation_id or new_correlation_id()
    with structlog.contextvars.bound_contextvars(correlation_id=cid, **identifiers):
        yield cid

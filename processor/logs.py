"""Structured logging: stable dotted event names, identifiers as context, no content.

One JSON object per line for machines; on a terminal (or with ``M365SYNC_LOG_FORMAT=console``)
the same events as aligned, readable lines.
"""

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


#: Library loggers whose DEBUG records dump payloads: MSAL's token cache logs the
#: authorization code and PKCE verifier it redeems, aiormq every frame it sends (message
#: bodies, 1Relation's content among them), pymongo every command and reply.
PAYLOAD_LOGGERS = (
    "msal.application",
    "msal.authority",
    "msal.telemetry",
    "msal.token_cache",
    "aiormq.channel",
    "aiormq.connection",
    "pymongo.command",
)


def _above_debug(record: logging.LogRecord) -> bool:
    return record.levelno > logging.DEBUG


def silence_payload_debug() -> None:
    """Drop the DEBUG records of :data:`PAYLOAD_LOGGERS` at the source.

    A filter on the logger itself holds whatever levels and handlers an operator sets up
    later (``logging.getLogger("msal").setLevel(DEBUG)`` included); their INFO and above
    still pass. Idempotent.
    """
    for name in PAYLOAD_LOGGERS:
        logger = logging.getLogger(name)
        if _above_debug not in logger.filters:
            logger.addFilter(_above_debug)


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


#: Values of ``M365SYNC_LOG_FORMAT``: ``auto`` is console on a terminal, JSON otherwise.
LOG_FORMATS = ("auto", "console", "json")


def renders_console(log_format: str, stream: Any) -> bool:
    """Whether events written to ``stream`` in ``log_format`` are rendered for people."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if log_format != "auto":
        return log_format == "console"
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed or detached stream is no terminal
        return False


def configure_logging(level: str = "info", *, stream: Any = None, log_format: str = "auto") -> None:
    """Send structlog events to ``stream`` (stdout): JSON lines, or readable on a terminal."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    out = stream or sys.stdout
    if renders_console(log_format, out):
        # Exceptions go through the renderer's own formatter (format_exc_info would
        # flatten them first); colours only when a terminal shows them.
        tail: list[Any] = [structlog.dev.ConsoleRenderer(colors=_isatty(out), sort_keys=True)]
    else:
        tail = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library: keep their warnings, in one line each.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
    silence_payload_debug()


def _isatty(stream: Any) -> bool:
    return renders_console("auto", stream)


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

"""The runtime's view of the domain's error taxonomy (:mod:`handlers.errors`)."""

from __future__ import annotations

from handlers.errors import (
    AccountUnavailable,
    PermanentError,
    PublishError,
    ReauthorizationRequired,
    SyncError,
    ThrottledError,
    TransientError,
)

__all__ = [
    "AccountUnavailable",
    "PermanentError",
    "PublishError",
    "ReauthorizationRequired",
    "SyncError",
    "ThrottledError",
    "TransientError",
]

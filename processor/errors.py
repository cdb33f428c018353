"""The runtime's view of the domain's error taxonomy (:mod:`handlers.errors`)."""

from __future__ import annotations

from handlers.errors import (
    AccountUnavailable,
    KeyUnreadable,
    PermanentError,
    PublishError,
    ReauthorizationRequired,
    SyncError,
    ThrottledError,
    TransientError,
)

__all__ = [
    "AccountUnavailable",
    "KeyUnreadable",
    "PermanentError",
    "PublishError",
    "ReauthorizationRequired",
    "SyncError",
    "ThrottledError",
    "TransientError",
]

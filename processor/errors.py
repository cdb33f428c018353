"""The small exception taxonomy every role shares, and the tuple retry policies use."""

from __future__ import annotations


class SyncError(Exception):
    """Base of the service's own exceptions."""


class TransientError(SyncError):
    """Worth another try later; ``retry_after_s`` is the wait a remote asked for, if any."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ThrottledError(TransientError):
    """Graph answered 429/503/504: wait ``retry_after_s`` before trying again."""


class PermanentError(SyncError):
    """Retrying cannot help: the message is dead-lettered with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StaleUpdate(SyncError):
    """A newer version is already stored: the update is dropped, not retried."""


class AccountUnavailable(SyncError):
    """The account cannot be served now (erased, disconnected, needs reauthorization)."""

    def __init__(self, account_id: str, status: str) -> None:
        super().__init__(f"account {account_id} is {status}")
        self.account_id = account_id
        self.status = status

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


class KeyUnreadable(TransientError):
    """The account's data key is wrapped by a master key the key ring lacks.

    Not an erased account: the data is intact and reads again once the master key is back
    (a key removed before ``keys rotate`` finished, or a rolling deploy). Work waits and an
    operator is alerted; nothing is acked away.
    """

    def __init__(self, account_id: str, key_id: str) -> None:
        super().__init__(
            f"data key of account {account_id} is wrapped by master key {key_id!r}, "
            "which is not in the key ring"
        )
        self.account_id = account_id
        self.key_id = key_id

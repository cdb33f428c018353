"""The error taxonomy of the sync domain: what went wrong, in terms of what to do next.

Three families, and :func:`handlers.outcome.outcome_for` is the one place that turns each
into what happens to a message:

- :class:`TransientError` (:class:`ThrottledError` and :class:`KeyUnreadable` among them):
  worth another try later;
- :class:`PermanentError`: retrying cannot help;
- :class:`AccountUnavailable` and :class:`ReauthorizationRequired`: the account cannot be
  served now, whatever the message says; its messages are dropped (erased) or wait for the
  user to connect again, and the resync that follows a reconnect repairs what they pointed at.

:class:`PublishError` is the publisher's: the broker did not confirm a publish.
"""

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


class DeltaResetRequired(TransientError):
    """The delta link is no longer usable: discard it and run a full initial round."""


class PermanentError(SyncError):
    """Retrying cannot help: the message is dead-lettered with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AccountUnavailable(SyncError):
    """The account cannot be served now (erased, disconnected, needs reauthorization)."""

    def __init__(self, account_id: str, status: str) -> None:
        super().__init__(f"account {account_id} is {status}")
        self.account_id = account_id
        self.status = status


class ReauthorizationRequired(SyncError):
    """The stored sign-in cannot produce tokens any more; a person must connect again.

    Neither transient (no retry brings the token back) nor permanent for the message (the
    work is valid and is repaired by the resync after a reconnect): handlers catch it to set
    the account's status, and its message is acked.
    """

    def __init__(self, account_id: str, reason: str) -> None:
        super().__init__(f"account {account_id} needs reauthorization: {reason}")
        self.account_id = account_id
        self.reason = reason


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


class PublishError(Exception):
    """The broker did not confirm a publish (down, nacked, unroutable or timed out)."""

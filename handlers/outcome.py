"""What happens to a message once its handler is done, and the one rule that decides it.

Handlers set an :class:`Outcome` per message, or raise; :func:`outcome_for` maps the error
taxonomy of :mod:`handlers.errors` to an outcome; the consumer's ``settle`` carries it out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from handlers.errors import (
    AccountUnavailable,
    KeyUnreadable,
    PermanentError,
    PublishError,
    ReauthorizationRequired,
    ThrottledError,
    TransientError,
)

#: The wait when Graph throttled without saying how long.
DEFAULT_THROTTLE_WAIT_S = 5.0
#: How long work waits when its account's data key cannot be unwrapped (a master key
#: missing from this process's key ring): parked, not counted against the delivery limit,
#: so the work survives until an operator puts the key back.
KEY_UNREADABLE_RETRY_S = 30.0


class Action(enum.StrEnum):
    """What the broker is told (the value is also the ``outcome`` metric label)."""

    ACK = "ack"
    RETRY = "retry"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Outcome:
    """What to do with a delivery once its handler is done."""

    action: Action
    delay_s: float = 0.0
    reason: str = ""

    @classmethod
    def ack(cls) -> Outcome:
        """The effect is durable (or was a no-op): remove the message."""
        return cls(Action.ACK)

    @classmethod
    def retry(cls, delay_s: float) -> Outcome:
        """Throttled: park the message in a retry queue for ``delay_s``, then try again."""
        return cls(Action.RETRY, delay_s=delay_s)

    @classmethod
    def requeue(cls, reason: str) -> Outcome:
        """A transient failure: back to the queue now (counts against the delivery limit)."""
        return cls(Action.REQUEUE, reason=reason)

    @classmethod
    def dead_letter(cls, reason: str) -> Outcome:
        """Retrying cannot help: move it to the dead-letter queue with the reason."""
        return cls(Action.DEAD_LETTER, reason=reason)


def outcome_for(exc: BaseException) -> Outcome:
    """The outcome of a message whose handling raised ``exc``.

    Throttled: wait what Graph asked in a retry queue; an unreadable data key: wait in a
    retry queue for the key to come back (never a requeue, which the delivery limit would
    turn into a dead letter). Other transient failures and
    unconfirmed publishes: back to the queue. Permanent: dead letter with the reason. The
    account cannot be served (erased, or waiting for its user to connect again): ack, since
    an erased account's messages are dropped and a reconnect's resync repairs the rest
    (handlers record the account's status before they let the message go). Anything else is
    a bug: requeued, so the delivery limit dead-letters it if it keeps failing.
    """
    if isinstance(exc, ThrottledError):
        return Outcome.retry(exc.retry_after_s or DEFAULT_THROTTLE_WAIT_S)
    if isinstance(exc, KeyUnreadable):
        return Outcome.retry(KEY_UNREADABLE_RETRY_S)
    if isinstance(exc, TransientError):
        return Outcome.requeue(str(exc)[:200])
    if isinstance(exc, PermanentError):
        return Outcome.dead_letter(exc.reason)
    if isinstance(exc, AccountUnavailable | ReauthorizationRequired):
        return Outcome.ack()
    if isinstance(exc, PublishError):
        return Outcome.requeue(f"publish not confirmed: {str(exc)[:200]}")
    return Outcome.requeue(type(exc).__name__)

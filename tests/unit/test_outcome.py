"""The one ack decision: every error of the domain's taxonomy maps to one outcome."""

from __future__ import annotations

import pytest

from handlers.errors import (
    AccountUnavailable,
    PermanentError,
    PublishError,
    ReauthorizationRequired,
    SyncError,
    ThrottledError,
    TransientError,
)
from handlers.outcome import DEFAULT_THROTTLE_WAIT_S, Action, Outcome, outcome_for


def test_throttled_waits_what_graph_asked() -> None:
    """A throttle parks the message for the Retry-After Graph sent."""
    assert outcome_for(ThrottledError("429", retry_after_s=12.5)) == Outcome.retry(12.5)


def test_throttled_without_a_wait_uses_the_default() -> None:
    """A throttle without Retry-After parks for the default wait."""
    assert outcome_for(ThrottledError("503")) == Outcome.retry(DEFAULT_THROTTLE_WAIT_S)


def test_transient_is_requeued_with_a_bounded_reason() -> None:
    """Another transient failure goes back to the queue with at most 200 characters of why."""
    outcome = outcome_for(TransientError("x" * 500))
    assert outcome.action is Action.REQUEUE
    assert outcome.reason == "x" * 200


def test_permanent_is_dead_lettered_with_its_reason() -> None:
    """A permanent failure is dead-lettered with the error's reason."""
    assert outcome_for(PermanentError("event.start is not a date")) == Outcome.dead_letter(
        "event.start is not a date"
    )


@pytest.mark.parametrize(
    "exc",
    [AccountUnavailable("a1", "erased"), ReauthorizationRequired("a1", "invalid_grant")],
)
def test_an_account_that_cannot_be_served_acks(exc: SyncError) -> None:
    """An erased account or one waiting for its user to reconnect has its message acked."""
    assert outcome_for(exc) == Outcome.ack()


def test_an_unconfirmed_publish_is_requeued() -> None:
    """A publish the broker did not confirm sends the message back to the queue."""
    assert outcome_for(PublishError("nacked")).action is Action.REQUEUE


def test_a_bug_is_requeued_under_its_type_name() -> None:
    """An unexpected exception is requeued (the delivery limit catches a repeating bug)."""
    assert outcome_for(KeyError("body")) == Outcome.requeue("KeyError")


def test_reauthorization_is_neither_transient_nor_permanent() -> None:
    """ReauthorizationRequired is its own kind, so no transient or permanent handler eats it."""
    exc = ReauthorizationRequired("a1", "invalid_grant")
    assert not isinstance(exc, TransientError | PermanentError)


def test_actions_keep_their_metric_labels() -> None:
    """Each action's value is the ``outcome`` label the metrics have always used."""
    assert [a.value for a in Action] == ["ack", "retry", "requeue", "dead_letter"]

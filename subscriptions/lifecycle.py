"""Lifecycle notifications: the receiver's validated items, acted on by the manager.

- ``subscriptionRemoved``: create a new subscription, then a full delta resync;
- ``missed``: a full delta resync (notifications were dropped);
- ``reauthorizationRequired``: renew with a fresh token (PATCH renews *and* reauthorizes),
  then an incremental delta pass for what changed while notifications were paused; a
  refresh that fails for good sets ``reauthorization_required`` instead.

A message for a subscription we do not know (already replaced, or erased) is acked and
counted. Work that cannot be done now (Graph throttled or down, another manager holding
the account's lease) is handed to the manager's next scan and the message is acked:
lifecycle queues have no retry-delay queues, and waiting is never done by holding a
message. If this process dies before that scan, the periodic Graph check (a missing
subscription is recreated and resynced) and Graph's repeated ``reauthorizationRequired``
cover it. Acks go through :func:`processor.broker.settle` like every consumer's.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, ConsumerTag

from processor.broker import ConfirmPublisher, Outcome, settle
from processor.errors import AccountUnavailable, PermanentError, TransientError
from processor.interfaces import PublishError
from processor.logs import correlation
from processor.messages import LIFECYCLE_SCHEMA
from processor.tokens import ReauthorizationRequired
from processor.topology import LIFECYCLE_QUEUE
from subscriptions.manager import SubscriptionManager
from subscriptions.ports import Repositories

log = structlog.get_logger(__name__)

LIFECYCLE_EVENTS = frozenset({"subscriptionRemoved", "missed", "reauthorizationRequired"})


#: Largest lifecycle message parsed: ours are a few hundred bytes.
MAX_LIFECYCLE_MESSAGE_BYTES = 64 * 1024


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """The JSON body, or why it cannot be read: the size first, then every parse failure
    (a deeply nested document raises ``RecursionError``, which must not escape the callback)."""
    if len(raw) > MAX_LIFECYCLE_MESSAGE_BYTES:
        return None, f"message is larger than {MAX_LIFECYCLE_MESSAGE_BYTES} bytes"
    try:
        return json.loads(raw), None
    except (ValueError, RecursionError):
        return None, "body is not JSON"


def validate_lifecycle(body: Any) -> str | None:
    """Why a lifecycle message is malformed, or None."""
    if not isinstance(body, dict):
        return "body is not an object"
    if body.get("schema") != LIFECYCLE_SCHEMA:
        return f"unknown schema {str(body.get('schema'))[:64]!r}"
    for name in ("account_id", "subscription_hash", "lifecycle_event"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} missing"
    return None


class LifecycleHandler:
    """Decides what one lifecycle message needs and has the manager do it."""

    def __init__(self, *, store: Repositories, manager: SubscriptionManager) -> None:
        self._store = store
        self._manager = manager
        #: Counts by what happened (handled_<event>, unknown, unknown_event, deferred, …).
        self.stats: Counter[str] = Counter()

    async def handle(self, body: dict[str, Any]) -> Outcome:
        """Handle one validated message; returns what to do with it."""
        account_id = str(body["account_id"])
        sub_hash = str(body["subscription_hash"])
        event = str(body["lifecycle_event"])
        if event not in LIFECYCLE_EVENTS:
            self.stats["unknown_event"] += 1
            log.info("lifecycle.unknown_event", account_id=account_id, lifecycle_event=event[:40])
            return Outcome.ack()
        record = await self._store.subscriptions.get_for_account(account_id, sub_hash)
        account = await self._store.accounts.get(account_id)
        if record is None or account is None:
            self.stats["unknown"] += 1
            self._manager.stats["lifecycle_unknown"] += 1
            log.info("lifecycle.unknown_subscription", account_id=account_id, lifecycle_event=event)
            return Outcome.ack()
        log.info(
            "lifecycle.received",
            account_id=account_id,
            lifecycle_event=event,
            subscription=sub_hash,
        )
        try:
            done = await self._act(account_id, sub_hash, event)
        except ReauthorizationRequired as exc:
            try:
                await self._manager.report_reauthorization(account_id, exc.reason)
            except TransientError as publish_failure:
                return Outcome.requeue(str(publish_failure))
            return Outcome.ack()
        except PublishError as exc:
            return Outcome.requeue(f"resync not confirmed: {exc}")
        except AccountUnavailable:
            self.stats["unknown"] += 1
            return Outcome.ack()
        except (TransientError, PermanentError) as exc:
            log.warning("lifecycle.deferred", account_id=account_id, error=str(exc)[:200])
            done = False
        if not done:
            self.stats["deferred"] += 1
            actions = {"renew"} if event == "reauthorizationRequired" else {"check"}
            self._manager.request_repair(account_id, actions)
        self.stats[f"handled_{event}"] += 1
        return Outcome.ack()

    async def _act(self, account_id: str, sub_hash: str, event: str) -> bool:
        if event == "missed":
            await self._manager.publish_resync(account_id, full=True, reason="missed")
            return True
        if event == "subscriptionRemoved":
            return await self._manager.recreate(account_id, sub_hash)
        return await self._manager.reauthorize(account_id, sub_hash)


class LifecycleConsumer:
    """Consumes ``m365sync.lifecycle`` (any number of consumers; no per-account order needed)."""

    def __init__(
        self,
        *,
        channel: AbstractChannel,
        handler: LifecycleHandler,
        publisher: ConfirmPublisher,
        prefetch: int = 8,
    ) -> None:
        self._channel = channel
        self._handler = handler
        self._publisher = publisher
        self._prefetch = prefetch
        self._queue: AbstractQueue | None = None
        self._tag: ConsumerTag | None = None

    async def start(self) -> None:
        """Start consuming."""
        await self._channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await self._channel.get_queue(LIFECYCLE_QUEUE, ensure=False)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop intake (messages in flight finish or are requeued by the channel's close)."""
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception as exc:  # the channel may already be gone
                log.info("lifecycle.cancel_failed", error=type(exc).__name__)
            self._tag = None

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        with correlation(message.correlation_id):
            body, problem = _parse(message.body)
            if problem is None:
                problem = validate_lifecycle(body)
            if problem is not None:
                outcome = Outcome.dead_letter(problem)
            else:
                try:
                    outcome = await self._handler.handle(body)
                except Exception:  # a bug must not strand the message unsettled
                    log.exception("lifecycle.failed")
                    outcome = Outcome.requeue("handler failed")
            await settle(
                message,
                outcome,
                publisher=self._publisher,
                retry_target="inbound",  # never used: lifecycle outcomes are never "retry"
                queue_name=LIFECYCLE_QUEUE,
            )

"""Consuming shard queues: per-account batches, bounded prefetch, graceful drain.

Every delivery is parsed and grouped by account. Each account has at most one batch in
progress in this process; deliveries that arrive meanwhile wait and form the next batch,
which is how duplicate notifications for one event coalesce into one fetch. Together with
single active consumer on the shard queues this serializes one account's writes across
every worker process (FerretDB's updates are not atomic against concurrent writers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    ConsumerTag,
)
from pymongo.errors import ConnectionFailure

from handlers.errors import KeyUnreadable
from handlers.messages import INBOUND_SCHEMA
from handlers.outcome import Action, Outcome, outcome_for
from handlers.timeutil import utcnow
from processor.broker import ConfirmPublisher, settle, settle_parts
from processor.lag import LagTracker
from processor.logs import correlation, get_logger
from processor.metrics import Metrics

log = get_logger(__name__)

#: How long a batch waits when the database is unreachable before it is tried again.
DATABASE_RETRY_S = 5.0
#: How long :meth:`ShardConsumer.release` waits for a queue's running batches.
RELEASE_WAIT_S = 30.0
#: Largest message body parsed (a consumer may be given its own limit): bigger ones are
#: dead-lettered unread, so a huge message costs no parsing.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def parse_body(raw: bytes, *, max_bytes: int) -> dict[str, Any] | str:
    """The message's JSON object, or why it cannot be worked on (dead-letter reason).

    The size is checked before parsing, and every parse failure (bad UTF-8, bad JSON,
    nesting deep enough for a ``RecursionError``) is a reason too, so no message escapes
    the consumer's callback unsettled.
    """
    if len(raw) > max_bytes:
        return f"message is larger than {max_bytes} bytes"
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        return "body is not JSON"
    if not isinstance(body, dict):
        return "body is not an object"
    return body


def problem_of(
    body: dict[str, Any], validate: Callable[[dict[str, Any]], str | None]
) -> str | None:
    """The validator's reason, with a validator that raises counted as one (never escaping)."""
    try:
        return validate(body)
    except (ValueError, TypeError, RecursionError) as exc:
        log.warning("message.validation_failed", error=type(exc).__name__)
        return "body could not be validated"


@dataclass
class _Subscription:
    """One queue consumed on a channel of its own, so that it can be let go on its own."""

    channel: AbstractChannel
    queue: AbstractQueue
    tag: ConsumerTag


@dataclass
class _Parts:
    """A message that carried several items: settled once every item has an outcome."""

    message: AbstractIncomingMessage
    queue_name: str
    count: int
    settled: list[tuple[object, Outcome]] = field(default_factory=list)


@dataclass
class Delivery:
    """One parsed message (or one item of a multi-item message) and where it came from."""

    message: AbstractIncomingMessage
    body: dict[str, Any]
    queue_name: str
    outcome: Outcome | None = field(default=None)
    part_of: _Parts | None = field(default=None, repr=False)


class BatchHandler(Protocol):
    """Handles one account's waiting deliveries; sets every delivery's ``outcome``."""

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Process deliveries of one account; must never raise for a single bad message."""


Validator = Callable[[dict[str, Any]], str | None]
#: The items of a multi-item message, None for a single message; ``ValueError`` if malformed.
Splitter = Callable[[dict[str, Any]], list[Any] | None]


class ShardConsumer:
    """Consumes a set of queues and feeds per-account batches to a :class:`BatchHandler`.

    ``retry_target`` names the retry-delay queues a "retry" outcome parks in; None for queues
    that have none (lifecycle), whose "retry" outcomes are requeued instead.

    Each queue has a channel of its own. On a single-active-consumer queue that lets the
    process hand one queue to another process (:meth:`release`) while it keeps the rest.
    """

    def __init__(
        self,
        *,
        connection: AbstractConnection,
        queue_names: Sequence[str],
        handler: BatchHandler,
        publisher: ConfirmPublisher,
        retry_target: str | None,
        metrics: Metrics,
        validate: Validator,
        prefetch: int,
        max_batch: int = 64,
        split: Splitter | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._connection = connection
        self._max_message_bytes = max_message_bytes
        self._queue_names = list(queue_names)
        self._handler = handler
        self._publisher = publisher
        self._retry_target = retry_target
        self._metrics = metrics
        self._validate = validate
        self._prefetch = prefetch
        self._max_batch = max_batch
        self._split = split
        self._pending: dict[str, list[Delivery]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._busy: dict[str, str] = {}  # account -> queue of the batch being handled
        self._batch_done = asyncio.Event()
        self._subscriptions: dict[str, _Subscription] = {}
        #: Queues being let go -> what arrived from them meanwhile (returned by the close).
        self._releasing: dict[str, list[AbstractIncomingMessage]] = {}
        self._stopping = False
        #: Deliveries received per queue (the balancer reads it to see where it is active).
        self.received: dict[str, int] = dict.fromkeys(self._queue_names, 0)
        self.lag = LagTracker(histogram=metrics.message_lag)

    @property
    def queue_names(self) -> list[str]:
        return list(self._queue_names)

    def report(self) -> dict[str, Any]:
        """Lag figures for the heartbeat (:meth:`processor.lag.LagTracker.report`)."""
        return self.lag.report()

    async def start(self) -> None:
        """Start consuming every queue, each on its own channel with the prefetch."""
        for name in self._queue_names:
            self._subscriptions[name] = await self._subscribe(name)

    async def _subscribe(self, name: str) -> _Subscription:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        # After a reconnect aio-pika re-declares and re-consumes only the queues that were
        # declared through the robust channel; a queue object from
        # ``get_queue(ensure=False)`` is not among them, and its consumer silently stays
        # gone: the "0 consumers after a broker restart" failure (docs/reliability.md 2.5).
        # A passive declare registers the queue for restore without touching its arguments.
        queue = await channel.declare_queue(name, passive=True)
        tag = await queue.consume(self._on_message(name))
        return _Subscription(channel, queue, tag)

    async def release(self, name: str) -> int:
        """Let another consumer of the single-active-consumer queue ``name`` take it over.

        Stops starting work from it, lets the batches already running finish and settle,
        then closes its channel (the broker hands the queue to the next consumer in line
        together with what this process had received but not started) and subscribes
        again, at the back of the line. Returns how many deliveries went back. Other
        queues go on meanwhile. An account's deliveries all come from one queue, so no
        account is ever worked on here and in the next owner at the same time.
        """
        if self._stopping or name in self._releasing or name not in self._subscriptions:
            return 0
        held: list[AbstractIncomingMessage] = []
        self._releasing[name] = held
        try:
            for account_id in list(self._pending):
                kept = [d for d in self._pending[account_id] if d.queue_name != name]
                for d in self._pending[account_id]:
                    # The items of one message share it: hand it back once.
                    if d.queue_name == name and not any(m is d.message for m in held):
                        held.append(d.message)
                if kept:
                    self._pending[account_id] = kept
                else:
                    del self._pending[account_id]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + RELEASE_WAIT_S
            while name in self._busy.values() and loop.time() < deadline:
                self._batch_done.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_done.wait(), deadline - loop.time())
            if name in self._busy.values():
                # A batch is stuck: keep the queue rather than let two owners overlap.
                log.warning("consumer.release_timeout", queue=name)
                del self._releasing[name]
                for message in held:
                    await self._accept(name, message, counted=True)
                return 0
            returned = len(held)
            self.lag.forget(name)
            old = self._subscriptions.pop(name)
            try:
                await old.channel.close()
            except Exception as exc:  # already gone with the connection: nothing is held
                log.info("consumer.release_close_failed", queue=name, error=type(exc).__name__)
            if not self._stopping:
                self._subscriptions[name] = await self._subscribe(name)
            log.info("consumer.released", queue=name, returned=returned)
            return returned
        finally:
            self._releasing.pop(name, None)

    def _on_message(self, queue_name: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._accept(queue_name, message)

        return on_message

    async def _accept(
        self, queue_name: str, message: AbstractIncomingMessage, *, counted: bool = False
    ) -> None:
        if not counted:
            self.received[queue_name] = self.received.get(queue_name, 0) + 1
            self.lag.received(queue_name, message)
        held = self._releasing.get(queue_name)
        if held is not None:
            # Its channel is about to close: the broker gives it to the next owner.
            held.append(message)
            return
        body = parse_body(message.body, max_bytes=self._max_message_bytes)
        if isinstance(body, str):
            await self._settle(Delivery(message, {}, queue_name, Outcome.dead_letter(body)))
            return
        if self._stopping:
            await self._settle(Delivery(message, body, queue_name, Outcome.requeue("stopping")))
            return
        try:
            items = self._split(body) if self._split is not None else None
        except ValueError as exc:
            await self._settle(Delivery(message, body, queue_name, Outcome.dead_letter(str(exc))))
            return
        if items is None:
            problem = problem_of(body, self._validate)
            if problem is not None:
                await self._settle(Delivery(message, {}, queue_name, Outcome.dead_letter(problem)))
                return
            self._enqueue(Delivery(message, body, queue_name))
            return
        parts = _Parts(message, queue_name, len(items))
        for item in items:
            if not isinstance(item, dict):
                await self._settle_part(parts, item, Outcome.dead_letter("item is not an object"))
            elif (problem := problem_of(item, self._validate)) is not None:
                await self._settle_part(parts, item, Outcome.dead_letter(problem))
            else:
                self._enqueue(Delivery(message, item, queue_name, part_of=parts))

    def _enqueue(self, delivery: Delivery) -> None:
        # Validators of the service's own queues require an account id; the intake's lets a
        # message without one through so that its handler can tell 1Relation why it failed.
        given = delivery.body.get("account_id")
        account_id = given if isinstance(given, str) else ""
        self._pending.setdefault(account_id, []).append(delivery)
        if account_id not in self._running:
            task = asyncio.create_task(self._drain(account_id), name=f"account:{account_id}")
            self._running[account_id] = task

    async def _drain(self, account_id: str) -> None:
        try:
            while batch := self._take(account_id):
                self._busy[account_id] = batch[0].queue_name
                try:
                    await self._handle(account_id, batch)
                finally:
                    self._busy.pop(account_id, None)
                    self._batch_done.set()
        finally:
            self._running.pop(account_id, None)
            if self._pending.get(account_id) and not self._stopping:
                # Arrived between the last take and the pop above: start a new drain.
                self._running[account_id] = asyncio.create_task(self._drain(account_id))

    async def _handle(self, account_id: str, batch: list[Delivery]) -> None:
        """Hand one batch to the handler and settle every delivery of it."""
        with correlation(batch[0].message.correlation_id, account_id=account_id):
            # Debug-level marks of when this process worked on the account: the scaling
            # test checks from them that no two processes ever overlap on one account.
            log.debug("batch.started", queue=batch[0].queue_name, size=len(batch))
            fallback = Outcome.requeue("handler set no outcome")
            try:
                await self._handler.handle_batch(account_id, batch)
            except KeyUnreadable as exc:
                # Never "erased": the data is intact and reads again once the key is back.
                log.warning("batch.key_unreadable", key_id=exc.key_id, size=len(batch))
                fallback = outcome_for(exc)
            except ConnectionFailure as exc:
                # The database is away: wait in the retry queue, which does not count
                # against the delivery limit (requeues would dead-letter the batch
                # after a few server-selection timeouts).
                log.warning("batch.database_unavailable", error=type(exc).__name__)
                fallback = Outcome.retry(DATABASE_RETRY_S)
            except Exception:  # a handler bug must not strand the batch unsettled
                log.exception("batch.failed", size=len(batch))
            for delivery in batch:
                if delivery.outcome is None:
                    delivery.outcome = fallback
            await asyncio.gather(*(self._settle(d) for d in batch))
            log.debug("batch.settled", queue=batch[0].queue_name, size=len(batch))

    def _take(self, account_id: str) -> list[Delivery]:
        pending = self._pending.get(account_id)
        if not pending:
            self._pending.pop(account_id, None)
            return []
        batch, rest = pending[: self._max_batch], pending[self._max_batch :]
        if rest:
            self._pending[account_id] = rest
        else:
            del self._pending[account_id]
        return batch

    async def _settle(self, delivery: Delivery) -> None:
        assert delivery.outcome is not None
        outcome = delivery.outcome
        if outcome.action is Action.RETRY and self._retry_target is None:
            # Queues without retry-delay queues (lifecycle): the wait becomes a requeue.
            outcome = Outcome.requeue(f"no retry queue for a {outcome.delay_s:g} s wait")
        if delivery.part_of is not None:
            await self._settle_part(delivery.part_of, delivery.body, outcome)
            return
        action = await settle(
            delivery.message,
            outcome,
            publisher=self._publisher,
            retry_target=self._retry_target or "",
            queue_name=delivery.queue_name,
        )
        self._metrics.messages_processed.labels(queue=delivery.queue_name, outcome=action).inc()
        self.lag.settled(delivery.queue_name, delivery.message)
        lag_s = inbound_lag_s(delivery.body)
        if lag_s is not None:
            self._metrics.inbound_lag.observe(lag_s)

    async def _settle_part(self, parts: _Parts, item: object, outcome: Outcome) -> None:
        """Record one item's outcome; the message is settled with its last item."""
        parts.settled.append((item, outcome))
        if len(parts.settled) < parts.count:
            return
        actions = await settle_parts(
            parts.message,
            parts.settled,
            publisher=self._publisher,
            retry_target=self._retry_target or "",
            queue_name=parts.queue_name,
        )
        for action in actions:
            self._metrics.messages_processed.labels(queue=parts.queue_name, outcome=action).inc()
        self.lag.settled(parts.queue_name, parts.message)
        for body, _ in parts.settled:
            lag_s = inbound_lag_s(body) if isinstance(body, dict) else None
            if lag_s is not None:
                self._metrics.inbound_lag.observe(lag_s)

    @property
    def in_flight(self) -> int:
        """Deliveries received and not yet settled."""
        return sum(len(p) for p in self._pending.values()) + len(self._running)

    async def stop(self, *, grace_s: float) -> None:
        """Stop intake, let running batches finish within ``grace_s``, requeue the rest."""
        self._stopping = True
        for name, sub in self._subscriptions.items():
            try:
                await sub.queue.cancel(sub.tag)
            except Exception as exc:  # the channel may already be gone
                log.info("consumer.cancel_failed", queue=name, error=type(exc).__name__)
        running = list(self._running.values())
        if running:
            _, still = await asyncio.wait(running, timeout=grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for account_id in list(self._pending):
            for delivery in self._pending.pop(account_id):
                delivery.outcome = Outcome.requeue("stopping")
                await self._settle(delivery)
        for sub in self._subscriptions.values():
            if not sub.channel.is_closed:
                await sub.channel.close()
        self._subscriptions.clear()


def inbound_lag_s(body: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds since the receiver accepted an inbound change notification, else None.

    Only ``change`` messages count (a resync's timestamp is when it was requested); a
    timestamp that does not parse, or lies in the future by clock skew, is not a lag.
    """
    if body.get("schema") != INBOUND_SCHEMA or body.get("kind") != "change":
        return None
    raw = body.get("received_at")
    if not isinstance(raw, str):
        return None
    try:
        received = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if received.tzinfo is None:
        return None
    lag_s = ((now or utcnow()) - received).total_seconds()
    return lag_s if lag_s >= 0 else None

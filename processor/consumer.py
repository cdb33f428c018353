"""Consuming shard queues: per-account batches, bounded prefetch, graceful drain.

Every delivery is parsed and grouped by account. Each account has at most one batch in
progress in this process; deliveries that arrive meanwhile wait and form the next batch,
which is how duplicate notifications for one event coalesce into one fetch. Together with
single active consumer on the shard queues this serializes one account's writes across
every worker process (FerretDB's updates are not atomic against concurrent writers).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, ConsumerTag
from pymongo.errors import ConnectionFailure

from processor.broker import ConfirmPublisher, Outcome, settle
from processor.logs import correlation, get_logger
from processor.metrics import Metrics

log = get_logger(__name__)

#: How long a batch waits when the database is unreachable before it is tried again.
DATABASE_RETRY_S = 5.0


@dataclass
class Delivery:
    """One parsed message and where it came from."""

    message: AbstractIncomingMessage
    body: dict[str, Any]
    queue_name: str
    outcome: Outcome | None = field(default=None)


class BatchHandler(Protocol):
    """Handles one account's waiting deliveries; sets every delivery's ``outcome``."""

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Process deliveries of one account; must never raise for a single bad message."""


Validator = Callable[[dict[str, Any]], str | None]


class ShardConsumer:
    """Consumes a set of queues and feeds per-account batches to a :class:`BatchHandler`."""

    def __init__(
        self,
        *,
        channel: AbstractChannel,
        queues: Sequence[AbstractQueue],
        handler: BatchHandler,
        publisher: ConfirmPublisher,
        retry_target: str,
        metrics: Metrics,
        validate: Validator,
        prefetch: int,
        max_batch: int = 64,
    ) -> None:
        self._channel = channel
        self._queues = list(queues)
        self._handler = handler
        self._publisher = publisher
        self._retry_target = retry_target
        self._metrics = metrics
        self._validate = validate
        self._prefetch = prefetch
        self._max_batch = max_batch
        self._pending: dict[str, list[Delivery]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._tags: list[tuple[AbstractQueue, ConsumerTag]] = []
        self._stopping = False

    async def start(self) -> None:
        """Set the prefetch and start consuming every queue."""
        await self._channel.set_qos(prefetch_count=self._prefetch)
        for index, given in enumerate(self._queues):
            # After a reconnect aio-pika re-declares and re-consumes only the queues that
            # were declared through the robust channel; a queue object from
            # ``get_queue(ensure=False)`` is not among them, and its consumer silently stays
            # gone: the "0 consumers after a broker restart" failure (RELIABILITY-NOTES 2.5).
            # A passive declare registers the queue for restore without touching its arguments.
            queue = await self._channel.declare_queue(given.name, passive=True)
            self._queues[index] = queue
            tag = await queue.consume(self._on_message(queue.name))
            self._tags.append((queue, tag))

    def _on_message(self, queue_name: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._accept(queue_name, message)

        return on_message

    async def _accept(self, queue_name: str, message: AbstractIncomingMessage) -> None:
        try:
            body = json.loads(message.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        problem = "body is not JSON" if body is None else None
        if problem is None:
            problem = self._validate(body) if isinstance(body, dict) else "body is not an object"
        if problem is not None:
            await self._settle(Delivery(message, {}, queue_name, Outcome.dead_letter(problem)))
            return
        assert isinstance(body, dict)
        # Validators of the service's own queues require an account id; the intake's lets a
        # message without one through so that its handler can tell 1Relation why it failed.
        given = body.get("account_id")
        account_id = given if isinstance(given, str) else ""
        if self._stopping:
            await self._settle(Delivery(message, body, queue_name, Outcome.requeue("stopping")))
            return
        self._pending.setdefault(account_id, []).append(Delivery(message, body, queue_name))
        if account_id not in self._running:
            task = asyncio.create_task(self._drain(account_id), name=f"account:{account_id}")
            self._running[account_id] = task

    async def _drain(self, account_id: str) -> None:
        try:
            while batch := self._take(account_id):
                with correlation(batch[0].message.correlation_id, account_id=account_id):
                    fallback = Outcome.requeue("handler set no outcome")
                    try:
                        await self._handler.handle_batch(account_id, batch)
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
        finally:
            self._running.pop(account_id, None)
            if self._pending.get(account_id) and not self._stopping:
                # Arrived between the last take and the pop above: start a new drain.
                self._running[account_id] = asyncio.create_task(self._drain(account_id))

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
        action = await settle(
            delivery.message,
            delivery.outcome,
            publisher=self._publisher,
            retry_target=self._retry_target,
            queue_name=delivery.queue_name,
        )
        self._metrics.messages_processed.labels(queue=delivery.queue_name, outcome=action).inc()

    @property
    def in_flight(self) -> int:
        """Deliveries received and not yet settled."""
        return sum(len(p) for p in self._pending.values()) + len(self._running)

    async def stop(self, *, grace_s: float) -> None:
        """Stop intake, let running batches finish within ``grace_s``, requeue the rest."""
        self._stopping = True
        for queue, tag in self._tags:
            try:
                await queue.cancel(tag)
            except Exception as exc:  # the channel may already be gone
                log.info("consumer.cancel_failed", queue=queue.name, error=type(exc).__name__)
        self._tags.clear()
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

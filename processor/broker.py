"""RabbitMQ: one robust connection per process, a confirming publisher, the delivery policy.

Handlers decide what happens to a message with an :class:`~handlers.outcome.Outcome`
(:func:`handlers.outcome.outcome_for` maps their errors to one); :func:`settle` carries it
out: ack, delay (retry queue), requeue (bounded by the quorum queue's delivery limit) or
dead-letter with a reason.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from handlers.errors import PublishError
from handlers.outcome import Action, Outcome
from handlers.ports import OutgoingMessage
from processor import lag
from processor.logs import get_logger
from processor.topology import DEAD_EXCHANGE, DELAY_HEADER, RETRY_EXCHANGE, retry_delay_bucket

log = get_logger(__name__)

#: Exceptions that mean "the broker or the connection failed", as opposed to a bug.
CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,  # aio-pika raises it for a channel or connection that is closing
)

REASON_HEADER = "x-m365sync-reason"
ORIGIN_EXCHANGE_HEADER = "x-m365sync-origin-exchange"
ORIGIN_ROUTING_KEY_HEADER = "x-m365sync-origin-routing-key"
ORIGIN_QUEUE_HEADER = "x-m365sync-origin-queue"
RETRIES_HEADER = "x-m365sync-retries"
#: Milliseconds since the epoch at which the service dead-lettered the message.
DEAD_LETTERED_HEADER = "x-m365sync-dead-lettered-ms"
#: How often an item split out of a multi-item message went back to its queue.
REQUEUES_HEADER = "x-m365sync-requeues"
#: Past this many requeues a split-out item is dead-lettered (the quorum queues' delivery
#: limit does the same for whole messages).
MAX_PART_REQUEUES = 5


async def connect(
    url: str | Sequence[str], *, name: str, reconnect_interval_s: float = 2.0
) -> AbstractRobustConnection:
    """Open the process's robust connection (reconnects and restores consumers itself).

    ``url`` may name several nodes of one cluster (a sequence, or one string with
    comma-separated URLs): each connection attempt tries them in turn, starting with the
    node it was last connected to, so losing a node costs one reconnect to the next.
    """
    urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else [*url]
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("no AMQP URL given")
    connection = ClusterConnection(
        URL(urls[0]),
        urls=[URL(u) for u in urls],
        client_properties={"connection_name": name},
        reconnect_interval=reconnect_interval_s,
    )
    await connection.connect()
    return connection


class ClusterConnection(RobustConnection):
    """A robust connection that knows every node of a cluster.

    aio-pika's :class:`RobustConnection` reconnects to the one URL it was given; a cluster
    whose node went away would leave it retrying a dead address. Each attempt here walks the
    list, starting with the node that answered last.
    """

    def __init__(self, url: URL, *, urls: Sequence[URL], **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._urls = list(urls) or [url]
        self._current = 0

    @property
    def node_url(self) -> URL:
        """The URL of the node this connection uses (or tries) now."""
        return self._urls[self._current]

    async def _RobustConnection__connect_transport(self) -> None:  # noqa: N802  aio-pika's hook
        # The name-mangled attempt of RobustConnection: one attempt per node, in turn.
        attempt_one = RobustConnection._RobustConnection__connect_transport  # type: ignore[attr-defined]
        for tried in range(len(self._urls)):
            self.url = self._urls[self._current]
            try:
                await attempt_one(self)
            except CONNECTION_EXCEPTIONS as exc:
                if tried == len(self._urls) - 1:
                    raise
                log.info(
                    "broker.node_unreachable",
                    node=f"{self.url.host}:{self.url.port}",
                    error=type(exc).__name__,
                )
                self._current = (self._current + 1) % len(self._urls)
            else:
                if len(self._urls) > 1:
                    log.info("broker.node_connected", node=f"{self.url.host}:{self.url.port}")
                return


class ConfirmPublisher:
    """Publishes persistent, mandatory JSON messages on a confirm channel.

    A publish returns only once the broker confirmed it *and* routed it to a queue
    (``on_return_raises``); anything else raises :class:`PublishError`.
    """

    def __init__(self, *, channel: AbstractChannel) -> None:
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> ConfirmPublisher:
        """A publisher on a fresh confirm channel of ``connection``."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel=channel)

    async def close(self) -> None:
        """Close the channel (idempotent)."""
        if not self._channel.is_closed:
            await self._channel.close()

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self._channel.default_exchange
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, message: OutgoingMessage, *, timeout_s: float) -> None:
        """Publish one message; raises :class:`PublishError` unless confirmed and routed."""
        amqp_message = aio_pika.Message(
            json.dumps(message.body, separators=(",", ":")).encode("utf-8"),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers={lag.PUBLISHED_HEADER: lag.now_ms(), **message.headers},
            expiration=(message.expiration_ms / 1000)
            if message.expiration_ms is not None
            else None,
        )
        await self.publish_raw(
            message.exchange, message.routing_key, amqp_message, timeout_s=timeout_s
        )

    async def publish_raw(
        self, exchange_name: str, routing_key: str, message: aio_pika.Message, *, timeout_s: float
    ) -> None:
        """Publish a prepared AMQP message with confirms (used to re-route deliveries)."""
        try:
            async with asyncio.timeout(timeout_s):
                exchange = await self._exchange(exchange_name)
                await exchange.publish(
                    message, routing_key=routing_key, mandatory=True, timeout=timeout_s
                )
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"broker refused or could not route the message: {exc}") from exc
        except CONNECTION_EXCEPTIONS as exc:
            raise PublishError(f"publish not confirmed: {type(exc).__name__}") from exc

    async def publish_many(self, messages: list[OutgoingMessage], *, timeout_s: float) -> None:
        """Publish concurrently; raises :class:`PublishError` unless every one was confirmed."""
        if not messages:
            return
        results = await asyncio.gather(
            *(self.publish(m, timeout_s=timeout_s) for m in messages), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, PublishError):
                raise failure
        if failures:
            raise PublishError(f"{len(failures)} of {len(messages)} messages not confirmed")


#: Throttle retries never count against the delivery limit, but they are not endless:
#: past this many, or once the message has been parked again and again for longer than
#: MAX_PARKED_S since its first parking, it is dead-lettered so an operator can see it.
MAX_THROTTLE_RETRIES = 200
MAX_PARKED_S = 6 * 3600.0
#: Spread of the random extra wait added to a parking (a fraction of the wait, capped), so
#: the messages a throttled mailbox parked together do not all come back in one instant.
PARK_JITTER_FRACTION = 0.2
PARK_JITTER_MAX_S = 2.0
PARKED_SINCE_HEADER = "x-m365sync-parked-since-ms"

_jitter = random.Random()  # noqa: S311  spreading retries, not security


def park_delay_s(asked_s: float, *, rng: random.Random = _jitter) -> float:
    """How long to park a message that must wait ``asked_s``: that, plus a little jitter
    (never less than asked: the wait is what Graph told the mailbox)."""
    asked = max(asked_s, 0.0)
    spread = min(PARK_JITTER_MAX_S, 0.05 + PARK_JITTER_FRACTION * asked)
    return asked + rng.uniform(0.0, spread)


def _copy(message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> aio_pika.Message:
    merged = dict(message.headers or {})
    merged.pop("x-death", None)
    merged.pop("x-delivery-count", None)
    merged.update(headers)
    return aio_pika.Message(
        message.body,
        content_type=message.content_type or "application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        headers=merged,
    )


async def settle(
    message: AbstractIncomingMessage,
    outcome: Outcome,
    *,
    publisher: ConfirmPublisher,
    retry_target: str,
    queue_name: str,
    timeout_s: float = 5.0,
) -> Action:
    """Carry out ``outcome`` for ``message``; returns the action actually taken.

    A retry or dead-letter first publishes the copy with confirms and only then acks the
    original, so a crash in between duplicates the message rather than losing it. If that
    publish fails, the original is requeued instead.
    """
    action = outcome.action
    try:
        if action is Action.RETRY:
            retries = _int_header(message, RETRIES_HEADER) + 1
            now_ms = int(time.time() * 1000)
            since_ms = _int_header(message, PARKED_SINCE_HEADER) or now_ms
            if retries > MAX_THROTTLE_RETRIES or now_ms - since_ms > MAX_PARKED_S * 1000:
                outcome = Outcome.dead_letter(
                    f"still throttled after {retries - 1} retries"
                    f" over {(now_ms - since_ms) // 1000} s"
                )
                action = Action.DEAD_LETTER
            else:
                delay_s = park_delay_s(outcome.delay_s)
                bucket = retry_delay_bucket(delay_s)
                copy = _copy(
                    message,
                    {
                        DELAY_HEADER: str(bucket),
                        RETRIES_HEADER: retries,
                        PARKED_SINCE_HEADER: since_ms,
                    },
                )
                copy.expiration = max(delay_s, 0.05)
                await publisher.publish_raw(
                    RETRY_EXCHANGE.format(target=retry_target),
                    message.routing_key or "",
                    copy,
                    timeout_s=timeout_s,
                )
                await _safe_ack(message)
                return action
        if action is Action.DEAD_LETTER:
            copy = _copy(
                message,
                {
                    REASON_HEADER: outcome.reason[:1000],
                    ORIGIN_EXCHANGE_HEADER: message.exchange or "",
                    ORIGIN_ROUTING_KEY_HEADER: message.routing_key or "",
                    ORIGIN_QUEUE_HEADER: queue_name,
                    DEAD_LETTERED_HEADER: lag.now_ms(),
                },
            )
            await publisher.publish_raw(DEAD_EXCHANGE, "", copy, timeout_s=timeout_s)
            log.warning(
                "message.dead_lettered",
                queue=queue_name,
                message_id=message.message_id,
                reason=outcome.reason[:200],
            )
            await _safe_ack(message)
            return action
        if action is Action.REQUEUE:
            await _safe_nack(message, requeue=True)
            return action
        await _safe_ack(message)
    except PublishError:
        log.warning("message.settle_failed", queue=queue_name, action=action)
        await _safe_nack(message, requeue=True)
        return Action.REQUEUE
    return action


class _Part:
    """One item of a multi-item message, seen by :func:`settle` as a message of its own.

    It carries the item as its body and the original's headers and routing; acking or
    nacking it does nothing, since only the original message is settled with the broker.
    """

    def __init__(self, message: AbstractIncomingMessage, body: bytes, index: int) -> None:
        self.body = body
        self.headers = dict(message.headers or {})
        self.content_type = message.content_type
        self.message_id = f"{message.message_id}.{index}"
        self.correlation_id = message.correlation_id
        self.timestamp = message.timestamp
        self.exchange = message.exchange
        self.routing_key = message.routing_key
        self.nacked = False

    async def ack(self) -> None:
        """Nothing to do: the original is acked once every item is settled."""

    async def nack(self, requeue: bool = True) -> None:
        """Remember that :func:`settle` could not move the item (its publish failed)."""
        self.nacked = True


async def settle_parts(
    message: AbstractIncomingMessage,
    parts: Sequence[tuple[object, Outcome]],
    *,
    publisher: ConfirmPublisher,
    retry_target: str,
    queue_name: str,
    timeout_s: float = 5.0,
) -> list[Action]:
    """Settle a message that carried several items, each with its own outcome.

    When every item is acked, or every item wants a requeue, the message is settled whole.
    Otherwise each item that is not acked is published alone, as the one-item message it
    would have been, with its own outcome (retry queue and dead-letter queue exactly as
    :func:`settle` does; a requeue goes back to this queue at most
    :data:`MAX_PART_REQUEUES` times), and only then is the message acked: one bad item does
    not sink the others. If any of those publishes fails the whole message is requeued
    (every effect is idempotent). Returns the action taken for each item.
    """
    actions = [outcome.action for _, outcome in parts]
    if all(a is Action.ACK for a in actions) or all(a is Action.REQUEUE for a in actions):
        whole = Outcome.ack() if actions[0] is Action.ACK else parts[0][1]
        action = await settle(
            message,
            whole,
            publisher=publisher,
            retry_target=retry_target,
            queue_name=queue_name,
            timeout_s=timeout_s,
        )
        return [action] * len(parts)
    taken: list[Action] = []
    for index, (item, outcome) in enumerate(parts):
        item_action = await _settle_item(
            message,
            index,
            item,
            outcome,
            publisher=publisher,
            retry_target=retry_target,
            queue_name=queue_name,
            timeout_s=timeout_s,
        )
        if item_action is None:
            log.warning("message.settle_failed", queue=queue_name, action="split")
            await _safe_nack(message, requeue=True)
            return [Action.REQUEUE] * len(parts)
        taken.append(item_action)
    await _safe_ack(message)
    return taken


async def _settle_item(
    message: AbstractIncomingMessage,
    index: int,
    item: object,
    outcome: Outcome,
    *,
    publisher: ConfirmPublisher,
    retry_target: str,
    queue_name: str,
    timeout_s: float,
) -> Action | None:
    """Carry out one item's outcome; None when the publish that moves it failed."""
    if outcome.action is Action.ACK:
        return Action.ACK
    part = _Part(message, json.dumps(item, separators=(",", ":")).encode("utf-8"), index)
    # settle() reads only what _Part has; cast rather than build a real incoming message.
    as_message = cast(AbstractIncomingMessage, part)
    if outcome.action is Action.REQUEUE:
        requeues = _int_header(message, REQUEUES_HEADER) + 1
        if requeues <= MAX_PART_REQUEUES:
            copy = _copy(as_message, {REQUEUES_HEADER: requeues})
            try:
                await publisher.publish_raw(
                    message.exchange or "", message.routing_key or "", copy, timeout_s=timeout_s
                )
            except PublishError:
                return None
            return Action.REQUEUE
        outcome = Outcome.dead_letter(f"requeued {requeues - 1} times: {outcome.reason}")
    action = await settle(
        as_message,
        outcome,
        publisher=publisher,
        retry_target=retry_target,
        queue_name=queue_name,
        timeout_s=timeout_s,
    )
    return None if part.nacked else action


def _int_header(message: AbstractIncomingMessage, name: str) -> int:
    value = (message.headers or {}).get(name)
    return value if isinstance(value, int) else 0


async def _safe_ack(message: AbstractIncomingMessage) -> None:
    # After a reconnect the delivery tag belongs to a dead channel: the broker has already
    # requeued the message, and idempotent handlers absorb the redelivery.
    try:
        await message.ack()
    except CONNECTION_EXCEPTIONS as exc:
        log.info("message.ack_lost", message_id=message.message_id, error=type(exc).__name__)


async def _safe_nack(message: AbstractIncomingMessage, *, requeue: bool) -> None:
    try:
        await message.nack(requeue=requeue)
    except CONNECTION_EXCEPTIONS as exc:
        log.info("message.nack_lost", message_id=message.message_id, error=type(exc).__name__)

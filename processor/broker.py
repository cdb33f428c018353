"""RabbitMQ: one robust connection per process, a confirming publisher, the delivery policy.

The ack decision lives here and nowhere else (STYLE 5): handlers return an
:class:`Outcome`; :func:`settle` turns it into ack, delay (retry queue), requeue (bounded by
the quorum queue's delivery limit) or dead-letter with a reason.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from processor.interfaces import OutgoingMessage, PublishError
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
#: How often an item split out of a multi-item message went back to its queue.
REQUEUES_HEADER = "x-m365sync-requeues"
#: Past this many requeues a split-out item is dead-lettered (the quorum queues' delivery
#: limit does the same for whole messages).
MAX_PART_REQUEUES = 5


async def connect(
    url: str, *, name: str, reconnect_interval_s: float = 2.0
) -> AbstractRobustConnection:
    """Open the process's robust connection (reconnects and restores consumers itself)."""
    return await aio_pika.connect_robust(
        url,
        client_properties={"connection_name": name},
        reconnect_interval=reconnect_interval_s,
    )


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
            headers=dict(message.headers),
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


@dataclass(frozen=True)
class Outcome:
    """What to do with a delivery once its handler is done."""

    action: str  # "ack" | "retry" | "requeue" | "dead_letter"
    delay_s: float = 0.0
    reason: str = ""

    @classmethod
    def ack(cls) -> Outcome:
        """The effect is durable (or was a no-op): remove the message."""
        return cls("ack")

    @classmethod
    def retry(cls, delay_s: float) -> Outcome:
        """Throttled: park the message in a retry queue for ``delay_s``, then try again."""
        return cls("retry", delay_s=delay_s)

    @classmethod
    def requeue(cls, reason: str) -> Outcome:
        """A transient failure: back to the queue now (counts against the delivery limit)."""
        return cls("requeue", reason=reason)

    @classmethod
    def dead_letter(cls, reason: str) -> Outcome:
        """Retrying cannot help: move it to the dead-letter queue with the reason."""
        return cls("dead_letter", reason=reason)


#: Throttle retries never count against the delivery limit, but they are not endless:
#: past this many the message is dead-lettered so an operator can see it.
MAX_THROTTLE_RETRIES = 200


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
) -> str:
    """Carry out ``outcome`` for ``message``; returns the action actually taken.

    A retry or dead-letter first publishes the copy with confirms and only then acks the
    original, so a crash in between duplicates the message rather than losing it. If that
    publish fails, the original is requeued instead.
    """
    action = outcome.action
    try:
        if action == "retry":
            retries = _int_header(message, RETRIES_HEADER) + 1
            if retries > MAX_THROTTLE_RETRIES:
                outcome = Outcome.dead_letter(f"still throttled after {retries - 1} retries")
                action = "dead_letter"
            else:
                bucket = retry_delay_bucket(outcome.delay_s)
                copy = _copy(message, {DELAY_HEADER: str(bucket), RETRIES_HEADER: retries})
                copy.expiration = max(outcome.delay_s, 0.05)
                await publisher.publish_raw(
                    RETRY_EXCHANGE.format(target=retry_target),
                    message.routing_key or "",
                    copy,
                    timeout_s=timeout_s,
                )
                await _safe_ack(message)
                return action
        if action == "dead_letter":
            copy = _copy(
                message,
                {
                    REASON_HEADER: outcome.reason[:1000],
                    ORIGIN_EXCHANGE_HEADER: message.exchange or "",
                    ORIGIN_ROUTING_KEY_HEADER: message.routing_key or "",
                    ORIGIN_QUEUE_HEADER: queue_name,
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
        if action == "requeue":
            await _safe_nack(message, requeue=True)
            return action
        await _safe_ack(message)
    except PublishError:
        log.warning("message.settle_failed", queue=queue_name, action=action)
        await _safe_nack(message, requeue=True)
        return "requeue"
    return action


async def settle_parts(
    message: AbstractIncomingMessage,
    parts: Sequence[tuple[object, Outcome]],
    *,
    publisher: ConfirmPublisher,
    retry_target: str,
    queue_name: str,
    timeout_s: float = 5.0,
) -> list[str]:
    """Settle a message that carried several items, each with its own outcome.

    When every item is acked, or every item wants a requeue, the message is settled whole.
    Otherwise each item that is not acked is published alone, as the one-item message it
    would have been, with its own outcome (retry queue, dead-letter queue, or back to this
    queue at most :data:`MAX_PART_REQUEUES` times), and only then is the message acked: one
    bad item does not sink the others. If any of those publishes fails the whole message is
    requeued (every effect is idempotent). Returns the action taken for each part.
    """
    actions = [outcome.action for _, outcome in parts]
    if all(a == "ack" for a in actions) or all(a == "requeue" for a in actions):
        whole = Outcome.ack() if actions[0] == "ack" else Outcome.requeue(parts[0][1].reason)
        action = await settle(
            message,
            whole,
            publisher=publisher,
            retry_target=retry_target,
            queue_name=queue_name,
            timeout_s=timeout_s,
        )
        return [action] * len(parts)
    taken: list[str] = []
    try:
        for body, given in parts:
            outcome, action = given, given.action
            copy = _copy(message, {})
            copy.body = json.dumps(body, separators=(",", ":")).encode("utf-8")
            copy.message_id = f"{message.message_id}.{len(taken)}"
            if action == "requeue":
                requeues = _int_header(message, REQUEUES_HEADER) + 1
                if requeues > MAX_PART_REQUEUES:
                    action = "dead_letter"
                    reason = f"requeued {requeues - 1} times: {outcome.reason}"
                    outcome = Outcome.dead_letter(reason)
                else:
                    copy.headers[REQUEUES_HEADER] = requeues
                    await publisher.publish_raw(
                        message.exchange or "", message.routing_key or "", copy, timeout_s=timeout_s
                    )
            if action == "retry":
                retries = _int_header(message, RETRIES_HEADER) + 1
                if retries > MAX_THROTTLE_RETRIES:
                    action = "dead_letter"
                    outcome = Outcome.dead_letter(f"still throttled after {retries - 1} retries")
                else:
                    copy.headers[DELAY_HEADER] = str(retry_delay_bucket(outcome.delay_s))
                    copy.headers[RETRIES_HEADER] = retries
                    copy.expiration = max(outcome.delay_s, 0.05)
                    await publisher.publish_raw(
                        RETRY_EXCHANGE.format(target=retry_target),
                        message.routing_key or "",
                        copy,
                        timeout_s=timeout_s,
                    )
            if action == "dead_letter":
                copy.headers.update(
                    {
                        REASON_HEADER: outcome.reason[:1000],
                        ORIGIN_EXCHANGE_HEADER: message.exchange or "",
                        ORIGIN_ROUTING_KEY_HEADER: message.routing_key or "",
                        ORIGIN_QUEUE_HEADER: queue_name,
                    }
                )
                await publisher.publish_raw(DEAD_EXCHANGE, "", copy, timeout_s=timeout_s)
                log.warning(
                    "message.dead_lettered",
                    queue=queue_name,
                    message_id=copy.message_id,
                    reason=outcome.reason[:200],
                )
            taken.append(action)
    except PublishError:
        log.warning("message.settle_failed", queue=queue_name, action="split")
        await _safe_nack(message, requeue=True)
        return ["requeue"] * len(parts)
    await _safe_ack(message)
    return taken


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

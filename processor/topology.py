"""Broker topology: every exchange and queue name and argument, declared from one place.

Per-account ordering and serialization: each account is routed (by a hash computed here,
since RabbitMQ 3.10 has no modulus-hash exchange) to one of ``shard_count`` quorum queues
per role, each with single active consumer. Whichever process is active on a shard is the
only one working on that shard's accounts, so one account's writes never race across
worker processes, and the per-mailbox Graph budget holds across any number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

# The domain owns these names; the runtime's topology declares what they address.
from handlers.routing import ONERELATION_INBOUND, OUTBOUND_EXCHANGE

# Contract names (docs/contract.md §3).
ONERELATION_OUTBOUND = "onerelation.outbound"
ONERELATION_INBOUND_QUEUE = "onerelation.inbound"

# The service's own names.
INBOUND_EXCHANGE = "m365sync.inbound"  # notifications and resync jobs, by shard
INBOUND_QUEUE = "m365sync.inbound.{shard}"
OUTBOUND_INTAKE_QUEUE = "m365sync.outbound.intake"  # bound to onerelation.outbound
OUTBOUND_QUEUE = "m365sync.outbound.{shard}"
LIFECYCLE_EXCHANGE = "m365sync.lifecycle"
LIFECYCLE_QUEUE = "m365sync.lifecycle"
RETRY_EXCHANGE = "m365sync.retry.{target}"  # headers exchange, one per work exchange
RETRY_QUEUE = "m365sync.retry.{target}.{delay_s}s"
DEAD_EXCHANGE = "m365sync.dead"
DEAD_QUEUE = "m365sync.dead-letters"

#: Delay buckets of the retry queues, in seconds. A delayed message goes to the smallest
#: bucket at least as long as the wait; its per-message TTL trims the wait to the asked value.
#: A queue expires messages only at its head, so a short wait queued behind a longer one
#: in the same bucket waits for that one: each bucket is at most twice the one below it
#: (and 1 s wide at the short end, where Graph's Retry-After usually lies), which bounds
#: that overshoot by the bucket's width instead of letting a 1 s wait take up to 5 s.
RETRY_DELAYS_S: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)
#: Matched by the retry headers exchange; RabbitMQ ignores ``x-`` headers when matching.
DELAY_HEADER = "m365sync-delay"


@dataclass(frozen=True)
class TopologyConfig:
    """The tunables the topology is declared with."""

    shard_count: int = 8
    delivery_limit: int = 5
    dead_letter_ttl_days: int = 14


def retry_delay_bucket(wait_s: float) -> int:
    """The retry bucket a wait of ``wait_s`` seconds goes to."""
    for delay in RETRY_DELAYS_S:
        if wait_s <= delay:
            return delay
    return RETRY_DELAYS_S[-1]


def _work_queue_arguments(config: TopologyConfig) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": config.delivery_limit,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def _declare_retry(
    channel: AbstractChannel, target: str, target_exchange: str
) -> AbstractExchange:
    """Retry queues for one work exchange: TTL buckets that dead-letter back to it.

    Dead-lettering keeps the message's routing key (``shard.N``), so it lands back on the
    same shard queue; at-least-once dead-lettering means the hand-back cannot lose it.
    """
    exchange = await channel.declare_exchange(
        RETRY_EXCHANGE.format(target=target), aio_pika.ExchangeType.HEADERS, durable=True
    )
    for delay in RETRY_DELAYS_S:
        queue = await channel.declare_queue(
            RETRY_QUEUE.format(target=target, delay_s=delay),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": target_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        await queue.bind(exchange, arguments={"x-match": "all", DELAY_HEADER: str(delay)})
    return exchange


async def declare_topology(channel: AbstractChannel, config: TopologyConfig) -> None:
    """Declare every exchange, queue and binding (idempotent; same arguments everywhere)."""
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(
        DEAD_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": config.dead_letter_ttl_days * 86_400_000,
        },
    )
    await dead_queue.bind(dead)

    # 1Relation's side of the contract.
    await channel.declare_exchange(ONERELATION_OUTBOUND, aio_pika.ExchangeType.TOPIC, durable=True)
    inbound_out = await channel.declare_exchange(
        ONERELATION_INBOUND, aio_pika.ExchangeType.TOPIC, durable=True
    )
    announce_queue = await channel.declare_queue(
        ONERELATION_INBOUND_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await announce_queue.bind(inbound_out, "#")

    for target, exchange_name, queue_name in (
        ("inbound", INBOUND_EXCHANGE, INBOUND_QUEUE),
        ("outbound", OUTBOUND_EXCHANGE, OUTBOUND_QUEUE),
    ):
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for shard in range(config.shard_count):
            queue = await channel.declare_queue(
                queue_name.format(shard=shard),
                durable=True,
                arguments=_work_queue_arguments(config),
            )
            await queue.bind(exchange, f"shard.{shard}")
        await _declare_retry(channel, target, exchange_name)

    intake_args = _work_queue_arguments(config)
    del intake_args["x-single-active-consumer"]  # intake only validates and re-routes
    intake = await channel.declare_queue(OUTBOUND_INTAKE_QUEUE, durable=True, arguments=intake_args)
    for key in ("event.upsert", "event.delete"):
        await intake.bind(ONERELATION_OUTBOUND, key)
        # A parked intake message (its retry queue dead-letters to the outbound exchange
        # with its own routing key) comes back here; shard messages use ``shard.N`` keys.
        await intake.bind(OUTBOUND_EXCHANGE, key)

    lifecycle = await channel.declare_exchange(
        LIFECYCLE_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    lifecycle_args = _work_queue_arguments(config)
    del lifecycle_args["x-single-active-consumer"]
    lifecycle_queue = await channel.declare_queue(
        LIFECYCLE_QUEUE, durable=True, arguments=lifecycle_args
    )
    await lifecycle_queue.bind(lifecycle, "lifecycle")


def shard_queue_names(role: str, shard_count: int) -> list[str]:
    """The names of the shard queues of ``role`` (``inbound`` or ``outbound``)."""
    template = INBOUND_QUEUE if role == "inbound" else OUTBOUND_QUEUE
    return [template.format(shard=shard) for shard in range(shard_count)]

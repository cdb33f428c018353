"""Operator commands: key rotation and the dead-letter queue."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from crypto import Hasher, KeyRing
from processor import broker as broker_mod
from processor.app import mongo_client
from processor.broker import (
    ORIGIN_EXCHANGE_HEADER,
    ORIGIN_QUEUE_HEADER,
    ORIGIN_ROUTING_KEY_HEADER,
    REASON_HEADER,
    ConfirmPublisher,
)
from processor.settings import Settings
from processor.store import Store
from processor.topology import DEAD_QUEUE

#: How many dead letters one listing or replay reads at most.
MAX_DEAD_LETTERS = 10_000


async def rotate_keys(settings: Settings, *, out: TextIO = sys.stdout) -> int:
    """Rewrap every account's data key under the active master key (no data re-encrypted).

    Prints what it covered; exits 1 when some data keys are wrapped by a master key the
    key ring lacks (they are skipped, never the end of the run).
    """
    mongo = mongo_client(settings.mongodb_url)
    try:
        store = Store(
            db=mongo[settings.database_name],
            keyring=KeyRing(settings.master_keys),
            hasher=Hasher(settings.hash_key),
        )
        report = await store.keys.rotate()
    finally:
        await mongo.close()
    active = settings.master_keys[0].key_id
    print(
        json.dumps(
            {
                "active_master_key": active,
                "accounts": report.total,
                "rewrapped": report.rewrapped,
                "already_current": report.current,
                "unreadable": sum(report.unreadable.values()),
                "unreadable_by_master_key": report.unreadable,
            }
        ),
        file=out,
    )
    # Not done while any key is unreadable: the missing master key must come back first.
    return 1 if report.unreadable else 0


def describe_dead_letter(message: AbstractIncomingMessage) -> dict[str, Any]:
    """Identifiers and the reason of a dead letter (never its body: it may hold content)."""
    headers = dict(message.headers or {})
    deaths = headers.get("x-death")
    reason = headers.get(REASON_HEADER)
    origin_queue = headers.get(ORIGIN_QUEUE_HEADER)
    if reason is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        first = deaths[0]
        reason = f"broker: {first.get('reason')!s} (after {first.get('count')!s} deaths)"
        origin_queue = first.get("queue")
    if reason == "broker: delivery_limit (after 1 deaths)":
        reason = "delivery limit reached: the message kept failing with transient errors"
    return {
        "id": message.message_id,
        "reason": str(reason or "unknown"),
        "queue": str(origin_queue or ""),
        "routing_key": _origin(message)[1],
        "timestamp": message.timestamp.isoformat() if message.timestamp else None,
    }


def _origin(message: AbstractIncomingMessage) -> tuple[str, str]:
    headers = dict(message.headers or {})
    exchange = headers.get(ORIGIN_EXCHANGE_HEADER)
    routing_key = headers.get(ORIGIN_ROUTING_KEY_HEADER)
    deaths = headers.get("x-death")
    if exchange is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        exchange = deaths[0].get("exchange")
        keys = deaths[0].get("routing-keys") or [""]
        routing_key = keys[0] if isinstance(keys, list) and keys else ""
    return str(exchange or ""), str(routing_key or "")


async def _read_dead_letters(
    settings: Settings,
) -> tuple[aio_pika.abc.AbstractRobustConnection, list[AbstractIncomingMessage]]:
    connection = await broker_mod.connect(settings.amqp_urls, name="m365sync:dlq")
    channel = await connection.channel()
    queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
    messages: list[AbstractIncomingMessage] = []
    while len(messages) < MAX_DEAD_LETTERS:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
        messages.append(message)
    return connection, messages


async def dlq_list(settings: Settings, *, out: TextIO = sys.stdout) -> int:
    """Print one JSON line per dead letter; the queue is left as it was."""
    connection, messages = await _read_dead_letters(settings)
    try:
        for message in messages:
            print(json.dumps(describe_dead_letter(message)), file=out)
    finally:
        await connection.close()  # unacked messages go back to the queue
    return 0


async def dlq_replay(settings: Settings, ids: Sequence[str], *, out: TextIO = sys.stdout) -> int:
    """Send the chosen dead letters back to where they came from; 1 if any id was not found."""
    wanted = set(ids)
    connection, messages = await _read_dead_letters(settings)
    try:
        publisher = await ConfirmPublisher.open(connection)
        for message in messages:
            if message.message_id not in wanted:
                continue
            exchange, routing_key = _origin(message)
            headers = {
                k: v
                for k, v in dict(message.headers or {}).items()
                if not k.startswith("x-m365sync-") and k != "x-death"
            }
            copy = aio_pika.Message(
                message.body,
                content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                headers=headers,
            )
            await publisher.publish_raw(exchange, routing_key, copy, timeout_s=10)
            await message.ack()
            wanted.discard(str(message.message_id))
            print(json.dumps({"replayed": message.message_id, "to": exchange}), file=out)
        await publisher.close()
    finally:
        await connection.close()
    for missing in sorted(wanted):
        print(json.dumps({"not_found": missing}), file=out)
    return 1 if wanted else 0


async def status(settings: Settings, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the operator's view (``processor.status``): tables, or one JSON document."""
    from processor.status import collect, render_text  # noqa: PLC0415

    mongo = mongo_client(settings.mongodb_url)
    connection = await broker_mod.connect(settings.amqp_urls, name="m365sync:status")
    try:
        facts = await collect(
            db=mongo[settings.database_name],
            connection=connection,
            shard_count=settings.shard_count,
        )
    finally:
        await connection.close()
        await mongo.close()
    if as_json:
        print(json.dumps(facts, indent=2, sort_keys=True), file=out)
    else:
        out.write(render_text(facts))
    return 0

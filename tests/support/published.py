"""Every message the service publishes to 1Relation in the tests, checked against its schema.

:func:`install` wraps ``ConfirmPublisher.publish_raw`` (the one path every publish takes,
single, batched or re-routed) for the whole test session; each message to exchange
``onerelation.inbound`` is validated with the schema its routing key names in
``contract.ROUTING_SCHEMAS``. A message may carry no property the schema does not declare:
a new field is documented first (v1 grows by addition only, and never with content).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import aio_pika

from contract import ROUTING_SCHEMAS, load_schema, validator_for
from handlers.routing import ONERELATION_INBOUND
from processor.broker import ConfirmPublisher
from processor.topology import ONERELATION_INBOUND_QUEUE


@dataclass
class Published:
    """What the wrapped publisher saw: counts by routing key and the problems found."""

    validated: Counter[str] = field(default_factory=Counter)
    #: Messages read back from ``onerelation.inbound`` after a fault test (service roles
    #: running as child processes publish there too, out of this process's sight).
    read_back: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, routing_key: str, raw: bytes, *, count: bool = True) -> None:
        """Validate one message body published with ``routing_key``."""
        name = ROUTING_SCHEMAS.get(routing_key)
        if name is None:
            self.violations.append(f"{routing_key}: no schema documents this routing key")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.violations.append(f"{routing_key}: body is not JSON")
            return
        problems = [
            f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator_for(name).iter_errors(body)
        ]
        if isinstance(body, dict):
            undeclared = sorted(set(body) - set(load_schema(name)["properties"]))
            problems += [f"{key}: not declared in {name}" for key in undeclared]
        if count:
            self.validated[routing_key] += 1
        self.violations += [f"{routing_key} ({name}): {p}" for p in problems]


PUBLISHED = Published()


def install() -> None:
    """Wrap ``ConfirmPublisher.publish_raw`` once for the session."""
    original = ConfirmPublisher.publish_raw
    if getattr(original, "_contract_checked", False):
        return

    async def publish_raw(
        self: ConfirmPublisher,
        exchange_name: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        timeout_s: float,
    ) -> None:
        if exchange_name == ONERELATION_INBOUND:
            PUBLISHED.check(routing_key, message.body)
        await original(self, exchange_name, routing_key, message, timeout_s=timeout_s)

    publish_raw._contract_checked = True  # type: ignore[attr-defined]
    ConfirmPublisher.publish_raw = publish_raw  # type: ignore[method-assign]


async def check_queued(amqp_url: str, *, timeout_s: float = 10.0) -> int:
    """Read every message of ``onerelation.inbound`` at ``amqp_url`` (as 1Relation would)
    and validate each with its schema, then return them all to the queue (a test may read
    them after); returns how many were read.

    This covers what service roles running as child processes published. Messages this
    process published were validated when they were sent and are checked again, not counted
    again.
    """
    held: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect(amqp_url, timeout=timeout_s)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(ONERELATION_INBOUND_QUEUE, ensure=False)
        # Unacknowledged, each message stays out of the queue until it is returned, so the
        # loop ends when every message has been seen once.
        while (message := await queue.get(no_ack=False, fail=False, timeout=timeout_s)) is not None:
            PUBLISHED.check(message.routing_key or "", message.body, count=False)
            held.append(message)
        for message in held:
            await message.nack(requeue=True)
    PUBLISHED.read_back += len(held)
    return len(held)


def summary() -> list[str]:
    """Lines for the end of the test run."""
    total = sum(PUBLISHED.validated.values())
    kinds = ", ".join(f"{key} {n}" for key, n in sorted(PUBLISHED.validated.items()))
    return [
        f"contract: {total} published messages validated against docs/schemas ({kinds}); "
        f"{PUBLISHED.read_back} read back from onerelation.inbound after fault tests "
        f"(child processes' included) and validated again"
    ]


def take_violations() -> list[str]:
    """The problems found since the last call (each test reports its own)."""
    found, PUBLISHED.violations[:] = list(PUBLISHED.violations), []
    return found

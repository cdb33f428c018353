"""Shard queues spread over worker processes, against the real RabbitMQ and database.

Single active consumer alone gives every shard to the process that subscribed first; the
balancer makes the processes share them, hands a shard over without two processes ever
working on one account at the same time, and loses nothing when one of them leaves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from handlers.outcome import Outcome
from handlers.routing import shard_routing_key
from processor.balance import Balancer, assign
from processor.broker import ConfirmPublisher
from processor.consumer import Delivery, ShardConsumer
from processor.metrics import Metrics
from processor.repositories.workers import Registry
from processor.topology import INBOUND_EXCHANGE, TopologyConfig, declare_topology, shard_queue_names

pytestmark = pytest.mark.integration

SHARDS = 4


@dataclass(frozen=True)
class Handled:
    process: str
    account_id: str
    queue: str
    n: int
    started: float
    ended: float


class RecordingHandler:
    """Acks everything after a short pause, recording who handled what and when."""

    def __init__(self, process: str, log: list[Handled]) -> None:
        self.process = process
        self.log = log

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        started = time.monotonic()
        await asyncio.sleep(0.03)
        ended = time.monotonic()
        for delivery in deliveries:
            self.log.append(
                Handled(
                    self.process,
                    account_id,
                    delivery.queue_name,
                    delivery.body["n"],
                    started,
                    ended,
                )
            )
            delivery.outcome = Outcome.ack()


def _validate(body: dict[str, Any]) -> str | None:
    return None if isinstance(body.get("account_id"), str) else "account_id missing"


def _accounts() -> list[str]:
    """Two accounts on every shard."""
    found: dict[int, list[str]] = {shard: [] for shard in range(SHARDS)}
    n = 0
    while any(len(v) < 2 for v in found.values()):
        account = f"acc-{n}"
        shard = int(shard_routing_key(account, SHARDS).rsplit(".", 1)[1])
        if len(found[shard]) < 2:
            found[shard].append(account)
        n += 1
    return [a for accounts in found.values() for a in accounts]


class Process:
    """One worker process's consumer and balancer, on a connection of its own."""

    def __init__(
        self, name: str, amqp_url: str, db: AsyncDatabase[Any], log: list[Handled]
    ) -> None:
        self.name = name
        self.amqp_url = amqp_url
        self.db = db
        self.log = log

    async def start(self) -> Process:
        self.connection = await aio_pika.connect_robust(self.amqp_url)
        self.publisher = await ConfirmPublisher.open(self.connection)
        self.consumer = ShardConsumer(
            connection=self.connection,
            queue_names=shard_queue_names("inbound", SHARDS),
            handler=RecordingHandler(self.name, self.log),
            publisher=self.publisher,
            retry_target="inbound",
            metrics=Metrics(),
            validate=_validate,
            prefetch=8,
        )
        await self.consumer.start()
        self.balancer = Balancer(
            registry=Registry(self.db),
            consumer=self.consumer,
            role="inbound",
            member=self.name,
            interval_s=0.2,
        )
        await self.balancer.start()
        return self

    async def stop(self) -> None:
        await self.balancer.stop()
        await self.consumer.stop(grace_s=5)
        await self.connection.close()


async def _publish(amqp_url: str, accounts: list[str], start: int, count: int) -> list[int]:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(INBOUND_EXCHANGE, ensure=False)
        sent = []
        for n in range(start, start + count):
            account = accounts[n % len(accounts)]
            await exchange.publish(
                aio_pika.Message(
                    json.dumps({"account_id": account, "n": n}).encode(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=shard_routing_key(account, SHARDS),
            )
            sent.append(n)
            await asyncio.sleep(0.005)
        return sent


async def _all_handled(log: list[Handled], sent: list[int], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if {h.n for h in log} >= set(sent):
            return
        await asyncio.sleep(0.05)
    missing = sorted(set(sent) - {h.n for h in log})
    raise AssertionError(f"{len(missing)} messages not handled: {missing[:10]}")


def _overlaps(log: list[Handled]) -> list[tuple[Handled, Handled]]:
    """Pairs of batches of one account handled by two processes at the same time."""
    by_account: dict[str, list[Handled]] = {}
    for h in log:
        by_account.setdefault(h.account_id, []).append(h)
    found = []
    for handled in by_account.values():
        for a in handled:
            for b in handled:
                if a.process < b.process and a.started < b.ended and b.started < a.ended:
                    found.append((a, b))
    return found


def test_assignment_is_the_same_everywhere_and_even() -> None:
    names = shard_queue_names("inbound", 8)
    one = assign(names, ["w-b", "w-a", "w-c"])
    assert one == assign(names, ["w-c", "w-a", "w-b", "w-a"])
    counts = sorted(list(one.values()).count(m) for m in ("w-a", "w-b", "w-c"))
    assert counts == [2, 3, 3]
    assert set(assign(names, ["solo"]).values()) == {"solo"}
    assert assign(names, []) == {}


async def test_a_second_process_takes_half_the_shards_and_a_leaving_one_hands_them_back(
    amqp_url: str, mongo_db: AsyncDatabase[Any]
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        await declare_topology(await connection.channel(), TopologyConfig(shard_count=SHARDS))
    accounts = _accounts()
    log: list[Handled] = []
    first = await Process("w-1", amqp_url, mongo_db, log).start()
    second: Process | None = None
    try:
        sent = await _publish(amqp_url, accounts, 0, 80)
        await _all_handled(log, sent)
        assert {h.process for h in log} == {"w-1"}  # alone, it is active on every shard

        second = await Process("w-2", amqp_url, mongo_db, log).start()
        # Messages keep coming while the shards change hands.
        sent += await _publish(amqp_url, accounts, 80, 400)
        await _all_handled(log, sent)
        assert first.balancer.assignment == second.balancer.assignment
        mine = {p.name: set(p.balancer.mine()) for p in (first, second)}
        assert len(mine["w-1"]) == len(mine["w-2"]) == SHARDS // 2
        assert first.balancer.stats["releases"] >= SHARDS // 2

        settled = len(log)
        sent += await _publish(amqp_url, accounts, 480, 120)
        await _all_handled(log, sent)
        after = log[settled:]
        for name, queues in mine.items():  # each shard is now worked on by its owner only
            assert {h.queue for h in after if h.process == name} == queues, (name, queues)

        await second.stop()
        second = None
        sent += await _publish(amqp_url, accounts, 600, 80)
        await _all_handled(log, sent)
        assert {h.process for h in log if h.n >= 600} == {"w-1"}  # the leaver's shards are back

        assert _overlaps(log) == []
        handled = [h.n for h in log]
        assert sorted(handled) == sorted(sent)  # each exactly once: nothing lost or redone
    finally:
        if second is not None:
            await second.stop()
        await first.stop()


async def test_survivors_spread_a_leavers_shards_at_once_though_they_released_them_lately(
    amqp_url: str, mongo_db: AsyncDatabase[Any]
) -> None:
    """Four processes share the shards, then two leave: the leavers' shards reach whichever
    process is next in line, and the two survivors are back on an even split within
    seconds, even for shards a survivor let go less than a minute before (the once-a-minute
    guard is against bouncing while a dead process's heartbeat lingers, not against a new
    set of processes)."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        await declare_topology(await connection.channel(), TopologyConfig(shard_count=SHARDS))
    accounts = _accounts()
    log: list[Handled] = []
    procs = [await Process(f"w-{i}", amqp_url, mongo_db, log).start() for i in range(1, 5)]
    try:
        sent = await _publish(amqp_url, accounts, 0, 200)
        await _all_handled(log, sent)

        async def spread_over(live: list[Process]) -> bool:
            nonlocal sent
            settled = len(log)
            batch = await _publish(amqp_url, accounts, len(sent), 80)
            sent += batch
            await _all_handled(log, sent)
            owners = live[0].balancer.assignment
            after = log[settled:]
            return len({p.name for p in live}) == len(set(owners.values())) and all(
                owners.get(h.queue) == h.process for h in after
            )

        deadline = time.monotonic() + 30
        while not await spread_over(procs):
            assert time.monotonic() < deadline, "four processes never split the shards"
        for leaver in procs[2:]:
            await leaver.stop()
        survivors = procs[:2]
        procs = survivors
        deadline = time.monotonic() + 15
        while not await spread_over(survivors):
            assert time.monotonic() < deadline, (
                "the survivors did not split the shards within 15 s: "
                f"{Counter(h.process for h in log[-80:])}"
            )
        assert _overlaps(log) == []
        assert sorted(h.n for h in log) == sorted(sent)
    finally:
        for proc in procs:
            await proc.stop()

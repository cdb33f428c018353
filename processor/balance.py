"""Spreading the shard queues over the worker processes of a role.

A shard queue has *single active consumer*: every process of a role subscribes to every
shard, and the broker delivers to one of them, the first that subscribed. That keeps one
writer per account, but on its own it gives every shard to whichever process started
first, and the others only stand by. Here each process announces itself in MongoDB with a
heartbeat; all of them compute the same assignment of shards to the live processes, and a
process that is active on a shard assigned to another one lets it go
(:meth:`ShardConsumer.release`): the broker then activates the next consumer in line.
Failover stays the broker's: when a process dies, its shards go at once to a standby, and
the next assignment spreads them again.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from processor.logs import get_logger
from processor.repositories.workers import Registry

__all__ = [
    "HEARTBEAT_S",
    "Balancer",
    "Releasable",
    "assign",
    "process_id",
]

log = get_logger(__name__)

HEARTBEAT_S: Final = 2.0
#: While the live processes stay the same, a shard is let go again (after deliveries kept
#: coming to a process it is not assigned to) at most this often: each release returns what
#: was received and not started, which counts as a delivery of those messages.
RELEASE_AGAIN_AFTER_S: Final = 60.0


class Releasable(Protocol):
    """What the balancer needs of a consumer (``ShardConsumer``)."""

    @property
    def queue_names(self) -> list[str]: ...

    @property
    def received(self) -> Mapping[str, int]: ...

    def report(self) -> Mapping[str, Any]: ...

    async def release(self, name: str) -> int: ...


def process_id() -> str:
    """This process's id among the workers: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def assign(queue_names: Sequence[str], live: Sequence[str]) -> dict[str, str]:
    """Queue -> process: round robin over the live processes in a fixed order, so every
    process computes the same answer from the same set, and shard counts differ by at most
    one between processes."""
    members = sorted(set(live))
    if not members:
        return {}
    return {name: members[index % len(members)] for index, name in enumerate(queue_names)}


class Balancer:
    """Keeps this process on its share of a role's shard queues."""

    def __init__(
        self,
        *,
        registry: Registry,
        consumer: Releasable,
        role: str,
        member: str | None = None,
        interval_s: float = HEARTBEAT_S,
        release_again_after_s: float = RELEASE_AGAIN_AFTER_S,
    ) -> None:
        self._registry = registry
        self._consumer = consumer
        self._role = role
        self.member = member or process_id()
        self._interval_s = interval_s
        self._release_again_after_s = release_again_after_s
        self._assignment: dict[str, str] = {}
        self._released_at: dict[str, float] = {}
        self._received_at_release: dict[str, int] = {}
        self._live_at_release: dict[str, frozenset[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.stats = {"rounds": 0, "releases": 0, "returned": 0}

    @property
    def assignment(self) -> dict[str, str]:
        return dict(self._assignment)

    def mine(self) -> list[str]:
        """The queues assigned to this process by the last round."""
        return [name for name, owner in self._assignment.items() if owner == self.member]

    async def start(self) -> None:
        """Announce this process (after its consumer subscribed) and start the rounds."""
        await self._registry.beat(self._role, self.member, self._consumer.report())
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"balancer:{self._role}")

    async def stop(self) -> None:
        """Stop the rounds and leave, so that the others take this process's shards now."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._registry.leave(self._role, self.member)
        except Exception as exc:  # the database may be away; the heartbeat expires anyway
            log.info("balancer.leave_failed", role=self._role, error=type(exc).__name__)

    async def _run(self) -> None:
        # The flag as well as the cancel: a cancel that lands inside a driver call which
        # swallows it (seen once: a stack that never stopped) must not keep the rounds going.
        while not self._stopping:
            try:
                await self.round()
            except Exception as exc:  # the database or broker is away: try next round
                log.warning("balancer.round_failed", role=self._role, error=type(exc).__name__)
            await asyncio.sleep(self._interval_s)

    async def round(self) -> None:
        """Beat, read the live processes, and let go of the shards that are another's and
        that this process is receiving."""
        self.stats["rounds"] += 1
        await self._registry.beat(self._role, self.member, self._consumer.report())
        live = await self._registry.live(self._role)
        if self.member not in live:
            live.append(self.member)
        assignment = assign(self._consumer.queue_names, live)
        members = frozenset(live)
        if assignment != self._assignment:
            log.info(
                "balancer.assignment",
                role=self._role,
                members=len(set(live)),
                mine=sum(1 for owner in assignment.values() if owner == self.member),
            )
        self._assignment = assignment
        now = asyncio.get_running_loop().time()
        received = self._consumer.received
        for name, owner in assignment.items():
            if owner == self.member:
                continue
            # Only a process that has been receiving a shard is (or was) its active
            # consumer: a standby, or the holder of a quiet shard, has nothing to hand over
            # (a quiet shard moves when its next message arrives). With the same live
            # processes, the same shard is let go again only after a while, so that a shard
            # whose owner died (and whose heartbeat has not expired yet) does not bounce
            # between the survivors. A changed set of processes is a new assignment, and
            # may move it at once: processes that left gracefully, or whose heartbeat
            # expired, would otherwise keep the survivors uneven for up to that while.
            active = received.get(name, 0) > self._received_at_release.get(name, 0)
            waited = now - self._released_at.get(name, -1e9) >= self._release_again_after_s
            changed = self._live_at_release.get(name) != members
            if active and (waited or changed):
                await self._release(name, now, members)

    async def _release(self, name: str, now: float, members: frozenset[str]) -> None:
        returned = await self._consumer.release(name)
        self._released_at[name] = now
        self._live_at_release[name] = members
        self._received_at_release[name] = self._consumer.received.get(name, 0)
        self.stats["releases"] += 1
        self.stats["returned"] += returned

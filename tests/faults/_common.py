"""What the fault tests share: events to write, a load that runs until told to stop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.e2e.harness import Stack, eventually
from tests.support.cluster import RabbitCluster
from tests.support.history import History
from tests.support.nodes import RabbitNode


def outlook_event(rng: random.Random, n: int) -> dict[str, Any]:
    """An Outlook event inside the sync window with content that must stay encrypted."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(
        days=rng.randint(1, 60), hours=rng.randint(0, 8)
    )
    return {
        "subject": f"Fault subject {n} {rng.randrange(10**9)}",
        "body": {"contentType": "text", "content": f"Agenda {n} {rng.randrange(10**9)}"},
        "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        "end": {
            "dateTime": (start + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": "UTC",
        },
    }


class OutlookLoad:
    """An Outlook user creating (and now and then editing or deleting) events until stopped."""

    def __init__(
        self,
        history: History,
        user_id: str,
        *,
        seed: int,
        interval_s: float = 0.05,
        edits: bool = True,
        limit: int = 10_000,
        burst: int = 0,
    ) -> None:
        self.history = history
        self.user_id = user_id
        self.rng = random.Random(seed)
        self.interval_s = interval_s
        self.edits = edits
        self.limit = limit
        self.burst = burst  # the first ``burst`` changes come without a pause (a backlog)
        self.created: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> OutlookLoad:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and n < self.limit:
            roll = self.rng.random()
            if self.edits and self.created and roll < 0.2:
                target = self.rng.choice(self.created)
                await self.history.update_event(self.user_id, target, {"subject": f"Edited {n}"})
            elif self.edits and len(self.created) > 5 and roll < 0.25:
                target = self.created.pop(self.rng.randrange(len(self.created)))
                await self.history.delete_event(self.user_id, target)
            else:
                event = await self.history.create_event(self.user_id, outlook_event(self.rng, n))
                self.created.append(event["id"])
            n += 1
            if n > self.burst:
                await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def wait_done(self) -> None:
        if self._task is not None:
            await self._task


async def consumers(node: RabbitNode, vhost: str, prefix: str) -> dict[str, int]:
    """Consumers per queue whose name starts with ``prefix`` (management API)."""
    queues = await node.queues(vhost)
    return {
        name: int(q.get("consumers") or 0)
        for name, q in queues.items()
        if name.startswith(prefix) and ".retry." not in name
    }


async def wait_consumers(
    node: RabbitNode, vhost: str, prefix: str, shard_count: int, *, timeout_s: float = 30.0
) -> float:
    """Wait until each of the ``shard_count`` shard queues has a consumer; returns the wait."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def all_consumed() -> dict[str, int] | None:
        counts = await consumers(node, vhost, prefix)
        shards = {n: c for n, c in counts.items() if n.rsplit(".", 1)[-1].isdigit()}
        if len(shards) == shard_count and all(c >= 1 for c in shards.values()):
            return shards
        return None

    await eventually(all_consumed, timeout_s=timeout_s, interval_s=0.2)
    return round(loop.time() - started, 2)


async def until(predicate: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    """``eventually`` with a finer poll, for catching a moment (messages held, a batch running)."""
    return await eventually(predicate, timeout_s=timeout_s, interval_s=0.05)


def history_for(
    stack: Stack,
    label: str,
    *,
    mongodb_url: str,
    node: RabbitNode | RabbitCluster,
    vhost: str,
) -> History:
    """A :class:`History` over ``stack``'s accounts, reading the database at ``mongodb_url``."""
    return History(
        label,
        control=stack.control,
        settings=stack.settings,
        accounts=stack.accounts,
        mongodb_url=mongodb_url,
        node=node,
        vhost=vhost,
    )

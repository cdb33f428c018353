"""Workers that scale: under steady load a role goes from 1 to 4 processes and back to 2.

The shards rebalance (``processor/balance.py``), no account is ever worked on by two
processes at once (from each process's ``batch.started``/``batch.settled`` marks), nothing is
lost (the history check), and the test reports how long new processes took to hold their
share and how many messages each step redelivered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from handlers.routing import shard_of
from tests.e2e.harness import Stack, running_stack
from tests.e2e.outbound_support import message, relation_event
from tests.e2e.processes import RoleProcess
from tests.faults._common import OutlookLoad, history_for, wait_consumers
from tests.faults.conftest import Broker
from tests.support.history import History

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

SHARDS = 8
#: Queue-name prefix of each role's shard queues.
PREFIX = {"worker": "m365sync.inbound.", "outbound": "m365sync.outbound."}


def accounts_covering_every_shard() -> list[str]:
    """One account id per shard, so that every shard has traffic (a quiet shard only moves
    when its next message arrives)."""
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < SHARDS:
        account = f"acc-s{n}"
        chosen.setdefault(shard_of(account, SHARDS), account)
        n += 1
    return [chosen[s] for s in range(SHARDS)]


def _is_shard(name: str, role: str) -> bool:
    return name.startswith(PREFIX[role]) and name.rsplit(".", 1)[-1].isdigit()


async def active_owners(broker: Broker, role: str) -> dict[str, str]:
    """Shard queue -> the connection name (``m365sync:<pid>``) of its active consumer."""
    consumers = await broker.node.api("GET", f"/consumers/{broker.vhost}")
    connections = await broker.node.api("GET", f"/vhosts/{broker.vhost}/connections")
    given = {
        c["name"]: str((c.get("client_properties") or {}).get("connection_name") or c["name"])
        for c in connections
    }
    owners = {}
    for consumer in consumers:
        queue = consumer["queue"]["name"]
        details = consumer.get("channel_details")
        # The management API gives `[]` for a channel that is closing: not an owner yet.
        if _is_shard(queue, role) and consumer.get("active", True) and isinstance(details, dict):
            peer = details["connection_name"]
            owners[queue] = given.get(peer, peer)
    return owners


async def redelivered(broker: Broker, role: str) -> int:
    """Redeliveries so far over the role's shard queues (management API figures)."""
    queues = await broker.node.queues(broker.vhost)
    return sum(
        int((q.get("message_stats") or {}).get("redeliver") or 0)
        for name, q in queues.items()
        if _is_shard(name, role)
    )


async def balanced(broker: Broker, role: str, procs: list[RoleProcess], timeout_s: float) -> float:
    """Wait until every process is the active consumer of its share of the shards (counts
    differ by at most one, every shard owned by one of ``procs``); returns the wait."""
    names = {f"m365sync:{p.proc.pid}" for p in procs if p.proc is not None}
    started = time.monotonic()
    deadline = started + timeout_s
    last: Counter[str] = Counter()
    while time.monotonic() < deadline:
        owners = await active_owners(broker, role)
        last = Counter(owners.values())
        if (
            len(owners) == SHARDS
            and set(owners.values()) == names
            and max(last.values()) - min(last.values()) <= 1
        ):
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.2)
    raise AssertionError(f"shards never balanced over {len(names)} processes: {dict(last)}")


def work_intervals(logs: list[Path], role: str) -> dict[str, list[tuple[datetime, datetime, str]]]:
    """Per account, the (start, end, process) of every batch the processes logged."""
    spans: dict[str, list[tuple[datetime, datetime, str]]] = defaultdict(list)
    for path in logs:
        open_at: dict[str, datetime] = {}
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("event") not in ("batch.started", "batch.settled"):
                continue
            if not _is_shard(str(entry.get("queue")), role):
                continue
            account, at = str(entry["account_id"]), datetime.fromisoformat(entry["timestamp"])
            if entry["event"] == "batch.started":
                open_at[account] = at
            elif account in open_at:
                spans[account].append((open_at.pop(account), at, path.name))
        for account, at in open_at.items():  # still running when the process stopped
            spans[account].append((at, datetime.max.replace(tzinfo=at.tzinfo), path.name))
    return spans


def overlaps(spans: dict[str, list[tuple[datetime, datetime, str]]]) -> list[str]:
    """Accounts worked on by two processes at the same time."""
    found = []
    for account, intervals in spans.items():
        latest_end: dict[str, datetime] = {}  # process -> the end of its latest batch so far
        for start, end, proc in sorted(intervals):
            for other, other_end in latest_end.items():
                if other != proc and start < other_end:
                    found.append(f"{account}: {other} until {other_end}, {proc} from {start}")
            latest_end[proc] = max(end, latest_end.get(proc, end))
    return found


class RelationLoad:
    """1Relation publishing revisions of its events for every account until stopped."""

    def __init__(self, history: History, url: str, accounts: list[str], interval_s: float) -> None:
        self.history = history
        self.url = url
        self.accounts = accounts
        self.interval_s = interval_s
        self.revision = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> RelationLoad:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.revision += 1
            n = self.revision % 6
            bodies = [
                message(
                    a,
                    f"rel-{n}",
                    self.revision,
                    relation_event(f"rel-{n} r{self.revision}", day=1 + n),
                )
                for a in self.accounts
            ]
            await self.history.publish_outbound(self.url, bodies)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def _start(role: str, stack: Stack, tmp_path: Path, n: int) -> RoleProcess:
    env = {**stack.env, "M365SYNC_LOG_LEVEL": "debug"}
    return await RoleProcess(role, env, tmp_path / f"{role}-{n}.log").start()


@pytest.mark.parametrize("role", ["worker", "outbound"])
async def test_scaling_a_role_from_one_to_four_processes_and_back_to_two(
    role: str, tmp_path: Path, broker: Broker, mongodb_url: str
) -> None:
    """Under steady load one process becomes four, then two: each time the shards spread
    evenly over the live processes, no account is worked on by two processes at once, and
    nothing is lost (every 2xx'd notification and every confirmed 1Relation change has its
    effect, nothing dead-lettered)."""
    accounts = accounts_covering_every_shard()
    users = tuple((f"User {i}", f"user{i}@contoso.example") for i in range(len(accounts)))
    in_process = ("receiver",) if role == "worker" else ("receiver", "worker")
    async with running_stack(
        tmp_path,
        amqp_url=broker.url,
        mongodb_url=mongodb_url,
        roles=in_process,
        sim_config={"users": users},
        extra_env={"M365SYNC_SHARDS": str(SHARDS)},
    ) as stack:
        procs: list[RoleProcess] = []
        stopped: list[RoleProcess] = []
        try:
            mailboxes = [u["id"] for u in await stack.control.users()]
            for account, user_id in zip(accounts, mailboxes, strict=True):
                await stack.connect_account(account, user_id)
            procs.append(await _start(role, stack, tmp_path, 0))
            await procs[0].wait_log("process.ready")
            await wait_consumers(broker.node, broker.vhost, PREFIX[role], SHARDS)  # type: ignore[arg-type]
            async with history_for(
                stack,
                f"scale-{role}",
                mongodb_url=mongodb_url,
                node=broker.node,
                vhost=broker.vhost,
            ) as history:
                if role == "worker":
                    loads: list[Any] = [
                        OutlookLoad(history, user_id, seed=70 + i, interval_s=0.8, burst=0).start()
                        for i, user_id in enumerate(mailboxes)
                    ]
                else:
                    loads = [RelationLoad(history, broker.url, accounts, interval_s=0.4).start()]
                figures: dict[str, Any] = {}
                # Every shard has traffic and one owner: the single process.
                figures["one_process_s"] = await balanced(broker, role, procs, timeout_s=30)

                before = await redelivered(broker, role)
                for n in range(1, 4):
                    procs.append(await _start(role, stack, tmp_path, n))
                figures["one_to_four_share_taken_s"] = await balanced(
                    broker, role, procs, timeout_s=90
                )
                figures["one_to_four_redelivered"] = await redelivered(broker, role) - before

                await asyncio.sleep(2.0)
                before = await redelivered(broker, role)
                for proc in procs[2:]:
                    assert await proc.stop() == 0, proc.tail()
                stopped, procs = procs[2:], procs[:2]
                figures["four_to_two_share_taken_s"] = await balanced(
                    broker, role, procs, timeout_s=90
                )
                figures["four_to_two_redelivered"] = await redelivered(broker, role) - before

                await asyncio.sleep(2.0)
                for load in loads:
                    await load.stop()
                history.extra.update(figures)
                report = await history.check(timeout_s=120)
                assert report.mutations + report.outbound_published > 0
            spans = work_intervals([p.log_path for p in procs + stopped], role)
            assert sum(len(v) for v in spans.values()) > len(accounts)
            assert len({proc for v in spans.values() for _, _, proc in v}) == 4, (
                "not all four worked"
            )
            problems = overlaps(spans)
            assert not problems, f"accounts worked on by two processes at once: {problems[:5]}"
            print(f"SCALE {role} {json.dumps(figures)}")
        finally:
            for proc in procs:
                await proc.stop()

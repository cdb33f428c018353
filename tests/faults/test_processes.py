"""Worker and outbound processes killed with SIGKILL mid-batch, and stopped with SIGTERM
under load: what they held is redelivered (SIGKILL) or finished or requeued (SIGTERM),
nothing is acked without its effect, and a SIGTERM'd process exits 0 within its grace."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Stack, running_stack
from tests.e2e.outbound_support import message, relation_event
from tests.e2e.processes import RoleProcess
from tests.faults._common import OutlookLoad, history_for, until, wait_consumers
from tests.faults.conftest import Broker
from tests.support.history import History
from tests.support.nodes import FerretNode

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

#: The processes' drain deadline (``service_env`` sets M365SYNC_SHUTDOWN_GRACE_S=5).
GRACE_S = 5.0


def relation_changes(account_id: str, count: int, *, revisions: int = 2) -> list[dict[str, Any]]:
    """``count`` relation events, each upserted ``revisions`` times (subjects name both)."""
    bodies = []
    for revision in range(1, revisions + 1):
        for n in range(count):
            event = relation_event(f"rel-{n} r{revision}", day=1 + n % 20, hour=8 + n % 8)
            bodies.append(message(account_id, f"rel-{n}", revision, event))
    return bodies


#: A worker that fetches each event (no burst delta pass, which would fetch them all at
#: once and leave the rest of the notifications nothing to wait on): with Graph slowed
#: down, it holds deliveries for seconds, which these tests need to kill it mid-batch.
PER_EVENT_GETS = {"M365SYNC_BURST_MIN_EVENTS": "1000"}


async def _held(history: History, queue_prefix: str) -> int:
    assert history.node is not None
    assert history.vhost is not None
    queues = await history.node.queues(history.vhost)
    return sum(
        int(q.get("messages_unacknowledged") or 0)
        for name, q in queues.items()
        if name.startswith(queue_prefix)
    )


async def _roles(stack: Stack, tmp_path: Path, tag: str) -> tuple[RoleProcess, RoleProcess]:
    worker = await RoleProcess("worker", stack.env, tmp_path / f"worker-{tag}.log").start()
    outbound = await RoleProcess("outbound", stack.env, tmp_path / f"outbound-{tag}.log").start()
    await worker.wait_log("process.ready")
    await outbound.wait_log("process.ready")
    return worker, outbound


async def test_worker_and_outbound_processes_killed_mid_batch(
    tmp_path: Path, broker: Broker, ferret: FerretNode
) -> None:
    """SIGKILL a worker process while it holds inbound deliveries and an outbound process
    while it holds outbound changes; replacements take over: no loss, Outlook holds exactly
    1Relation's latest revisions, and the database equals Graph."""
    mongodb_url = ferret.url(f"m365sync_fault_{uuid.uuid4().hex[:8]}")
    async with running_stack(
        tmp_path,
        amqp_url=broker.url,
        mongodb_url=mongodb_url,
        roles=("receiver",),
        extra_env=PER_EVENT_GETS,
    ) as stack:
        worker, outbound = await _roles(stack, tmp_path, "1")
        replacements: list[RoleProcess] = []
        try:
            user_id = (await stack.control.users())[0]["id"]
            await stack.connect_account("acc-k", user_id)
            shards = stack.settings.shard_count
            await wait_consumers(broker.node, broker.vhost, "m365sync.inbound.", shards)
            # Graph slower than the changes come: both processes hold deliveries for seconds.
            await stack.control.set_faults(latency_ms=1000)
            async with history_for(
                stack,
                "process-sigkill-mid-batch",
                mongodb_url=mongodb_url,
                node=broker.node,
                vhost=broker.vhost,
            ) as history:
                load = OutlookLoad(history, user_id, seed=31, interval_s=0.05, limit=40).start()
                await history.publish_outbound(broker.url, relation_changes("acc-k", 15))

                async def both_busy() -> bool:
                    inbound = await _held(history, "m365sync.inbound.")
                    outbound_held = await _held(history, "m365sync.outbound.")
                    # The receiver groups notifications, so one held message may carry many.
                    return inbound >= 1 and outbound_held >= 1

                await until(both_busy)
                await history.fault(
                    inbound_held=await _held(history, "m365sync.inbound."),
                    outbound_held=await _held(history, "m365sync.outbound."),
                )
                worker.kill()
                outbound.kill()
                await worker.stop()
                await outbound.stop()
                await load.wait_done()
                await stack.control.set_faults(latency_ms=200)
                replacements = list(await _roles(stack, tmp_path, "2"))
                history.heal()
                report = await history.check(timeout_s=60)
                assert report.redeliveries > 0
        finally:
            for process in (worker, outbound, *replacements):
                await process.stop()


async def test_sigterm_under_load_drains_in_flight_work_before_exit(
    tmp_path: Path, broker: Broker, ferret: FerretNode
) -> None:
    """SIGTERM a worker and an outbound process while both hold deliveries: each exits 0
    within its grace period, having finished or requeued what it held (nothing acked
    without its effect), and a fresh pair finishes the rest with nothing lost."""
    mongodb_url = ferret.url(f"m365sync_fault_{uuid.uuid4().hex[:8]}")
    async with running_stack(
        tmp_path,
        amqp_url=broker.url,
        mongodb_url=mongodb_url,
        roles=("receiver",),
        extra_env=PER_EVENT_GETS,
    ) as stack:
        worker, outbound = await _roles(stack, tmp_path, "1")
        replacements: list[RoleProcess] = []
        try:
            user_id = (await stack.control.users())[0]["id"]
            await stack.connect_account("acc-t", user_id)
            shards = stack.settings.shard_count
            await wait_consumers(broker.node, broker.vhost, "m365sync.inbound.", shards)
            # Slow enough that the worker holds deliveries while the outbound writer does.
            await stack.control.set_faults(latency_ms=600)
            async with history_for(
                stack,
                "sigterm-under-load",
                mongodb_url=mongodb_url,
                node=broker.node,
                vhost=broker.vhost,
            ) as history:
                # Creates only and no duplicate notifications: each event has exactly one
                # notification, so one acked without its effect would show as lost.
                load = OutlookLoad(
                    history, user_id, seed=41, interval_s=0.05, edits=False, limit=40
                ).start()
                await history.publish_outbound(broker.url, relation_changes("acc-t", 15))

                async def both_busy() -> bool:
                    inbound = await _held(history, "m365sync.inbound.")
                    outbound_held = await _held(history, "m365sync.outbound.")
                    # The receiver groups notifications, so one held message may carry many.
                    return inbound >= 1 and outbound_held >= 1

                await until(both_busy)
                await history.fault(
                    inbound_held=await _held(history, "m365sync.inbound."),
                    outbound_held=await _held(history, "m365sync.outbound."),
                )
                started = time.monotonic()
                codes = await asyncio.gather(
                    worker.stop(timeout_s=GRACE_S + 10), outbound.stop(timeout_s=GRACE_S + 10)
                )
                exit_s = round(time.monotonic() - started, 2)
                history.extra["exit_codes"] = list(codes)
                history.extra["exit_s"] = exit_s
                assert codes == [0, 0], (codes, worker.tail(), outbound.tail())
                assert exit_s < GRACE_S + 5
                # Nothing is held by a process that is gone: what it had and did not finish
                # is back in the queue (the broker's figures trail by up to a second).

                async def released() -> tuple[int, int] | None:
                    totals = await history.queue_totals()
                    return totals if totals[1] == 0 else None

                history.extra["after_exit_ready_unacked"] = list(await until(released, 10))
                await load.wait_done()
                replacements = list(await _roles(stack, tmp_path, "2"))
                history.heal()
                await history.check(timeout_s=60)
        finally:
            for process in (worker, outbound, *replacements):
                await process.stop()

"""RabbitMQ stopped and restarted under load: the receiver answers 503 while it is away,
Graph retries, workers' unacknowledged deliveries come back, consumers come back."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import running_stack
from tests.faults._common import OutlookLoad, history_for, until, wait_consumers
from tests.faults.conftest import Broker
from tests.support.nodes import FerretNode

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
async def test_broker_restart_while_the_receiver_publishes_and_workers_hold_messages(
    how: str, tmp_path: Path, broker: Broker, ferret: FerretNode
) -> None:
    """The broker goes down (SIGTERM or SIGKILL) while notifications stream in and the
    worker holds unacknowledged deliveries; it comes back on the same data. Every
    notification Graph got a 2xx for has its effect, the database equals Graph, and every
    inbound shard queue has its consumer again."""
    mongodb_url = ferret.url(f"m365sync_fault_{uuid.uuid4().hex[:8]}")
    async with running_stack(tmp_path, amqp_url=broker.url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-b", user_id)
        shards = stack.settings.shard_count
        await wait_consumers(broker.node, broker.vhost, "m365sync.inbound.", shards)
        # Slow Graph reads: the worker holds deliveries unacknowledged while it fetches.
        await stack.control.set_faults(latency_ms=400, duplicates=True)
        async with history_for(
            stack,
            f"broker-restart-{how}",
            mongodb_url=mongodb_url,
            node=broker.node,
            vhost=broker.vhost,
        ) as history:
            load = OutlookLoad(history, user_id, seed=11, interval_s=0.3, burst=25).start()

            async def holding() -> bool:
                return (await history.queue_totals())[1] >= 2

            await until(holding)
            await history.fault()
            if how == "graceful":
                await broker.node.stop()
            else:
                await broker.node.kill()
            await asyncio.sleep(1.0)  # notifications keep coming while it is away
            boot_s = await broker.node.start()
            history.heal()
            await asyncio.sleep(1.0)
            await load.stop()
            history.extra["broker_boot_s"] = round(boot_s, 1)
            history.extra["consumers_back_s"] = await wait_consumers(
                broker.node, broker.vhost, "m365sync.inbound.", shards, timeout_s=30
            )
            report = await history.check(timeout_s=90)
            assert report.webhook_non2xx > 0, "the receiver never answered non-2xx while down"
            assert report.mutations > 0

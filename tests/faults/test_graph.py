"""Graph answering 429 and 503 storms and answering slowly: both directions converge, waits
honour Retry-After through the retry queues, nothing is dead-lettered."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import running_stack
from tests.faults._common import OutlookLoad, history_for, wait_consumers
from tests.faults.conftest import Broker
from tests.faults.test_processes import relation_changes
from tests.support.nodes import FerretNode

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


async def test_graph_throttling_and_unavailability_storm_with_slow_answers(
    tmp_path: Path, broker: Broker, ferret: FerretNode
) -> None:
    """For a while Graph throttles hard (one request per mailbox at a time, Retry-After),
    fails a third of requests with 503 and answers slowly; inbound and outbound still
    converge once it calms down, with no message dead-lettered."""
    mongodb_url = ferret.url(f"m365sync_fault_{uuid.uuid4().hex[:8]}")
    async with running_stack(
        tmp_path,
        amqp_url=broker.url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-g", user_id)
        await wait_consumers(
            broker.node, broker.vhost, "m365sync.inbound.", stack.settings.shard_count
        )
        async with history_for(
            stack,
            "graph-429-503-slow",
            mongodb_url=mongodb_url,
            node=broker.node,
            vhost=broker.vhost,
        ) as history:
            await history.fault()
            await stack.control.set_faults(
                seed=9,
                duplicates=True,
                latency_ms=300,
                max_concurrent_per_mailbox=1,
                throttle_retry_after="0.5",
                random_503_rate=0.3,
                random_503_retry_after="0.3",
            )
            load = OutlookLoad(history, user_id, seed=51, interval_s=0.1, limit=40).start()
            await history.publish_outbound(broker.url, relation_changes("acc-g", 10))
            await load.wait_done()
            await asyncio.sleep(2.0)
            await stack.control.set_faults(
                latency_ms=0, max_concurrent_per_mailbox=4, random_503_rate=0.0
            )
            history.heal()
            report = await history.check(timeout_s=60)
            assert report.graph_429 > 0
            assert report.graph_503 > 0

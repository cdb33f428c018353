"""The connection to RabbitMQ slowed, then cut, then refused for a while (through a TCP
proxy): the receiver answers 503 meanwhile, every process reconnects, consumers return."""

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
from tests.support.tcpproxy import TCPProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


async def test_broker_connection_slowed_cut_and_refused(
    tmp_path: Path, broker: Broker, ferret: FerretNode
) -> None:
    """Every byte to and from the broker is delayed, then every connection is dropped, then
    new ones are refused for 4 s: nothing 2xx'd or confirmed is lost, both directions
    converge, and the inbound and outbound shard queues have their consumers again."""
    mongodb_url = ferret.url(f"m365sync_fault_{uuid.uuid4().hex[:8]}")
    async with TCPProxy("127.0.0.1", broker.node.amqp_port) as proxy:
        proxied = broker.url.replace(f":{broker.node.amqp_port}/", f":{proxy.port}/")
        async with running_stack(
            tmp_path,
            amqp_url=proxied,
            mongodb_url=mongodb_url,
            roles=("receiver", "worker", "outbound"),
        ) as stack:
            user_id = (await stack.control.users())[0]["id"]
            await stack.connect_account("acc-n", user_id)
            shards = stack.settings.shard_count
            await wait_consumers(broker.node, broker.vhost, "m365sync.inbound.", shards)
            await stack.control.set_faults(latency_ms=50, duplicates=True)
            async with history_for(
                stack,
                "broker-proxy-slow-cut-refuse",
                mongodb_url=mongodb_url,
                node=broker.node,
                vhost=broker.vhost,
            ) as history:
                load = OutlookLoad(history, user_id, seed=61, interval_s=0.1).start()
                await history.publish_outbound(broker.url, relation_changes("acc-n", 10))
                await asyncio.sleep(0.5)
                await history.fault()
                proxy.delay_s = 0.3
                await asyncio.sleep(3.0)
                proxy.delay_s = 0.0
                proxy.refuse()
                await asyncio.sleep(4.0)
                proxy.restore()
                history.heal()
                await load.stop()
                history.extra["inbound_consumers_back_s"] = await wait_consumers(
                    broker.node, broker.vhost, "m365sync.inbound.", shards
                )
                history.extra["outbound_consumers_back_s"] = await wait_consumers(
                    broker.node, broker.vhost, "m365sync.outbound.", shards
                )
                report = await history.check(timeout_s=60)
                assert report.webhook_non2xx > 0

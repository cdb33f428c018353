"""The database stopped, killed, slowed and cut mid-stream: workers never ack without the
write (a failed write requeues), and the end state equals Graph's."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import running_stack
from tests.faults._common import OutlookLoad, history_for, until, wait_consumers
from tests.faults.conftest import Broker
from tests.support.nodes import FerretNode
from tests.support.tcpproxy import TCPProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

#: Longer than the driver's server selection timeout (5 s): operations really fail.
OUTAGE_S = 7.0


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
async def test_database_stopped_and_restarted_mid_stream(
    how: str, tmp_path: Path, broker: Broker, ferret: FerretNode
) -> None:
    """FerretDB goes away (SIGTERM or SIGKILL) while the worker holds deliveries and comes
    back on the same data: nothing 2xx'd is lost and the database equals Graph."""
    mongodb_url = ferret.url(f"m365sync_fault_{uuid.uuid4().hex[:8]}")
    async with running_stack(tmp_path, amqp_url=broker.url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-d", user_id)
        await wait_consumers(
            broker.node, broker.vhost, "m365sync.inbound.", stack.settings.shard_count
        )
        # Graph reads slower than changes arrive: a backlog builds and the worker holds
        # deliveries for longer than the broker's statistics interval, so the moment is seen.
        await stack.control.set_faults(latency_ms=1000)
        async with history_for(
            stack,
            f"database-restart-{how}",
            mongodb_url=mongodb_url,
            node=broker.node,
            vhost=broker.vhost,
        ) as history:
            load = OutlookLoad(history, user_id, seed=21, interval_s=0.15, burst=10).start()

            async def holding() -> bool:
                return (await history.queue_totals())[1] >= 2

            await until(holding)
            await history.fault()
            if how == "graceful":
                await ferret.stop()
            else:
                await ferret.kill()
            await asyncio.sleep(OUTAGE_S)
            await load.stop()
            history.extra["restart_s"] = round(await ferret.start(), 2)
            await stack.control.set_faults(latency_ms=100)
            history.heal()
            report = await history.check(timeout_s=60)
            assert report.mutations > 0


async def test_database_connection_slowed_then_cut(
    tmp_path: Path, broker: Broker, ferret: FerretNode
) -> None:
    """The service reaches FerretDB through a proxy that first delays every chunk, then
    drops every connection and refuses new ones for a while: no loss, convergence."""
    database = f"m365sync_fault_{uuid.uuid4().hex[:8]}"
    async with TCPProxy("127.0.0.1", ferret.port) as proxy:
        proxied = f"mongodb://127.0.0.1:{proxy.port}/{database}?directConnection=true"
        async with running_stack(tmp_path, amqp_url=broker.url, mongodb_url=proxied) as stack:
            user_id = (await stack.control.users())[0]["id"]
            await stack.connect_account("acc-p", user_id)
            await stack.control.set_faults(latency_ms=50, duplicates=True)
            async with history_for(
                stack,
                "database-proxy-slow-cut",
                mongodb_url=ferret.url(database),
                node=broker.node,
                vhost=broker.vhost,
            ) as history:
                load = OutlookLoad(history, user_id, seed=22, interval_s=0.1).start()
                await asyncio.sleep(1.0)
                await history.fault()
                proxy.delay_s = 0.2  # every read and write of the driver waits
                await asyncio.sleep(3.0)
                proxy.refuse()
                await asyncio.sleep(OUTAGE_S)
                proxy.delay_s = 0.0
                proxy.restore()
                history.heal()
                await load.stop()
                await history.check(timeout_s=60)

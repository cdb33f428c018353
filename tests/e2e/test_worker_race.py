"""Several worker processes: one account's writes stay serialized, no stale overwrite."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from handlers.timeutil import isoformat_z
from processor.verify import diff_account, expected_events
from tests.e2e.harness import eventually, running_stack
from tests.e2e.processes import RoleProcess

pytestmark = pytest.mark.e2e


async def test_racing_deliveries_across_worker_processes_never_overwrite_a_newer_version(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Three worker processes (one killed midway) receive duplicated, reordered notifications
    for the same events: a stored version never goes backwards and the end state is Graph's."""
    rng = random.Random(99)
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        workers = [
            await RoleProcess("worker", stack.env, tmp_path / f"worker{i}.log").start()
            for i in range(3)
        ]
        try:
            for worker in workers:
                await worker.wait_log("process.ready")
            user_id = (await stack.control.users())[0]["id"]
            await stack.connect_account("acc-r", user_id)
            await stack.control.set_faults(seed=5, duplicates=True, reorder_ms=150, latency_ms=15)
            start = datetime.now(UTC) + timedelta(days=2)
            ids = []
            for n in range(5):
                event = await stack.control.create_event(
                    user_id,
                    {
                        "subject": f"Race {n}",
                        "start": {
                            "dateTime": start.strftime("%Y-%m-%dT%H:%M:%S"),
                            "timeZone": "UTC",
                        },
                        "end": {
                            "dateTime": (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S"),
                            "timeZone": "UTC",
                        },
                    },
                    immutable=True,
                )
                ids.append(event["id"])

            history: dict[str, list[datetime]] = defaultdict(list)
            watching = True

            async def watch() -> None:
                while watching:
                    async for doc in stack.rt.events.collection.find(
                        {"account_id": "acc-r"}, {"lm": 1}
                    ):
                        seq = history[doc["_id"]]
                        if not seq or seq[-1] != doc["lm"]:
                            seq.append(doc["lm"])
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            for n in range(60):
                await stack.control.update_event(
                    user_id, rng.choice(ids), {"subject": f"Edit {n}"}, immutable=True
                )
                if n == 30:
                    workers[0].kill()  # whichever shard it held moves to another process
                await asyncio.sleep(rng.uniform(0, 0.02))

            async def converged() -> bool:
                truth = expected_events(
                    await stack.control.events(user_id, immutable=True),
                    await stack.control.calendar_view(
                        user_id,
                        isoformat_z(start - timedelta(days=1)),
                        isoformat_z(start + timedelta(days=1)),
                        immutable=True,
                    ),
                )
                diff = await diff_account(stack.rt.store, stack.rt.events, "acc-r", truth)
                return diff.ok and await stack.control.is_idle()

            await eventually(converged, timeout_s=60, interval_s=0.3)
            watching = False
            await watcher
            for key, versions in history.items():
                assert versions == sorted(versions), f"{key}: a stored version went backwards"
            assert sum(len(v) for v in history.values()) > len(ids)
        finally:
            for worker in workers:
                await worker.stop()

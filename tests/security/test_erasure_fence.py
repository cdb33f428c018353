"""An erasure during a delta pass running in another process leaves nothing behind
(issue 11 row 5)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from processor.app import build_runtime, worker_role
from tests.e2e.harness import eventually, running_stack
from tests.integration.support import make_store

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-erased-midpass"
EVENTS = 250
#: processor.store.ERASURE_RESWEEPS (spelled out so that the test runs on older code too).
ERASURE_RESWEEPS = "erasure_resweeps"


async def test_erasure_during_a_running_delta_pass_leaves_nothing_behind(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """DELETE answers 204 while a slow full delta pass runs in a worker with its own
    runtime (its own cipher, token cache and database client); once the pass is over there
    are no event documents, no sync_state and no event announcements of the account, and
    the erasure's second sweep is scheduled."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        assert stack.exit_stack is not None
        other = await build_runtime(stack.settings, stack.exit_stack, mailbox_concurrency=3)
        consumer = await stack.exit_stack.enter_async_context(worker_role(other))
        ann = (await stack.control.users())[0]["id"]
        first = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT08:00:00Z")
        await stack.control.bulk_create_events(ann, count=EVENTS, start=first, notify=False)
        await stack.connect_account(ACCOUNT, ann)
        await stack.announcements()
        await stack.control.set_faults(latency_ms=1500)
        await stack.request_resync(ACCOUNT, full=True, reason="connect")
        await asyncio.sleep(0.7)  # the pass's first page is on its way

        url = f"http://127.0.0.1:{stack.port}/api/v1/accounts/{ACCOUNT}"
        headers = {"Authorization": f"Bearer {stack.settings.api_tokens[0]}"}
        async with (
            aiohttp.ClientSession(trust_env=False) as http,
            http.delete(url, headers=headers) as response,
        ):
            assert response.status == 204

        async def pass_over() -> bool:
            return consumer.in_flight == 0

        await asyncio.sleep(1.0)
        await eventually(pass_over, timeout_s=60, interval_s=0.2)
        await asyncio.sleep(2.0)  # anything the pass still had in hand has landed

        db = stack.rt.db
        left = {
            name: await db[name].count_documents({"account_id": ACCOUNT})
            for name in await db.list_collection_names()
            if name != ERASURE_RESWEEPS
        }
        sync_state = await db["sync_state"].find_one({"_id": ACCOUNT})
        announced = [a["routing_key"] for a in await stack.announcements()]
        print(
            f"documents left: {sum(left.values())} { ({k: v for k, v in left.items() if v}) } "
            f"sync_state: {sync_state is not None} announced: {sorted(set(announced))} "
            f"({len(announced)})"
        )
        assert {k: v for k, v in left.items() if v} == {}
        assert sync_state is None
        assert await db["accounts"].find_one({"_id": ACCOUNT}) is None
        assert [k for k in announced if k != "account.status"] == []
        assert await db[ERASURE_RESWEEPS].count_documents({}) == 1


async def test_the_second_sweep_removes_late_writes_unless_the_account_came_back(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Once due, the erasure's second sweep deletes documents an erased account's late
    writer left (event documents, sync_state), and spares an account connected again (the
    late writer's documents went when it was created again; the new connection's stay)."""
    store, _ = make_store(mongo_db)
    for account_id in ("acc-gone", "acc-back"):
        await mongo_db["events"].insert_one({"_id": f"{account_id}:e1", "account_id": account_id})
        await mongo_db["sync_state"].insert_one({"_id": account_id})
        await store.erasures.schedule_resweep(account_id, after_s=3600)
    await store.accounts.create("acc-back")
    assert await mongo_db["events"].count_documents({"account_id": "acc-back"}) == 0
    await mongo_db["events"].insert_one({"_id": "acc-back:e2", "account_id": "acc-back"})
    assert await store.erasures.resweep_due() == 0  # not due yet
    for account_id in ("acc-gone", "acc-back"):
        await store.erasures.schedule_resweep(account_id, after_s=-1)
    assert await store.erasures.resweep_due() == 2
    assert await mongo_db["events"].count_documents({"account_id": "acc-gone"}) == 0
    assert await mongo_db["sync_state"].find_one({"_id": "acc-gone"}) is None
    assert await mongo_db["events"].count_documents({"account_id": "acc-back"}) == 1
    assert await mongo_db[ERASURE_RESWEEPS].count_documents({}) == 2  # the ones not due yet

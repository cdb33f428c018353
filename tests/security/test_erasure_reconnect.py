"""Disconnecting and connecting again at once: processes that held the erased account's
data key and access token must not go on using either for the new connection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from processor.app import build_runtime, worker_role
from tests.e2e.harness import api, converged, eventually, running_stack

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-erased-and-back"


@pytest.mark.parametrize("again", ["same mailbox", "another mailbox"])
async def test_a_worker_that_held_the_erased_connection_syncs_the_new_one(
    tmp_path: Path, amqp_url: str, mongodb_url: str, again: str
) -> None:
    """A worker in its own runtime syncs the account (so it holds its data key and its
    user's access token); the account is erased and connected again at once, to the same
    mailbox or to another user's. A full resync then stores the new mailbox's events,
    readable under the new key by the service's other processes, and the account is
    connected. Before, the worker failed every batch on the new connection's sealed
    identity, and with another mailbox it called Graph with the first user's token (403)."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        assert stack.exit_stack is not None
        other = await build_runtime(stack.settings, stack.exit_stack, mailbox_concurrency=3)
        await stack.exit_stack.enter_async_context(worker_role(other))
        ann, bob = [user["id"] for user in await stack.control.users()][:2]
        second = ann if again == "same mailbox" else bob
        first = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT08:00:00Z")
        await stack.control.bulk_create_events(ann, count=12, start=first, notify=False)
        await stack.control.bulk_create_events(bob, count=5, start=first, notify=False)

        await stack.connect_account(ACCOUNT, ann)
        await stack.request_resync(ACCOUNT, full=True, reason="connect")
        await eventually(lambda: converged(stack, ACCOUNT, ann), timeout_s=60)

        status, _, _ = await api(stack, "DELETE", f"/api/v1/accounts/{ACCOUNT}")
        assert status == 204
        assert await stack.rt.db["events"].count_documents({"account_id": ACCOUNT}) == 0

        await stack.connect_account(ACCOUNT, second)
        await stack.request_resync(ACCOUNT, full=True, reason="connect")
        await eventually(lambda: converged(stack, ACCOUNT, second), timeout_s=60)
        assert await stack.status(ACCOUNT) == "connected"

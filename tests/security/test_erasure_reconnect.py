"""Disconnecting and connecting again at once: processes that held the erased account's
data key must not go on using it for the new connection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from processor.app import build_runtime, worker_role
from tests.e2e.harness import converged, eventually, running_stack

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-erased-and-back"
EVENTS = 12


async def test_a_worker_that_held_the_erased_key_syncs_the_reconnected_account(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """A worker in its own runtime syncs the account (and so holds its data key), the
    account is erased and connected again to the same mailbox at once; a full resync then
    stores events that the service's other processes read under the new key, and nothing
    of the first connection is left."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        assert stack.exit_stack is not None
        other = await build_runtime(stack.settings, stack.exit_stack, mailbox_concurrency=3)
        await stack.exit_stack.enter_async_context(worker_role(other))
        ann = (await stack.control.users())[0]["id"]
        first = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT08:00:00Z")
        await stack.control.bulk_create_events(ann, count=EVENTS, start=first, notify=False)

        await stack.connect_account(ACCOUNT, ann)
        await stack.request_resync(ACCOUNT, full=True, reason="connect")
        await eventually(lambda: converged(stack, ACCOUNT, ann), timeout_s=60)

        url = f"http://127.0.0.1:{stack.port}/api/v1/accounts/{ACCOUNT}"
        headers = {"Authorization": f"Bearer {stack.settings.api_tokens[0]}"}
        async with (
            aiohttp.ClientSession(trust_env=False) as http,
            http.delete(url, headers=headers) as response,
        ):
            assert response.status == 204
        assert await stack.rt.db["events"].count_documents({"account_id": ACCOUNT}) == 0

        await stack.connect_account(ACCOUNT, ann)
        await stack.request_resync(ACCOUNT, full=True, reason="connect")
        await eventually(lambda: converged(stack, ACCOUNT, ann), timeout_s=60)
        assert await stack.status(ACCOUNT) == "connected"


async def test_an_account_connected_again_to_another_mailbox_is_synced_with_its_own_token(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """The account is erased and connected again at once, to another user's mailbox: a
    worker that held the first user's access token (and data key) must not use either for
    the second user; the second mailbox is synced, and none of the first user's events is
    left in the account."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        assert stack.exit_stack is not None
        other = await build_runtime(stack.settings, stack.exit_stack, mailbox_concurrency=3)
        await stack.exit_stack.enter_async_context(worker_role(other))
        ann, bob = [user["id"] for user in await stack.control.users()][:2]
        first = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT08:00:00Z")
        await stack.control.bulk_create_events(ann, count=EVENTS, start=first, notify=False)
        await stack.control.bulk_create_events(bob, count=5, start=first, notify=False)

        await stack.connect_account(ACCOUNT, ann)
        await stack.request_resync(ACCOUNT, full=True, reason="connect")
        await eventually(lambda: converged(stack, ACCOUNT, ann), timeout_s=60)

        url = f"http://127.0.0.1:{stack.port}/api/v1/accounts/{ACCOUNT}"
        headers = {"Authorization": f"Bearer {stack.settings.api_tokens[0]}"}
        async with (
            aiohttp.ClientSession(trust_env=False) as http,
            http.delete(url, headers=headers) as response,
        ):
            assert response.status == 204

        await stack.connect_account(ACCOUNT, bob)
        await stack.request_resync(ACCOUNT, full=True, reason="connect")
        await eventually(lambda: converged(stack, ACCOUNT, bob), timeout_s=60)
        assert await stack.status(ACCOUNT) == "connected"

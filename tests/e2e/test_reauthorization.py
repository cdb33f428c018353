"""A revoked sign-in: the account stops, says so once, loses nothing, and resumes on reconnect."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from processor.repositories.renewals import RENEWAL_STATE_COLLECTION as STATE_COLLECTION
from processor.topology import DEAD_QUEUE
from tests.conftest import RabbitAdmin
from tests.e2e.harness import (
    Stack,
    api,
    converged,
    eventually,
    running_stack,
    timed_event,
)

pytestmark = pytest.mark.e2e


def _event(n: int) -> dict[str, Any]:
    return timed_event(f"Reauth subject {n} {uuid.uuid4().hex[:6]}", days=3, hours=n)


async def _dead_letters(stack: Stack) -> int:
    channel = await stack.rt.connection.channel()
    try:
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        assert queue.declaration_result.message_count is not None
        return queue.declaration_result.message_count
    finally:
        await channel.close()


async def test_revoked_sign_in_pauses_the_account_and_reconnect_resumes_it(
    tmp_path: Path, amqp_url: str, mongodb_url: str, vhost: str, rabbit_admin: RabbitAdmin
) -> None:
    """A revoked refresh token puts the account in reauthorization_required with exactly one
    account.status message and no dead letter; reconnecting resumes sync, and the changes
    made meanwhile arrive."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "subscriptions"),
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-x", user_id)
        kept = await stack.control.create_event(user_id, _event(1), immutable=True)
        doomed = await stack.control.create_event(user_id, _event(2), immutable=True)
        await eventually(lambda: converged(stack, "acc-x", user_id))
        await stack.control.wait_idle()
        await stack.announcements()  # 1Relation has read everything so far

        await stack.control.revoke_tokens(user_id, access_tokens=True)
        await stack.control.create_event(user_id, _event(3), immutable=True)

        async def paused() -> bool:
            return await stack.status("acc-x") == "reauthorization_required"

        await eventually(paused)
        # More changes while the account cannot call Graph: their notifications are acked.
        await stack.control.update_event(user_id, kept["id"], {"subject": "Edited while revoked"})
        await stack.control.delete_event(user_id, doomed["id"])
        await stack.control.create_event(user_id, _event(4), immutable=True)
        await stack.control.wait_idle()

        async def manager_saw_it() -> bool:
            state = await stack.rt.db[STATE_COLLECTION].find_one({"_id": "acc-x"})
            return bool(state and state.get("paused"))

        await eventually(manager_saw_it)
        statuses = [a for a in await stack.announcements() if a["routing_key"] == "account.status"]
        assert [s["status"] for s in statuses] == ["reauthorization_required"]
        assert "connect" in statuses[0]["status_reason"].lower()
        assert await _dead_letters(stack) == 0
        assert (await rabbit_admin.queue(vhost, DEAD_QUEUE))["messages"] == 0
        assert not await converged(stack, "acc-x", user_id)  # nothing was fetched meanwhile

        await stack.connect_account("acc-x", user_id)  # the user connects again

        async def resumed() -> bool:
            active = [
                s
                for s in await stack.control.subscriptions()
                if s["state"] == "active" and s["userId"] == user_id
            ]
            return len(active) == 1 and await converged(stack, "acc-x", user_id)

        await eventually(resumed, timeout_s=30)
        assert await stack.status("acc-x") == "connected"
        probe = await stack.control.create_event(user_id, _event(5), immutable=True)
        await eventually(lambda: converged(stack, "acc-x", user_id))
        key = stack.rt.events.event_key("acc-x", probe["id"])
        assert await stack.rt.events.collection.find_one({"_id": key}) is not None
        assert await _dead_letters(stack) == 0


async def test_last_error_says_what_failed_when_and_what_to_do(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """An account in reauthorization_required shows a last_error (API and account.status)
    that says in words what failed, when, and what a person can do, with no token or
    Microsoft id in it."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-e", user_id)
        cache = await stack.rt.store.token_caches.load("acc-e")
        assert cache is not None
        before = datetime.now(UTC).replace(microsecond=0)
        await stack.control.revoke_tokens(user_id, access_tokens=True)
        await stack.control.create_event(user_id, _event(1), immutable=True)

        async def paused() -> bool:
            return await stack.status("acc-e") == "reauthorization_required"

        await eventually(paused)
        status, body, _ = await api(stack, "GET", "/api/v1/accounts/acc-e")
        assert status == 200
        error = body["last_error"]
        assert isinstance(error, str), body
        assert "refused the account's stored sign-in" in error
        assert "Connect to Microsoft" in error
        stamp = re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", error)
        assert stamp is not None, error
        when = datetime.strptime(stamp.group(0), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert before <= when <= datetime.now(UTC)
        secrets = {
            entry["secret"]
            for section in ("AccessToken", "RefreshToken", "IdToken")
            for entry in json.loads(cache[0]).get(section, {}).values()
        }
        forbidden = secrets | {user_id, stack.sim.tenant_id, stack.sim.client_id}
        assert [v for v in forbidden if v in error] == []
        published = [a for a in await stack.announcements() if a["routing_key"] == "account.status"]
        assert published[-1]["last_error"] == error

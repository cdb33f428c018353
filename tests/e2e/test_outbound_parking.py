"""Outbound for an account that cannot write: parked in order, applied after reconnect."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e


async def test_changes_wait_while_reauthorization_is_required_and_apply_in_order_after_reconnect(
    tmp_path: Path, amqp_url: str, mongodb_url: str, rabbit_admin: object, vhost: str
) -> None:
    """With the refresh token revoked the account turns reauthorization_required, its
    outbound changes are parked (acked, encrypted, not dead-lettered), and after the user
    reconnects they are applied in revision order: Outlook shows the last one."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-p", user_id)
        await publish_outbound(stack, [message("acc-p", "rel-p", 1, relation_event("Kick-off"))])

        async def subjects() -> list[str]:
            return sorted(e["subject"] for e in await stack.control.events(user_id, immutable=True))

        await eventually(lambda: _equals(subjects, ["Kick-off"]))
        await stack.control.revoke_tokens(user_id, access_tokens=True)
        stack.rt.tokens.invalidate("acc-p")
        await publish_outbound(
            stack,
            [message("acc-p", "rel-p", r, relation_event(f"Kick-off v{r}")) for r in (2, 3, 4)],
        )

        async def parked() -> bool:
            return await stack.rt.links.parked.count_documents({"account_id": "acc-p"}) == 3

        await eventually(parked, timeout_s=30)
        assert await stack.status("acc-p") == "reauthorization_required"
        assert await subjects() == ["Kick-off"]
        dead = await rabbit_admin.queue(vhost, "m365sync.dead-letters")  # type: ignore[attr-defined]
        assert dead.get("messages", 0) == 0
        async for doc in stack.rt.links.parked.find({"account_id": "acc-p"}):
            assert "Kick-off" not in str(doc)  # content is ciphertext at rest

        await stack.connect_account("acc-p", user_id)  # the user signs in again

        await eventually(lambda: _equals(subjects, ["Kick-off v4"]), timeout_s=40)

        async def drained() -> bool:
            return await stack.rt.links.parked.count_documents({"account_id": "acc-p"}) == 0

        # A replayed change that met a transient error waits for the next wake-up (15 s).
        await eventually(drained, timeout_s=40)


async def _equals(probe, expected) -> bool:  # type: ignore[no-untyped-def]
    return await probe() == expected

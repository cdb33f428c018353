"""Issue 11 row 13: parked outbound changes are bounded in number and age, and each one
dropped is reported to 1Relation as ``event.rejected``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Stack, eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e


async def _rejections(stack: Stack, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen.extend(a for a in await stack.announcements() if a["routing_key"] == "event.rejected")
    return seen


async def test_parked_changes_are_capped_and_expire_with_a_rejection_each(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """With a cap of 2, a third change for an account that cannot write is dead-lettered and
    reported; changes parked longer than the age limit are dropped and reported when the
    account's next change arrives, and that change is parked in their place; with no
    change arriving, an expired one is dropped and reported all the same."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
        extra_env={"M365SYNC_PARKED_MAX_PER_ACCOUNT": "2", "M365SYNC_PARKED_TTL_DAYS": "3"},
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-cap", user_id)
        await stack.control.revoke_tokens(user_id, access_tokens=True)
        stack.rt.tokens.invalidate("acc-cap")
        await stack.announcements()  # what connecting announced is not under test
        await publish_outbound(
            stack, [message("acc-cap", "rel-c", r, relation_event(f"v{r}")) for r in (1, 2, 3)]
        )
        parked = stack.rt.links.parked
        seen: list[dict[str, Any]] = []

        async def one_rejected() -> bool:
            return len(await _rejections(stack, seen)) == 1

        await eventually(one_rejected, timeout_s=30)
        assert await parked.count_documents({"account_id": "acc-cap"}) == 2
        full = seen[0]
        assert full["relation_event_id"] == "rel-c"
        assert "2 changes waiting" in full["reason"]
        assert "send it again" in full["reason"]

        # Four days pass for what is parked; the next change sweeps it out.
        async for doc in parked.find({"account_id": "acc-cap"}):
            await parked.update_one(
                {"_id": doc["_id"]}, {"$set": {"parked_at": doc["parked_at"] - timedelta(days=4)}}
            )
        revisions = sorted([d["revision"] async for d in parked.find({"account_id": "acc-cap"})])
        await publish_outbound(stack, [message("acc-cap", "rel-d", 1, relation_event("new"))])

        async def three_rejected() -> bool:
            return len(await _rejections(stack, seen)) == 3

        await eventually(three_rejected, timeout_s=30)
        expired = seen[1:]
        assert sorted(r["revision"] for r in expired) == revisions
        assert all(r["relation_event_id"] == "rel-c" for r in expired)
        assert all("waited more than 3 days" in r["reason"] for r in expired)

        async def only_new_parked() -> bool:
            docs = [d async for d in parked.find({"account_id": "acc-cap"})]
            return [d["relation_event_id"] for d in docs] == ["rel-d"]

        await eventually(only_new_parked)

        # Four more days pass and no change arrives: the outbound role's wake-up (every
        # 15 s) finds the expired change of the paused account and has it dropped.
        async for doc in parked.find({"account_id": "acc-cap"}):
            await parked.update_one(
                {"_id": doc["_id"]}, {"$set": {"parked_at": doc["parked_at"] - timedelta(days=4)}}
            )

        async def four_rejected() -> bool:
            return len(await _rejections(stack, seen)) == 4

        await eventually(four_rejected, timeout_s=60, interval_s=0.5)
        assert seen[3]["relation_event_id"] == "rel-d"
        assert "waited more than 3 days" in seen[3]["reason"]
        assert await parked.count_documents({"account_id": "acc-cap"}) == 0

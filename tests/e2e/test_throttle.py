"""Graph's Retry-After under 429/503 storms: no request jumps a mailbox's wait, inbound and
outbound alike, and the account still converges soon after the last change."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from processor.verify import diff_account
from tests.e2e.harness import (
    eventually,
    expected_for,
    running_stack,
    timed_event,
)
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e

#: The faults of issue 10 item 3/4: every notification fault, and 2 % 429s (Retry-After
#: 0.5-1.5 s) and 3 % 503s on event GETs.
FAULTS: dict[str, Any] = {
    "seed": 11,
    "duplicates": True,
    "reorder_ms": 200,
    "batch_max_items": 10,
    "batch_window_ms": 100,
    "deleted_ghosts": 0.3,
    "latency_ms": 15,
    "random_fault_kinds": "events.get",
    # The run had 2 %; 5 % makes "at least one 429 met" hold in every run.
    "random_429_rate": 0.05,
    "random_429_retry_after_min_s": 0.5,
    "random_429_retry_after_max_s": 1.5,
    "random_503_rate": 0.03,
    "random_503_retry_after": "0.8",
}

CHANGES = 200


async def test_no_request_jumps_retry_after_and_the_account_converges(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """200 Outlook changes and 1Relation writes to one mailbox under 429/503 faults: the
    simulator counts no request that reached the mailbox before its Retry-After elapsed,
    and the database ends equal to Outlook (seconds from the last change reported)."""
    rng = random.Random(20261203)
    # Per-event GETs (the faults are on them): a burst's one delta pass would meet few.
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
        extra_env={"M365SYNC_BURST_MIN_EVENTS": "1000"},
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-t", user_id)
        await stack.control.set_faults(**FAULTS)
        await stack.control.reset_counters()

        async def outlook() -> None:
            live: list[str] = []
            made = 0
            while made < CHANGES:
                roll = rng.random()
                if not live or roll < 0.4:
                    event = await stack.control.create_event(
                        user_id,
                        timed_event(
                            f"Load {made}", days=rng.randint(1, 60), hours=rng.randint(0, 8)
                        ),
                        immutable=True,
                    )
                    live.append(event["id"])
                elif roll < 0.85:
                    await stack.control.update_event(
                        user_id, rng.choice(live), {"subject": f"Edit {made}"}, immutable=True
                    )
                else:
                    await stack.control.delete_event(user_id, live.pop(rng.randrange(len(live))))
                made += 1
                await asyncio.sleep(rng.uniform(0.0, 0.06))

        async def relation() -> None:
            for n in range(12):
                bodies = [
                    message("acc-t", f"rel-{n}", 1, relation_event(f"From CRM {n}", day=n + 2))
                ]
                if n % 3 == 0:
                    bodies.append(
                        message(
                            "acc-t",
                            f"rel-{n}",
                            2,
                            {
                                **relation_event(f"From CRM {n}", day=n + 2),
                                "subject": f"From CRM {n} (moved)",
                            },
                        )
                    )
                await publish_outbound(stack, bodies)
                await asyncio.sleep(0.4)

        await asyncio.gather(outlook(), relation())
        last_change = time.monotonic()

        async def converged() -> bool:
            if not await stack.control.is_idle():
                return False
            if await stack.rt.events.pending_announcements("acc-t"):
                return False
            expected = await expected_for(stack, user_id)
            crm = [e for e in expected.values() if str(e.get("subject", "")).startswith("From CRM")]
            if len(crm) < 12:  # every 1Relation write has reached Outlook
                return False
            diff = await diff_account(stack.rt.store, stack.rt.events, "acc-t", expected)
            return diff.ok

        await eventually(converged, timeout_s=180, interval_s=0.25)
        seconds = time.monotonic() - last_change
        counters = await stack.control.counters()
        print(
            json.dumps(
                {  # figures for the closing note; not asserted (timing is for benches)
                    "changes": CHANGES,
                    "last_change_to_converged_s": round(seconds, 1),
                    "retry_after_violations": counters["retry_after_violations"],
                    "retry_after_within_grace": counters["retry_after_within_grace"],
                    "by_status": counters["by_status"],
                    "client": dict(stack.rt.graph.stats),
                }
            )
        )
        assert counters["throttled_429"] > 0, counters["by_status"]
        assert counters["retry_after_violations"] == 0, counters["retry_after_recent"][:10]

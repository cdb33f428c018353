"""Outbound: 1Relation's changes reach Microsoft 365 once, in order, without echo."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Stack, eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e

ROLES = ("receiver", "worker", "outbound")


async def _outlook(stack: Stack, user_id: str) -> dict[str, dict[str, Any]]:
    return {e["subject"]: e for e in await stack.control.events(user_id, immutable=True)}


async def test_a_new_relation_event_appears_in_outlook_once_and_is_not_echoed(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """An upsert creates the event (Windows time zone), an update PATCHes it, and the
    notifications about those writes produce no event.upserted for 1Relation."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=ROLES
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-1", user_id)
        await publish_outbound(
            stack, [message("acc-1", "rel-1", 1, relation_event("Quarterly review"))]
        )
        created = await eventually(lambda: _first(stack, user_id, "Quarterly review"))
        assert created["start"]["timeZone"] == "UTC"
        await publish_outbound(
            stack,
            [
                message(
                    "acc-1",
                    "rel-1",
                    2,
                    {**relation_event("Quarterly review"), "subject": "Quarterly review (moved)"},
                )
            ],
        )
        await eventually(lambda: _first(stack, user_id, "Quarterly review (moved)"))
        key = stack.rt.events.event_key("acc-1", created["id"])

        async def stored_latest() -> bool:
            doc = await stack.rt.events.collection.find_one({"_id": key})
            if doc is None:
                return False
            content = stack.rt.events.decrypt(doc, await stack.rt.store.keys.cipher_for("acc-1"))[1]
            return (
                content["subject"] == "Quarterly review (moved)" and await stack.control.is_idle()
            )

        await eventually(stored_latest)
        await asyncio.sleep(0.5)
        announcements = [a for a in await stack.announcements() if a.get("event_key") == key]
        assert announcements == []
        assert len(await stack.control.events(user_id, immutable=True)) == 1


async def _first(stack: Stack, user_id: str, subject: str) -> dict[str, Any] | None:
    return (await _outlook(stack, user_id)).get(subject)


async def test_shuffled_and_redelivered_revisions_end_in_exactly_the_intended_events(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """100 upserts and deletes over 20 events, shuffled and duplicated: Outlook ends with
    exactly the events 1Relation intended (the highest revision of each), no duplicates."""
    rng = random.Random(1)
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=ROLES
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-2", user_id)
        bodies = []
        intended: dict[str, str | None] = {}
        for n in range(20):
            rel = f"rel-{n}"
            revisions = range(1, 6)
            for revision in revisions:
                deleted = n % 4 == 0 and revision == 5
                subject = f"Event {n} r{revision}"
                bodies.append(
                    message(
                        "acc-2",
                        rel,
                        revision,
                        None if deleted else relation_event(subject, day=n + 1),
                    )
                )
                intended[rel] = None if deleted else subject
        sent = bodies + rng.sample(bodies, 30)  # redelivery
        rng.shuffle(sent)
        await publish_outbound(stack, sent)
        want = sorted(s for s in intended.values() if s is not None)

        async def settled() -> bool:
            have = sorted(e["subject"] for e in await stack.control.events(user_id, immutable=True))
            return have == want

        await eventually(settled, timeout_s=60)
        await asyncio.sleep(1.0)
        have = sorted(e["subject"] for e in await stack.control.events(user_id, immutable=True))
        assert have == want

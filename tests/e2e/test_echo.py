"""Echoes, Graph requests per change, bursts and minimal PATCHes, counted by the simulator."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Stack, converged, eventually, running_stack, timed_event
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e

ROLES = ("receiver", "worker", "outbound")


async def _settled(stack: Stack, account_id: str, user_id: str) -> bool:
    """Graph has nothing left to notify, every change is announced, database = Outlook."""
    if not await stack.control.is_idle():
        return False
    if await stack.rt.events.pending_announcements(account_id):
        return False
    return await converged(stack, account_id, user_id)


def _shuffled_mix(account_id: str, rng: random.Random) -> tuple[list[dict[str, Any]], list[str]]:
    """Issue 10's mix: deletes after updates, deletes with a redelivered create, and 20
    events x revisions 1-3 at once; returns the messages and the subjects that remain."""
    bodies: list[dict[str, Any]] = []
    for n in range(5):
        bodies += [
            message(account_id, f"del-a-{n}", 1, relation_event(f"A{n} r1", day=n + 1)),
            message(account_id, f"del-a-{n}", 2, relation_event(f"A{n} r2", day=n + 1)),
            message(account_id, f"del-a-{n}", 3, None),
        ]
    for n in range(5):
        first = message(account_id, f"del-b-{n}", 1, relation_event(f"B{n} r1", day=n + 8))
        bodies += [first, message(account_id, f"del-b-{n}", 2, None), first]
    remain = []
    for n in range(20):
        for revision in (1, 2, 3):
            bodies.append(
                message(
                    account_id,
                    f"burst-{n}",
                    revision,
                    relation_event(f"C{n} r{revision}", day=n + 15),
                )
            )
        remain.append(f"C{n} r3")
    bodies += rng.sample(bodies, 10)  # redelivery
    rng.shuffle(bodies)
    return bodies, sorted(remain)


@pytest.mark.parametrize(
    "delivery",
    [
        # Graph's notification is handled before the service has Graph's answer to its write.
        pytest.param({"write_answer_delay_ms": 400, "duplicates": True}, id="notification-first"),
        # The answer is recorded when the notification arrives (Graph answers in 60 ms, so
        # the database holds an event before 1Relation's delete of it is written).
        pytest.param(
            {"notify_delay_ms": 150, "latency_ms": 60, "duplicates": True}, id="answer-first"
        ),
    ],
)
async def test_the_service_never_announces_its_own_writes_as_microsoft_changes(
    tmp_path: Path, amqp_url: str, mongodb_url: str, delivery: dict[str, Any]
) -> None:
    """1Relation's shuffled creates, updates and deletes (with redeliveries) reach Outlook,
    the database follows Graph's notifications of them, and onerelation.inbound carries
    no event.upserted or event.deleted from Microsoft for any of them."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=ROLES
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-e", user_id)
        await stack.control.set_faults(seed=11, **delivery)
        bodies, remain = _shuffled_mix("acc-e", random.Random(10))
        await publish_outbound(stack, list(bodies))

        async def in_outlook() -> bool:
            have = sorted(e["subject"] for e in await stack.control.events(user_id, immutable=True))
            return have == remain

        await eventually(in_outlook, timeout_s=60)
        await eventually(lambda: _settled(stack, "acc-e", user_id), timeout_s=60, interval_s=0.3)
        await asyncio.sleep(1.0)  # a late echo would be announced by now
        announced = await stack.announcements()
        echoes = [a for a in announced if a["routing_key"] in ("event.upserted", "event.deleted")]
        counters = await stack.control.counters()
        print(
            {
                "echoes": len(echoes),
                "announcements": Counter(a["routing_key"] for a in announced),
                "graph_requests": counters["by_kind"],
            }
        )
        assert echoes == []


async def _edit_all(stack: Stack, user_id: str, ids: list[str], label: str) -> None:
    await asyncio.gather(
        *(
            stack.control.update_event(user_id, gid, {"subject": f"{label} {n}"}, immutable=True)
            for n, gid in enumerate(ids)
        )
    )


async def test_a_change_notified_three_times_costs_at_most_one_get(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Graph notifies every change three times: the worker fetches each distinct change at
    most once (the copies name a version it already has); two edits of one event within a
    second are announced with Graph's full precision and a growing sequence."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-t", user_id)
        # The copies of one change arrive up to a second apart, in different batches.
        await stack.control.set_faults(notify_copies=3, reorder_ms=1000, seed=4)
        ids = [
            (
                await stack.control.create_event(
                    user_id, timed_event(f"Event {n}", days=n + 1), immutable=True
                )
            )["id"]
            for n in range(8)
        ]
        await eventually(lambda: _settled(stack, "acc-t", user_id), timeout_s=30)
        first = await stack.control.counters()
        await _edit_all(stack, user_id, ids, "Edited")
        await stack.control.update_event(
            user_id, ids[0], {"subject": "Edited again"}, immutable=True
        )
        changes = len(ids) + 1
        await eventually(lambda: _settled(stack, "acc-t", user_id), timeout_s=30)
        counters = await stack.control.counters()
        gets = counters["by_kind"].get("events.get", 0) - first["by_kind"].get("events.get", 0)
        print(
            {
                "gets_per_change_triple": gets / changes,
                "creates_gets": first["by_kind"].get("events.get", 0) / 8,
            }
        )
        assert gets <= changes
        assert first["by_kind"].get("events.get", 0) <= 8

        key = stack.rt.events.event_key("acc-t", ids[0])
        mine = [a for a in await stack.announcements() if a["event_key"] == key]
        assert [a["change"] for a in mine] == ["upserted"] * len(mine)
        assert all(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", a["last_modified"])
            for a in mine
        )
        sequences = [a["sequence"] for a in mine]
        assert sequences == sorted(set(sequences))
        assert len({a["last_modified"] for a in mine}) == len(mine)


async def test_echoes_of_the_services_own_writes_cost_no_get(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """When Graph's notifications (three per change) arrive after the write's answer, the
    worker stores our write from that answer: no GET for creates, updates or deletes."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=ROLES
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-g", user_id)
        await stack.control.set_faults(notify_copies=3, notify_delay_ms=500)
        await stack.control.reset_counters()
        await publish_outbound(
            stack,
            [
                message("acc-g", f"rel-{n}", 1, relation_event(f"Mine {n}", day=n + 1))
                for n in range(6)
            ],
        )
        await eventually(lambda: _settled_with(stack, "acc-g", user_id, 6), timeout_s=30)
        await publish_outbound(
            stack,
            [
                message("acc-g", f"rel-{n}", 2, relation_event(f"Mine {n} moved", day=n + 1))
                for n in range(4)
            ]
            + [message("acc-g", "rel-5", 2, None)],
        )
        await eventually(lambda: _settled_with(stack, "acc-g", user_id, 5, moved=4), timeout_s=30)
        counters = await stack.control.counters()
        print(
            {"echo_gets": counters["by_kind"].get("events.get", 0), "by_kind": counters["by_kind"]}
        )
        assert counters["by_kind"].get("events.get", 0) == 0
        assert [
            a for a in await stack.announcements() if a["routing_key"] != "account.status"
        ] == []


async def _settled_with(
    stack: Stack, account_id: str, user_id: str, count: int, moved: int = 0
) -> bool:
    subjects = [e["subject"] for e in await stack.control.events(user_id, immutable=True)]
    if len(subjects) != count or sum(s.endswith("moved") for s in subjects) != moved:
        return False
    return await _settled(stack, account_id, user_id)


async def test_a_burst_on_one_mailbox_takes_one_delta_pass_instead_of_a_get_each(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """60 events edited at once, each notified three times: the worker runs a delta pass
    rather than 60 GETs, every edit is announced and the database equals Outlook."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-b", user_id)
        await stack.control.bulk_create_events(
            user_id, events=[timed_event(f"Burst {n}", days=1 + n / 10) for n in range(60)]
        )
        await stack.request_resync("acc-b", full=True, reason="connect")
        await eventually(lambda: _settled(stack, "acc-b", user_id), timeout_s=60)
        await stack.announcements()
        passes_before = _burst_passes(stack)
        await stack.control.set_faults(notify_copies=3)
        await stack.control.reset_counters()
        ids = [e["id"] for e in await stack.control.events(user_id, immutable=True)]
        await _edit_all(stack, user_id, ids, "Burst edited")
        await eventually(lambda: _settled(stack, "acc-b", user_id), timeout_s=60, interval_s=0.3)
        counters = await stack.control.counters()
        print(
            {
                "burst_requests_per_change": counters["total"] / len(ids),
                "by_kind": counters["by_kind"],
            }
        )
        assert counters["by_kind"].get("calendarView.delta", 0) >= 1
        assert counters["total"] <= len(ids) / 2
        assert _burst_passes(stack) > passes_before
        announced = {
            a["event_key"]
            for a in await stack.announcements()
            if a["routing_key"] == "event.upserted"
        }
        assert announced == {stack.rt.events.event_key("acc-b", gid) for gid in ids}


def _burst_passes(stack: Stack) -> float:
    counter = getattr(stack.rt.metrics, "burst_passes", None)  # absent before the burst path
    return 0.0 if counter is None else float(counter._value.get())


#: For each field 1Relation can send, a value different from the base event's.
def _single_field_changes(base: dict[str, Any]) -> list[tuple[str, Any]]:
    start = datetime.fromisoformat(base["start"]["dateTime"])
    end = datetime.fromisoformat(base["end"]["dateTime"])
    fmt = "%Y-%m-%dT%H:%M:%S"
    return [
        ("subject", "Renamed"),
        ("body", {"contentType": "text", "content": "New notes"}),
        ("location", {"displayName": "Room 9"}),
        ("showAs", "tentative"),
        ("sensitivity", "private"),
        ("categories", ["Blue category"]),
        (
            "attendees",
            [{"emailAddress": {"address": "ann@example.com", "name": "Ann"}, "type": "required"}],
        ),
        ("start", {"dateTime": (start - timedelta(hours=1)).strftime(fmt), "timeZone": "UTC"}),
        ("end", {"dateTime": (end + timedelta(hours=1)).strftime(fmt), "timeZone": "UTC"}),
        (
            "recurrence",
            {
                "pattern": {
                    "type": "weekly",
                    "interval": 1,
                    "daysOfWeek": [start.strftime("%A").lower()],
                },
                "range": {
                    "type": "numbered",
                    "numberOfOccurrences": 3,
                    "startDate": start.strftime("%Y-%m-%d"),
                },
            },
        ),
    ]


def _utc_event(subject: str, *, all_day_shape: bool = False) -> dict[str, Any]:
    day = (datetime.now(UTC) + timedelta(days=4)).replace(hour=0, minute=0, second=0, microsecond=0)
    start = day if all_day_shape else day.replace(hour=10)
    end = day + timedelta(days=1) if all_day_shape else start + timedelta(hours=1)
    fmt = "%Y-%m-%dT%H:%M:%S"
    return {
        "subject": subject,
        "body": {"contentType": "text", "content": "Notes"},
        "start": {"dateTime": start.strftime(fmt), "timeZone": "UTC"},
        "end": {"dateTime": end.strftime(fmt), "timeZone": "UTC"},
        "isAllDay": False,
        "location": {"displayName": "Room 4"},
        "showAs": "busy",
        "sensitivity": "normal",
        "categories": [],
        "attendees": [],
        "recurrence": None,
    }


async def test_a_revision_changing_one_field_patches_only_that_field(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """For every field 1Relation can send, a revision that changes only that field makes
    a PATCH holding only that field, and a revision that changes nothing makes no request."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=ROLES
    ) as stack:
        user_id = (await stack.control.users())[0]["id"]
        await stack.connect_account("acc-p", user_id)
        cases: list[tuple[str, str, dict[str, Any]]] = []
        state = _utc_event("Fields")
        for name, value in _single_field_changes(state):
            state = {**state, name: value}
            cases.append(("rel-fields", name, dict(state)))
        all_day = _utc_event("All day", all_day_shape=True)
        cases.append(("rel-allday", "isAllDay", {**all_day, "isAllDay": True}))
        revisions = {"rel-fields": 1, "rel-allday": 1}
        await publish_outbound(
            stack,
            [
                message("acc-p", "rel-fields", 1, _utc_event("Fields")),
                message("acc-p", "rel-allday", 1, all_day),
            ],
        )
        await eventually(lambda: _applied(stack, "acc-p", revisions))
        seen: list[list[str]] = []
        for relation_id, name, event in cases:
            revisions[relation_id] += 1
            before = len((await stack.control.counters())["patch_fields"])
            await publish_outbound(
                stack, [message("acc-p", relation_id, revisions[relation_id], event)]
            )
            await eventually(lambda: _applied(stack, "acc-p", revisions))
            patches = (await stack.control.counters())["patch_fields"][before:]
            seen.append(patches[0] if patches else [])
            assert patches == [[name]], (name, patches)
        print({"fields_per_patch": [len(p) for p in seen]})
        # The recurring event our writes made is in the database with its occurrences.
        await eventually(lambda: _settled(stack, "acc-p", user_id), timeout_s=30)

        await stack.control.wait_idle()
        await asyncio.sleep(0.5)
        before = await stack.control.counters()
        revisions["rel-fields"] += 1
        await publish_outbound(
            stack, [message("acc-p", "rel-fields", revisions["rel-fields"], cases[-2][2])]
        )
        await eventually(lambda: _applied(stack, "acc-p", revisions))
        await asyncio.sleep(0.5)
        after = await stack.control.counters()
        assert after["total"] == before["total"], (
            after["by_kind"],
            before["by_kind"],
            after["patch_fields"][-1],
        )


async def _applied(stack: Stack, account_id: str, revisions: dict[str, int]) -> bool:
    for relation_id, revision in revisions.items():
        doc = await stack.rt.links.links.find_one(
            {"_id": stack.rt.links.link_id(account_id, relation_id)}
        )
        if doc is None or doc.get("applied_revision") != revision:
            return False
    return True

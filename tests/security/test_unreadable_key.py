"""A data key no master key in the ring unwraps is not an erased account (issue 11 row 4)."""

from __future__ import annotations

import io
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crypto import KeyRing, WrappedKey, generate_master_key_spec, parse_master_keys
from handlers.routing import shard_of
from processor.app import build_runtime
from processor.broker import REASON_HEADER
from processor.operations import rotate_keys
from processor.settings import SettingsError
from processor.topology import DEAD_QUEUE, INBOUND_QUEUE, OUTBOUND_INTAKE_QUEUE
from tests.e2e.harness import Stack, eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-keyless"
SUBJECT = "Written once the key is back"


async def _dead_letters(stack: Stack) -> list[dict[str, Any]]:
    out = []
    channel = await stack.rt.connection.channel()
    try:
        queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(dict(msg.headers or {}))
    finally:
        await channel.close()
    return out


def _processed(stack: Stack, queue: str, outcome: str) -> float:
    value = stack.rt.metrics.registry.get_sample_value(
        "m365sync_messages_processed_total", {"queue": queue, "outcome": outcome}
    )
    return value or 0.0


async def _events_status(stack: Stack) -> int:
    url = (
        f"http://127.0.0.1:{stack.port}/api/v1/accounts/{ACCOUNT}/events"
        "?start=2020-01-01T00:00:00Z&end=2021-01-01T00:00:00Z"
    )
    headers = {"Authorization": f"Bearer {stack.settings.api_tokens[0]}"}
    async with aiohttp.ClientSession(trust_env=False) as http, http.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def _start_runtime(stack: Stack) -> None:
    async with AsyncExitStack() as scratch:
        await build_runtime(stack.settings, scratch, mailbox_concurrency=1)


async def test_a_missing_master_key_parks_the_work_and_alerts_and_nothing_is_acked_away(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """While an account's data key is wrapped by a master key this process lacks (a rolling
    deploy, or a key removed before rotation finished): its resync and a 1Relation change
    are parked, not acked or dead-lettered; the alert metric counts and the API answers 503,
    not 404; `keys rotate` reports the key and goes on; and once the key reads again both
    are carried out."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
    ) as stack:
        ann = (await stack.control.users())[0]["id"]
        await stack.connect_account(ACCOUNT, ann)
        await stack.control.wait_idle()
        store = stack.rt.store
        original = await store.db["data_keys"].find_one({"_id": ACCOUNT})
        assert original is not None
        [missing_key] = parse_master_keys(generate_master_key_spec("gone"))
        elsewhere = KeyRing((missing_key, *stack.settings.master_keys))
        foreign = elsewhere.rewrap(ACCOUNT, WrappedKey.from_doc(original))
        await store.db["data_keys"].update_one({"_id": ACCOUNT}, {"$set": foreign.to_doc()})
        store.keys.forget(ACCOUNT)
        await stack.announcements()  # the connect's own announcements

        shard = INBOUND_QUEUE.format(shard=shard_of(ACCOUNT, stack.settings.shard_count))
        acked_before = {q: _processed(stack, q, "ack") for q in (shard, OUTBOUND_INTAKE_QUEUE)}
        await stack.request_resync(ACCOUNT, full=True, reason="operator")
        await publish_outbound(stack, [message(ACCOUNT, "rel-keyless", 1, relation_event(SUBJECT))])

        def alerted() -> bool:
            parked = [_processed(stack, q, "retry") for q in (shard, OUTBOUND_INTAKE_QUEUE)]
            return all(p >= 1 for p in parked)

        async def parked() -> bool:
            return alerted()

        try:
            await eventually(parked, timeout_s=20)
        finally:
            unreadable = stack.rt.metrics.registry.get_sample_value(
                "m365sync_data_key_unreadable_total"
            )
            print(
                "unreadable alerts:",
                unreadable,
                "acked:",
                {q: _processed(stack, q, "ack") - n for q, n in acked_before.items()},
                "dead-lettered:",
                [d.get(REASON_HEADER) for d in await _dead_letters(stack)],
            )
        assert (unreadable or 0) >= 2
        assert await _dead_letters(stack) == []
        for queue, before in acked_before.items():
            assert _processed(stack, queue, "ack") == before
        assert [
            a for a in await stack.announcements() if a["routing_key"] == "event.rejected"
        ] == []
        assert await _events_status(stack) == 503

        out = io.StringIO()
        assert await rotate_keys(stack.settings, out=out) == 1
        report = json.loads(out.getvalue())
        print("keys rotate:", report)
        assert report["unreadable_by_master_key"] == {"gone": 1}
        assert report["accounts"] == report["rewrapped"] + report["already_current"] + 1

        with pytest.raises(SettingsError, match="'gone'"):
            await _start_runtime(stack)

        # The master key is back (here: the key is wrapped as before).
        await store.db["data_keys"].replace_one({"_id": ACCOUNT}, original)
        store.keys.forget(ACCOUNT)

        async def written() -> bool:
            return any(e["subject"] == SUBJECT for e in await stack.control.events(ann))

        await eventually(written, timeout_s=90, interval_s=0.5)

        async def resynced() -> bool:
            return _processed(stack, shard, "ack") > acked_before[shard]

        await eventually(resynced, timeout_s=60, interval_s=0.5)
        assert await _events_status(stack) == 200
        assert await _dead_letters(stack) == []

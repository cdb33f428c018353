"""Internal shard messages are authenticated as a whole (issue 11 row 11): whoever can
publish to ``m365sync.*`` cannot delete or alter Outlook events."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from crypto import seal_message
from handlers.routing import shard_of
from processor.broker import REASON_HEADER
from processor.messages import change_message
from processor.topology import DEAD_QUEUE, INBOUND_QUEUE, OUTBOUND_QUEUE
from tests.e2e.harness import Stack, eventually, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-sealed"
SUBJECT = "Board meeting"


async def _publish(stack: Stack, queue: str, body: dict[str, Any]) -> None:
    connection = await aio_pika.connect(stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                message_id=uuid.uuid4().hex,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )


async def _dead_reasons(stack: Stack) -> list[str]:
    out = []
    channel = await stack.rt.connection.channel()
    try:
        queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(str((msg.headers or {}).get(REASON_HEADER)))
    finally:
        await channel.close()
    return out


async def test_forged_or_altered_shard_messages_are_refused(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """An unsealed delete (the old format, which carried no ciphertext), a sealed upsert
    turned into a delete, and a sealed change notification with another change type are
    dead-lettered with a reason, and the Outlook event stays; an unsealed change
    notification from before sealing is still worked on (its event_ref decrypts)."""
    async with running_stack(
        tmp_path,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        roles=("receiver", "worker", "outbound"),
    ) as stack:
        ann = (await stack.control.users())[0]["id"]
        await stack.connect_account(ACCOUNT, ann)
        await publish_outbound(stack, [message(ACCOUNT, "rel-1", 1, relation_event(SUBJECT))])

        async def created() -> list[dict[str, Any]]:
            return [e for e in await stack.control.events(ann) if e["subject"] == SUBJECT]

        [event] = await eventually(created, timeout_s=20)
        shards = stack.settings.shard_count
        outbound_queue = OUTBOUND_QUEUE.format(shard=shard_of(ACCOUNT, shards))
        inbound_queue = INBOUND_QUEUE.format(shard=shard_of(ACCOUNT, shards))
        cipher = await stack.rt.store.keys.cipher_for(ACCOUNT)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        forged_delete = {
            "schema": "m365sync.outbound.v1",
            "kind": "change",
            "account_id": ACCOUNT,
            "relation_event_id": "rel-1",
            "revision": 2,
            "op": "delete",
            "occurred_at": now,
            "event_ct": None,
        }
        await _publish(stack, outbound_queue, forged_delete)
        sealed_upsert = seal_message(
            cipher, {**forged_delete, "revision": 3, "op": "upsert"}, purpose="m365sync.outbound"
        )
        await _publish(stack, outbound_queue, {**sealed_upsert, "op": "delete"})

        event_hash = stack.rt.hasher.hash_id("event", ACCOUNT, event["id"])
        sealed_change = seal_message(
            cipher,
            change_message(
                account_id=ACCOUNT,
                change_type="updated",
                event_hash=event_hash,
                event_ref_ct=cipher.encrypt_str(
                    event["id"], aad=f"inbound|{ACCOUNT}|{event_hash}|event_ref".encode()
                ),
                received_at=datetime.now(UTC),
            ),
            purpose="m365sync.inbound",
        )
        await _publish(stack, inbound_queue, {**sealed_change, "change_type": "deleted"})
        legacy_change = change_message(
            account_id=ACCOUNT,
            change_type="updated",
            event_hash=event_hash,
            event_ref_ct=cipher.encrypt_str(
                event["id"], aad=f"inbound|{ACCOUNT}|event_ref".encode()
            ),
            received_at=datetime.now(UTC),
        )
        acked = (
            stack.rt.metrics.registry.get_sample_value(
                "m365sync_messages_processed_total", {"queue": inbound_queue, "outcome": "ack"}
            )
            or 0.0
        )
        await _publish(stack, inbound_queue, legacy_change)

        reasons: list[str] = []

        async def all_refused() -> bool:
            reasons.extend(await _dead_reasons(stack))
            return len(reasons) >= 3

        async def legacy_worked_on() -> bool:
            value = stack.rt.metrics.registry.get_sample_value(
                "m365sync_messages_processed_total", {"queue": inbound_queue, "outcome": "ack"}
            )
            return (value or 0.0) > acked

        try:
            await eventually(all_refused, timeout_s=20)
        finally:
            still = [e["subject"] for e in await stack.control.events(ann)]
            print(f"dead-lettered: {reasons} outlook: {still}")
        assert sorted(reasons) == sorted(
            [
                "unsealed delete (queued before an upgrade): 1Relation must send it again",
                "seal does not verify",
                "seal does not verify",
            ]
        )
        await eventually(legacy_worked_on, timeout_s=20)
        assert [e["id"] for e in await created()] == [event["id"]]

"""Publishing 1Relation's outbound messages in end-to-end tests."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika

from processor.topology import ONERELATION_OUTBOUND
from tests.e2e.harness import Stack


def relation_event(
    subject: str, *, day: int = 3, hour: int = 10, tz: str = "Europe/Copenhagen"
) -> dict[str, Any]:
    """An event as 1Relation sends it (IANA time zone, local times)."""
    start = (datetime.now(UTC) + timedelta(days=day)).replace(
        hour=hour, minute=0, second=0, microsecond=0
    )
    return {
        "subject": subject,
        "body": {"contentType": "text", "content": f"Notes for {subject}"},
        "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": tz},
        "end": {
            "dateTime": (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": tz,
        },
        "isAllDay": False,
        "location": {"displayName": "Room 4"},
        "showAs": "busy",
        "sensitivity": "normal",
    }


def message(
    account_id: str,
    relation_event_id: str,
    revision: int,
    event: dict[str, Any] | None,
    *,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "onerelation.event.v1",
        "op": "upsert" if event is not None else "delete",
        "account_id": account_id,
        "relation_event_id": relation_event_id,
        "revision": revision,
        "occurred_at": (occurred_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    if event is not None:
        body["event"] = event
    return body


async def publish_outbound(stack: Stack, bodies: list[dict[str, Any] | bytes]) -> None:
    """Publish as 1Relation does: persistent JSON on onerelation.outbound, with confirms."""
    connection = await aio_pika.connect(stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(ONERELATION_OUTBOUND, ensure=False)
        for body in bodies:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            key = (
                "event.delete"
                if isinstance(body, dict) and body.get("op") == "delete"
                else "event.upsert"
            )
            await exchange.publish(
                aio_pika.Message(
                    raw,
                    content_type="application/json",
                    message_id=uuid.uuid4().hex,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=key,
            )

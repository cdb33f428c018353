"""What the outbound side tells 1Relation besides the write itself: ``event.rejected``
(a change could not be applied, and why), ``event.conflict`` (its change to some fields
lost to a newer one in Outlook) and ``event.deleted`` (the user deleted the event in
Outlook, so it is not recreated)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from handlers.errors import PublishError, TransientError
from handlers.messages import event_change_body
from handlers.ports import OutgoingMessage, Publisher, SyncMetrics
from handlers.records import Link, next_sequence
from handlers.routing import ONERELATION_INBOUND


class Reporter:
    """Publishes ``event.rejected``, ``event.conflict`` and ``event.deleted`` to 1Relation."""

    def __init__(self, *, publisher: Publisher, metrics: SyncMetrics, timeout_s: float) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._timeout_s = timeout_s
        self.rejected = metrics.counter(
            "outbound_rejected_total", "Outbound messages rejected, by kind of problem.", ("kind",)
        )

    async def _send(self, routing_key: str, body: dict[str, Any]) -> None:
        try:
            await self._publisher.publish(
                OutgoingMessage(
                    exchange=ONERELATION_INBOUND,
                    routing_key=routing_key,
                    body=body,
                    message_id=uuid.uuid4().hex,
                ),
                timeout_s=self._timeout_s,
            )
        except PublishError as exc:
            raise TransientError(f"{routing_key} not confirmed") from exc

    async def rejected_change(
        self,
        account_id: str | None,
        relation_event_id: str | None,
        revision: Any,
        reason: str,
        kind: str,
    ) -> None:
        """``event.rejected``: the message could not be applied, and why."""
        self.rejected.labels(kind=kind).inc()
        if relation_event_id is None:
            return  # nothing 1Relation could match it to; the dead letter keeps it
        await self._send(
            "event.rejected",
            {
                "schema": "m365sync.event-rejected.v1",
                "account_id": account_id,
                "relation_event_id": relation_event_id,
                "revision": revision if isinstance(revision, int) else None,
                "reason": reason,
            },
        )

    async def conflict(self, link: Link, revision: int, lost: Sequence[str], lm: Any) -> None:
        """``event.conflict``: 1Relation's change to these fields lost to a newer Outlook one."""
        body = event_change_body(
            account_id=link.account_id,
            event_key=link.event_key or "",
            change="conflict",
            origin="microsoft",
            last_modified=lm,
            relation_event_id=link.relation_event_id,
            sequence=next_sequence(None),
        )
        body["lost_fields"] = sorted(lost)
        body["revision"] = revision
        await self._send("event.conflict", body)

    async def deleted_in_outlook(self, link: Link) -> None:
        """``event.deleted`` from Microsoft: the user deleted the event in Outlook."""
        await self._send(
            "event.deleted",
            event_change_body(
                account_id=link.account_id,
                event_key=link.event_key or "",
                change="deleted",
                origin="microsoft",
                last_modified=None,
                relation_event_id=link.relation_event_id,
                sequence=next_sequence(None),
            ),
        )

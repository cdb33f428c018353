"""Account status: the closed list of docs/contract.md §2, its document, and ``account.status``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final

from contract.statuses import DEFAULT_REASONS, STATUSES
from handlers.errors import PublishError, TransientError
from handlers.ports import OutgoingMessage, Publisher
from handlers.routing import ONERELATION_INBOUND
from handlers.timeutil import isoformat_z, utcnow
from processor.event_store import EventStore
from processor.logs import get_logger
from processor.metrics import Metrics
from processor.store import Store

log = get_logger(__name__)

#: What failed, and what a person can do, when an account enters a status that stops it.
FAILURES: Final = {
    "reauthorization_required": (
        "Microsoft 365 refused the account's stored sign-in",
        "The user must click 'Connect to Microsoft' in 1Relation again; the calendar "
        "catches up by itself afterwards.",
    ),
    "admin_consent_required": (
        "Microsoft 365 refused access because the organisation has not approved the app",
        "An administrator of the user's Microsoft 365 organisation must approve the app, "
        "then the user connects again.",
    ),
    "deletions_paused": (
        "Deleting events was paused because Microsoft reported far more deletions than usual",
        "Check the calendar in Outlook; if the deletions are real, a resync "
        "(POST /api/v1/accounts/{account_id}/resync) releases them.",
    ),
}


def describe_failure(status: str, reason: str, *, at: datetime) -> str:
    """``last_error`` for a failure that put the account in ``status``: what failed, when,
    why and what a person can do, in words (``reason`` is ours, never Graph's text)."""
    what, action = FAILURES.get(
        status, ("Synchronisation stopped", DEFAULT_REASONS.get(status, ""))
    )
    why = f": {reason.rstrip('.')}" if reason and reason != DEFAULT_REASONS.get(status) else ""
    return f"{what} at {isoformat_z(at)}{why}. {action}".strip()


class AccountStatuses:
    """Changes account statuses and tells 1Relation (``account.status``) when one changes."""

    def __init__(
        self,
        *,
        store: Store,
        events: EventStore,
        publisher: Publisher,
        metrics: Metrics,
        timeout_s: float,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._events = events
        self._publisher = publisher
        self._timeout_s = timeout_s

    async def record_sync(self, account_id: str, *, error: str | None = None) -> None:
        """Note a finished sync step (written only by the account's shard owner)."""
        await self._store.sync_state.record_sync(account_id, error=error)

    async def set(self, account_id: str, status: str, reason: str | None = None) -> bool:
        """Set the status; publish ``account.status`` if it changed. Returns whether it did.

        The message is published with confirms after the write; if the broker does not
        confirm, :class:`TransientError` is raised so the caller's message is retried
        (setting the same status again is harmless and publishes again).
        """
        if status not in STATUSES:
            raise ValueError(f"unknown account status {status!r}")
        text = DEFAULT_REASONS[status] if reason is None else reason
        if status in FAILURES:
            # Written before the status so that the account.status it causes carries it.
            await self._store.sync_state.record_sync(
                account_id, error=describe_failure(status, text, at=utcnow())
            )
        changed = await self._store.accounts.set_status(account_id, status, text)
        if changed:
            self._metrics.account_status_changes.labels(status=status).inc()
            log.info("account.status_changed", account_id=account_id, status=status)
            await self.publish(account_id)
        return changed

    async def publish(self, account_id: str) -> None:
        """Publish the account's current status document on ``onerelation.inbound``."""
        document = await self.document(account_id)
        if document is None:
            return
        try:
            await self._send(document)
        except PublishError as exc:
            raise TransientError(f"account.status not confirmed: {exc}") from exc

    async def announce(self, document: dict[str, Any]) -> None:
        """Publish a status document built by the caller (an erased account's last one);
        :class:`TransientError` when the broker does not confirm it in time."""
        try:
            await self._send(document)
        except (PublishError, TimeoutError) as exc:
            raise TransientError(f"account.status not confirmed: {exc}") from exc

    async def _send(self, document: dict[str, Any]) -> None:
        await self._publisher.publish(
            OutgoingMessage(
                exchange=ONERELATION_INBOUND,
                routing_key="account.status",
                body=document,
                message_id=uuid.uuid4().hex,
            ),
            timeout_s=self._timeout_s,
        )

    async def document(self, account_id: str) -> dict[str, Any] | None:
        """The status document of docs/contract.md §2, or None for an unknown account."""
        account = await self._store.accounts.get(account_id)
        if account is None:
            return None
        sync = await self._store.sync_state.get(account_id)
        tenant_id = None
        if account.bound:
            tenant_id = (await self._store.accounts.decrypt_identity(account)).tenant_id
        expiries = await self._store.subscriptions.expiries(account_id)
        last_sync = sync.get("last_sync_at")
        return {
            "account_id": account_id,
            "status": account.status,
            "status_reason": account.status_reason,
            "tenant_id": tenant_id,
            "last_sync_at": isoformat_z(last_sync) if last_sync else None,
            "subscription_expires_at": isoformat_z(max(expiries)) if expiries else None,
            "event_count": await self._events.count_live(account_id),
            "last_error": sync.get("last_error"),
        }

"""Erasing an account (``DELETE /api/v1/accounts/{id}``): nothing of it stays readable.

Order, chosen so that a crash at any point leaves a state the next ``DELETE`` finishes:

1. mark the account ``disconnected`` (workers stop calling Graph for it) and take the
   subscription manager's and the connect flow's leases of the account (a barrier);
2. delete its Graph subscriptions, best effort (needs the token cache, so it comes before
   the key goes; a failure is fine: an orphaned subscription expires within days, and its
   notifications are dropped because the subscription record is gone);
3. destroy the data key (crypto-shredding: every ciphertext of the account, anywhere,
   including copies in queues and backups, becomes unreadable) and forget cached keys and
   tokens;
4. delete every document of the account in every collection (by ``account_id`` or by
   ``_id``; leases named ``<purpose>:<account_id>``);
5. publish a final ``account.status`` (``disconnected``, built in memory) with confirms;
6. delete the account document last, so that a failed publish is repeated by the next try.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, Final

import structlog

from contract.statuses import DEFAULT_REASONS
from subscriptions.ports import (
    AccessTokenCache,
    AccountStatusPublisher,
    GraphSubscriptionApi,
    Repositories,
)

__all__ = ["Eraser", "Erasure", "disconnected_document"]

log = structlog.get_logger(__name__)

#: Time allowed for deleting the Graph subscriptions before giving up on them.
GRAPH_BUDGET_S: Final = 10.0
#: Leases whose holders write the account's subscription or binding: the subscription
#: manager's (subscriptions/manager.py) and the connect callback's (subscriptions/connect.py).
BARRIER_LEASES: Final = ("subscription:{account_id}", "connect:{account_id}")
LEASE_WAIT_S: Final = 10.0
#: When the second sweep runs: after the longest a delta pass can hold its message (the
#: broker closes a consumer that keeps a delivery unacknowledged for 30 minutes).
RESWEEP_AFTER_S: Final = 40 * 60.0
LEASE_TTL_S: Final = 60.0


def disconnected_document(account_id: str) -> dict[str, Any]:
    """The last status document of an erased account (docs/contract.md §2 shape)."""
    return {
        "account_id": account_id,
        "status": "disconnected",
        "status_reason": DEFAULT_REASONS["disconnected"],
        "tenant_id": None,
        "last_sync_at": None,
        "subscription_expires_at": None,
        "event_count": 0,
        "last_error": None,
    }


@dataclass(frozen=True)
class Erasure:
    """What one erasure did (counts only: nothing personal)."""

    existed: bool
    subscriptions_deleted: int
    subscriptions_left: int
    documents_deleted: int


class Eraser:
    """Erases accounts; safe to repeat, and to run again after a crash midway."""

    def __init__(
        self,
        *,
        store: Repositories,
        graph: GraphSubscriptionApi,
        tokens: AccessTokenCache,
        statuses: AccountStatusPublisher,
        graph_budget_s: float = GRAPH_BUDGET_S,
        lease_wait_s: float = LEASE_WAIT_S,
        resweep_after_s: float = RESWEEP_AFTER_S,
    ) -> None:
        self._resweep_after_s = resweep_after_s
        self._store = store
        self._graph = graph
        self._tokens = tokens
        self._statuses = statuses
        self._graph_budget_s = graph_budget_s
        self._lease_wait_s = lease_wait_s

    async def erase(self, account_id: str) -> Erasure:
        """Erase everything of ``account_id``; raises :class:`TransientError` if 1Relation
        could not be told (the account document is then kept, so a repeat finishes it)."""
        store = self._store
        account = await store.accounts.get(account_id)
        if account is not None and account.status != "disconnected":
            await store.accounts.set_status(
                account_id, "disconnected", DEFAULT_REASONS["disconnected"]
            )
        # A barrier: wait out a subscription write or a connect callback that began before
        # the status changed (afterwards both see "disconnected" or no account and stop).
        # The leases are held to the end; the document sweep below removes them.
        owner = f"erasure:{uuid.uuid4().hex}"
        for template in BARRIER_LEASES:
            await self._hold(template.format(account_id=account_id), owner)
        deleted, left = await self._delete_graph_subscriptions(account_id)
        await store.keys.destroy(account_id)
        self._tokens.invalidate(account_id)
        documents = await store.accounts.delete_other_documents(account_id)
        # A delta pass in another process checks the fence before each write, but one
        # write may land between its check and the sweep above: sweep again later.
        await store.erasures.schedule_resweep(account_id, after_s=self._resweep_after_s)
        if account is not None:
            await self._publish_final(account_id)
            documents += await store.accounts.delete(account_id)
        store.keys.forget(account_id)
        log.info(
            "account.erased",
            account_id=account_id,
            existed=account is not None,
            subscriptions_deleted=deleted,
            subscriptions_left=left,
            documents=documents,
        )
        return Erasure(account is not None, deleted, left, documents)

    async def _hold(self, name: str, owner: str) -> None:
        if not await self._store.leases.take(
            name, owner, ttl_s=LEASE_TTL_S, wait_s=self._lease_wait_s
        ):
            log.warning("erasure.lease_busy", lease=name.partition(":")[0])
            # erase anyway; a straggler's documents go with the next DELETE

    async def _delete_graph_subscriptions(self, account_id: str) -> tuple[int, int]:
        hashes = await self._store.subscriptions.hashes_for_account(account_id)
        deleted = left = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._graph_budget_s
        for sub_hash in hashes:
            try:
                async with asyncio.timeout_at(deadline):
                    subscription_id = await self._store.subscriptions.fetch_graph_id(
                        account_id, sub_hash
                    )
                    if subscription_id is not None:
                        await self._graph.delete_subscription(account_id, subscription_id)
                deleted += 1
            except Exception as exc:
                # Best effort by design: the key may be gone already (a repeated erasure),
                # the sign-in revoked or Graph unreachable. The subscription then expires.
                left += 1
                log.info(
                    "erasure.subscription_not_deleted",
                    account_id=account_id,
                    subscription=sub_hash,
                    error=type(exc).__name__,
                )
            await self._store.subscriptions.delete(sub_hash)
        return deleted, left

    async def _publish_final(self, account_id: str) -> None:
        """The last ``account.status``; :class:`TransientError` if it is not confirmed."""
        await self._statuses.announce(disconnected_document(account_id))

"""Registering a connected account and creating its Graph subscription."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog

from handlers.errors import PermanentError
from handlers.timeutil import isoformat_z, parse_graph_datetime, utcnow
from subscriptions.ports import AccountIdentity, GraphSubscriptionApi, Repositories

log = structlog.get_logger(__name__)

#: Graph's documented maximum lifetime of an Outlook event subscription (docs/graph.md §3);
#: newer documentation quotes 10,080 minutes, so that is asked first and this is the fallback.
MAX_EVENT_SUBSCRIPTION_MINUTES = 4230
OPTIMISTIC_SUBSCRIPTION_MINUTES = 10080
#: The lifetimes asked for, in order: a 400 for one is retried with the next.
LIFETIMES_MINUTES = (OPTIMISTIC_SUBSCRIPTION_MINUTES, MAX_EVENT_SUBSCRIPTION_MINUTES - 5)
#: Lease held by whoever creates, renews or deletes an account's subscription (the
#: subscription manager, the connect flow, erasure): ``<prefix><account id>``.
SUBSCRIPTION_LEASE_PREFIX = "subscription:"


async def register_account(
    store: Repositories, *, account_id: str, serialized_cache: str, user_id: str, tenant_id: str
) -> None:
    """Create (or reuse) the account, bind its Microsoft identity and store its token cache."""
    await store.accounts.create(account_id)
    await store.accounts.bind_identity(account_id, user_id=user_id, tenant_id=tenant_id)
    current = await store.token_caches.load(account_id)
    version = current[1] if current is not None else 0
    if not await store.token_caches.save(account_id, serialized_cache, version):
        raise RuntimeError(f"token cache of {account_id} changed during registration")
    await store.accounts.set_status(account_id, "connected")


async def create_subscription(
    store: Repositories,
    graph: GraphSubscriptionApi,
    *,
    account_id: str,
    public_url: str,
    now: datetime | None = None,
    lifetimes_minutes: Sequence[int] = LIFETIMES_MINUTES,
    identity: AccountIdentity | None = None,
    record_granted_at: bool = False,
) -> tuple[str, datetime]:
    """Create the account's event subscription with a fresh clientState.

    Asks for the longest lifetime and reads the granted expiry back from the answer; a
    400 for the optimistic lifetime is retried with the documented maximum. A caller that
    knows Graph's answer already passes just that lifetime (``lifetimes_minutes``), one
    that has read the account passes its ``identity``, and ``record_granted_at`` stores
    ``now`` as the time the expiry was granted (the subscription manager's clock).
    """
    if identity is None:
        identity = await store.accounts.identity(account_id)
    client_state = secrets.token_urlsafe(48)  # 64 characters; Graph allows 128
    now = now or utcnow()
    body = {
        "changeType": "created,updated,deleted",
        "notificationUrl": f"{public_url}/graph/notifications",
        "lifecycleNotificationUrl": f"{public_url}/graph/lifecycle",
        "resource": f"users/{identity.user_id}/events",
        "clientState": client_state,
        "latestSupportedTlsVersion": "v1_2",
    }
    answer = None
    last: PermanentError | None = None
    for minutes in lifetimes_minutes:
        body["expirationDateTime"] = isoformat_z(now + timedelta(minutes=minutes))
        try:
            answer = await graph.create_subscription(account_id, body)
            break
        except PermanentError as exc:
            log.info(
                "subscription.create_rejected",
                account_id=account_id,
                minutes=minutes,
                reason=exc.reason[:200],
            )
            last = exc
    if answer is None:
        raise last or ValueError("no lifetime to ask for")
    expires_at = parse_graph_datetime(str(answer["expirationDateTime"]))
    sub_hash = await store.subscriptions.save(
        account_id,
        subscription_id=str(answer["id"]),
        client_state=client_state,
        user_id=identity.user_id,
        tenant_id=identity.tenant_id,
        expires_at=expires_at,
        granted_at=now if record_granted_at else None,
    )
    log.info(
        "subscription.created",
        account_id=account_id,
        subscription=sub_hash,
        expires_at=isoformat_z(expires_at),
    )
    return sub_hash, expires_at

"""The benchmark driver's own view of the service: a Runtime for setup, connected accounts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from graphsim.client import SimControl
from processor.app import Runtime, build_runtime
from processor.devsignin import sign_in_headless
from processor.settings import load_settings
from processor.tokens import MsalApps
from subscriptions.registration import create_subscription, register_account


@asynccontextmanager
async def driver_runtime(env: dict[str, str]) -> AsyncIterator[Runtime]:
    """A Runtime in the driver process (declares the topology); used for setup and checks."""
    async with AsyncExitStack() as stack:
        yield await build_runtime(load_settings(env), stack, mailbox_concurrency=3)


async def connect_accounts(
    rt: Runtime,
    control: SimControl,
    state: dict[str, Any],
    count: int,
    *,
    subscribe: bool,
) -> dict[str, str]:
    """Create ``count`` mailboxes, sign each in through MSAL and register it; account -> user.

    With ``subscribe`` each account also gets its Graph subscription (the simulator runs the
    validation handshake against the receiver, which must be up).
    """
    settings = rt.settings
    apps = MsalApps(
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        authority_host=settings.authority_host,
        ca_bundle=settings.ca_bundle,
    )
    accounts: dict[str, str] = {}
    try:
        for n in range(count):
            domain = state["tenants"][0]["domains"][0] if state.get("tenants") else None
            upn = f"bench{n:03d}@{domain or 'contoso.example'}"
            user = await control.create_user(f"Bench User {n}", upn)
            await control.set_signin_user(user["id"])
            claims, cache = await sign_in_headless(
                apps, ca_bundle=settings.ca_bundle, tenant=state["tenant_id"]
            )
            account_id = f"bench-acc-{n:03d}"
            await register_account(
                rt.store,
                account_id=account_id,
                serialized_cache=cache,
                user_id=claims["oid"],
                tenant_id=claims["tid"],
            )
            if subscribe:
                await create_subscription(
                    rt.store, rt.graph, account_id=account_id, public_url=settings.public_url
                )
            accounts[account_id] = user["id"]
    finally:
        apps.close()
    return accounts

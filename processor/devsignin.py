"""Headless sign-in against an identity provider that auto-approves (the simulator).

Used by the tests and the demo to obtain a real MSAL token cache through the real
authorization-code flow with PKCE, without a browser: the authorize URL is fetched and the
redirect it answers with is handed back to MSAL as the browser would.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from processor.tokens import DEFAULT_SCOPES, MsalApps, initiate_flow_async, redeem_auth_code


async def sign_in_headless(
    apps: MsalApps,
    *,
    ca_bundle: str | None,
    redirect_uri: str = "http://127.0.0.1/auth/callback",
    tenant: str = "organizations",
) -> tuple[dict[str, Any], str]:
    """Run the authorization-code flow; returns (ID-token claims, serialized token cache)."""
    flow = await initiate_flow_async(
        apps, response_mode="query", redirect_uri=redirect_uri, scopes=DEFAULT_SCOPES, tenant=tenant
    )
    context: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
    )
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.get(flow["auth_uri"], allow_redirects=False, ssl=context) as resp,
    ):
        location = resp.headers.get("Location", "")
        if resp.status not in (301, 302, 303) or not location:
            raise RuntimeError(f"authorize answered {resp.status} without a redirect")
    response = dict(parse_qsl(urlsplit(location).query))
    if "error" in response:
        raise RuntimeError(f"sign-in failed: {response['error']}")
    result, cache = await redeem_auth_code(apps, flow, response, DEFAULT_SCOPES)
    if "error" in result:
        raise RuntimeError(f"token redemption failed: {result['error']}")
    return dict(result["id_token_claims"]), cache

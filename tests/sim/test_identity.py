"""The identity platform as real MSAL Python and raw OAuth clients see it."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import msal
import requests

from graphsim.client import SimControl
from graphsim.server import Simulator

from .conftest import Graph, delegated_tokens

SCOPES = ["Calendars.ReadWrite", "User.Read"]
REDIRECT = "http://localhost:8765/auth/callback"


async def _msal_app(sim: Simulator) -> msal.ConfidentialClientApplication:
    """Built off the loop: MSAL's constructor runs OIDC discovery against the in-process sim."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(sim.ca_file)
    return await asyncio.to_thread(
        msal.ConfidentialClientApplication,
        sim.client_id,
        client_credential=sim.client_secret,
        authority=sim.authority,
        instance_discovery=False,
        http_client=session,
    )


async def _sign_in(
    app: msal.ConfidentialClientApplication, http: aiohttp.ClientSession
) -> dict[str, Any]:
    def initiate() -> dict[str, Any]:
        # The simulator's sign-in answers in query mode (as m365sync's GET callback expects);
        # MSAL's advice to use form_post is known and not this test's subject.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="response_mode='form_post'", category=UserWarning
            )
            flow: dict[str, Any] = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT)
        return flow

    flow = await asyncio.to_thread(initiate)
    async with http.get(flow["auth_uri"], allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert location.startswith(REDIRECT)
    auth_response = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    result: dict[str, Any] = await asyncio.to_thread(
        app.acquire_token_by_auth_code_flow, flow, auth_response
    )
    return result


async def test_msal_auth_code_refresh_and_revocation(
    sim: Simulator, http: aiohttp.ClientSession, control: SimControl
) -> None:
    """Real MSAL completes auth code + PKCE, refreshes, and gets invalid_grant after revocation."""
    app = await _msal_app(sim)
    result = await _sign_in(app, http)
    assert "access_token" in result, result
    claims = result["id_token_claims"]
    ann = sim.store.find_user("ann@contoso.example")
    assert ann is not None
    assert claims["oid"] == ann.id
    assert claims["tid"] == sim.tenant_id
    assert claims["preferred_username"] == "ann@contoso.example"
    status, me, _ = await Graph(sim, http, result["access_token"]).call("GET", "/me")
    assert status == 200
    assert me["id"] == ann.id

    accounts = await asyncio.to_thread(app.get_accounts)
    assert len(accounts) == 1
    refreshed = await asyncio.to_thread(
        app.acquire_token_silent, SCOPES, accounts[0], force_refresh=True
    )
    assert refreshed, "acquire_token_silent found nothing to refresh"
    assert "access_token" in refreshed, refreshed
    assert refreshed["access_token"] != result["access_token"]

    await control.revoke_tokens(ann.id)
    failed = await asyncio.to_thread(
        app.acquire_token_by_refresh_token, result["refresh_token"], SCOPES
    )
    assert failed["error"] == "invalid_grant"
    assert 50173 in failed["error_codes"]


async def test_msal_client_credentials(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Real MSAL obtains an app-only token that Graph accepts for any mailbox in the tenant."""
    app = await _msal_app(sim)
    result = await asyncio.to_thread(
        app.acquire_token_for_client, ["https://graph.microsoft.com/.default"]
    )
    assert "access_token" in result, result
    status, user, _ = await Graph(sim, http, result["access_token"]).call(
        "GET", "/users/bob@contoso.example"
    )
    assert status == 200
    assert user["userPrincipalName"] == "bob@contoso.example"


async def test_refresh_tokens_rotate_and_old_ones_stay_valid(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Each refresh returns a new refresh token, and the previous one still works."""
    first = await delegated_tokens(sim, http)

    async def refresh(rt: str) -> dict[str, Any]:
        form = {
            "grant_type": "refresh_token",
            "client_id": sim.client_id,
            "client_secret": sim.client_secret,
            "refresh_token": rt,
            "scope": "Calendars.ReadWrite offline_access openid",
        }
        async with http.post(f"{sim.authority}/oauth2/v2.0/token", data=form) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data

    second = await refresh(first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    again = await refresh(first["refresh_token"])
    assert again["access_token"]


async def test_code_is_single_use_and_secret_checked(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A wrong client secret is 401 invalid_client; a redeemed code cannot be redeemed again."""
    form = {
        "grant_type": "client_credentials",
        "client_id": sim.client_id,
        "client_secret": "wrong",
        "scope": "https://graph.microsoft.com/.default",
    }
    async with http.post(f"{sim.authority}/oauth2/v2.0/token", data=form) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"


async def test_consent_required_and_admin_consent(
    sim: Simulator, http: aiohttp.ClientSession, control: SimControl
) -> None:
    """Without tenant consent authorize redirects with consent_required; admin consent fixes it."""
    await control.set_consent(False)
    params = {
        "client_id": sim.client_id,
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "scope": "User.Read openid",
        "state": "xyz",
        "code_challenge": "a" * 43,
        "code_challenge_method": "S256",
    }
    async with http.get(
        f"{sim.authority}/oauth2/v2.0/authorize", params=params, allow_redirects=False
    ) as resp:
        query = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert query["error"] == ["consent_required"]
    assert query["error_description"][0].startswith("AADSTS65001")
    assert query["state"] == ["xyz"]

    await control.set_admin_consent_decision(False)
    consent = {
        "client_id": sim.client_id,
        "scope": "https://graph.microsoft.com/.default",
        "redirect_uri": REDIRECT,
        "state": "adm",
    }
    async with http.get(
        f"{sim.base_url}/organizations/v2.0/adminconsent", params=consent, allow_redirects=False
    ) as resp:
        declined = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert declined["error"] == ["access_denied"]

    await control.set_admin_consent_decision(True)
    async with http.get(
        f"{sim.base_url}/{sim.tenant_id}/v2.0/adminconsent", params=consent, allow_redirects=False
    ) as resp:
        granted = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert granted["admin_consent"] == ["True"]
    assert granted["tenant"] == [sim.tenant_id]
    assert granted["state"] == ["adm"]
    assert (await delegated_tokens(sim, http))["access_token"]


async def test_discovery_issuer_matches_id_token_for_domain_authority(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Discovery by tenant domain reports the tenant-GUID issuer that id_tokens carry."""
    url = f"{sim.base_url}/contoso.example/v2.0/.well-known/openid-configuration"
    async with http.get(url) as resp:
        doc = await resp.json()
    assert doc["issuer"] == f"{sim.base_url}/{sim.tenant_id}/v2.0"
    assert doc["token_endpoint"].startswith("https://")
    async with http.get(
        f"{sim.base_url}/nope.example/v2.0/.well-known/openid-configuration"
    ) as resp:
        assert resp.status == 400


async def test_graph_rejects_bad_and_revoked_access_tokens(
    sim: Simulator, http: aiohttp.ClientSession, control: SimControl, ann: str
) -> None:
    """Graph answers 401 InvalidAuthenticationToken for garbage, expired and revoked tokens."""
    status, body, _ = await Graph(sim, http, "garbage").call("GET", "/me")
    assert status == 401
    assert body["error"]["code"] == "InvalidAuthenticationToken"
    assert "request-id" in body["error"]["innerError"]
    token = (await delegated_tokens(sim, http))["access_token"]
    graph = Graph(sim, http, token)
    assert (await graph.call("GET", "/me"))[0] == 200
    await control.advance_clock(3601)
    assert (await graph.call("GET", "/me"))[0] == 401
    await control.advance_clock(-3601)
    await control.revoke_tokens(ann, access_tokens=True)
    assert (await graph.call("GET", "/me"))[0] == 401


async def test_authorize_honours_documented_prompt_values(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """prompt=select_account signs in (the picked account is the sign-in user) and is
    recorded; a prompt value Microsoft does not document is an invalid_request."""
    app = await _msal_app(sim)

    def initiate(prompt: str) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="response_mode='form_post'", category=UserWarning
            )
            flow: dict[str, Any] = app.initiate_auth_code_flow(
                SCOPES, redirect_uri=REDIRECT, prompt=prompt
            )
        return flow

    for prompt, answer in (("select_account", "code"), ("pick_one", "error")):
        flow = await asyncio.to_thread(initiate, prompt)
        async with http.get(flow["auth_uri"], allow_redirects=False) as resp:
            assert resp.status == 302
            query = parse_qs(urlsplit(resp.headers["Location"]).query)
        assert answer in query, (prompt, query)
    assert query["error"] == ["invalid_request"]
    assert sim.describe()["authorize_prompts"] == ["select_account"]

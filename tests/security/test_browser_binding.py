"""Sign-in and admin consent bound to the browser that started them, and the links that start
them (issue 11 rows 1, 7, 9, 10), against the running receiver, the simulator's identity
platform, real RabbitMQ and FerretDB."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import pytest

from subscriptions.connect import CONNECT_FLOWS
from subscriptions.consent import CONSENT_FLOWS, TENANTS
from subscriptions.links import USED_LINKS
from tests.e2e.harness import (
    Stack,
    browse,
    browser_jar,
    mint_link,
    running_stack,
)

pytestmark = pytest.mark.e2e

# Spelled out rather than imported: they are what 1Relation's signer and browsers see.
BROWSER_COOKIE = "m365sync-signin"
CONNECT_AUDIENCE = "m365sync:connect"
CONSENT_AUDIENCE = "m365sync:admin-consent"


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


async def _count(stack: Stack, collection: str) -> int:
    return await stack.rt.db[collection].count_documents({})


async def _start(stack: Stack, path: str, token: str, jar: Any) -> str:
    """The browser holding ``jar`` opens ``path?token=`` and stops at Microsoft's URL."""
    run = await browse(stack, f"{path}?token={quote(token)}", max_hops=1, jar=jar)
    assert run.status == 302, (run.status, run.body)
    assert run.location.startswith(stack.sim.authority_host), run.location
    return run.location


async def test_sign_in_url_finished_in_another_browser_binds_nothing(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """A sign-in URL started by one browser and finished in another is refused with a page,
    binds no mailbox and stays usable by the browser that started it; the authorize request
    asks for the account picker."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        attacker, victim = (await stack.control.users())[:2]
        attacker_jar = browser_jar()
        sign_in_url = await _start(
            stack, "/connect", mint_link(stack, "acc-attacker"), attacker_jar
        )

        # The colleague's browser signs in (as the colleague) and lands on the callback.
        await stack.control.set_signin_user(victim["id"])
        refused = await browse(stack, sign_in_url, jar=browser_jar())
        assert refused.hops[-1].endswith("/auth/callback")
        assert refused.status == 403, (refused.status, refused.body)
        assert "another browser" in refused.body
        assert await stack.rt.store.accounts.get("acc-attacker") is None
        assert await _count(stack, CONNECT_FLOWS) == 1  # not used up by the wrong browser

        # The browser that started it still finishes it, with its own sign-in.
        await stack.control.set_signin_user(attacker["id"])
        finished = await browse(stack, sign_in_url, jar=attacker_jar)
        assert finished.status == 302, (finished.status, finished.body)
        assert finished.query()["status"] == "connected"
        account = await stack.rt.store.accounts.get("acc-attacker")
        assert account is not None
        assert account.user_hash == stack.rt.hasher.hash_id("user", attacker["id"].lower())
        assert _query(sign_in_url)["prompt"] == "select_account"
        assert "select_account" in (await stack.control.state())["authorize_prompts"]
        [cookie] = list(attacker_jar)
        assert cookie.key == BROWSER_COOKIE  # http on loopback: no __Host- prefix possible
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Lax"
        assert cookie["path"] == "/"


async def test_one_mailbox_is_bound_to_one_account(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """A mailbox connected to one 1Relation account cannot be connected to a second one: the
    second gets reason mailbox_in_use and stays unbound; after the first is erased it can."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        user = (await stack.control.users())[0]
        await stack.control.set_signin_user(user["id"])
        first = await browse(stack, f"/connect?token={quote(mint_link(stack, 'acc-first'))}")
        assert first.query()["status"] == "connected", first
        second = await browse(stack, f"/connect?token={quote(mint_link(stack, 'acc-second'))}")
        assert second.query() == {"tab": "sync", "status": "error", "reason": "mailbox_in_use"}
        account = await stack.rt.store.accounts.get("acc-second")
        assert account is None or account.user_hash is None
        # Reconnecting the same account with the same mailbox still works.
        again = await browse(stack, f"/connect?token={quote(mint_link(stack, 'acc-first'))}")
        assert again.query()["status"] == "connected", again


async def test_admin_consent_finished_in_another_browser_records_nothing(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """An admin consent URL finished in another browser is refused, records no tenant and
    stays usable by the browser that started it."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        jar = browser_jar()
        token = mint_link(stack, "acc-admin", tenant=stack.sim.tenant_id)
        consent_url = await _start(stack, "/admin-consent", token, jar)
        refused = await browse(stack, consent_url, jar=browser_jar())
        assert refused.hops[-1].endswith("/admin-consent/callback")
        assert refused.status == 403, (refused.status, refused.body)
        assert await _count(stack, TENANTS) == 0
        assert await _count(stack, CONSENT_FLOWS) == 1
        approved = await browse(stack, consent_url, jar=jar)
        assert approved.query() == {"tab": "sync", "status": "connected"}
        assert await _count(stack, TENANTS) == 1


async def test_consent_callback_tenant_is_confirmed_with_microsoft(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Without a tenant in the link, a callback naming a tenant that never approved the app
    (or does not exist) records nothing; a real approval is recorded."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        unapproved = await stack.control.create_tenant("fabrikam.example", consented=False)
        for tenant_id in (unapproved["id"], str(uuid.uuid4())):
            jar = browser_jar()
            consent_url = await _start(stack, "/admin-consent", mint_link(stack, "acc-t"), jar)
            state = _query(consent_url)["state"]
            forged = await browse(
                stack,
                f"/admin-consent/callback?admin_consent=True&tenant={tenant_id}&state={state}",
                jar=jar,
            )
            assert forged.query() == {
                "tab": "sync",
                "status": "error",
                "reason": "admin_consent_not_confirmed",
            }, tenant_id
            assert await _count(stack, TENANTS) == 0
        jar = browser_jar()
        consent_url = await _start(stack, "/admin-consent", mint_link(stack, "acc-t"), jar)
        approved = await browse(stack, consent_url, jar=jar)
        assert approved.query() == {"tab": "sync", "status": "connected"}
        assert await _count(stack, TENANTS) == 1


def _signed(header: dict[str, Any], claims: dict[str, Any], secret: str) -> str:
    """An HS256 JWS with exactly ``header`` (PyJWT refuses to write these headers)."""

    def part(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signing_input = part(header) + b"." + part(claims)
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


async def _answer(stack: Stack, path: str, token: str) -> tuple[int, dict[str, Any] | None]:
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.get(
            f"http://127.0.0.1:{stack.port}{path}?token={quote(token)}", allow_redirects=False
        ) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def test_link_headers_that_pyjwt_refuses_are_answered_400(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """A correctly signed link whose header has a numeric kid or an unknown crit extension
    gets 400 invalid_token on both routes, never 500, and consumes nothing."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        secret = stack.settings.connect_secrets[0]
        claims = {"sub": "acc-h", "exp": int(time.time()) + 600, "jti": uuid.uuid4().hex}
        headers = {
            "kid": {"alg": "HS256", "typ": "JWT", "kid": 5},
            "crit": {"alg": "HS256", "typ": "JWT", "crit": ["x-unknown"], "x-unknown": 1},
        }
        for name, header in headers.items():
            for path in ("/connect", "/admin-consent"):
                status, body = await _answer(stack, path, _signed(header, claims, secret))
                assert status == 400, (name, path, status)
                assert body is not None
                assert body["error"]["code"] == "invalid_token", (name, body)
        assert await _count(stack, USED_LINKS) == 0


async def test_links_only_work_on_the_route_their_aud_names(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """A connect link with the consent aud, a consent link with the connect aud and a
    foreign aud are refused with 403 wrong_audience and consume nothing; a link with its
    route's aud, or with no aud (docs/contract.md §2 names none), works."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        refused = {
            "/connect": [
                CONSENT_AUDIENCE,
                "https://other-app.example",
                [CONNECT_AUDIENCE, CONSENT_AUDIENCE],
            ],
            "/admin-consent": [CONNECT_AUDIENCE, "https://other-app.example"],
        }
        for path, audiences in refused.items():
            for aud in audiences:
                status, body = await _answer(stack, path, mint_link(stack, "acc-aud", aud=aud))
                assert status == 403, (path, aud, status)
                assert body is not None
                assert body["error"]["code"] == "wrong_audience", body
        assert await _count(stack, USED_LINKS) == 0
        accepted = {
            "/connect": (CONNECT_AUDIENCE, [CONNECT_AUDIENCE], None),
            "/admin-consent": (CONSENT_AUDIENCE, None),
        }
        for path, audiences in accepted.items():
            for aud in audiences:
                status, _ = await _answer(stack, path, mint_link(stack, "acc-aud", aud=aud))
                assert status == 302, (path, aud, status)

"""The operator's view: ``m365sync status`` and the token-guarded operator page."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from processor.status import collect
from processor.topology import INBOUND_EXCHANGE
from tests.e2e.harness import Stack, api, converged, eventually, running_stack, timed_event
from tests.support.chromium import ensure_chromium, headless_chromium

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".run" / "artifacts"


async def _cli(stack: Stack, *args: str) -> str:
    """Run the real ``m365sync`` console entry point against the stack's services."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "processor.cli",
        *args,
        env={**os.environ, **stack.env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _synced_stack_with_traffic(stack: Stack) -> str:
    """Connect one account, make Outlook changes and wait until they are stored."""
    user_id = (await stack.control.users())[0]["id"]
    await stack.connect_account("acc-op", user_id)
    for n in range(6):
        await stack.control.create_event(
            user_id, timed_event(f"Ops {n}", days=n + 1), immutable=True
        )
    await eventually(lambda: converged(stack, "acc-op", user_id), timeout_s=30)
    return str(user_id)


async def _lag_reported(stack: Stack) -> dict[str, Any] | None:
    facts = await collect(
        db=stack.rt.db, connection=stack.rt.connection, shard_count=stack.settings.shard_count
    )
    return facts if facts["lag"]["worker"]["samples"] > 0 else None


async def test_status_reports_accounts_subscriptions_queues_dead_letters_and_lag(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """``m365sync status --json`` counts the account by status and its subscription, lists
    every shard queue with its consumer, the lag p99 the worker recorded, the age of the
    messages a slow Graph makes the worker hold, and a dead letter with its age; the
    plain-text form shows the same tables."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        user_id = await _synced_stack_with_traffic(stack)
        await eventually(lambda: _lag_reported(stack), timeout_s=20)

        facts = json.loads(await _cli(stack, "status", "--json"))
        assert sum(facts["accounts"].values()) == 1
        assert facts["accounts"]["connected"] + facts["accounts"]["backfilling"] == 1
        assert facts["subscriptions"]["total"] == 1
        assert facts["subscriptions"]["expired"] == 0
        shards = [q for q in facts["queues"] if q["queue"].startswith("m365sync.inbound.")]
        assert len(shards) == stack.settings.shard_count
        assert all(q["exists"] and q["consumers"] == 1 for q in shards)
        worker = facts["lag"]["worker"]
        assert worker["processes"] == 1
        # One sample per broker message: the receiver may group the 6 notifications.
        assert worker["samples"] >= 1
        assert 0 <= worker["lag_p99_s"] < 60
        assert facts["lag"]["outbound"]["processes"] == 0
        assert facts["dead_letters"] == {"count": 0, "oldest_age_s": None}

        text = await _cli(stack, "status")
        assert "m365sync.inbound.0" in text
        assert "lag p99 (5 min)" in text
        assert "dead letters: 0" in text

        # A slow Graph: the worker holds the deliveries while it fetches; their age shows.
        await stack.control.set_faults(latency_ms=4000)
        for n in range(3):
            await stack.control.create_event(
                user_id, timed_event(f"Slow {n}", days=20 + n), immutable=True
            )

        async def holding() -> dict[str, Any] | None:
            facts = await collect(
                db=stack.rt.db,
                connection=stack.rt.connection,
                shard_count=stack.settings.shard_count,
            )
            aged = [
                q for q in facts["queues"] if q.get("held") and q.get("oldest_age_s") is not None
            ]
            return aged[0] if aged else None

        held = await eventually(holding, timeout_s=20, interval_s=0.3)
        assert held["queue"].startswith("m365sync.inbound.")
        assert held["oldest_age_s"] >= 0
        await stack.control.set_faults(latency_ms=0)

        # A message that is not JSON is dead-lettered at once; its age comes from a peek.
        channel = await stack.rt.connection.channel()
        exchange = await channel.get_exchange(INBOUND_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(b"not json", timestamp=datetime.now(UTC)), routing_key="shard.0"
        )
        await channel.close()

        async def dead_letter() -> dict[str, Any] | None:
            facts = json.loads(await _cli(stack, "status", "--json"))
            return facts["dead_letters"] if facts["dead_letters"]["count"] else None

        dead = await eventually(dead_letter, timeout_s=20, interval_s=0.5)
        assert dead["count"] == 1
        assert dead["oldest_age_s"] is not None
        assert dead["oldest_age_s"] >= 0
        # The peek put it back: it is still there for ``dlq list``.
        assert "body is not JSON" in await _cli(stack, "dlq", "list")


async def test_operator_page_needs_the_token_and_shows_the_facts_in_headless_chromium(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Without the token the page has no facts and the status route answers 401; in a real
    headless Chromium a wrong token is refused, the right one shows the tables, and the
    token is in neither the URL, storage nor cookies. A screenshot is kept as an artefact."""
    binary, why = ensure_chromium()
    if binary is None:
        pytest.skip(why)
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        await _synced_stack_with_traffic(stack)
        await eventually(lambda: _lag_reported(stack), timeout_s=20)
        token = stack.settings.api_tokens[0]

        status, body, _ = await api(stack, "GET", "/api/v1/operator/status", token=None)
        assert status == 401
        status, body, _ = await api(stack, "GET", "/api/v1/operator/status", token="wrong-token")
        assert status == 401
        status, body, headers = await api(stack, "GET", "/api/v1/operator/status")
        assert status == 200
        assert body["accounts"]["connected"] + body["accounts"]["backfilling"] == 1
        status, _, headers = await api(stack, "GET", "/operator", token=None)
        assert status == 200
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"

        base = f"http://127.0.0.1:{stack.port}"
        async with headless_chromium(binary, tmp_path / "chromium") as page:
            await page.goto(f"{base}/operator")
            assert await page.evaluate("document.getElementById('facts').hidden") is True
            assert "acc-op" not in await page.evaluate("document.body.innerText")

            async def sign_in(value: str) -> None:
                await page.evaluate(
                    "(() => { const i = document.getElementById('token'); i.value = "
                    + json.dumps(value)
                    + "; document.querySelector('#signin button').click(); })()"
                )

            await sign_in("not-the-token")
            await page.wait_for("document.getElementById('error').textContent.length > 0")
            assert await page.evaluate("document.getElementById('facts').hidden") is True

            await sign_in(token)
            await page.wait_for("!document.getElementById('facts').hidden")
            await page.wait_for("document.querySelectorAll('#queues tr').length > 1")
            text = await page.evaluate("document.body.innerText")
            assert "connected" in text
            assert "m365sync.inbound.0" in text
            assert "p99 (5 min)" in text.lower()
            assert await page.evaluate("document.getElementById('token').value") == ""
            assert token not in await page.evaluate("location.href")
            assert await page.evaluate("localStorage.length + sessionStorage.length") == 0
            assert await page.evaluate("document.cookie") == ""
            shot = await page.screenshot(ARTIFACTS / "operator-page.png")
            assert shot.stat().st_size > 10_000
            print(f"operator page screenshot: {shot}")

"""The standalone CLI and the control client's directory, clock and reset operations."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from graphsim.client import SimControl, SimControlError
from graphsim.server import Simulator

from .conftest import Graph, delegated_tokens, event_body


async def test_cli_prints_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`python -m graphsim` prints one JSON line when ready and exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "graphsim",
        "--port",
        "0",
        "--state-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert info["graph_url"] == info["base_url"] + "/v1.0"
        assert info["ca_file"] == str(tmp_path / "ca.pem")
        async with SimControl(info["base_url"], info["ca_file"]) as ctl:
            assert (await ctl.state())["tenant_id"] == info["tenant_id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_users_signin_and_reset(
    sim: Simulator, control: SimControl, http: aiohttp.ClientSession
) -> None:
    """A created user can be made the sign-in user; reset restores the configured directory."""
    carol = await control.create_user("Carol Example", "carol@contoso.example")
    await control.set_signin_user(carol["id"])
    token = (await delegated_tokens(sim, http))["access_token"]
    _, me, _ = await Graph(sim, http, token).call("GET", "/me")
    assert me["userPrincipalName"] == "carol@contoso.example"
    await control.create_event(carol["id"], event_body())
    await control.set_faults(latency_ms=5)
    await control.reset()
    assert [u["userPrincipalName"] for u in await control.users()] == [
        "ann@contoso.example",
        "bob@contoso.example",
    ]
    assert (await control.faults())["latency_ms"] == 0


async def test_clock_control(control: SimControl) -> None:
    """The sim clock can jump forward and run faster than real time."""
    before = (await control.clock())["now_s"]
    after = (await control.advance_clock(3600))["now_s"]
    assert after - before >= 3600
    await control.set_clock_speed(1000)
    await asyncio.sleep(0.05)
    assert (await control.clock())["now_s"] - after >= 40


async def test_control_errors_are_json(control: SimControl) -> None:
    """Control calls with bad input raise SimControlError with the status."""
    with pytest.raises(SimControlError) as caught:
        await control.set_faults(no_such_knob=1)
    assert caught.value.status == 400


async def test_request_counters(app_graph: Graph, control: SimControl, ann: str) -> None:
    """Counters split Graph requests by route kind, mailbox and status."""
    await control.reset_counters()
    await app_graph.call("GET", f"/users/{ann}/events")
    await app_graph.call("GET", f"/users/{ann}/events/AAMkAGnope")
    counters = await control.counters()
    assert counters["by_kind"] == {"events.list": 1, "events.get": 1}
    assert counters["by_mailbox"] == {ann: 2}
    assert counters["by_status"] == {"200": 1, "404": 1}

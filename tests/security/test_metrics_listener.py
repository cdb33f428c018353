"""Metrics only on the internal listener, never on the public one (issue 11 row 8)."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import pytest

from processor.settings import load_settings
from tests.e2e.harness import running_stack, service_env
from tests.e2e.processes import RoleProcess

pytestmark = pytest.mark.e2e


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(trust_env=False) as http, http.get(url) as resp:
        return resp.status, await resp.text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_listener_defaults_to_loopback_9464() -> None:
    """Unless configured, the internal listener binds 127.0.0.1:9464, not the public host."""
    settings = load_settings({}, required=frozenset())
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9464)
    assert settings.http_host == "0.0.0.0"  # the public listener's, for contrast
    configured = load_settings(
        {"M365SYNC_METRICS_HOST": "10.0.0.5", "M365SYNC_METRICS_PORT": "9100"},
        required=frozenset(),
    )
    assert (configured.metrics_host, configured.metrics_port) == ("10.0.0.5", 9100)


async def test_public_listener_has_no_metrics(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """/metrics on the public port is 404 (a prober learns no rejection counters); the
    internal listener serves it, with health and readiness."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        public = f"http://127.0.0.1:{stack.port}"
        status, body = await _get(f"{public}/metrics")
        assert status == 404, body
        assert "m365sync_notifications_rejected_total" not in body
        assert (await _get(f"{public}/healthz"))[0] == 200
        internal = f"http://127.0.0.1:{stack.metrics_port}"
        status, body = await _get(f"{internal}/metrics")
        assert status == 200
        assert "m365sync_notifications_received_total" in body
        assert (await _get(f"{internal}/readyz"))[0] == 200


async def test_a_worker_process_serves_metrics_on_the_internal_listener(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """``m365sync worker`` (no public HTTP listener) serves /metrics and /healthz on
    M365SYNC_METRICS_HOST:M365SYNC_METRICS_PORT."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=()
    ) as stack:
        port = _free_port()
        env = service_env(
            sim=stack.sim,
            amqp_url=amqp_url,
            mongodb_url=mongodb_url,
            public_url="http://127.0.0.1:9",
            M365SYNC_METRICS_PORT=str(port),
        )
        worker = await RoleProcess("worker", env, tmp_path / "worker.log").start()
        try:
            await worker.wait_log("process.ready", timeout_s=60)
            status, body = await _get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            assert "m365sync_" in body
            assert (await _get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
        finally:
            assert await worker.stop() == 0, worker.tail()

"""The simulator listening on a wildcard address names a public host in its URLs (compose stack)."""

from __future__ import annotations

import ssl

import aiohttp

from graphsim.server import SimConfig, Simulator


async def test_wildcard_listener_advertises_the_public_host_with_a_matching_certificate(tmp_path):
    """With host 0.0.0.0 and public_host 127.0.0.1, discovery names 127.0.0.1 and its certificate verifies there."""
    sim = Simulator(
        SimConfig(host="0.0.0.0", public_host="127.0.0.1", port=0, state_dir=tmp_path / "sim")
    )
    await sim.start()
    try:
        assert sim.base_url.startswith("https://127.0.0.1:")
        tls = ssl.create_default_context(cafile=str(sim.ca_file))
        url = f"{sim.base_url}/{sim.tenant_id}/v2.0/.well-known/openid-configuration"
        async with aiohttp.ClientSession() as session, session.get(url, ssl=tls) as response:
            assert response.status == 200
            discovery = await response.json()
        assert discovery["token_endpoint"].startswith(sim.base_url)
        assert discovery["issuer"].startswith("https://127.0.0.1:")
    finally:
        await sim.stop()

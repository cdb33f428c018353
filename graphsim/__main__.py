"""`python -m graphsim`: run the simulator standalone until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from .server import DEFAULT_CLIENT_ID, DEFAULT_TENANT_ID, SimConfig, Simulator


def _parse(argv: list[str] | None) -> SimConfig:
    parser = argparse.ArgumentParser(
        prog="graphsim", description="Microsoft Graph + identity simulator"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument(
        "--public-host",
        default=None,
        help="host its URLs name when --host is a wildcard (default: --host)",
    )
    parser.add_argument("--state-dir", type=Path, default=Path(".graphsim"))
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=SimConfig.client_secret)
    parser.add_argument("--tenant-id", default=DEFAULT_TENANT_ID)
    parser.add_argument("--tenant-domain", default="contoso.example")
    parser.add_argument("--clock-speed", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redirect-uri",
        action="append",
        default=[],
        help="registered redirect URI (repeatable; none = accept any)",
    )
    parser.add_argument("--notification-ca-file", type=Path, default=None)
    parser.add_argument("--no-verify-notification-tls", action="store_true")
    args = parser.parse_args(argv)
    return SimConfig(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        client_id=args.client_id,
        client_secret=args.client_secret,
        tenant_id=args.tenant_id,
        tenant_domain=args.tenant_domain,
        users=(
            ("Ann Example", f"ann@{args.tenant_domain}"),
            ("Bob Example", f"bob@{args.tenant_domain}"),
        ),
        redirect_uris=tuple(args.redirect_uri),
        clock_speed=args.clock_speed,
        seed=args.seed,
        notification_ca_file=args.notification_ca_file,
        public_host=args.public_host,
        verify_notification_tls=not args.no_verify_notification_tls,
    )


async def _run(config: SimConfig) -> None:
    sim = Simulator(config)
    await sim.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps(sim.describe()) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    asyncio.run(_run(_parse(argv)))


if __name__ == "__main__":
    main()

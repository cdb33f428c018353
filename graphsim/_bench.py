"""`python -m graphsim._bench`: requests per second of GET /v1.0/me/events/{id} over HTTPS.

The simulator runs in a child process (`python -m graphsim`) so that the load generator does
not share its event loop; N concurrent workers reuse keep-alive connections for D seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import secrets
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from .client import SimControl


async def _token(http: aiohttp.ClientSession, state: dict[str, str]) -> str:
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    redirect = "http://localhost/cb"
    params = {
        "client_id": state["client_id"],
        "response_type": "code",
        "redirect_uri": redirect,
        "scope": "Calendars.ReadWrite User.Read",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with http.get(
        f"{state['authority']}/oauth2/v2.0/authorize", params=params, allow_redirects=False
    ) as resp:
        code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "client_id": state["client_id"],
        "client_secret": state["client_secret"],
        "code": code,
        "redirect_uri": redirect,
        "code_verifier": verifier,
    }
    async with http.post(f"{state['authority']}/oauth2/v2.0/token", data=form) as resp:
        return str((await resp.json())["access_token"])


async def _bench(concurrency: int, duration_s: float, keep_limits: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "graphsim",
            "--port",
            "0",
            "--state-dir",
            tmp,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            state = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            ctx = ssl.create_default_context(cafile=state["ca_file"])
            async with SimControl(state["base_url"], Path(state["ca_file"])) as ctl:
                if not keep_limits:
                    await ctl.set_faults(
                        max_concurrent_per_mailbox=100_000, mailbox_budget=10_000_000
                    )
                ann = state["users"][0]["id"]
                event = await ctl.create_event(
                    ann,
                    {
                        "subject": "bench",
                        "start": {"dateTime": "2026-12-03T09:00:00", "timeZone": "UTC"},
                        "end": {"dateTime": "2026-12-03T10:00:00", "timeZone": "UTC"},
                    },
                )
            connector = aiohttp.TCPConnector(ssl=ctx, limit=concurrency)
            async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
                token = await _token(http, state)
                url = f"{state['graph_url']}/me/events/{event['id']}"
                headers = {"Authorization": f"Bearer {token}"}
                statuses: Counter[int] = Counter()
                latencies: list[float] = []
                stop_at = time.monotonic() + duration_s

                async def worker() -> None:
                    while time.monotonic() < stop_at:
                        started = time.monotonic()
                        async with http.get(url, headers=headers) as resp:
                            await resp.read()
                            statuses[resp.status] += 1
                        latencies.append(time.monotonic() - started)

                began = time.monotonic()
                await asyncio.gather(*[worker() for _ in range(concurrency)])
                elapsed = time.monotonic() - began
            latencies.sort()
            total = sum(statuses.values())
            return {
                "route": "GET /v1.0/me/events/{id}",
                "concurrency": concurrency,
                "duration_s": round(elapsed, 2),
                "requests": total,
                "rps": round(total / elapsed, 1),
                "rps_2xx": round(sum(v for k, v in statuses.items() if k < 300) / elapsed, 1),
                "statuses": dict(statuses),
                "p50_ms": round(statistics.median(latencies) * 1000, 2),
                "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
                "per_mailbox_limit": "kept (4)" if keep_limits else "lifted",
                "cpus": os.cpu_count(),
            }
        finally:
            proc.terminate()
            await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m graphsim._bench")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument(
        "--keep-limits",
        action="store_true",
        help="keep the 4-concurrent-per-mailbox limit (most requests get 429)",
    )
    args = parser.parse_args()
    result = asyncio.run(_bench(args.concurrency, args.duration, args.keep_limits))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

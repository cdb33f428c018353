"""``python -m bench.receiver``: notifications accepted per second, real receiver vs bare 202.

The real receiver is ``python -m processor.cli receiver`` (production entry point): every
POST is checked against the subscription store on FerretDB (briefly cached) and answered
202 only after RabbitMQ confirmed the message into its quorum shard queue. The baseline
is a bare aiohttp server (``bench._bare``) that reads the body and answers 202. Both are
driven by the same client in this process (N concurrent posters, one notification per
POST), one server at a time, alternating over several rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aio_pika
import aiohttp
from pymongo import AsyncMongoClient

from bench._common import (
    Backends,
    ChildProcess,
    CpuMeter,
    command_delta,
    database_commands,
    free_port,
    header,
    log_directory,
    ms,
    percentile,
    private_backends,
    quiet_driver_logs,
    role_process,
    service_env,
    service_pids,
    wait_ready,
)
from crypto import CipherCache, Hasher, KeyRing
from processor.settings import load_settings
from processor.store import Store
from processor.timeutil import utcnow
from processor.topology import INBOUND_QUEUE

TENANT_ID = "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"
CLIENT_STATE = "bench-client-state-7f3e91-long-enough"


@dataclass(frozen=True)
class Mailbox:
    """A seeded account's subscription, as Graph would name it in a notification."""

    subscription_id: str
    user_id: str


@dataclass(frozen=True)
class LoadResult:
    """What one timed run of the client saw."""

    requests: int
    elapsed_s: float
    statuses: Counter[int]
    latencies_s: list[float]

    @property
    def rate(self) -> float:
        return self.statuses[202] / self.elapsed_s

    def line(self, label: str) -> str:
        other = {k: v for k, v in self.statuses.items() if k != 202}
        errors = f"  non-202: {dict(other)}" if other else ""
        return (
            f"   {label:<22} {self.rate:8.0f} accepted/s   "
            f"p50 {ms(percentile(self.latencies_s, 50)):>9}   "
            f"p99 {ms(percentile(self.latencies_s, 99)):>9}   "
            f"({self.requests} POSTs in {self.elapsed_s:.2f} s){errors}"
        )


async def seed(env: dict[str, str], accounts: int) -> list[Mailbox]:
    """Accounts with a bound identity and one subscription each, under the service's keys."""
    settings = load_settings(env)
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        settings.mongodb_url, tz_aware=True
    )
    try:
        store = Store(
            db=client[settings.database_name],
            keyring=KeyRing(settings.master_keys),
            hasher=Hasher(settings.hash_key),
            cipher_cache=CipherCache(),
        )
        mailboxes = []
        for n in range(accounts):
            account_id = f"bench-acc-{n:03d}"
            mailbox = Mailbox(subscription_id=str(uuid.uuid4()), user_id=str(uuid.uuid4()))
            await store.accounts.create(account_id)
            await store.accounts.bind_identity(
                account_id, user_id=mailbox.user_id, tenant_id=TENANT_ID
            )
            await store.subscriptions.save(
                account_id,
                subscription_id=mailbox.subscription_id,
                client_state=CLIENT_STATE,
                user_id=mailbox.user_id,
                tenant_id=TENANT_ID,
                expires_at=utcnow() + timedelta(days=2),
            )
            mailboxes.append(mailbox)
        return mailboxes
    finally:
        await client.close()


def notification_body(mailbox: Mailbox, n: int) -> bytes:
    """A one-item changeNotificationCollection as Graph posts it (Graph-length event id)."""
    event_id = f"AAMkAGI2THVSAAA{n:012d}" + "A" * 120
    resource = f"Users/{mailbox.user_id}/Events/{event_id}"
    item = {
        "subscriptionId": mailbox.subscription_id,
        "subscriptionExpirationDateTime": "2031-05-14T09:30:00.0000000+00:00",
        "changeType": "updated",
        "resource": resource,
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Event",
            "@odata.id": resource,
            "@odata.etag": 'W/"DwAAABYAAAB"',
            "id": event_id,
        },
        "clientState": CLIENT_STATE,
        "tenantId": TENANT_ID,
    }
    return json.dumps({"value": [item]}).encode()


async def drive(
    url: str, bodies: Iterator[bytes], *, count: int, concurrency: int, http: aiohttp.ClientSession
) -> LoadResult:
    """POST ``count`` bodies with ``concurrency`` posters; latency per request."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    remaining = count
    headers = {"Content-Type": "application/json"}

    async def poster() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            body = next(bodies)
            started = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                statuses[resp.status] += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(poster() for _ in range(concurrency)))
    return LoadResult(count, time.perf_counter() - started, statuses, latencies)


async def measure(
    port: int,
    bodies: Iterator[bytes],
    *,
    warmup: int,
    requests: int,
    concurrency: int,
    meter: CpuMeter,
    mongodb_url: str,
) -> tuple[LoadResult, LoadResult, str]:
    """Warm up (connections, caches), then the timed run, on one client session."""
    url = f"http://127.0.0.1:{port}/graph/notifications"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        warm = await drive(url, bodies, count=warmup, concurrency=concurrency, http=http)
        commands = await database_commands(mongodb_url)
        meter.start()
        timed = await drive(url, bodies, count=requests, concurrency=concurrency, http=http)
        cpu = meter.stop()
        db = command_delta(commands, await database_commands(mongodb_url))
        return warm, timed, f"{cpu}\n   {'':<22} database commands (server-wide): {db}"


async def queued_messages(backends: Backends, shard_count: int) -> int:
    """Messages sitting in the inbound shard queues (passive declare: exact, not sampled)."""
    connection = await aio_pika.connect(backends.amqp_url)
    try:
        channel = await connection.channel()
        total = 0
        for shard in range(shard_count):
            queue = await channel.declare_queue(INBOUND_QUEUE.format(shard=shard), passive=True)
            total += queue.declaration_result.message_count or 0
        return total
    finally:
        await connection.close()


async def run(args: argparse.Namespace) -> None:
    header("bench.receiver: notifications accepted per second, real receiver vs bare 202")
    print(
        f"   {args.requests} timed POSTs (1 notification each) after {args.warmup} warm-up, "
        f"{args.concurrency} concurrent posters, {args.accounts} accounts, "
        f"{args.rounds} alternating rounds, receiver log level {args.log_level}"
    )
    async with private_backends("receiver") as backends:
        with log_directory(args.log_dir, "receiver") as log_dir:
            quiet_driver_logs(log_dir)
            port = free_port()
            env = service_env(backends, http_port=port, M365SYNC_LOG_LEVEL=args.log_level)
            mailboxes = await seed(env, args.accounts)
            counter = iter(range(10**9))
            bodies = (notification_body(mailboxes[n % len(mailboxes)], n) for n in counter)
            bare_results: list[LoadResult] = []
            real_results: list[LoadResult] = []
            accepted = 0
            for round_no in range(1, args.rounds + 1):
                for kind in ("bare", "real"):
                    if kind == "bare":
                        server = ChildProcess(
                            "bare", [sys.executable, "-m", "bench._bare", str(port)], {}, log_dir
                        )
                    else:
                        server = role_process("receiver", env, log_dir)
                        if args.profile_dir:
                            server.argv = [
                                sys.executable, "-m", "pyinstrument", "-r", "text", "-o",
                                str(Path(args.profile_dir) / f"receiver-{round_no}.txt"),
                                "-m", "processor.cli", "receiver",
                            ]  # fmt: skip
                    await server.start()
                    try:
                        await wait_ready(port)
                        meter = CpuMeter(
                            {"server": server.pid, "client": os.getpid(), **service_pids()}
                        )
                        warm, result, cpu = await measure(
                            port,
                            bodies,
                            warmup=args.warmup,
                            requests=args.requests,
                            concurrency=args.concurrency,
                            meter=meter,
                            mongodb_url=backends.mongodb_url,
                        )
                    finally:
                        await server.stop()
                    label = f"round {round_no} " + ("bare 202" if kind == "bare" else "receiver")
                    print(result.line(label), flush=True)
                    print(f"   {'':<22} {cpu}", flush=True)
                    (bare_results if kind == "bare" else real_results).append(result)
                    if kind == "real":
                        accepted += warm.statuses[202] + result.statuses[202]
            settings = load_settings(env)
            queued = await queued_messages(backends, settings.shard_count)
    bare = statistics.mean(r.rate for r in bare_results)
    real = statistics.mean(r.rate for r in real_results)
    ratio = real / bare
    bare_lat = [x for r in bare_results for x in r.latencies_s]
    real_lat = [x for r in real_results for x in r.latencies_s]
    print(
        f"   bare 202 (all rounds)  {bare:8.0f} accepted/s   "
        f"p50 {ms(percentile(bare_lat, 50)):>9}   p99 {ms(percentile(bare_lat, 99)):>9}"
    )
    print(
        f"   receiver (all rounds)  {real:8.0f} accepted/s   "
        f"p50 {ms(percentile(real_lat, 50)):>9}   p99 {ms(percentile(real_lat, 99)):>9}"
    )
    verdict = "met" if ratio >= 0.5 else "MISSED"
    print(f"   ratio receiver/bare: {ratio:.2f}  (goal >= 0.5: {verdict})")
    print(
        f"   broker check: {queued} messages in the inbound shard queues; "
        f"{accepted} POSTs answered 202 by the receiver (warm-up included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="timed POSTs per run")
    parser.add_argument("--warmup", type=int, default=300, help="untimed POSTs before each run")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent posters")
    parser.add_argument("--accounts", type=int, default=20, help="seeded subscriptions")
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/real rounds")
    parser.add_argument("--log-level", default="info", help="the receiver's M365SYNC_LOG_LEVEL")
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="run the receiver under pyinstrument (must be installed), text report in this "
        "directory; the numbers are then distorted by the profiler",
    )
    parser.add_argument("--log-dir", default=None, help="keep the processes' logs here")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

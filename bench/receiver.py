"""``python -m bench.receiver``: notifications accepted per second, receiver vs raw publishes.

The real receiver is ``python -m processor.cli receiver`` (production entry point): every
POST is checked against the subscription store on FerretDB (briefly cached) and answered
202 only after RabbitMQ confirmed the group-committed message(s) holding its items into the
quorum shard queues. The goal's baseline is raw aio-pika confirmed publishes of the same
notifications from this process, one message each, as many in flight as there are posters.
For context, a bare aiohttp server (``bench._bare``) that answers 202, and the same server
making one confirmed publish per POST (``bare+publish``). The servers are driven by the
same client in this process (N concurrent posters), one at a time, for each number of
notifications per POST.
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
    bench_parser,
    free_port,
    header,
    log_directory,
    ms,
    percentile,
    private_backends,
    quiet_driver_logs,
    role_process,
    run_bench,
    service_env,
    service_pids,
    wait_ready,
)
from crypto import CipherCache, Hasher, KeyRing
from handlers.timeutil import utcnow
from processor.settings import load_settings
from processor.store import Store
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
    """What one timed run saw: POSTs (or raw publishes) and the notifications they carried."""

    requests: int
    elapsed_s: float
    statuses: Counter[int]
    latencies_s: list[float]
    items_per_request: int = 1

    @property
    def rate(self) -> float:
        """Notifications accepted (answered 202, or confirmed) per second."""
        return self.statuses[202] * self.items_per_request / self.elapsed_s

    def line(self, label: str) -> str:
        other = {k: v for k, v in self.statuses.items() if k != 202}
        errors = f"  non-202: {dict(other)}" if other else ""
        return (
            f"   {label:<26} {self.rate:8.0f} notifications/s   "
            f"p50 {ms(percentile(self.latencies_s, 50)):>9}   "
            f"p99 {ms(percentile(self.latencies_s, 99)):>9}   "
            f"({self.requests} x {self.items_per_request} in {self.elapsed_s:.2f} s){errors}"
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


def notification_item(mailbox: Mailbox, n: int) -> dict[str, object]:
    """One change notification as Graph posts it (Graph-length event id)."""
    event_id = f"AAMkAGI2THVSAAA{n:012d}" + "A" * 120
    resource = f"Users/{mailbox.user_id}/Events/{event_id}"
    return {
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


def notification_bodies(mailboxes: list[Mailbox], items: int) -> Iterator[bytes]:
    """Endless changeNotificationCollections of ``items`` distinct events of one mailbox each."""
    for n in range(10**9):
        mailbox = mailboxes[n % len(mailboxes)]
        value = [notification_item(mailbox, n * items + k) for k in range(items)]
        yield json.dumps({"value": value}).encode()


def item_bodies(mailboxes: list[Mailbox]) -> Iterator[bytes]:
    """The raw baseline's message bodies: one notification each, as the receiver gets it."""
    for n in range(10**9):
        yield json.dumps({"value": [notification_item(mailboxes[n % len(mailboxes)], n)]}).encode()


async def drive(
    url: str,
    bodies: Iterator[bytes],
    *,
    seconds: float,
    concurrency: int,
    items: int,
    http: aiohttp.ClientSession,
) -> LoadResult:
    """POST bodies with ``concurrency`` posters for ``seconds``; latency per request."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    headers = {"Content-Type": "application/json"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def poster() -> None:
        while loop.time() < deadline:
            body = next(bodies)
            started = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                statuses[resp.status] += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(poster() for _ in range(concurrency)))
    return LoadResult(
        len(latencies), time.perf_counter() - started, statuses, latencies, items_per_request=items
    )


async def measure(
    port: int,
    bodies: Iterator[bytes],
    *,
    warmup_s: float,
    seconds: float,
    concurrency: int,
    items: int,
    meter: CpuMeter,
) -> tuple[LoadResult, LoadResult, str]:
    """Warm up (connections, caches), then the timed run, on one client session."""
    url = f"http://127.0.0.1:{port}/graph/notifications"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        warm = await drive(
            url, bodies, seconds=warmup_s, concurrency=concurrency, items=items, http=http
        )
        meter.start()
        timed = await drive(
            url, bodies, seconds=seconds, concurrency=concurrency, items=items, http=http
        )
        return warm, timed, meter.stop()


RAW_QUEUE = "bench.raw-publish"


async def raw_publishes(
    backends: Backends,
    bodies: Iterator[bytes],
    *,
    seconds: float,
    concurrency: int,
    meter: CpuMeter,
) -> tuple[LoadResult, str]:
    """The broker's own rate: confirmed persistent publishes into a quorum queue.

    One message per notification, ``concurrency`` publishes in flight, through aio-pika
    from this process, as the receiver would publish them without any work of its own.
    """
    connection = await aio_pika.connect(backends.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(
            RAW_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        loop = asyncio.get_running_loop()

        async def publisher(deadline: float) -> None:
            while loop.time() < deadline:
                message = aio_pika.Message(
                    next(bodies),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=uuid.uuid4().hex,
                )
                started = time.perf_counter()
                await channel.default_exchange.publish(
                    message, routing_key=RAW_QUEUE, mandatory=True
                )
                statuses[202] += 1
                latencies.append(time.perf_counter() - started)

        warm_deadline = loop.time() + 1.0
        await asyncio.gather(*(publisher(warm_deadline) for _ in range(concurrency)))
        statuses.clear()
        latencies.clear()
        meter.start()
        started = time.perf_counter()
        deadline = loop.time() + seconds
        await asyncio.gather(*(publisher(deadline) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        await queue.purge()
        return LoadResult(len(latencies), elapsed, statuses, latencies), cpu
    finally:
        await connection.close()


async def purge_raw(backends: Backends) -> None:
    """Empty the raw-publish queue (filled by the raw baseline and by ``bare+publish``)."""
    connection = await aio_pika.connect(backends.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(RAW_QUEUE, passive=True)
        await queue.purge()
    finally:
        await connection.close()


async def queued_notifications(backends: Backends, shard_count: int) -> tuple[int, int]:
    """Messages in the inbound shard queues and the notifications they carry (read them all).

    The shard queues are single-active-consumer quorum queues, which refuse ``basic.get``:
    each is consumed (no ack) until its passively declared count has arrived.
    """
    connection = await aio_pika.connect(backends.amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        messages = notifications = 0
        for shard in range(shard_count):
            queue = await channel.declare_queue(INBOUND_QUEUE.format(shard=shard), passive=True)
            count = queue.declaration_result.message_count or 0
            if not count:
                continue
            seen = 0
            async with queue.iterator(no_ack=True) as stream:
                async for message in stream:
                    body = json.loads(message.body)
                    notifications += len(body["items"]) if body.get("kind") == "changes" else 1
                    seen += 1
                    if seen == count:
                        break
            messages += seen
        return messages, notifications
    finally:
        await connection.close()


async def run(args: argparse.Namespace) -> None:
    header("bench.receiver: notifications accepted per second: receiver vs raw publishes")
    items_list = [int(x) for x in args.items.split(",")]
    print(
        f"   {args.seconds:.0f} s timed per phase after {args.warmup:.0f} s warm-up, "
        f"{args.concurrency} concurrent posters / publishes in flight, {args.accounts} accounts, "
        f"{args.rounds} round(s), items per POST {items_list}, "
        f"receiver log level {args.log_level}"
    )
    async with private_backends("receiver") as backends:
        with log_directory(args.log_dir, "receiver") as log_dir:
            quiet_driver_logs(log_dir)
            port = free_port()
            env = service_env(backends, http_port=port, M365SYNC_LOG_LEVEL=args.log_level)
            mailboxes = await seed(env, args.accounts)
            results: dict[tuple[str, int], list[LoadResult]] = {}
            cpu_per_post: dict[tuple[str, int], list[float]] = {}
            accepted = 0
            for round_no in range(1, args.rounds + 1):
                for items in items_list:
                    raw, cpu = await raw_publishes(
                        backends,
                        item_bodies(mailboxes),
                        seconds=args.seconds,
                        concurrency=args.concurrency,
                        meter=CpuMeter({"client": os.getpid(), **service_pids()}),
                    )
                    print(raw.line(f"r{round_no} raw publish"), flush=True)
                    print(f"   {'':<26} {cpu}", flush=True)
                    results.setdefault(("raw", items), []).append(raw)
                    for kind in ("bare", "bare+publish", "real"):
                        if kind != "real":
                            publish = [backends.amqp_url, RAW_QUEUE] if "publish" in kind else []
                            server = ChildProcess(
                                kind,
                                [sys.executable, "-m", "bench._bare", str(port), *publish],
                                {},
                                log_dir,
                            )
                        else:
                            server = role_process("receiver", env, log_dir)
                            if args.profile_dir:
                                server.argv = [
                                    sys.executable, "-m", "pyinstrument", "-r", "text", "-o",
                                    str(Path(args.profile_dir) / f"receiver-{items}.txt"),
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
                                notification_bodies(mailboxes, items),
                                warmup_s=args.warmup,
                                seconds=args.seconds,
                                concurrency=args.concurrency,
                                items=items,
                                meter=meter,
                            )
                        finally:
                            await server.stop()
                        name = {"bare": "bare 202", "real": "receiver"}.get(kind, kind)
                        if kind == "bare+publish":
                            await purge_raw(backends)
                        print(result.line(f"r{round_no} {name} x{items}"), flush=True)
                        per_post = meter.spent.get("server", 0.0) / max(result.requests, 1)
                        print(
                            f"   {'':<26} {cpu}; server CPU {per_post * 1000:.2f} ms per POST",
                            flush=True,
                        )
                        results.setdefault((kind, items), []).append(result)
                        cpu_per_post.setdefault((kind, items), []).append(per_post)
                        if kind == "real":
                            accepted += (warm.statuses[202] + result.statuses[202]) * items
            settings = load_settings(env)
            queued, carried = await queued_notifications(backends, settings.shard_count)
    print("   summary (mean over rounds, notifications per second):")
    for items in items_list:
        raw = statistics.mean(r.rate for r in results[("raw", items)])
        bare = statistics.mean(r.rate for r in results[("bare", items)])
        bare_publish = statistics.mean(r.rate for r in results[("bare+publish", items)])
        real = statistics.mean(r.rate for r in results[("real", items)])
        real_cpu = statistics.mean(cpu_per_post[("real", items)]) * 1000
        bare_cpu = statistics.mean(cpu_per_post[("bare", items)]) * 1000
        ratio = real / raw
        verdict = "met" if ratio >= 0.8 else "MISSED"
        print(
            f"   {items:>3} per POST: raw publish {raw:8.0f}  bare 202 {bare:8.0f}  "
            f"bare+publish {bare_publish:8.0f} ({bare_publish / raw:.3f} of raw)  "
            f"receiver {real:8.0f}   receiver/raw {ratio:.3f} (goal >= 0.8: {verdict})   "
            f"server CPU per POST: receiver {real_cpu:.2f} ms, bare {bare_cpu:.2f} ms"
        )
    print(
        f"   broker check: {queued} messages in the inbound shard queues carry {carried} "
        f"notifications; the receiver answered 202 for {accepted} notifications "
        f"(warm-up included)"
    )


def main() -> None:
    parser = bench_parser("receiver", __doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="concurrent posters / publishes in flight"
    )
    parser.add_argument("--items", default="1,10", help="notifications per POST, comma-separated")
    parser.add_argument("--accounts", type=int, default=20, help="seeded subscriptions")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of raw/bare/receiver")
    parser.add_argument("--log-level", default="info", help="the receiver's M365SYNC_LOG_LEVEL")
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="run the receiver under pyinstrument (must be installed), text report in this "
        "directory; the numbers are then distorted by the profiler",
    )
    run_bench(parser, run)


if __name__ == "__main__":
    main()

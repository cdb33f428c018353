"""``python -m bench.burst``: 500 edits at once on one big mailbox, each notified three times.

Real processes: the Graph simulator, a receiver and a worker, on a private vhost and
database of the shared services. Two mailboxes side by side, one with 1,000 and one with
10,000 events, each synced (seeded by the same delta pass the worker runs, in the driver,
so that seeding 10,000 events stays short; it is not measured). Then 500 of a mailbox's
events are edited at once in Outlook, Graph notifying every change three times. Measured
per mailbox:

- seconds from the first edit until the database holds every edited version and
  ``onerelation.inbound`` carries an ``event.upserted`` for every edited event;
- Graph requests made by the service per change (the simulator's counters);
- cost per change (those seconds / 500) at 10,000 events against 1,000.

Goals (issue 10, 12): at most 15 s at 1,000 events, at most 0.5 Graph requests per change,
per-change cost at 10,000 within 1.5x that at 1,000. The database behind
``M365SYNC_MONGODB_URL`` (default 127.0.0.1:27017) is reported as found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil

from bench._common import (
    CpuMeter,
    bench_parser,
    free_port,
    header,
    log_directory,
    private_backends,
    quiet_driver_logs,
    role_process,
    run_bench,
    service_env,
    service_pids,
    simulator_process,
    wait_ready,
)
from bench._stack import connect_accounts, driver_runtime
from graphsim.client import SimControl
from handlers.delta import DeltaRunner, DeltaSettings
from handlers.inbound import SyncWindow
from processor.app import Runtime
from processor.topology import ONERELATION_INBOUND_QUEUE
from processor.verify import diff_account, expected_events


async def _database_kind(rt: Runtime) -> str:
    """What answers on the MongoDB URL: FerretDB names itself in ``buildInfo`` but not its
    backend, so a PostgreSQL server running on this machine is taken as its backend."""
    info = await rt.db.client.admin.command("buildInfo")
    if "ferretdbVersion" not in info:
        return f"MongoDB {info.get('version', '?')}"
    postgres = any(
        (p.info.get("name") or "").startswith("postgres") for p in psutil.process_iter(["name"])
    )
    backend = "PostgreSQL (a postgres server runs here)" if postgres else "SQLite (no PostgreSQL)"
    return f"FerretDB {info['ferretdbVersion']}, backend {backend}"


async def _drain_announcements(rt: Runtime, into: dict[str, int]) -> None:
    channel = await rt.connection.channel()
    try:
        queue = await channel.get_queue(ONERELATION_INBOUND_QUEUE, ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            body = json.loads(message.body)
            if message.routing_key == "event.upserted":
                into[body["event_key"]] = into.get(body["event_key"], 0) + 1
    finally:
        await channel.close()


async def _seed(
    rt: Runtime, control: SimControl, account_id: str, user_id: str, count: int
) -> None:
    start = (datetime.now(UTC) - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    for offset in range(0, count, 2000):
        await control.bulk_create_events(
            user_id,
            count=min(2000, count - offset),
            start=(start + timedelta(minutes=30 * offset)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            spacing_minutes=30,
            subject_prefix=f"Seed {offset}",
            notify=False,
        )
    window = SyncWindow(rt.settings.sync_window_past_days, rt.settings.sync_window_future_days)
    runner = DeltaRunner(
        links=rt.links,
        store=rt.store,
        delta_links=rt.store.sync_state,
        events=rt.events,
        graph=rt.graph,
        statuses=rt.statuses,
        window=window,
        settings=DeltaSettings(page_size=500, upsert_concurrency=8),
    )
    cipher = await rt.store.keys.cipher_for(account_id)
    identity = await rt.store.accounts.identity(account_id)
    await runner(account_id, cipher, identity.user_id, True, "connect")
    await _drain_announcements(rt, {})


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _burst(
    rt: Runtime,
    control: SimControl,
    account_id: str,
    user_id: str,
    edits: int,
    timeout_s: float,
    pids: dict[str, int],
) -> dict[str, Any]:
    ids = [e["id"] for e in await control.events(user_id, immutable=True)][:edits]
    await control.set_faults(notify_copies=3)
    await control.reset_counters()
    gate = asyncio.Semaphore(32)
    wanted: dict[str, str] = {}  # event key -> changeKey hash of the edited version

    async def edit(n: int, event_id: str) -> None:
        async with gate:
            after = await control.update_event(
                user_id, event_id, {"subject": f"Burst edit {n}"}, immutable=True
            )
        key = rt.events.event_key(account_id, event_id)
        wanted[key] = rt.events.change_key_hash(account_id, str(after["changeKey"]))

    meter = CpuMeter({**pids, **service_pids()})
    worker_cpu = _cpu_s(pids["worker"])
    meter.start()
    started = time.monotonic()
    await asyncio.gather(*(edit(n, gid) for n, gid in enumerate(ids)))
    edits_done = time.monotonic() - started
    announced: dict[str, int] = {}
    # A change is announced only after its version is written, so the announcements are
    # polled (the broker, not the database under test); the versions are checked after.
    while not all(k in announced for k in wanted):
        await _drain_announcements(rt, announced)
        if time.monotonic() - started > timeout_s:
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    cpu = meter.stop()
    worker_cpu = _cpu_s(pids["worker"]) - worker_cpu
    stored_ok = 0
    for key, change_key in wanted.items():
        doc = await rt.events.collection.find_one({"_id": key}, {"ck": 1})
        stored_ok += doc is not None and doc.get("ck") == change_key
    await control.wait_idle(timeout_s=30)
    counters = await control.counters()
    await control.set_faults(notify_copies=0)
    diff = await diff_account(
        rt.store,
        rt.events,
        account_id,
        expected_events(
            await control.events(user_id, immutable=True),
            await control.calendar_view(
                user_id,
                (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                (datetime.now(UTC) + timedelta(days=365)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                immutable=True,
            ),
        ),
    )
    return {
        "seconds": elapsed,
        "edits_made_s": edits_done,
        "stored": stored_ok,
        "announced": sum(1 for k in wanted if k in announced),
        "requests": counters["total"],
        "by_kind": counters["by_kind"],
        "converged": diff.ok,
        "cpu": cpu,
        "worker_cpu_s": worker_cpu,
    }


async def run(args: argparse.Namespace) -> None:
    header("bench.burst: 500 edits at once on one mailbox, each notified three times")
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[int, dict[str, Any]] = {}
    async with private_backends("burst") as backends:
        with log_directory(args.log_dir, "burst") as log_dir:
            quiet_driver_logs(log_dir)
            async with (
                simulator_process(log_dir) as (sim, state),
                SimControl(state["base_url"], state["ca_file"]) as control,
            ):
                await control.set_faults(delivery_retry_base_s=0.05, delivery_retry_cap_s=0.5)
                port = free_port()
                env = service_env(backends, http_port=port, sim=state, M365SYNC_SHARDS="4")
                receiver = await role_process("receiver", env, log_dir).start()
                worker = await role_process("worker", env, log_dir).start()
                try:
                    await wait_ready(port)
                    await worker.wait_log("process.ready")
                    async with driver_runtime(env) as rt:
                        print(f"   database: {await _database_kind(rt)}")
                        accounts = list(
                            (
                                await connect_accounts(
                                    rt, control, state, len(sizes), subscribe=True
                                )
                            ).items()
                        )
                        for size, (account_id, user_id) in zip(sizes, accounts, strict=True):
                            seeded = time.monotonic()
                            await _seed(rt, control, account_id, user_id, size)
                            print(
                                f"   {size:>6} events seeded in {time.monotonic() - seeded:.1f} s "
                                "(not measured)"
                            )
                            results[size] = await _burst(
                                rt,
                                control,
                                account_id,
                                user_id,
                                args.edits,
                                args.timeout,
                                {
                                    "worker": worker.pid,
                                    "receiver": receiver.pid,
                                    "graphsim": sim.pid,
                                },
                            )
                finally:
                    await worker.stop()
                    await receiver.stop()

    print()
    print(
        f"   {'events':>7} {'seconds':>8} {'s/change':>9} {'requests':>9} {'req/change':>11} "
        f"{'stored':>7} {'announced':>10} {'db = Outlook':>13}"
    )
    for size, r in results.items():
        print(
            f"   {size:>7} {r['seconds']:>8.2f} {r['seconds'] / args.edits:>9.4f} "
            f"{r['requests']:>9} {r['requests'] / args.edits:>11.3f} {r['stored']:>7} "
            f"{r['announced']:>10} {r['converged']!s:>13}"
        )
        print(
            f"           Graph requests by kind: {r['by_kind']}; "
            f"edits made in {r['edits_made_s']:.1f} s; worker CPU {r['worker_cpu_s']:.2f} s "
            f"({r['worker_cpu_s'] / args.edits * 1000:.1f} ms per change)"
        )
        print(f"           {r['cpu']}")
    if len(results) == 2:
        small, big = (results[s] for s in sizes)
        print(
            f"   per-change cost at {sizes[1]:,} vs {sizes[0]:,} events: "
            f"{big['seconds'] / small['seconds']:.2f}x in time (goal <= 1.5x), "
            f"{big['worker_cpu_s'] / small['worker_cpu_s']:.2f}x in the worker's CPU "
            "(less disturbed by other load on the machine)"
        )
    print(f"   goals: <= 15 s at {sizes[0]:,} events; <= 0.5 Graph requests per change")


def main() -> None:
    parser = bench_parser("burst", __doc__)
    parser.add_argument("--sizes", default="1000,10000", help="mailbox sizes, comma-separated")
    parser.add_argument("--edits", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on a burst after")
    run_bench(parser, run)


if __name__ == "__main__":
    main()

"""``python -m bench.load``: a sustained load across many mailboxes with Graph's faults on.

The Graph simulator (own process) pushes change notifications to a real receiver process;
several real worker processes fetch, encrypt and upsert. Every mailbox is signed in
through MSAL and subscribed (``connect_accounts``). Then, with the simulator's faults on
(duplicate and reordered notifications, batched POSTs, late ``updated`` after deletes,
random 503s and latency on Graph reads), the driver makes Outlook-side changes (control
API) at a fixed rate, round-robin over all mailboxes: mostly creates, some updates and
deletes of events whose last change is at least ``--min-gap`` seconds old.

Measured:

- lag per change: the document's ``updated_at`` minus the start of the first POST that
  carried the notification of that change in the simulator's delivery log (matched by the
  event id and the change's ``@odata.etag``; for a delete, the first ``deleted`` item).
  Only the last change of each event can be seen in the database, so an event created and
  then updated counts once, with its update; overall and per minute of the load;
- throughput: changes offered and applied per second (announcements on
  ``onerelation.inbound``, one per real write), the inbound backlog per minute, and the
  drain time after the load;
- the resident set size of every process, sampled every second: at the start of the load,
  at each tenth of it, at its end, the peak, and the least-squares slope over the second
  half of the load;
- nothing lost: after the drain, every mailbox's documents (decrypted) are compared with
  the simulator's ground truth (``processor.verify``);
- CPU seconds per process during the load and during the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from bench._common import (
    Backends,
    ChildProcess,
    CpuMeter,
    RssSampler,
    add_service_options,
    bench_parser,
    command_delta,
    database_commands,
    free_port,
    header,
    log_directory,
    management_json,
    mib,
    percentile,
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
from graphsim.ids import parse_id
from handlers.timeutil import isoformat_z
from processor.app import Runtime
from processor.topology import (
    DEAD_QUEUE,
    INBOUND_QUEUE,
    ONERELATION_INBOUND_QUEUE,
    RETRY_DELAYS_S,
    RETRY_QUEUE,
)
from processor.verify import Diff, diff_account, expected_events
from tests.e2e.harness import timed_event

#: The simulator's faults during the load (``--fault NAME=VALUE`` overrides or adds).
DEFAULT_FAULTS: dict[str, Any] = {
    "duplicates": True,
    "reorder_ms": 200,
    "batch_max_items": 10,
    "batch_window_ms": 100,
    "deleted_ghosts": 0.05,
    "random_503_rate": 0.02,
    "latency_ms": 30,
}


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Tracked:
    """One event the driver made, and its last change."""

    account_id: str
    user_id: str
    event_id: str
    key: bytes  # the simulator's record key (parse_id)
    kind: str  # last change: created | updated | deleted
    etag: str  # @odata.etag of the last created/updated version
    made_at: float  # wall time the last change's control call started
    made_mono: float  # the same, monotonic
    changes: int = 1


@dataclass
class Load:
    """What the driver did, and what went wrong doing it."""

    tracked: dict[bytes, Tracked] = field(default_factory=dict)
    by_mailbox: dict[str, list[Tracked]] = field(default_factory=dict)  # live, by user id
    offered: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    busy: set[bytes] = field(default_factory=set)  # a change of it is in flight
    made: list[float] = field(default_factory=list)  # wall time of every change made


def _event_body(n: int, version: int) -> dict[str, Any]:
    return {
        **timed_event(f"Load {n} v{version}", days=1 + n % 60, hours=n % 9),
        "body": {"contentType": "text", "content": f"sustained load, change {version}"},
    }


async def _change(
    n: int,
    kind: str,
    control: SimControl,
    load: Load,
    mailbox: tuple[str, str],
    target: Tracked | None,
) -> None:
    account_id, user_id = mailbox
    made_at, made_mono = time.time(), time.monotonic()
    try:
        if kind == "created":
            event = await control.create_event(user_id, _event_body(n, 1), immutable=True)
            parsed = parse_id(event["id"])
            assert parsed is not None
            tracked = Tracked(
                account_id,
                user_id,
                event["id"],
                parsed[0],
                "created",
                str(event["@odata.etag"]),
                made_at,
                made_mono,
            )
            load.tracked[tracked.key] = tracked
            load.by_mailbox.setdefault(user_id, []).append(tracked)
        elif kind == "updated":
            assert target is not None
            version = target.changes + 1
            changes = {"subject": f"Load {n} v{version}", "body": _event_body(n, version)["body"]}
            event = await control.update_event(user_id, target.event_id, changes, immutable=True)
            target.kind, target.etag = "updated", str(event["@odata.etag"])
            target.made_at, target.made_mono, target.changes = made_at, made_mono, version
        else:
            assert target is not None
            await control.delete_event(user_id, target.event_id)
            target.kind, target.made_at, target.made_mono = "deleted", made_at, made_mono
            target.changes += 1
            load.by_mailbox[user_id].remove(target)
        load.offered[kind] += 1
        load.made.append(made_at)
    except Exception as exc:  # counted and printed: the load goes on
        load.failed[f"{kind}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
    finally:
        if target is not None:
            load.busy.discard(target.key)


def _pick_kind(rng: random.Random, mix: Sequence[float]) -> str:
    roll = rng.random() * sum(mix)
    if roll < mix[0]:
        return "created"
    if roll < mix[0] + mix[1]:
        return "updated"
    return "deleted"


async def drive(
    args: argparse.Namespace,
    control: SimControl,
    mailboxes: list[tuple[str, str]],
    load: Load,
) -> None:
    """Make ``rate`` changes per second for ``duration`` seconds, round-robin over mailboxes."""
    rng = random.Random(args.seed)
    total = int(args.rate * args.duration)
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    for n in range(total):
        delay = start + n / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        mailbox = mailboxes[n % len(mailboxes)]
        kind = _pick_kind(rng, args.mix)
        target = None
        if kind != "created":
            now = time.monotonic()
            candidates = [
                t
                for t in load.by_mailbox.get(mailbox[1], [])
                if now - t.made_mono >= args.min_gap and t.key not in load.busy
            ]
            if candidates:
                target = rng.choice(candidates)
                load.busy.add(target.key)
            else:
                load.offered[f"{kind} -> created (no event old enough)"] += 1
                kind = "created"
        task = asyncio.create_task(_change(n, kind, control, load, mailbox, target))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


# -- the broker's view ---------------------------------------------------------------------------


def _work_queues(shards: int) -> list[str]:
    return [INBOUND_QUEUE.format(shard=s) for s in range(shards)] + [
        RETRY_QUEUE.format(target="inbound", delay_s=d) for d in RETRY_DELAYS_S
    ]


async def ready_counts(rt: Runtime, names: Sequence[str]) -> dict[str, int]:
    """Ready messages per queue (passive declare: exact, not the management API's sample)."""
    channel = await rt.connection.channel()
    try:
        counts = {}
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            counts[name] = queue.declaration_result.message_count or 0
        return counts
    finally:
        await channel.close()


@dataclass
class BrokerSample:
    at: float  # monotonic
    backlog: int  # ready in the inbound shard and retry queues
    announced: int  # messages in onerelation.inbound (nobody consumes it here)


async def sample_broker(
    rt: Runtime, shards: int, into: list[BrokerSample], interval_s: float
) -> None:
    names = _work_queues(shards)
    while True:
        with contextlib.suppress(Exception):
            counts = await ready_counts(rt, [*names, ONERELATION_INBOUND_QUEUE])
            announced = counts.pop(ONERELATION_INBOUND_QUEUE)
            into.append(BrokerSample(time.monotonic(), sum(counts.values()), announced))
        await asyncio.sleep(interval_s)


async def shard_owners(backends: Backends, workers: Sequence[ChildProcess]) -> str:
    """Which worker process is the single active consumer of which inbound shard."""
    vhost = quote(backends.vhost, safe="")
    consumers = await management_json(backends, f"/consumers/{vhost}")
    connections = await management_json(backends, f"/vhosts/{vhost}/connections")
    by_pid = {str(w.pid): w.name for w in workers}
    by_connection = {  # the service names its connections m365sync:<pid>
        str(c.get("name")): str((c.get("client_properties") or {}).get("connection_name"))
        for c in connections
    }
    owned: dict[str, list[int]] = {w.name: [] for w in workers}
    standby: Counter[str] = Counter()
    for consumer in consumers:
        queue = str(consumer.get("queue", {}).get("name", ""))
        if not queue.startswith(INBOUND_QUEUE.format(shard="")):
            continue
        connection = str(consumer.get("channel_details", {}).get("connection_name", ""))
        client_name = by_connection.get(connection, connection)
        owner = by_pid.get(client_name.rpartition(":")[2], client_name)
        if consumer.get("active", True):
            owned.setdefault(owner, []).append(int(queue.rpartition(".")[2]))
        else:
            standby[owner] += 1
    return "; ".join(
        f"{name}: active on {sorted(shards) or 'none'}, standby on {standby[name]}"
        for name, shards in owned.items()
    )


async def unacked_work(backends: Backends, shards: int) -> int:
    """Unacknowledged messages in the work queues (management API, sampled every 5 s)."""
    names = set(_work_queues(shards))
    queues = await management_json(
        backends,
        f"/queues/{quote(backends.vhost, safe='')}?columns=name,messages_unacknowledged",
    )
    return sum(int(q.get("messages_unacknowledged") or 0) for q in queues if q["name"] in names)


async def redeliveries(backends: Backends) -> int:
    queues = await management_json(backends, f"/queues/{quote(backends.vhost, safe='')}")
    return sum(int((q.get("message_stats") or {}).get("redeliver") or 0) for q in queues)


# -- ground truth -------------------------------------------------------------------------------


async def compare_with_truth(
    rt: Runtime, control: SimControl, accounts: dict[str, str]
) -> dict[str, Diff]:
    """Every account's live documents, decrypted, against the simulator (processor.verify)."""
    now = datetime.now(UTC)
    start = isoformat_z(now - timedelta(days=rt.settings.sync_window_past_days))
    end = isoformat_z(now + timedelta(days=rt.settings.sync_window_future_days))
    diffs = {}
    for account_id, user_id in accounts.items():
        truth = expected_events(
            await control.events(user_id, immutable=True),
            await control.calendar_view(user_id, start, end, immutable=True),
        )
        diffs[account_id] = await diff_account(rt.store, rt.events, account_id, truth)
    return diffs


def diff_line(diffs: dict[str, Diff]) -> str:
    compared = sum(d.compared for d in diffs.values())
    missing = sum(len(d.missing) for d in diffs.values())
    extra = sum(len(d.unexpected) for d in diffs.values())
    stale = sum(len({gid for gid, _ in d.mismatched}) for d in diffs.values())
    bad = [a for a, d in diffs.items() if not d.ok]
    detail = f"; accounts differing: {len(bad)}, first: {diffs[bad[0]].summary()}" if bad else ""
    return (
        f"{len(diffs)} mailboxes, {compared} live events compared: missing {missing}, "
        f"stale {stale}, extra {extra}{detail}"
    )


# -- numbers --------------------------------------------------------------------------------------


def slope_per_10min(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares slope of ``(time, bytes)`` samples, in MiB per 10 minutes."""
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return float("nan")
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return cov / var * 600 / 2**20


def lag_stats(lags: Sequence[float]) -> str:
    if not lags:
        return "no changes"
    return (
        f"p50 {percentile(lags, 50):7.2f} s  p99 {percentile(lags, 99):7.2f} s  "
        f"max {max(lags):7.2f} s  (n {len(lags)})"
    )


def first_posts(
    log: Sequence[dict[str, Any]],
) -> tuple[dict[tuple[bytes, str], float], Counter[str]]:
    """(record key, etag or "deleted") -> start of the first POST that carried it."""
    first: dict[tuple[bytes, str], float] = {}
    items: Counter[str] = Counter()
    for entry in log:
        posted_at = entry["real_time"] - entry["duration_ms"] / 1000
        for item in entry["items"]:
            data = item.get("resourceData", {})
            parsed = parse_id(str(data.get("id", "")))
            if parsed is None:
                continue
            change = str(item.get("changeType"))
            items[f"{change} {'2xx' if entry['delivered'] else 'not 2xx'}"] += 1
            tag = "deleted" if change == "deleted" else str(data.get("@odata.etag"))
            key = (parsed[0], tag)
            if key not in first or posted_at < first[key]:
                first[key] = posted_at
    return first, items


# -- the run --------------------------------------------------------------------------------------


def _parse_faults(pairs: Sequence[str]) -> dict[str, Any]:
    faults = dict(DEFAULT_FAULTS)
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            faults[name] = json.loads(value)
        except ValueError:
            faults[name] = value
    return faults


async def run(args: argparse.Namespace) -> None:
    header("bench.load: sustained notifications across many mailboxes, simulator faults on")
    faults = _parse_faults(args.fault)
    total = int(args.rate * args.duration)
    print(
        f"   {args.rate:g} changes/s for {args.duration:g} s ({total} changes, mix "
        f"create/update/delete {'/'.join(f'{m:g}' for m in args.mix)}, min gap {args.min_gap:g} s "
        f"between changes of one event) round-robin over {args.mailboxes} mailboxes; "
        f"1 receiver + {args.workers} worker processes, {args.shards} shards, "
        f"prefetch {args.prefetch}"
    )
    print(f"   faults: {', '.join(f'{k}={v}' for k, v in faults.items())}")
    async with private_backends("load") as backends:
        with log_directory(args.log_dir, "load") as log_dir:
            quiet_driver_logs(log_dir)
            async with (
                simulator_process(log_dir) as (sim, state),
                SimControl(state["base_url"], state["ca_file"]) as control,
            ):
                port = free_port()
                env = service_env(
                    backends,
                    http_port=port,
                    sim=state,
                    M365SYNC_SHARDS=str(args.shards),
                    M365SYNC_PREFETCH=str(args.prefetch),
                )
                receiver = role_process("receiver", env, log_dir)
                workers = [
                    role_process("worker", env, log_dir, name=f"worker-{i + 1}")
                    for i in range(args.workers)
                ]
                for proc in (receiver, *workers):
                    await proc.start()
                try:
                    await wait_ready(port)
                    for worker in workers:
                        await worker.wait_log("process.ready")
                    async with driver_runtime(env) as rt:
                        await measure(
                            args, faults, backends, control, state, rt, sim, receiver, workers
                        )
                finally:
                    for proc in (*workers, receiver):
                        await proc.stop()
                    for proc in (receiver, *workers):
                        print(f"   {proc.name} log: {log_summary(proc)}")


async def measure(
    args: argparse.Namespace,
    faults: dict[str, Any],
    backends: Backends,
    control: SimControl,
    state: dict[str, Any],
    rt: Runtime,
    sim: ChildProcess,
    receiver: ChildProcess,
    workers: list[ChildProcess],
) -> None:
    connect_start = time.monotonic()
    accounts = await connect_accounts(rt, control, state, args.mailboxes, subscribe=True)
    print(
        f"   setup: {len(accounts)} mailboxes signed in through MSAL and subscribed in "
        f"{time.monotonic() - connect_start:.1f} s (sequential, faults off)"
    )
    await control.wait_idle(timeout_s=60)
    print(f"   inbound shard owners: {await shard_owners(backends, workers)}")
    knobs = await control.set_faults(**faults)
    limits = (
        "max_concurrent_per_mailbox",
        "throttle_retry_after",
        "random_503_retry_after",
        "delivery_timeout_s",
        "delivery_retry_base_s",
        "delivery_retry_cap_s",
        "seed",
    )
    print(f"   simulator limits kept: {', '.join(f'{k}={knobs[k]}' for k in limits)}")
    await control.reset_counters()
    seq_before = len(await control.deliveries())
    mailboxes = list(accounts.items())

    procs = {"receiver": receiver.pid, **{w.name: w.pid for w in workers}, "graphsim": sim.pid}
    rss = RssSampler(procs, interval_s=1.0)
    rss.start()
    broker: list[BrokerSample] = []
    broker_task = asyncio.create_task(sample_broker(rt, args.shards, broker, 5.0))
    await asyncio.sleep(2.0)
    meter = CpuMeter({**procs, **service_pids()})
    meter.start()
    commands = await database_commands(backends.mongodb_url)
    load = Load()
    load_start, load_start_wall = time.monotonic(), time.time()
    await drive(args, control, mailboxes, load)
    load_end, load_end_wall = time.monotonic(), time.time()
    cpu_load = meter.stop()
    commands_load = command_delta(
        commands, commands := await database_commands(backends.mongodb_url)
    )

    meter = CpuMeter({**procs, **service_pids()})
    meter.start()
    names = _work_queues(args.shards)
    quiet_since: float | None = None
    drained_at: float | None = None
    deadline = load_end + args.drain_timeout
    while time.monotonic() < deadline:
        quiet = (
            await control.is_idle()
            and sum((await ready_counts(rt, names)).values()) == 0
            and await unacked_work(backends, args.shards) == 0
        )
        if quiet and quiet_since is None:
            quiet_since = time.monotonic()
        elif not quiet:
            quiet_since = None
        if quiet_since is not None and time.monotonic() - quiet_since >= 6.0:
            drained_at = quiet_since
            break
        await asyncio.sleep(1.0)
    cpu_drain = meter.stop()
    commands_drain = command_delta(commands, await database_commands(backends.mongodb_url))
    await rss.stop()
    rss.sample()
    broker_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await broker_task

    verify_start = time.monotonic()
    diffs = await compare_with_truth(rt, control, accounts)
    verify_s = time.monotonic() - verify_start
    second: dict[str, Diff] | None = None
    if not all(d.ok for d in diffs.values()):
        await asyncio.sleep(30)
        second = await compare_with_truth(rt, control, accounts)

    durable: dict[str, tuple[float, bool]] = {}
    async for doc in rt.events.collection.find({}, {"updated_at": 1, "deleted": 1}):
        durable[str(doc["_id"])] = (doc["updated_at"].timestamp(), bool(doc.get("deleted")))
    log = await control.deliveries(since=seq_before, kind="change")
    counters = await control.counters()
    finals = await ready_counts(rt, [ONERELATION_INBOUND_QUEUE, DEAD_QUEUE, *names])
    redelivered = await redeliveries(backends)

    # -- lags ------------------------------------------------------------------------------
    first, items = first_posts(log)
    lags: list[tuple[float, float]] = []  # (first POST, lag)
    change_lags: list[float] = []
    unmatched: Counter[str] = Counter()
    for t in load.tracked.values():
        key = rt.events.event_key(t.account_id, t.event_id)
        stored = durable.get(key)
        posted = first.get((t.key, "deleted" if t.kind == "deleted" else t.etag))
        if stored is None:
            unmatched[f"{t.kind}: no document"] += 1
            continue
        if stored[1] != (t.kind == "deleted"):
            unmatched[f"{t.kind}: document {'deleted' if stored[1] else 'live'}"] += 1
            continue
        if posted is None:
            unmatched[f"{t.kind}: no notification in the delivery log"] += 1
            continue
        lags.append((posted, stored[0] - posted))
        change_lags.append(stored[0] - t.made_at)
    negative = sum(1 for _, lag in lags if lag < 0)

    # -- report ----------------------------------------------------------------------------
    load_s = load_end - load_start
    offered = sum(n for k, n in load.offered.items() if "->" not in k)
    announced_load = _announced_between(broker, load_start, load_end)
    print(
        f"   load: {offered} changes in {load_s:.1f} s ({offered / load_s:.1f}/s offered): "
        f"{dict(load.offered)}"
    )
    if load.failed:
        print(f"   driver failures: {dict(load.failed)}")
    print(
        f"   applied during the load: {announced_load} announcements "
        f"({announced_load / load_s:.1f}/s; one per real write)"
    )
    last_write = max((s[0] for s in durable.values()), default=load_end_wall)
    if drained_at is None:
        print(
            f"   NOT DRAINED within {args.drain_timeout:g} s after the load "
            f"(backlog left: {sum((await ready_counts(rt, names)).values())} ready messages)"
        )
    else:
        print(
            f"   drain: quiet (simulator idle, work queues empty) {drained_at - load_end:.1f} s "
            f"after the load; last document write {last_write - load_end_wall:.1f} s after it"
        )
    print(
        f"   lag, first POST of the change -> document durable: {lag_stats([x for _, x in lags])}"
    )
    print(f"   lag, Outlook change -> document durable:          {lag_stats(change_lags)}")
    if negative:
        print(f"   ({negative} changes were durable before their own notification was POSTed)")
    if unmatched:
        print(f"   changes without a lag: {dict(unmatched)}")
    print("   per minute of the load (lag by the minute of the change's first POST):")
    print(
        "      minute  offered  applied  backlog   lag p50     p99     max      "
        + "  ".join(f"{name:>9}" for name in rss.samples)
    )
    minutes = max(1, int((load_s + 59) // 60))
    for m in range(minutes):
        lo, hi = load_start_wall + 60 * m, load_start_wall + 60 * (m + 1)
        window = [lag for posted, lag in lags if lo <= posted < hi]
        made = sum(1 for at in load.made if lo <= at < hi)
        applied = _announced_between(broker, load_start + 60 * m, load_start + 60 * (m + 1))
        backlog = _at(broker, min(load_start + 60 * (m + 1), load_end))
        rss_cols = "  ".join(
            f"{rss.at(name, min(load_start + 60 * (m + 1), load_end)) / 2**20:7.1f}Mi"
            for name in rss.samples
        )
        if window:
            lag_cols = (
                f"{percentile(window, 50):7.2f} {percentile(window, 99):7.2f} {max(window):7.2f}"
            )
        else:
            lag_cols = f"{'-':>7} {'-':>7} {'-':>7}"
        print(f"      {m + 1:>6}  {made:>7}  {applied:>7}  {backlog:>7}  {lag_cols}  {rss_cols}")
    print(
        "      (backlog: ready messages in the inbound shard and retry queues at the minute's "
        "end; RSS at the minute's end)"
    )

    statuses = Counter(str(e["status"] or e.get("error")) for e in log)
    per_post = sum(len(e["items"]) for e in log) / max(len(log), 1)
    print(
        f"   deliveries: {len(log)} POSTs, statuses {dict(statuses)}, {per_post:.2f} items per "
        f"POST; items {dict(items)}"
    )
    delivered = sum(n for k, n in items.items() if k.endswith(" 2xx") and "not" not in k)
    print(
        f"   duplicates absorbed: {delivered} notification items answered 2xx for "
        f"{offered} changes; {finals[ONERELATION_INBOUND_QUEUE]} announcements "
        f"({max(0, delivered - offered)} duplicate/ghost items did not produce a write); "
        f"broker redeliveries {redelivered}"
    )
    by_status = counters.get("by_status", {})
    print(
        f"   Graph, load and drain: {counters.get('total')} requests, statuses {by_status}, "
        f"by kind {counters.get('by_kind', {})}"
    )
    print(
        f"   broker after the drain: dead-lettered {finals[DEAD_QUEUE]}, "
        f"work queues ready {sum(finals[n] for n in names)}"
    )
    print(f"   ground truth after the drain ({verify_s:.1f} s): {diff_line(diffs)}")
    if second is not None:
        print(f"   ground truth 30 s later: {diff_line(second)}")
    print(f"   load  {cpu_load}")
    print(f"         database commands (server-wide): {commands_load}")
    print(f"   drain {cpu_drain}")
    print(f"         database commands (server-wide): {commands_drain}")

    half = (load_start + load_end) / 2
    ticks = [load_start + load_s * k / 10 for k in range(11)]
    print("   RSS (MiB) at the start of the load, each tenth of it, and its end:")
    for name in rss.samples:
        values = " ".join(f"{rss.at(name, t) / 2**20:6.1f}" for t in ticks)
        print(f"      {name:>9}: {values}")
    for name, samples in rss.samples.items():
        second_half = [(t, v) for t, v in samples if half <= t <= load_end]
        print(
            f"   {name} RSS: start {mib(rss.at(name, load_start))}, "
            f"end {mib(rss.at(name, load_end))}, peak {mib(rss.peak(name, load_start))}, "
            f"after drain {mib(samples[-1][1])}; slope over the second half of the load "
            f"{slope_per_10min(second_half):+.2f} MiB per 10 min ({len(samples)} samples)"
        )


def log_summary(proc: ChildProcess) -> str:
    """Counts of the process's log events at warning level and above, and of stray lines."""
    counts: Counter[str] = Counter()
    first_error = ""
    for line in proc.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            counts["non-JSON line"] += 1
            first_error = first_error or line
            continue
        level = str(entry.get("level"))
        if level in ("warning", "error", "critical"):
            counts[f"{level} {entry.get('event')}"] += 1
            if level != "warning":
                first_error = first_error or line
    if not counts:
        return "no warnings or errors"
    text = ", ".join(f"{k} x{n}" for k, n in counts.most_common())
    return text + (f"; first: {first_error[:300]}" if first_error else "")


def _announced_between(samples: Sequence[BrokerSample], start: float, end: float) -> int:
    return _at_announced(samples, end) - _at_announced(samples, start)


def _at_announced(samples: Sequence[BrokerSample], when: float) -> int:
    if not samples:
        return 0
    return min(samples, key=lambda s: abs(s.at - when)).announced


def _at(samples: Sequence[BrokerSample], when: float) -> int:
    if not samples:
        return 0
    return min(samples, key=lambda s: abs(s.at - when)).backlog


def _mix(text: str) -> list[float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError("three non-negative weights: create,update,delete")
    return parts


def main() -> None:
    parser = bench_parser("load", __doc__, raw_description=True)
    parser.add_argument("--mailboxes", type=int, default=200)
    parser.add_argument("--rate", type=float, default=3.0, help="changes per second (default 3)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    add_service_options(parser)
    parser.add_argument(
        "--mix", type=_mix, default=[70.0, 20.0, 10.0], help="create,update,delete weights"
    )
    parser.add_argument(
        "--min-gap",
        type=float,
        default=30.0,
        help="seconds between two changes of one event (default 30)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"simulator fault knob during the load (graphsim.faults); defaults {DEFAULT_FAULTS}",
    )
    parser.add_argument("--seed", type=int, default=1, help="the load's random choices")
    run_bench(parser, run, drain_timeout_s=600.0)


if __name__ == "__main__":
    main()

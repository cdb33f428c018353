"""``python -m bench.e2e``: notification posted to document durable, under a steady load.

The Graph simulator (own process) pushes change notifications to a real receiver process;
a real worker process fetches, encrypts and upserts. The driver creates events in Outlook
(the simulator's control API) at a fixed rate across several mailboxes. Per change:

- lag = the document's ``updated_at`` minus the start of the change's first notification
  POST in the simulator's delivery log (``real_time - duration_ms``), so it counts the
  receiver's answer, the broker, the worker's fetch/encrypt/upsert and any retry;
- also shown: Outlook change (control call made) to document durable.

The worker's resident set size is sampled every 250 ms (psutil) to show that it stays flat
under sustained load (bounded prefetch).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from bench._common import (
    CpuMeter,
    RssSampler,
    add_service_options,
    bench_parser,
    free_port,
    header,
    log_directory,
    mib,
    ms,
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


def _event(n: int) -> dict[str, Any]:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1, minutes=30 * n)
    return {
        "subject": f"Bench e2e {n}",
        "body": {"contentType": "text", "content": "steady load"},
        "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        "end": {
            "dateTime": (start + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": "UTC",
        },
    }


async def run(args: argparse.Namespace) -> None:
    header("bench.e2e: notification posted to document durable, steady load")
    total = int(args.rate * args.duration)
    print(
        f"   {args.rate:g} changes/s for {args.duration:g} s ({total} event creations) across "
        f"{args.mailboxes} mailboxes; receiver and worker as separate processes, "
        f"worker prefetch {args.prefetch}, {args.shards} shards"
    )
    async with private_backends("e2e") as backends:
        with log_directory(args.log_dir, "e2e") as log_dir:
            quiet_driver_logs(log_dir)
            async with (
                simulator_process(log_dir) as (_sim, state),
                SimControl(state["base_url"], state["ca_file"]) as control,
            ):
                await control.set_faults(delivery_retry_base_s=0.05, delivery_retry_cap_s=0.5)
                port = free_port()
                env = service_env(
                    backends,
                    http_port=port,
                    sim=state,
                    M365SYNC_SHARDS=str(args.shards),
                    M365SYNC_PREFETCH=str(args.prefetch),
                )
                receiver = await role_process("receiver", env, log_dir).start()
                worker = await role_process("worker", env, log_dir).start()
                try:
                    await wait_ready(port)
                    await worker.wait_log("process.ready")
                    async with driver_runtime(env) as rt:
                        accounts = await connect_accounts(
                            rt, control, state, args.mailboxes, subscribe=True
                        )
                        await control.wait_idle()
                        seq_before = len(await control.deliveries())
                        mailboxes = list(accounts.items())

                        rss = RssSampler({"worker": worker.pid, "receiver": receiver.pid})
                        rss.start()
                        await asyncio.sleep(1.0)
                        meter = CpuMeter(
                            {
                                "receiver": receiver.pid,
                                "worker": worker.pid,
                                "graphsim": _sim.pid,
                                **service_pids(),
                            }
                        )
                        meter.start()

                        created: dict[bytes, tuple[str, str, float]] = {}
                        tasks: list[asyncio.Task[None]] = []

                        async def change(n: int) -> None:
                            account_id, user_id = mailboxes[n % len(mailboxes)]
                            made_at = time.time()
                            event = await control.create_event(user_id, _event(n), immutable=True)
                            parsed = parse_id(event["id"])
                            assert parsed is not None
                            created[parsed[0]] = (account_id, event["id"], made_at)

                        load_start = time.monotonic()
                        for n in range(total):
                            delay = load_start + n / args.rate - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                            tasks.append(asyncio.create_task(change(n)))
                        await asyncio.gather(*tasks)
                        load_end = time.monotonic()
                        cpu = meter.stop()

                        keys = {
                            rt.events.event_key(account_id, event_id): ref
                            for ref, (account_id, event_id, _) in created.items()
                        }
                        deadline = time.monotonic() + args.drain_timeout
                        while (
                            await rt.events.collection.count_documents({"_id": {"$in": list(keys)}})
                            < total
                        ):
                            if time.monotonic() > deadline:
                                break
                            await asyncio.sleep(0.25)
                        drained = time.monotonic()
                        await asyncio.sleep(1.0)
                        await rss.stop()
                        rss.sample()

                        updated: dict[bytes, float] = {}
                        async for doc in rt.events.collection.find(
                            {"_id": {"$in": list(keys)}}, {"updated_at": 1}
                        ):
                            updated[keys[doc["_id"]]] = doc["updated_at"].timestamp()
                        log = await control.deliveries(since=seq_before, kind="change")
                finally:
                    await worker.stop()
                    await receiver.stop()

    first_post: dict[bytes, float] = {}
    statuses: Counter[str] = Counter()
    post_s: list[float] = []
    items_per_post: list[int] = []
    for entry in log:
        statuses[str(entry["status"] or entry.get("error"))] += 1
        post_s.append(entry["duration_ms"] / 1000)
        items_per_post.append(len(entry["items"]))
        posted_at = entry["real_time"] - entry["duration_ms"] / 1000
        for item in entry["items"]:
            parsed = parse_id(str(item.get("resourceData", {}).get("id", "")))
            if parsed is not None and parsed[0] not in first_post:
                first_post[parsed[0]] = posted_at
    lags = [updated[ref] - first_post[ref] for ref in updated if ref in first_post]
    change_lags = [updated[ref] - created[ref][2] for ref in updated]
    if len(updated) < total:
        print(
            f"   NOT DRAINED: only {len(updated)} of {total} changes durable "
            f"{args.drain_timeout:g} s after the load; the lags below cover those only"
        )
    middle = (load_start + load_end) / 2
    print(
        f"   notification posted -> durable: p50 {ms(percentile(lags, 50))}, "
        f"p99 {ms(percentile(lags, 99))}, max {ms(max(lags))}  ({len(lags)} of {total} changes)"
    )
    print(
        f"   Outlook change -> durable:       p50 {ms(percentile(change_lags, 50))}, "
        f"p99 {ms(percentile(change_lags, 99))}, max {ms(max(change_lags))}"
    )
    print(
        f"   deliveries: {len(log)} POSTs, statuses {dict(statuses)}, "
        f"{sum(items_per_post) / max(len(items_per_post), 1):.2f} items per POST; "
        f"receiver answer p50 {ms(percentile(post_s, 50))}, p99 {ms(percentile(post_s, 99))}"
    )
    print(
        f"   load {load_end - load_start:.1f} s; {len(updated)} of {total} durable "
        f"{drained - load_end:.1f} s after the last change"
    )
    print(f"   {cpu}")
    for name in ("worker", "receiver"):
        print(
            f"   {name} RSS: start {mib(rss.at(name, load_start))}, "
            f"middle {mib(rss.at(name, middle))}, end {mib(rss.at(name, load_end))}, "
            f"peak during load {mib(rss.peak(name, load_start, load_end))}, "
            f"after drain {mib(rss.samples[name][-1][1])} "
            f"({len(rss.samples[name])} samples)"
        )


def main() -> None:
    parser = bench_parser("e2e", __doc__)
    parser.add_argument("--rate", type=float, default=20.0, help="changes per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--mailboxes", type=int, default=10)
    add_service_options(parser)
    run_bench(parser, run, drain_timeout_s=150.0)


if __name__ == "__main__":
    main()

"""``python -m bench.worker``: events reconciled per second, real worker vs raw driver upserts.

Setup: the Graph simulator in its own process, N accounts signed in through MSAL, E events
per mailbox created without notifications. Then:

- baseline: the raw ``AsyncMongoClient`` doing the same version-guarded ``update_one(...,
  upsert=True)`` of equivalent plaintext documents (no fetch, no encryption), one sequential
  writer per account, all accounts concurrently (the worker's own parallelism), into a
  collection with the same indexes; run before and after the worker to bracket noise.
- worker: one inbound ``change`` message per event, built as the receiver builds them
  (``event_ref`` encrypted under the account's key, routed to the account's shard), is
  published before the worker starts; then ``python -m processor.cli worker`` starts and the
  clock runs from its ``worker.started`` log event to the last document's ``updated_at``.
  Each event costs a Graph GET from the simulator, AES-GCM encryption, the version-guarded
  upsert, the announcement to ``onerelation.inbound`` (confirmed) and the ack.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient

from bench._common import (
    CpuMeter,
    add_service_options,
    bench_parser,
    command_delta,
    database_commands,
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
)
from bench._stack import connect_accounts, driver_runtime
from graphsim.client import SimControl
from handlers.ports import OutgoingMessage
from handlers.records import KEPT_FIELDS
from handlers.routing import shard_routing_key
from handlers.timeutil import parse_graph_datetime, utcnow
from handlers.timezones import event_time_to_utc
from processor.app import Runtime
from processor.messages import change_message
from processor.topology import INBOUND_EXCHANGE, INBOUND_QUEUE, ONERELATION_INBOUND_QUEUE


def baseline_document(rt: Runtime, account_id: str, event: dict[str, Any]) -> tuple[dict, dict]:
    """The filter and update of the plaintext twin of what ``upsert_version`` writes."""
    graph_id = str(event["id"])
    key = rt.events.event_key(account_id, graph_id)
    last_modified = parse_graph_datetime(str(event["lastModifiedDateTime"]))
    change_key = str(event.get("changeKey", ""))
    fields = {
        "schema": 1,
        "account_id": account_id,
        "gid": graph_id,
        "doc": {f: event[f] for f in KEPT_FIELDS if f in event},
        "lm": last_modified,
        "ck": change_key,
        "deleted": False,
        "start": event_time_to_utc(event.get("start")),
        "end": event_time_to_utc(event.get("end")),
        "type": event.get("type", "singleInstance"),
        "series": None,
        "announce": {"seq": time.time_ns(), "change": "upserted", "last_modified": last_modified},
        "updated_at": utcnow(),
    }
    query = {
        "_id": key,
        "$or": [
            {"lm": {"$lt": last_modified}},
            {"lm": last_modified, "ck": {"$ne": change_key}},
        ],
    }
    return query, {"$set": fields, "$unset": {"expires_at": ""}}


async def run_baseline(
    mongodb_url: str, collection: str, work: dict[str, list[tuple[dict, dict]]], *, guarded: bool
) -> float:
    """Raw-driver upserts, one sequential writer per account; returns elapsed seconds.

    ``guarded`` keeps the version guard (``$or`` on ``lm``/``ck``) in the filter, as the
    worker does; without it the filter is ``{"_id": key}`` alone.
    """
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_url, tz_aware=True)
    try:
        coll = client.get_default_database()[collection]
        await coll.create_index([("account_id", ASCENDING), ("start", ASCENDING)])
        await coll.create_index("expires_at")

        async def writer(ops: list[tuple[dict, dict]]) -> None:
            for query, update in ops:
                await coll.update_one(
                    query if guarded else {"_id": query["_id"]}, update, upsert=True
                )

        started = time.perf_counter()
        await asyncio.gather(*(writer(ops) for ops in work.values()))
        elapsed = time.perf_counter() - started
        written = await coll.count_documents({})
        expected = sum(len(ops) for ops in work.values())
        if written != expected:
            raise RuntimeError(f"baseline wrote {written} documents, expected {expected}")
        return elapsed
    finally:
        await client.close()


async def inbound_messages(rt: Runtime, events: dict[str, list[str]]) -> list[OutgoingMessage]:
    """One ``change`` message per event, as the receiver builds them, accounts interleaved."""
    shard_count = rt.settings.shard_count
    per_account: list[list[OutgoingMessage]] = []
    for account_id, ids in events.items():
        cipher = await rt.store.keys.cipher_for(account_id)
        aad = f"inbound|{account_id}|event_ref".encode()
        per_account.append(
            [
                OutgoingMessage(
                    exchange=INBOUND_EXCHANGE,
                    routing_key=shard_routing_key(account_id, shard_count),
                    body=change_message(
                        account_id=account_id,
                        change_type="created",
                        event_hash=rt.hasher.hash_id("event", account_id, event_id),
                        event_ref_ct=cipher.encrypt_str(event_id, aad=aad),
                        received_at=utcnow(),
                    ),
                    message_id=uuid.uuid4().hex,
                    correlation_id=uuid.uuid4().hex,
                )
                for event_id in ids
            ]
        )
    width = max(len(m) for m in per_account)
    return [m[i] for i in range(width) for m in per_account if i < len(m)]


async def queue_depth(rt: Runtime, names: list[str]) -> int:
    channel = await rt.connection.channel()
    try:
        total = 0
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
        return total
    finally:
        await channel.close()


async def run(args: argparse.Namespace) -> None:
    header("bench.worker: events reconciled per second, real worker vs raw driver upserts")
    total = args.accounts * args.events_per_account
    print(
        f"   {total} events = {args.accounts} accounts x {args.events_per_account}, "
        f"{args.shards} shards, worker prefetch {args.prefetch}, "
        "Graph limits kept (4 concurrent per mailbox; the worker uses 3)"
    )
    async with private_backends("worker") as backends:
        with log_directory(args.log_dir, "worker") as log_dir:
            quiet_driver_logs(log_dir)
            async with (
                simulator_process(log_dir) as (sim, state),
                SimControl(state["base_url"], state["ca_file"]) as control,
            ):
                env = service_env(
                    backends,
                    http_port=free_port(),
                    sim=state,
                    M365SYNC_SHARDS=str(args.shards),
                    M365SYNC_PREFETCH=str(args.prefetch),
                    M365SYNC_LOG_LEVEL=args.log_level,
                )
                async with driver_runtime(env) as rt:
                    accounts = await connect_accounts(
                        rt, control, state, args.accounts, subscribe=False
                    )
                    events: dict[str, list[str]] = {}
                    work: dict[str, list[tuple[dict, dict]]] = {}
                    for account_id, user_id in accounts.items():
                        created = await control.bulk_create_events(
                            user_id, count=args.events_per_account, notify=False, immutable=True
                        )
                        events[account_id] = list(created["ids"])
                        graph_events = await control.events(user_id, immutable=True)
                        work[account_id] = [
                            baseline_document(rt, account_id, e) for e in graph_events
                        ]

                    before = await run_baseline(
                        backends.mongodb_url, "baseline_guarded", work, guarded=True
                    )
                    print(
                        f"   baseline           {total / before:8.0f} upserts/s   "
                        f"({total} in {before:.2f} s; raw driver, same version-guarded filter)",
                        flush=True,
                    )

                    messages = await inbound_messages(rt, events)
                    for i in range(0, len(messages), 200):
                        await rt.publisher.publish_many(messages[i : i + 200], timeout_s=30)
                    shard_names = [INBOUND_QUEUE.format(shard=s) for s in range(args.shards)]
                    queued = await queue_depth(rt, shard_names)

                    commands = await database_commands(backends.mongodb_url)
                    worker = await role_process("worker", env, log_dir).start()
                    try:
                        started_event = await worker.wait_log("worker.started")
                        meter = CpuMeter(
                            {"worker": worker.pid, "graphsim": sim.pid, **service_pids()}
                        )
                        meter.start()
                        started_at = datetime.fromisoformat(started_event["timestamp"])
                        deadline = time.monotonic() + args.timeout
                        while (done := await rt.events.collection.count_documents({})) < total:
                            if time.monotonic() > deadline:
                                raise RuntimeError(
                                    f"only {done} of {total} events stored in {args.timeout} s:\n"
                                    + worker.tail()
                                )
                            await asyncio.sleep(0.2)
                        cpu = meter.stop()
                        last = await rt.events.collection.find_one(
                            {}, sort=[("updated_at", -1)], projection={"updated_at": 1}
                        )
                        assert last is not None
                        elapsed = (last["updated_at"] - started_at).total_seconds()
                        db = command_delta(commands, await database_commands(backends.mongodb_url))
                        await asyncio.sleep(1.0)  # let the last acks and announcements land
                        left = await queue_depth(rt, shard_names)
                        announced = await queue_depth(rt, [ONERELATION_INBOUND_QUEUE])
                    finally:
                        await worker.stop()
                    print(
                        f"   worker             {total / elapsed:8.0f} events/s    "
                        f"({total} in {elapsed:.2f} s, from worker.started to the last "
                        "document's updated_at)",
                        flush=True,
                    )
                    print(f"                      {cpu}")
                    print(f"                      database commands (server-wide): {db}")

                    after = await run_baseline(
                        backends.mongodb_url, "baseline_plain", work, guarded=False
                    )
                    print(
                        f"   (context) {total / after:8.0f} upserts/s   "
                        f"({total} in {after:.2f} s; raw driver, filter {{_id}} only, "
                        "after the worker)",
                        flush=True,
                    )
    baseline_rate = total / before
    worker_rate = total / elapsed
    ratio = worker_rate / baseline_rate
    verdict = "met" if ratio >= 0.5 else "MISSED"
    print(
        f"   ratio worker/baseline: {ratio:.2f}  (goal >= 0.5: {verdict}); "
        f"worker/unguarded upserts: {worker_rate / (total / after):.2f}"
    )
    print(
        f"   broker check: {queued} change messages queued before the worker started, "
        f"{left} left after; {announced} announcements on {ONERELATION_INBOUND_QUEUE}"
    )


def main() -> None:
    parser = bench_parser("worker", __doc__)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument(
        "--events-per-account",
        type=int,
        default=15,
        help="default 15 (300 events): guarded writes scan the collection on FerretDB, so "
        "2,000 events take well over ten minutes (see bench/README.md)",
    )
    add_service_options(parser)
    parser.add_argument("--log-level", default="info", help="the worker's M365SYNC_LOG_LEVEL")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this long")
    run_bench(parser, run)


if __name__ == "__main__":
    main()

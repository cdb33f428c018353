"""The test database's backends side by side: SQLite, PostgreSQL, PostgreSQL with serving indexes.

One run starts three private FerretDB servers from the binary ``scripts/services.sh``
builds: one on SQLite (a temporary directory), two on the PostgreSQL cluster that
``scripts/services.sh`` runs (one database without the GIN twins of
``tools/ferretdb/gin-twins.sql``, one with them). Each gets the same collection of
documents and the same indexes the service declares for such lookups, and times the
query shapes the service runs, one after the other, in one process. It prints ms per
operation and the ratios, so the numbers measure the backend, not the machine's mood.

    .venv/bin/python -m bench.database [--documents 10000] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient

from bench._common import ROOT, free_port, header

FERRETDB = ROOT / ".run" / "ferretdb-embed"
GIN_TWINS = ROOT / "tools" / "ferretdb" / "gin-twins.sql"
PG_PORT = int(os.environ.get("M365SYNC_PG_PORT", "55432"))
PSQL = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(PG_PORT)]


def _psql(*args: str) -> None:
    env = {**os.environ, "PGOPTIONS": "-c client_min_messages=warning"}
    subprocess.run([*PSQL, "-U", "postgres", *args], check=True, env=env, capture_output=True)


def _fresh_pg_database(name: str, *, serving_indexes: bool) -> str:
    _psql("-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", "-c", f"CREATE DATABASE {name}")
    if serving_indexes:
        _psql("-d", name, "-f", str(GIN_TWINS))
    return f"postgres://postgres@127.0.0.1:{PG_PORT}/{name}"


@contextlib.asynccontextmanager
async def ferretdb(*backend: str) -> AsyncIterator[str]:
    """A private FerretDB with the given backend flags; yields its MongoDB URL."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = await asyncio.create_subprocess_exec(
            str(FERRETDB), "-listen-addr", f"127.0.0.1:{port}", *backend, stdout=log, stderr=log
        )
        try:
            url = f"mongodb://127.0.0.1:{port}/bench?directConnection=true"
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                url, serverSelectionTimeoutMS=200
            )
            for _ in range(100):
                with contextlib.suppress(Exception):
                    await client.admin.command("ping")
                    break
                await asyncio.sleep(0.1)
            await client.close()
            yield url
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), timeout=10)


async def measure(url: str, documents: int, rounds: int) -> dict[str, float]:
    """ms per operation for the service's query shapes on ``documents`` documents of 1.2 kB."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    coll = client.get_default_database()["events"]
    # The indexes the service declares for these lookups (processor/event_store.py).
    await coll.create_index([("account_id", ASCENDING), ("outbox", ASCENDING)])
    pad = "x" * 1100
    batch = [
        {"_id": f"k{i}", "account_id": f"acc{i % 100}", "outbox": i % 97 == 0, "v": 1, "pad": pad}
        for i in range(documents)
    ]
    for start in range(0, documents, 1000):
        await coll.insert_many(batch[start : start + 1000])

    async def find_id(i: int) -> object:
        return await coll.find_one({"_id": f"k{i}"})

    async def find_id_account(i: int) -> object:
        return await coll.find_one({"_id": f"k{i}", "account_id": f"acc{i % 100}"})

    async def guarded_update(i: int) -> object:
        return await coll.update_one(
            {"_id": f"k{i}", "$or": [{"v": {"$lt": 2 + i}}, {"v": None}]}, {"$set": {"v": 2 + i}}
        )

    async def outbox(i: int) -> object:
        return await coll.find({"account_id": f"acc{i % 100}", "outbox": True}).to_list()

    shapes: dict[str, Callable[[int], Awaitable[object]]] = {
        "find {_id}": find_id,
        "find {_id, account_id}": find_id_account,
        "update_one({_id, $or}) guarded": guarded_update,
        "find {account_id, outbox: true}": outbox,
    }
    result: dict[str, float] = {}
    for name, op in shapes.items():
        await op(0)
        started = time.perf_counter()
        for r in range(rounds):
            await op((r * 7919) % documents)
        result[name] = (time.perf_counter() - started) / rounds * 1000
    await client.close()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200, help="operations per shape")
    parser.add_argument(
        "--sqlite-rounds", type=int, default=10, help="operations per shape on SQLite (scans)"
    )
    args = parser.parse_args()
    header(f"bench.database: {args.documents} documents of 1.2 kB, ms per operation")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="m365sync-bench-sqlite-") as sqlite_dir:
        runs: list[tuple[str, list[str], int]] = [
            ("SQLite", ["-sqlite-dir", sqlite_dir], args.sqlite_rounds),
            (
                "PostgreSQL",
                ["-postgresql-url", _fresh_pg_database("bench_plain", serving_indexes=False)],
                args.rounds,
            ),
            (
                "PostgreSQL + GIN twins",
                ["-postgresql-url", _fresh_pg_database("bench_gin", serving_indexes=True)],
                args.rounds,
            ),
        ]
        for label, flags, rounds in runs:
            async with ferretdb(*flags) as url:
                results[label] = await measure(url, args.documents, rounds)
    for name in ("bench_plain", "bench_gin"):
        _psql("-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    labels = list(results)
    print(
        f"{'query':36}" + "".join(f"{label:>24}" for label in labels) + f"{'SQLite / indexed':>18}"
    )
    for shape in results[labels[0]]:
        row = "".join(f"{results[label][shape]:>24.2f}" for label in labels)
        ratio = results["SQLite"][shape] / results["PostgreSQL + GIN twins"][shape]
        print(f"{shape:36}{row}{ratio:>17.0f}x")
    plain, indexed = results["PostgreSQL"], results["PostgreSQL + GIN twins"]
    print(
        "PostgreSQL without / with the GIN twins: "
        + ", ".join(f"{shape} {plain[shape] / indexed[shape]:.1f}x" for shape in plain)
    )


if __name__ == "__main__":
    asyncio.run(main())

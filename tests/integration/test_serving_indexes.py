"""On the local test database (FerretDB on PostgreSQL) every index the service declares serves equality.

FerretDB turns each declared index into a btree index that its pushed-down equality
(``_jsonb->'f' @> value``) cannot use; ``tools/ferretdb/gin-twins.sql`` gives each one a GIN
twin that can. These tests read PostgreSQL's catalogue and plans directly, so they run only
against the cluster ``scripts/services.sh`` starts (not when ``M365SYNC_MONGODB_URL`` points
elsewhere).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from tests.integration.support import make_store

pytestmark = pytest.mark.integration

PG_PORT = int(os.environ.get("M365SYNC_PG_PORT", "55432"))


def _local_cluster() -> bool:
    if os.environ.get("M365SYNC_MONGODB_URL") or shutil.which("psql") is None:
        return False
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", PG_PORT)) == 0


needs_local_cluster = pytest.mark.skipif(
    not _local_cluster(), reason="needs the local FerretDB-on-PostgreSQL of scripts/services.sh"
)


def _sql(query: str) -> list[list[str]]:
    out = subprocess.run(
        [
            "psql",
            "-X",
            "-At",
            "-F",
            "\t",
            "-h",
            "127.0.0.1",
            "-p",
            str(PG_PORT),
            "-U",
            "postgres",
            "-d",
            "ferretdb",
            "-c",
            query,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line]


@needs_local_cluster
async def test_every_declared_index_has_a_gin_twin(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Each btree index FerretDB built for the service's declared indexes (and `_id`) has a GIN twin on the same expressions."""
    store, _ = make_store(mongo_db)
    await store.ensure_indexes()
    schema = mongo_db.name
    rows = _sql(
        "SELECT t.relname, am.amname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
        f"WHERE n.nspname = '{schema}' AND t.relname NOT LIKE '\\_ferretdb\\_%'"
    )
    btree = {(table, d.split(" USING btree ")[1]) for table, am, d in rows if am == "btree"}
    gin = {(table, d.split(" USING gin ")[1]) for table, am, d in rows if am == "gin"}
    assert len(btree) >= 8  # `_id` of each collection plus the declared ones
    for table, columns in btree:
        expressions = columns.strip("()").split(")), ((")
        twin = "(" + ", ".join(f"(({e})) jsonb_path_ops" for e in expressions) + ")"
        assert (table, twin) in gin, f"{table} {columns} has no GIN twin"


@needs_local_cluster
async def test_an_equality_lookup_is_an_index_scan(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """FerretDB's pushed-down equality on a declared field is planned as an index scan, not a table scan."""
    coll = mongo_db["serving"]
    await coll.create_index("account_id")
    await coll.insert_many([{"_id": f"k{i}", "account_id": f"a{i % 50}"} for i in range(2000)])
    for i in range(20):  # past PostgreSQL's five custom plans, where a generic plan could take over
        assert await coll.find_one({"_id": f"k{i}"}) is not None
        assert len(await coll.find({"account_id": f"a{i}"}).to_list()) == 40
    (table,) = _sql(
        f"SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE n.nspname = '{mongo_db.name}' AND c.relname LIKE 'serving\\_%' AND c.relkind = 'r'"
    )[0]
    # FerretDB's statement shape: the field name is a parameter, prepared once, run often.
    out = _sql(
        "PREPARE q(text, jsonb) AS SELECT _jsonb FROM "
        f'"{mongo_db.name}"."{table}" WHERE _jsonb->$1 @> $2; '
        + "EXECUTE q('account_id', '\"a1\"'); " * 6
        + "EXPLAIN (FORMAT TEXT) EXECUTE q('account_id', '\"a7\"')"
    )
    plan = "\n".join(row[0] for row in out if "Scan" in row[0])
    assert "Index Scan" in plan, plan
    assert "Seq Scan" not in plan, plan

"""Fixtures shared by every suite: real RabbitMQ vhosts and real MongoDB-wire databases.

Each test that asks for them gets a private RabbitMQ vhost (through the management API)
and a private database, both removed afterwards, so tests never see each other's queues or
documents and the fixed contract names (``onerelation.inbound`` …) can be declared freely.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from tests.support import published

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MONGODB_URL = "mongodb://127.0.0.1:27017/m365sync"


def base_amqp_url() -> str:
    return os.environ.get("M365SYNC_AMQP_URL") or DEFAULT_AMQP_URL


def base_mongodb_url() -> str:
    return os.environ.get("M365SYNC_MONGODB_URL") or DEFAULT_MONGODB_URL


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    query = parts.query
    if "directConnection" not in query and "+srv" not in parts.scheme:
        query = "&".join(q for q in (query, "directConnection=true") if q)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, query, ""))


def with_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))


class RabbitAdmin:
    """The RabbitMQ management API of the broker behind ``M365SYNC_AMQP_URL``."""

    def __init__(self, amqp_url: str) -> None:
        parts = urlsplit(amqp_url)
        self.base = f"http://{parts.hostname}:15672/api"
        self.headers = {
            "Authorization": aiohttp.encode_basic_auth(
                parts.username or "guest", parts.password or "guest"
            )
        }

    async def request(self, method: str, path: str, json: object | None = None) -> object:
        async with (
            aiohttp.ClientSession(headers=self.headers) as http,
            http.request(method, self.base + path, json=json) as resp,
        ):
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {await resp.text()}")
            if resp.content_type == "application/json":
                return await resp.json()
            return None

    async def queue(self, vhost: str, name: str) -> dict[str, object]:
        """The queue's management record, once its message figures are there.

        The management API leaves out ``messages`` until its statistics have caught up
        with a new queue (seconds), so reading it too early is retried, not misread.
        """
        path = f"/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"
        result: object = None
        for _ in range(100):
            result = await self.request("GET", path)
            assert isinstance(result, dict)
            if "messages" in result:
                return result
            await asyncio.sleep(0.1)
        assert isinstance(result, dict)
        return result


@pytest.fixture
def rabbit_admin() -> RabbitAdmin:
    return RabbitAdmin(base_amqp_url())


@pytest.fixture
async def vhost(rabbit_admin: RabbitAdmin) -> AsyncIterator[str]:
    """A private vhost on the real broker, deleted with everything in it afterwards."""
    name = f"m365sync-test-{uuid.uuid4().hex[:12]}"
    user = urlsplit(base_amqp_url()).username or "guest"
    await rabbit_admin.request("PUT", f"/vhosts/{name}")
    await rabbit_admin.request(
        "PUT", f"/permissions/{name}/{user}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    yield name
    await rabbit_admin.request("DELETE", f"/vhosts/{name}")


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return with_vhost(base_amqp_url(), vhost)


@pytest.fixture
async def mongodb_url() -> AsyncIterator[str]:
    """A private database's URL; the database is dropped afterwards, whoever used it."""
    url = with_database(base_mongodb_url(), f"m365sync_test_{uuid.uuid4().hex[:12]}")
    yield url
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        url, serverSelectionTimeoutMS=5000
    )
    await client.drop_database(client.get_default_database().name)
    await client.close()


@pytest.fixture
async def mongo_db(mongodb_url: str) -> AsyncIterator[AsyncDatabase[dict[str, object]]]:
    """A private database on the real server, dropped afterwards."""
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        mongodb_url, serverSelectionTimeoutMS=5000
    )
    db = client.get_default_database()
    yield db
    await client.close()


def _dump_tasks(signum: int, frame: object) -> None:
    """``kill -USR1 <pytest pid>``: print every asyncio task's stack (a hung test's culprit)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        traceback.print_stack(frame, file=sys.stderr)  # type: ignore[arg-type]
        return
    for task in asyncio.all_tasks(loop):
        print(f"--- {task.get_name()} {task!r:.200}", file=sys.stderr)
        task.print_stack(limit=8, file=sys.stderr)


if hasattr(signal, "SIGUSR1"):
    signal.signal(signal.SIGUSR1, _dump_tasks)


published.install()


@pytest.fixture(autouse=True)
def _published_messages_follow_their_schemas() -> Iterator[None]:
    """Every message the service published to 1Relation during the test matched its schema."""
    published.take_violations()  # what an earlier test's leftovers published is theirs
    yield
    violations = published.take_violations()
    assert not violations, "published messages break docs/schemas:\n" + "\n".join(violations[:20])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many published messages the suite checked against their schemas."""
    for line in published.summary():
        terminalreporter.write_line(line)

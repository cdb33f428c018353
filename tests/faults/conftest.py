"""Private nodes for fault tests: one RabbitMQ node per session, one FerretDB per test.

The fault tests stop, kill and restart these; every other test keeps using the shared
broker and database. A RabbitMQ node takes 10-12 s to boot here, so it is shared by the
session (each test gets its own vhost on it, and finds it running); FerretDB starts in
under 0.1 s, so each test gets a fresh one.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from tests.support.nodes import FerretNode, RabbitNode, scratch_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: stops, kills and slows private service nodes")


@pytest.fixture(scope="session")
def rabbit_node() -> Iterator[RabbitNode]:
    """A private RabbitMQ node (own name, ports and data directory) for the whole session."""
    if not RabbitNode.available():
        pytest.skip("RabbitMQ is not installed (scripts/services.sh up installs it)")
    node = RabbitNode(scratch_dir("m365sync-fault-rabbit"))
    try:
        node.start_blocking()
        yield node
    finally:
        node.stop_blocking()
        print(f"private RabbitMQ node boots (s): {[round(b, 1) for b in node.boot_s]}")
        shutil.rmtree(node.base_dir, ignore_errors=True)


@dataclass
class Broker:
    """The private node and this test's vhost on it."""

    node: RabbitNode
    vhost: str
    url: str


@pytest.fixture
async def broker(rabbit_node: RabbitNode) -> AsyncIterator[Broker]:
    """A private vhost on the private node, which is running when the test starts."""
    await rabbit_node.start()  # a test that failed midway may have left it stopped
    vhost = f"fault-{uuid.uuid4().hex[:10]}"
    url = await rabbit_node.add_vhost(vhost)
    yield Broker(rabbit_node, vhost, url)
    if not rabbit_node.running:
        await rabbit_node.start()
    await rabbit_node.delete_vhost(vhost)


@pytest.fixture
async def ferret() -> AsyncIterator[FerretNode]:
    """A private FerretDB on its own port and data directory, removed afterwards."""
    if not FerretNode.available():
        pytest.skip("FerretDB is not built (scripts/services.sh up builds it)")
    node = FerretNode(scratch_dir("m365sync-fault-ferret"))
    await node.start()
    try:
        yield node
    finally:
        await node.kill()
        node.remove()

"""A three-node RabbitMQ cluster on this machine, for the node-loss test.

Three :class:`RabbitNode` s (Debian's RabbitMQ, distinct node names, ports and data
directories, one Erlang cookie) boot side by side; the second and third join the first with
``rabbitmqctl join_cluster``. Quorum queues declared afterwards have a member on each node.
A stopped member restarts on its own data and rejoins by itself.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.nodes import RabbitNode, scratch_dir


class RabbitCluster:
    """Three clustered private RabbitMQ nodes; management calls go to any running member."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        self.base_dir = base_dir
        cookie = uuid.uuid4().hex.upper()
        tag = uuid.uuid4().hex[:6]
        self.nodes = [
            RabbitNode(base_dir / f"n{i}", nodename=f"m365sync-c{tag}-{i}@localhost", cookie=cookie)
            for i in range(size)
        ]
        self.formed_s: float | None = None

    @classmethod
    def create(cls) -> RabbitCluster:
        """A cluster in a fresh scratch directory (not started)."""
        return cls(scratch_dir("m365sync-cluster"))

    def start_blocking(self) -> float:
        """Boot every node at once, join them to the first; returns the time it took."""
        started = time.monotonic()
        errors: list[BaseException] = []

        def boot(node: RabbitNode) -> None:
            try:
                node.start_blocking(timeout_s=180)
            except BaseException as exc:  # reported below, after every boot ends
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(node,)) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            for args in (("stop_app",), ("join_cluster", first.nodename), ("start_app",)):
                out = node.ctl(*args, timeout_s=120)
                if args[0] == "join_cluster" and "Clustering node" not in out:
                    raise RuntimeError(f"{node.nodename} did not join: {out!r} {node.tail()}")
        self.wait_members_blocking(len(self.nodes))
        self.formed_s = time.monotonic() - started
        return self.formed_s

    def wait_members_blocking(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait until the first running node reports ``count`` running members."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            node = self.any_running()
            out = node.ctl("eval", "length(rabbit_nodes:all_running()).")
            if out.strip() == str(count):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster never had {count} running members")

    def stop_blocking(self) -> None:
        """Stop every node (side by side) and remove the data."""
        threads = [threading.Thread(target=node.stop_blocking) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def any_running(self) -> RabbitNode:
        """A member that is running (management calls and ``rabbitmqctl`` go there)."""
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no cluster member is running")

    def node_named(self, nodename: str) -> RabbitNode:
        """The member called ``nodename``."""
        return next(node for node in self.nodes if node.nodename == nodename)

    def urls(self, vhost: str) -> str:
        """Every member's AMQP URL of ``vhost``, comma-separated (``M365SYNC_AMQP_URL``)."""
        return ",".join(node.url(vhost) for node in self.nodes)

    # -- management API through any running member --------------------------------------------

    async def api(self, method: str, path: str, body: object | None = None) -> Any:
        """Call the management API of a running member."""
        return await self.any_running().api(method, path, body)

    async def add_vhost(self, name: str) -> None:
        """Create ``name`` (cluster-wide) with full rights for ``guest``."""
        vhost = quote(name, safe="")
        await self.api("PUT", f"/vhosts/{vhost}")
        await self.api(
            "PUT", f"/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
        )

    async def delete_vhost(self, name: str) -> None:
        """Delete ``name`` and everything in it."""
        await self.api("DELETE", f"/vhosts/{quote(name, safe='')}")

    async def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """Every queue of ``vhost`` with its figures, as a running member reports them."""
        result = await self.api("GET", f"/queues/{quote(vhost, safe='')}")
        return {str(q["name"]): q for q in result}

    async def leaders(self, vhost: str, prefix: str) -> Counter[str]:
        """How many of the queues whose name starts with ``prefix`` each node leads."""
        queues = await self.queues(vhost)
        return Counter(
            str(q.get("leader") or q.get("node")) for n, q in queues.items() if n.startswith(prefix)
        )

    async def start_node(self, node: RabbitNode) -> float:
        """Restart a stopped member on its data (it rejoins by itself); returns its boot time."""
        boot = await node.start()
        await asyncio.to_thread(self.wait_members_blocking, len(self.nodes))
        return boot

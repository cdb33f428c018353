"""Private service nodes for fault tests: a RabbitMQ node and a FerretDB process of our own.

Fault tests stop, kill and restart these; the shared broker on 5672 and the shared
database on 27017 that every other test uses are never touched. Each node has its own
name, ports and data directory, and restarts on the same data, as a real restart would.

Measured on the 2-core CI machine: a RabbitMQ 3.10 node with the management plugin boots in
about 10-12 s (so the node is session-scoped, one vhost per test) and stops gracefully in
about 5 s; FerretDB starts in under 0.1 s (so each test gets its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
ROOT = Path(__file__).resolve().parents[2]
FERRETDB = ROOT / ".run" / "ferretdb-embed"
GUEST_AUTH = aiohttp.encode_basic_auth("guest", "guest")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def scratch_dir(prefix: str) -> Path:
    """A fresh directory for node data, on disk: FerretDB's embedded SQLite crashed with
    SIGBUS in its WAL reader on tmpfs (see scripts/services.sh)."""
    base = Path(tempfile.gettempdir())
    path = base / f"{prefix}-{uuid.uuid4().hex[:10]}"
    path.mkdir(parents=True)
    return path


def _kill_group(proc: subprocess.Popen[bytes] | asyncio.subprocess.Process) -> None:
    # The node runs in its own session: the group holds the start script, the Erlang VM
    # and its helpers, and nothing else.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class RabbitNode:
    """A private RabbitMQ node (``m365sync-fault-<random>@localhost``) run as a child process.

    ``kill()`` is SIGKILL for the whole node, ``stop()`` a graceful SIGTERM (the start script
    turns it into an orderly shutdown); ``start()`` after either restarts on the same data.
    """

    def __init__(
        self, base_dir: Path, *, nodename: str | None = None, cookie: str | None = None
    ) -> None:
        """``nodename`` and ``cookie`` are given for the members of one cluster (the cookie
        must be the same on every member); otherwise each node has its own."""
        self.base_dir = base_dir
        self.nodename = nodename or f"m365sync-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.management_port = free_port()
        self.boot_s: list[float] = []
        self._proc: subprocess.Popen[bytes] | None = None
        home = base_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie_file = home / ".erlang.cookie"
        cookie_file.write_text(cookie or uuid.uuid4().hex.upper())
        cookie_file.chmod(0o400)
        (base_dir / "rabbitmq.conf").write_text(
            "\n".join(
                (
                    f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
                    f"management.tcp.port = {self.management_port}",
                    "management.tcp.ip = 127.0.0.1",
                    # Queue figures (consumers, unacked, redeliveries) fresh within 0.5 s.
                    "collect_statistics_interval = 500",
                    "log.file.level = info",
                    "",
                )
            )
        )
        # Quorum queues report their figures on the Ra tick (5 s by default): without a
        # faster tick the management API shows consumers and unacked counts seconds late.
        (base_dir / "advanced.config").write_text("[{rabbit, [{quorum_tick_interval, 250}]}].\n")
        (base_dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (base_dir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(home),  # the Erlang cookie of this node (and of rabbitmqctl for it)
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base_dir / "log"),
            "RABBITMQ_PID_FILE": str(base_dir / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(base_dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base_dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base_dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base_dir / "rabbitmq-env.conf"),
        }

    @staticmethod
    def available() -> bool:
        """Whether Debian's RabbitMQ is installed here."""
        return RABBITMQ_SERVER.exists()

    def url(self, vhost: str = "/") -> str:
        """The AMQP URL of ``vhost`` on this node."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"

    @property
    def running(self) -> bool:
        """Whether the node process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle (blocking; the async wrappers below run them off the event loop) ---------

    def start_blocking(self, timeout_s: float = 120.0) -> float:
        """Start the node and wait until AMQP and the management API answer; returns the boot time."""
        if self.running:
            return 0.0
        started = time.monotonic()
        log = (self.base_dir / "console.log").open("ab")
        self._proc = subprocess.Popen(
            [str(RABBITMQ_SERVER)],
            env=self.env,
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ node exited {self._proc.returncode}: {self.tail()}")
            if port_open(self.amqp_port) and self._management_answers():
                boot = time.monotonic() - started
                self.boot_s.append(boot)
                return boot
            time.sleep(0.1)
        self.kill_blocking()
        raise RuntimeError(f"RabbitMQ node did not start within {timeout_s} s: {self.tail()}")

    def _management_answers(self) -> bool:
        import urllib.request  # noqa: PLC0415  only used while booting

        request = urllib.request.Request(f"http://127.0.0.1:{self.management_port}/api/overview")
        request.add_header("Authorization", GUEST_AUTH)
        try:
            with urllib.request.urlopen(request, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop_blocking(self, timeout_s: float = 60.0) -> None:
        """Graceful stop (SIGTERM to the start script: an orderly broker shutdown)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(self._proc)
                self._proc.wait()
        self._wait_port_closed()

    def kill_blocking(self) -> None:
        """SIGKILL the node: no goodbye to clients, no orderly flush."""
        if self._proc is None:
            return
        _kill_group(self._proc)
        self._proc.wait()
        self._wait_port_closed()

    def _wait_port_closed(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while port_open(self.amqp_port) and time.monotonic() < deadline:
            time.sleep(0.05)

    async def start(self) -> float:
        """Start (or restart on the same data); returns the boot time in seconds."""
        return await asyncio.to_thread(self.start_blocking)

    async def stop(self) -> None:
        """Graceful stop."""
        await asyncio.to_thread(self.stop_blocking)

    async def kill(self) -> None:
        """SIGKILL."""
        await asyncio.to_thread(self.kill_blocking)

    def tail(self, lines: int = 30) -> str:
        """The end of the node's console output, for failure messages."""
        path = self.base_dir / "console.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def ctl(self, *args: str, timeout_s: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <node> ...`` against this node (about 1.5 s per call)."""
        result = subprocess.run(  # noqa: PLW1510  the caller decides what a failure means
            [str(RABBITMQCTL), "-n", self.nodename, *args],
            env=self.env,
            capture_output=True,
            timeout=timeout_s,
            text=True,
        )
        return result.stdout

    # -- management API -----------------------------------------------------------------------

    async def api(self, method: str, path: str, body: object | None = None) -> Any:
        """Call the node's management API; raises on an error answer."""
        async with (
            aiohttp.ClientSession(headers={"Authorization": GUEST_AUTH}) as http,
            http.request(
                method,
                f"http://127.0.0.1:{self.management_port}/api{path}",
                json=body,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp,
        ):
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {await resp.text()}")
            if resp.content_type == "application/json":
                return await resp.json()
            return None

    async def add_vhost(self, name: str) -> str:
        """Create ``name`` with full rights for ``guest``; returns its AMQP URL."""
        vhost = quote(name, safe="")
        await self.api("PUT", f"/vhosts/{vhost}")
        await self.api(
            "PUT", f"/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
        )
        return self.url(name)

    async def delete_vhost(self, name: str) -> None:
        """Delete ``name`` and everything in it."""
        await self.api("DELETE", f"/vhosts/{quote(name, safe='')}")

    async def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """Every queue of ``vhost`` with its figures (messages, consumers, message_stats)."""
        result = await self.api("GET", f"/queues/{quote(vhost, safe='')}")
        return {str(q["name"]): q for q in result}


class FerretNode:
    """A private FerretDB (SQLite backend) on its own port and data directory."""

    def __init__(self, data_dir: Path, *, binary: Path = FERRETDB) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = free_port()
        self.starts: list[float] = []
        self._proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def available(binary: Path = FERRETDB) -> bool:
        """Whether the FerretDB binary built by ``scripts/services.sh`` is there."""
        return binary.exists()

    def url(self, database: str) -> str:
        """The MongoDB URL of ``database`` on this server."""
        return f"mongodb://127.0.0.1:{self.port}/{database}?directConnection=true"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout_s: float = 30.0) -> float:
        """Start (or restart on the same data); returns how long it took to listen."""
        if self.running:
            return 0.0
        started = time.monotonic()
        with (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                str(self.binary),
                "-listen-addr",
                f"127.0.0.1:{self.port}",
                "-sqlite-dir",
                str(self.data_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        while time.monotonic() - started < timeout_s:
            if self._proc.returncode is not None:
                raise RuntimeError(f"FerretDB exited {self._proc.returncode}")
            if port_open(self.port):
                took = time.monotonic() - started
                self.starts.append(took)
                return took
            await asyncio.sleep(0.02)
        raise RuntimeError(f"FerretDB did not listen within {timeout_s} s")

    async def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout_s``)."""
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), timeout_s)
        except TimeoutError:
            _kill_group(self._proc)
            await self._proc.wait()

    async def kill(self) -> None:
        """SIGKILL."""
        if self._proc is None or self._proc.returncode is not None:
            return
        _kill_group(self._proc)
        await self._proc.wait()

    def remove(self) -> None:
        """Delete the data directory and log (after the process is gone)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir.parent / f"{self.data_dir.name}.log").unlink()

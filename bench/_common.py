"""What every benchmark shares: private backends, service processes, the simulator, stats.

Nothing here runs inside a service process: the service roles are started as real
``python -m processor.cli <role>`` processes (as in production) and the simulator as
``python -m graphsim``, so the load generator never shares an event loop with what it
measures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import signal
import socket
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import psutil
from pymongo import AsyncMongoClient

from crypto import generate_master_key_spec

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MONGODB_URL = "mongodb://127.0.0.1:27017/m365sync"
ROOT = Path(__file__).resolve().parent.parent


# -- numbers ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of ``values`` (``pct`` in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal."""
    return f"{seconds * 1000:.1f} ms"


def machine() -> str:
    """One line naming the machine and the date, for the printed report."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    mem_gib = psutil.virtual_memory().total / 2**30
    return (
        f"{now}; {os.cpu_count()} cores, {mem_gib:.0f} GiB; {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}"
    )


def header(title: str) -> None:
    """Print the benchmark's title and the machine line."""
    print(f"== {title}")
    print(f"   {machine()}")


# -- private vhost and database --------------------------------------------------------------


@dataclass(frozen=True)
class Backends:
    """A private RabbitMQ vhost and MongoDB-wire database, with URLs that point at them."""

    amqp_url: str
    mongodb_url: str
    vhost: str
    database: str
    management_url: str
    management_auth: aiohttp.BasicAuth


def _with_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    query = parts.query
    if "directConnection" not in query and "+srv" not in parts.scheme:
        query = "&".join(q for q in (query, "directConnection=true") if q)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, query, ""))


async def _management(
    backends_url: str, auth: aiohttp.BasicAuth, method: str, path: str, body: object = None
) -> None:
    async with (
        aiohttp.ClientSession(auth=auth) as http,
        http.request(method, backends_url + path, json=body) as resp,
    ):
        if resp.status >= 400:
            raise RuntimeError(f"management API {method} {path}: {resp.status} {await resp.text()}")


async def management_json(backends: Backends, path: str) -> Any:
    """GET ``path`` (under ``/api``) from RabbitMQ's management API; the parsed JSON."""
    async with (
        aiohttp.ClientSession(auth=backends.management_auth) as http,
        http.get(backends.management_url + path) as resp,
    ):
        if resp.status >= 400:
            raise RuntimeError(f"management API GET {path}: {resp.status} {await resp.text()}")
        return await resp.json()


@asynccontextmanager
async def private_backends(tag: str) -> AsyncIterator[Backends]:
    """A fresh vhost (management API) and database; both removed on exit, even on failure."""
    base_amqp = os.environ.get("M365SYNC_AMQP_URL") or DEFAULT_AMQP_URL
    base_mongo = os.environ.get("M365SYNC_MONGODB_URL") or DEFAULT_MONGODB_URL
    parts = urlsplit(base_amqp)
    user = parts.username or "guest"
    auth = aiohttp.BasicAuth(user, parts.password or "guest")
    management_url = f"http://{parts.hostname}:15672/api"
    suffix = uuid.uuid4().hex[:10]
    vhost = f"m365sync-bench-{tag}-{suffix}"
    database = f"m365sync_bench_{tag}_{suffix}"
    await _management(management_url, auth, "PUT", f"/vhosts/{quote(vhost, safe='')}")
    try:
        await _management(
            management_url,
            auth,
            "PUT",
            f"/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        yield Backends(
            amqp_url=_with_vhost(base_amqp, vhost),
            mongodb_url=_with_database(base_mongo, database),
            vhost=vhost,
            database=database,
            management_url=management_url,
            management_auth=auth,
        )
    finally:
        await _management(management_url, auth, "DELETE", f"/vhosts/{quote(vhost, safe='')}")
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            _with_database(base_mongo, database), serverSelectionTimeoutMS=5000
        )
        try:
            await client.drop_database(database)
        finally:
            await client.close()


# -- service configuration and processes -----------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(
    backends: Backends,
    *,
    http_port: int,
    sim: dict[str, Any] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of a service process; without ``sim`` Graph points at a dead port."""
    graph = {
        "M365SYNC_GRAPH_URL": "http://127.0.0.1:9/v1.0",
        "M365SYNC_AUTHORITY_HOST": "http://127.0.0.1:9",
        "M365SYNC_CLIENT_ID": "bench-client",
        "M365SYNC_CLIENT_SECRET": "bench-secret",
    }
    if sim is not None:
        graph = {
            "M365SYNC_GRAPH_URL": sim["graph_url"],
            "M365SYNC_AUTHORITY_HOST": sim["authority_host"],
            "M365SYNC_CA_BUNDLE": sim["ca_file"],
            "M365SYNC_CLIENT_ID": sim["client_id"],
            "M365SYNC_CLIENT_SECRET": sim["client_secret"],
        }
    return {
        "M365SYNC_AMQP_URL": backends.amqp_url,
        "M365SYNC_MONGODB_URL": backends.mongodb_url,
        **graph,
        "M365SYNC_PUBLIC_URL": f"http://127.0.0.1:{http_port}",
        "M365SYNC_HTTP_HOST": "127.0.0.1",
        "M365SYNC_HTTP_PORT": str(http_port),
        "M365SYNC_METRICS_PORT": "0",
        "M365SYNC_MASTER_KEYS": generate_master_key_spec("bench1"),
        "M365SYNC_HASH_KEY": base64.b64encode(os.urandom(32)).decode(),
        "M365SYNC_CONNECT_SECRET": base64.b64encode(os.urandom(32)).decode(),
        "M365SYNC_API_TOKEN": base64.b64encode(os.urandom(24)).decode(),
        "M365SYNC_RETURN_URL_ORIGINS": "http://127.0.0.1:9",
        "M365SYNC_SHUTDOWN_GRACE_S": "5",
        **extra,
    }


class ChildProcess:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, *, stdout_pipe: bool = False) -> ChildProcess:
        """Start it (cwd: the repository root, so that ``-m`` finds the packages)."""
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=asyncio.subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
            )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def wait_log(self, needle: str, timeout_s: float = 60) -> dict[str, Any]:
        """Wait for a JSON log line containing ``needle``; returns it parsed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                if needle in line:
                    with contextlib.suppress(ValueError):
                        parsed: dict[str, Any] = json.loads(line)
                        return parsed
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} never logged {needle!r}:\n{self.tail()}")

    async def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM and wait for the graceful exit; SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


def role_process(
    role: str, env: dict[str, str], log_dir: Path, *, name: str | None = None
) -> ChildProcess:
    """``python -m processor.cli <role>``: the production entry point of a service role.

    ``name`` (default: the role) names the process and its log file, so that several
    processes of one role can run side by side.
    """
    return ChildProcess(name or role, [sys.executable, "-m", "processor.cli", role], env, log_dir)


async def wait_ready(port: int, timeout_s: float = 60) -> None:
    """Poll the receiver's ``/readyz`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing ready on port {port} within {timeout_s} s")
            await asyncio.sleep(0.1)


@asynccontextmanager
async def simulator_process(log_dir: Path) -> AsyncIterator[tuple[ChildProcess, dict[str, Any]]]:
    """``python -m graphsim`` in its own process; yields it and its state (URLs, CA file)."""
    sim = ChildProcess(
        "graphsim",
        [sys.executable, "-m", "graphsim", "--port", "0", "--state-dir", str(log_dir / "sim")],
        {},
        log_dir,
    )
    await sim.start(stdout_pipe=True)
    try:
        assert sim.proc is not None
        assert sim.proc.stdout is not None
        line = await asyncio.wait_for(sim.proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"the simulator did not start:\n{sim.tail()}")
        yield sim, json.loads(line)
    finally:
        await sim.stop()


def sim_ssl(state: dict[str, Any]) -> ssl.SSLContext:
    """A client TLS context that trusts the simulator's CA."""
    return ssl.create_default_context(cafile=state["ca_file"])


class RssSampler:
    """Samples the resident set size of processes every ``interval_s`` in the background."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.25) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._interval_s = interval_s
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        now = time.monotonic()
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                self.samples[name].append((now, proc.memory_info().rss))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def at(self, name: str, when: float) -> int:
        """The sample of ``name`` taken closest to monotonic time ``when``."""
        return min(self.samples[name], key=lambda s: abs(s[0] - when))[1]

    def peak(self, name: str, since: float = 0.0, until: float = float("inf")) -> int:
        return max(rss for t, rss in self.samples[name] if since <= t <= until)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def service_pids() -> dict[str, int]:
    """The processes listening on RabbitMQ's and the database's ports, when they run here."""
    amqp = urlsplit(os.environ.get("M365SYNC_AMQP_URL") or DEFAULT_AMQP_URL).port or 5672
    mongo = urlsplit(os.environ.get("M365SYNC_MONGODB_URL") or DEFAULT_MONGODB_URL).port or 27017
    wanted = {amqp: "rabbitmq", mongo: "ferretdb"}
    found: dict[str, int] = {}
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.pid:
                name = wanted.get(conn.laddr.port)
                if name is not None:
                    found.setdefault(name, conn.pid)
    return found


def _busy_s() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


class CpuMeter:
    """CPU seconds spent by named processes (and the whole machine) between two snapshots."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._start: dict[str, float] = {}
        self._wall = 0.0
        #: CPU seconds per named process of the last :meth:`stop`.
        self.spent: dict[str, float] = {}

    def _snapshot(self) -> dict[str, float]:
        values = {"machine": _busy_s()}
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                values[name] = t.user + t.system
        return values

    def start(self) -> None:
        self._start = self._snapshot()
        self._wall = time.monotonic()

    def stop(self) -> str:
        """One line: CPU seconds per process, the rest of the machine, and the capacity."""
        end = self._snapshot()
        wall = time.monotonic() - self._wall
        spent = {k: end[k] - self._start[k] for k in end if k in self._start}
        machine_s = spent.pop("machine")
        self.spent = dict(spent)
        other = machine_s - sum(spent.values())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in spent.items())
        cores = os.cpu_count() or 1
        return (
            f"CPU s: {parts}, everything else {max(other, 0.0):.1f} "
            f"(machine busy {machine_s:.1f} of {cores} x {wall:.1f} = {cores * wall:.1f})"
        )


async def database_commands(mongodb_url: str) -> dict[str, int]:
    """The server's command counters (``serverStatus``; server-wide, not per database)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongodb_url, serverSelectionTimeoutMS=5000
    )
    try:
        status = await client.admin.command("serverStatus")
    finally:
        await client.close()
    commands = status.get("metrics", {}).get("commands", {})
    return {
        name: int(value.get("total", 0))
        for name, value in commands.items()
        if isinstance(value, dict)
    }


def command_delta(before: dict[str, int], after: dict[str, int]) -> str:
    """The find/insert/update/delete commands between two counter snapshots, as one string."""
    names = ("find", "insert", "update", "delete", "aggregate", "getMore")
    return ", ".join(f"{n} {after.get(n, 0) - before.get(n, 0)}" for n in names)


@contextlib.contextmanager
def log_directory(keep: str | None, tag: str) -> Iterator[Path]:
    """Where child processes write their logs: ``keep`` (kept) or a temporary directory."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=f"bench-{tag}-") as tmp:
        yield Path(tmp)


def quiet_driver_logs(log_dir: Path) -> None:
    """Send the driver process's own service log events to ``driver.log``, not the report."""
    from processor.logs import configure_logging  # noqa: PLC0415

    stream = (log_dir / "driver.log").open("a")
    configure_logging("info", stream=stream)


def bench_parser(
    module: str, description: str | None, *, raw_description: bool = False
) -> argparse.ArgumentParser:
    """The command line of ``python -m bench.<module>``, described by its docstring."""
    return argparse.ArgumentParser(
        prog=f"python -m bench.{module}",
        description=description,
        formatter_class=(
            argparse.RawDescriptionHelpFormatter if raw_description else argparse.HelpFormatter
        ),
    )


def add_service_options(parser: argparse.ArgumentParser) -> None:
    """``--shards`` and ``--prefetch``: the service settings a benchmark may vary."""
    parser.add_argument("--shards", type=int, default=8, help="M365SYNC_SHARDS (default 8)")
    parser.add_argument("--prefetch", type=int, default=32, help="M365SYNC_PREFETCH (default 32)")


def run_bench(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    *,
    drain_timeout_s: float | None = None,
) -> None:
    """Add ``--drain-timeout`` (for a benchmark that drains, its default given) and
    ``--log-dir``, parse the command line and run the benchmark."""
    if drain_timeout_s is not None:
        parser.add_argument("--drain-timeout", type=float, default=drain_timeout_s)
    parser.add_argument("--log-dir", default=None, help="keep the processes' logs here")
    asyncio.run(run(parser.parse_args()))

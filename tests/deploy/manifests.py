"""What the deploy tests compare the manifests with, read from the code itself.

Nothing here copies a name: the environment variables come from ``processor/settings.py``'s
own reads, the queue names from running ``declare_topology`` on a recording channel, and
the metric names from the calls that register them.
"""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from processor.metrics import PREFIX
from processor.topology import TopologyConfig, declare_topology

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "chart" / "m365sync"
PRODUCTION_VALUES = ROOT / "deploy" / "chart" / "values-production.yaml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ROLES = ("receiver", "worker", "outbound", "subscriptions")


def settings_variables() -> set[str]:
    """Every M365SYNC_* variable ``load_settings`` reads (its ``r.get``/``r.parse`` calls)."""
    tree = ast.parse((ROOT / "processor" / "settings.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "parse")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "r"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).startswith("M365SYNC_")
        ):
            names.add(str(node.args[0].value))
    return names


def exported_metrics() -> set[str]:
    """Names of every metric family the packages register (``m365sync_…``)."""
    names: set[str] = set()
    for package in ("processor", "handlers", "subscriptions"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("counter", "gauge", "histogram", "counts", "gauges")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    names.add(PREFIX + node.args[0].value)
    return names


_METRIC = re.compile(r"\bm365sync_[a-z0-9_]+")


def metrics_in(expr: str) -> set[str]:
    """The m365sync metric families a PromQL expression reads (histogram suffixes cut)."""
    found = set()
    known = exported_metrics()
    for name in _METRIC.findall(expr):
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name not in known:
                family = name[: -len(suffix)]
        found.add(family)
    return found


class _Queue:
    def __init__(self, name: str) -> None:
        self.name = name

    async def bind(self, *_: Any, **__: Any) -> None:
        return None


class _Exchange:
    def __init__(self, name: str) -> None:
        self.name = name


class RecordingChannel:
    """Just enough of a channel for ``declare_topology``: it records the queues."""

    def __init__(self) -> None:
        self.queues: dict[str, dict[str, Any]] = {}

    async def declare_exchange(self, name: str, *_: Any, **__: Any) -> _Exchange:
        return _Exchange(name)

    async def declare_queue(
        self, name: str, *_: Any, arguments: dict[str, Any] | None = None, **__: Any
    ) -> _Queue:
        self.queues[name] = dict(arguments or {})
        return _Queue(name)


def declared_queues(shard_count: int) -> dict[str, dict[str, Any]]:
    """Every queue the code declares for ``shard_count`` shards, with its arguments."""
    channel = RecordingChannel()
    asyncio.run(declare_topology(channel, TopologyConfig(shard_count=shard_count)))  # type: ignore[arg-type]
    return channel.queues


def render(helm: str, *values: Path, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``helm template`` the chart; the documents, parsed."""
    args = [helm, "template", "m365sync", str(CHART)]
    for path in values:
        args += ["-f", str(path)]
    out = subprocess.run([*args, *extra], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def values(*paths: Path) -> dict[str, Any]:
    """The chart's values merged with ``paths`` (maps merge, everything else replaces)."""
    merged: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in paths:
        _merge(merged, yaml.safe_load(path.read_text()))
    return merged


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value

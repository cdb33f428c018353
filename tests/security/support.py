"""What the security tests observe: queue depths, document counts, /metrics samples."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from processor.topology import DEAD_QUEUE, INBOUND_QUEUE, LIFECYCLE_QUEUE, OUTBOUND_QUEUE
from tests.e2e.harness import Stack


def work_queues(stack: Stack) -> list[str]:
    """The service's queues a forged or invalid input could end up in."""
    shards = range(stack.settings.shard_count)
    return [
        *(INBOUND_QUEUE.format(shard=n) for n in shards),
        *(OUTBOUND_QUEUE.format(shard=n) for n in shards),
        LIFECYCLE_QUEUE,
        DEAD_QUEUE,
    ]


async def queue_depths(stack: Stack, names: list[str]) -> dict[str, int]:
    """Exact message counts (ready + unacknowledged) by passive declare.

    The management API's figures lag by its statistics interval (5 s), so a message
    published a moment ago may not show there yet; a passive declare answers from the
    queue itself. With no consumer on these queues, every published message stays counted.
    """
    channel = await stack.rt.connection.channel()
    try:
        depths = {}
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            depths[name] = queue.declaration_result.message_count or 0
        return depths
    finally:
        await channel.close()


async def document_counts(stack: Stack) -> dict[str, int]:
    """Documents per collection in the stack's database."""
    db = stack.rt.db
    return {name: await db[name].count_documents({}) for name in await db.list_collection_names()}


async def metrics(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample the internal listener serves at /metrics, keyed by (name, labels)."""
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.get(f"http://127.0.0.1:{stack.metrics_port}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)

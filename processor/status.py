"""The operator's view: what ``m365sync status`` prints and the operator page shows.

Facts, read-only and without personal data (account ids are the CRM's, never names or
mail addresses):

- accounts by status (``accounts``);
- subscriptions expiring within 24 h, and those already expired (``subscriptions``);
- per queue: messages waiting (a passive declare: works on any RabbitMQ with AMQP rights
  only, no management plugin), messages held by a consumer, consumers, and the age of the
  oldest message. Quorum queues do not report ``head_message_timestamp`` and a peek would
  count against their delivery limit, so the age comes from the consumers' heartbeats (the
  head of a shard queue is always among its active consumer's unsettled deliveries); the
  dead-letter queue, which has no delivery limit, is peeked;
- dead letters: how many, and how long ago the oldest was dead-lettered;
- lag p99 per role over the last five minutes, from the same heartbeats.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pymongo.asynchronous.database import AsyncDatabase

from contract.statuses import STATUSES
from handlers.timeutil import as_utc, isoformat_z, utcnow
from processor.broker import DEAD_LETTERED_HEADER
from processor.lag import merge_reports, published_ms
from processor.repositories.readings import OperatorReadings
from processor.repositories.workers import Registry
from processor.topology import (
    DEAD_QUEUE,
    LIFECYCLE_QUEUE,
    ONERELATION_INBOUND_QUEUE,
    OUTBOUND_INTAKE_QUEUE,
    RETRY_DELAYS_S,
    RETRY_QUEUE,
    shard_queue_names,
)

#: Subscriptions whose expiry is nearer than this are listed.
EXPIRING_WITHIN = timedelta(hours=24)
#: At most this many expiring subscriptions are named (all are counted).
EXPIRING_LISTED = 20

#: Balancer role (heartbeats) -> the command that runs it.
ROLES = {"inbound": "worker", "outbound": "outbound"}


def queue_names(shard_count: int) -> list[str]:
    """Every queue the service declares, in the order the view lists them."""
    names = [*shard_queue_names("inbound", shard_count), OUTBOUND_INTAKE_QUEUE]
    names += shard_queue_names("outbound", shard_count)
    names += [LIFECYCLE_QUEUE, ONERELATION_INBOUND_QUEUE, DEAD_QUEUE]
    names += [
        RETRY_QUEUE.format(target=target, delay_s=delay)
        for target in ("inbound", "outbound")
        for delay in RETRY_DELAYS_S
    ]
    return names


async def account_facts(readings: OperatorReadings) -> dict[str, int]:
    """Accounts by status (every status of the contract, zero included)."""
    counts: Counter[str] = Counter()
    for status in await readings.account_statuses():
        counts[str(status or "unknown")] += 1
    return {status: counts.get(status, 0) for status in sorted(STATUSES | set(counts))}


async def subscription_facts(readings: OperatorReadings, now: datetime) -> dict[str, Any]:
    """Subscriptions expiring within 24 h (soonest first) and already expired ones."""
    expiring: list[tuple[datetime, str]] = []
    expired = total = 0
    for account_id, expires_at in await readings.subscription_expiries():
        total += 1
        if expires_at is None:
            continue
        expires = as_utc(expires_at)
        if expires <= now:
            expired += 1
        elif expires - now <= EXPIRING_WITHIN:
            expiring.append((expires, account_id))
    expiring.sort()
    return {
        "total": total,
        "expired": expired,
        "expiring_24h": len(expiring),
        "expiring": [
            {
                "account_id": account,
                "expires_at": isoformat_z(at),
                "in_s": int((at - now).total_seconds()),
            }
            for at, account in expiring[:EXPIRING_LISTED]
        ],
    }


async def _declared(connection: AbstractConnection, name: str) -> tuple[int, int] | None:
    """(ready messages, consumers) by a passive declare; None if the queue does not exist."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
    except Exception:  # a missing queue closes the channel with 404
        return None
    result = queue.declaration_result
    ready, consumers = int(result.message_count or 0), int(result.consumer_count or 0)
    await channel.close()
    return ready, consumers


def dead_lettered_at(message: AbstractIncomingMessage) -> datetime | None:
    """When a dead letter was dead-lettered: by the service (its header), by the broker
    (``x-death``), else when it was first published."""
    headers = message.headers or {}
    stamp = headers.get(DEAD_LETTERED_HEADER)
    if isinstance(stamp, int) and not isinstance(stamp, bool):
        return datetime.fromtimestamp(stamp / 1000, tz=UTC)
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0].get("time")
        if isinstance(death, datetime):
            return death if death.tzinfo else death.replace(tzinfo=UTC)
    published = published_ms(message)
    return None if published is None else datetime.fromtimestamp(published / 1000, tz=UTC)


async def _oldest_dead_letter(connection: AbstractConnection) -> datetime | None:
    """When the oldest dead letter was dead-lettered: a peek (the dead-letter queue has no
    delivery limit, so the return does not count against anything)."""
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
        message = await queue.get(no_ack=False, fail=False, timeout=5)
        if message is None:
            return None
        at = dead_lettered_at(message)
        await message.reject(requeue=True)
        return at
    finally:
        if not channel.is_closed:
            await channel.close()


async def collect(
    *,
    db: AsyncDatabase[dict[str, Any]],
    connection: AbstractConnection,
    shard_count: int,
    clock: Callable[[], datetime] = utcnow,
) -> dict[str, Any]:
    """Every fact of the operator's view, as JSON-ready data."""
    now = clock()
    registry = Registry(db, clock=clock)
    readings = OperatorReadings(db=db)
    lag: dict[str, Any] = {}
    held_oldest: dict[str, datetime] = {}
    held_counts: Counter[str] = Counter()
    for family, command in ROLES.items():
        reports = await registry.reports(family)
        merged = merge_reports(reports)
        lag[command] = {
            "processes": len(reports),
            "lag_p99_s": merged["lag_p99_s"],
            "samples": merged["lag_samples"],
        }
        held_oldest.update(merged["oldest_held"])
        held_counts.update(merged["held"])

    names = queue_names(shard_count)
    declared = await asyncio.gather(*(_declared(connection, name) for name in names))
    queues: list[dict[str, Any]] = []
    for name, found in zip(names, declared, strict=True):
        if found is None:
            queues.append({"queue": name, "exists": False})
            continue
        ready, consumers = found
        oldest = held_oldest.get(name)
        age_s = None if oldest is None else round((now - oldest).total_seconds(), 1)
        queues.append(
            {
                "queue": name,
                "exists": True,
                "ready": ready,
                "held": held_counts.get(name, 0),
                "consumers": consumers,
                "oldest_age_s": age_s,
            }
        )
    dead: dict[str, Any] = next((q for q in queues if q["queue"] == DEAD_QUEUE), {})
    oldest_dead = await _oldest_dead_letter(connection) if dead.get("ready") else None
    if oldest_dead is not None:
        dead["oldest_age_s"] = round((now - oldest_dead).total_seconds(), 1)
    return {
        "generated_at": isoformat_z(now),
        "accounts": await account_facts(readings),
        "subscriptions": await subscription_facts(readings, now),
        "queues": queues,
        "dead_letters": {
            "count": int(dead.get("ready") or 0),
            "oldest_age_s": dead.get("oldest_age_s"),
        },
        "lag": lag,
    }


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    value = float(seconds)
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])]


def render_text(facts: Mapping[str, Any]) -> str:
    """The facts as plain-text tables for a terminal."""
    out = [f"m365sync status at {facts['generated_at']}", ""]
    out += _table(("accounts", "count"), sorted(facts["accounts"].items()))
    subs = facts["subscriptions"]
    out += [
        "",
        f"subscriptions: {subs['total']} recorded, {subs['expiring_24h']} expiring within 24 h, "
        f"{subs['expired']} expired",
    ]
    if subs["expiring"]:
        out += _table(
            ("expiring account", "expires at", "in"),
            [(s["account_id"], s["expires_at"], _age(s["in_s"])) for s in subs["expiring"]],
        )
    rows = [
        (q["queue"], q["ready"], q["held"], q["consumers"], _age(q.get("oldest_age_s")))
        for q in facts["queues"]
        if q.get("exists")
    ]
    missing = [q["queue"] for q in facts["queues"] if not q.get("exists")]
    out += ["", *_table(("queue", "waiting", "held", "consumers", "oldest"), rows)]
    if missing:
        out.append(f"not declared yet: {', '.join(missing)}")
    dead = facts["dead_letters"]
    out += ["", f"dead letters: {dead['count']} (oldest {_age(dead['oldest_age_s'])})", ""]
    out += _table(
        ("role", "processes", "lag p99 (5 min)", "samples"),
        [
            (role, v["processes"], _age(v["lag_p99_s"]), v["samples"])
            for role, v in facts["lag"].items()
        ],
    )
    return "\n".join(out) + "\n"


StatusSource = Callable[[], Awaitable[dict[str, Any]]]

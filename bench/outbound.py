"""Outbound throughput and lag: 1Relation's changes to Graph writes, across many mailboxes.

Run: .venv/bin/python -m bench.outbound [--mailboxes 50] [--per-mailbox 20]

Publishes upserts to ``onerelation.outbound`` for N connected mailboxes against the
simulator and measures, side by side in one run, the service's Graph writes per second
and the lag from each publish to the event's creation in the simulator (p50/p99), next to
the simulator's raw create rate from a bare client with the same concurrency (the ceiling).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
from pymongo import AsyncMongoClient

from handlers.timeutil import parse_graph_datetime
from processor.devsignin import sign_in_headless
from processor.tokens import MsalApps
from processor.topology import ONERELATION_OUTBOUND
from subscriptions.registration import register_account
from tests.conftest import RabbitAdmin, base_amqp_url, base_mongodb_url, with_database, with_vhost
from tests.e2e.harness import running_stack
from tests.e2e.outbound_support import message, relation_event


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


async def main(mailboxes: int, per_mailbox: int) -> None:
    admin = RabbitAdmin(base_amqp_url())
    vhost = f"bench-outbound-{uuid.uuid4().hex[:8]}"
    await admin.request("PUT", f"/vhosts/{vhost}")
    await admin.request(
        "PUT", f"/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    db_url = with_database(base_mongodb_url(), f"bench_outbound_{uuid.uuid4().hex[:8]}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with running_stack(
                Path(tmp),
                amqp_url=with_vhost(base_amqp_url(), vhost),
                mongodb_url=db_url,
                roles=("outbound",),
            ) as stack:
                users = await stack.control.users()
                for n in range(len(users), mailboxes):
                    users.append(
                        await stack.control.create_user(f"Bench {n}", f"bench{n}@contoso.example")
                    )
                apps = MsalApps(
                    client_id=stack.settings.client_id,
                    client_secret=stack.settings.client_secret,
                    authority_host=stack.settings.authority_host,
                    ca_bundle=stack.settings.ca_bundle,
                )
                for n, user in enumerate(users[:mailboxes]):
                    await stack.control.set_signin_user(user["id"])
                    claims, cache = await sign_in_headless(
                        apps, ca_bundle=stack.settings.ca_bundle, tenant=stack.sim.tenant_id
                    )
                    await register_account(
                        stack.rt.store,
                        account_id=f"bench-{n}",
                        serialized_cache=cache,
                        user_id=claims["oid"],
                        tenant_id=claims["tid"],
                    )
                await stack.control.reset_counters()
                published: dict[str, float] = {}
                connection = await aio_pika.connect(stack.settings.amqp_url)
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.get_exchange(ONERELATION_OUTBOUND, ensure=False)
                    started = time.time()
                    for i in range(per_mailbox):
                        for n in range(mailboxes):
                            subject = f"bench {n}-{i}"
                            body = message(
                                f"bench-{n}",
                                f"rel-{n}-{i}",
                                1,
                                relation_event(subject, day=1 + i % 30),
                            )
                            published[subject] = time.time()
                            await exchange.publish(
                                aio_pika.Message(
                                    json.dumps(body).encode(),
                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                ),
                                routing_key="event.upsert",
                            )
                total = mailboxes * per_mailbox
                created: dict[str, float] = {}
                deadline = time.time() + 300
                while len(created) < total and time.time() < deadline:
                    await asyncio.sleep(0.5)
                    for user in users[:mailboxes]:
                        for event in await stack.control.events(user["id"]):
                            created[event["subject"]] = parse_graph_datetime(
                                event["createdDateTime"]
                            ).timestamp()
                lags = [created[s] - published[s] for s in created if s in published]
                elapsed = max(created.values()) - started
                counters = await stack.control.counters()

                # The ceiling: the same number of creates straight to the simulator, one
                # request in flight per mailbox (as the service's ordered writer), no broker.
                token_by_user = {}
                for n, user in enumerate(users[:mailboxes]):
                    token_by_user[user["id"]] = await stack.rt.tokens.access_token(f"bench-{n}")
                context = ssl.create_default_context(cafile=str(stack.sim.ca_file))
                connector = aiohttp.TCPConnector(ssl=context)
                async with aiohttp.ClientSession(connector=connector) as http:

                    async def one_mailbox(user_id: str) -> None:
                        for i in range(per_mailbox):
                            ev = relation_event(f"raw {i}", tz="UTC")
                            async with http.post(
                                f"{stack.sim.graph_url}/users/{user_id}/events",
                                json=ev,
                                headers={"Authorization": f"Bearer {token_by_user[user_id]}"},
                            ) as resp:
                                assert resp.status == 201, resp.status

                    raw_started = time.perf_counter()
                    await asyncio.gather(*(one_mailbox(u["id"]) for u in users[:mailboxes]))
                    raw_elapsed = time.perf_counter() - raw_started
                print(
                    json.dumps(
                        {
                            "mailboxes": mailboxes,
                            "events": total,
                            "written": len(created),
                            "service_writes_per_s": round(len(created) / elapsed, 1),
                            "raw_creates_per_s": round(total / raw_elapsed, 1),
                            "ratio": round((len(created) / elapsed) / (total / raw_elapsed), 2),
                            "lag_p50_s": round(statistics.median(lags), 3),
                            "lag_p99_s": round(_pct(lags, 0.99), 3),
                            "graph_answers_by_status": counters["by_status"],
                        }
                    )
                )
    finally:
        await admin.request("DELETE", f"/vhosts/{vhost}")
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(db_url)
        await client.drop_database(client.get_default_database().name)
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mailboxes", type=int, default=50)
    parser.add_argument("--per-mailbox", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.mailboxes, args.per_mailbox))

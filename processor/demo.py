"""``m365sync demo``: the whole service against the bundled Graph simulator, for a first run.

It starts the simulator (HTTPS, its own CA), the receiver and the inbound worker in this
process against the real RabbitMQ and MongoDB-wire database, signs a user in through the
real MSAL authorization-code flow, subscribes, plays a script of Outlook changes with
Graph's misbehaviour switched on (duplicates, reordering, batching, 429s, 503s, late
notifications for deleted events), plays a scripted 1Relation that reads what is
announced, and checks that the decrypted database equals Microsoft's ground truth.

The demo never touches the service's data. Each run makes a RabbitMQ vhost and a database
of its own (random names, through the management API on port 15672 of the broker that
``M365SYNC_AMQP_URL`` names, as the tests do), uses nothing else, and deletes both at the
end; if it cannot make its vhost it refuses to run (exit 2). No other ``M365SYNC_*``
variable reaches it but ``M365SYNC_LOG_LEVEL`` and ``M365SYNC_HTTP_PORT``: keys, secrets,
Graph and identity endpoints are generated or the simulator's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import aio_pika
import aiohttp
import jwt

from crypto import generate_master_key_spec
from handlers.timeutil import isoformat_z
from processor.app import (
    Runtime,
    build_runtime,
    internal_listener,
    mongo_client,
    outbound_role,
    receiver_role,
    worker_role,
)
from processor.logs import configure_logging
from processor.settings import Settings, database_name_from_url, load_settings
from processor.topology import ONERELATION_INBOUND_QUEUE, ONERELATION_OUTBOUND
from processor.verify import Diff, diff_account, expected_events

if TYPE_CHECKING:  # the simulator is a dev tool: imported when the demo runs
    from graphsim.client import SimControl
    from graphsim.server import Simulator

DEMO_ACCOUNT = "demo-account-1"
#: Exit code when the demo refuses to run (as for a configuration error).
EXIT_REFUSED = 2
#: The only settings the environment may give the demo.
_PASSED_THROUGH = ("M365SYNC_LOG_LEVEL", "M365SYNC_LOG_FORMAT", "M365SYNC_HTTP_PORT")
_MANAGEMENT_PORT = 15672


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


class DemoRefused(RuntimeError):
    """The demo cannot get a broker vhost and database of its own, so it does not run."""


@dataclass(frozen=True)
class DemoTargets:
    """Where one demo run keeps its messages and data: nowhere the service does."""

    amqp_url: str
    mongodb_url: str
    vhost: str
    database: str
    management_url: str
    management_auth: str


def demo_targets(env: dict[str, str], *, run_id: str | None = None) -> DemoTargets:
    """A fresh vhost and database on the servers the environment names (or the defaults)."""
    defaults = Settings()
    suffix = run_id or uuid.uuid4().hex[:10]
    amqp = urlsplit(env.get("M365SYNC_AMQP_URL") or defaults.amqp_url)
    mongo = urlsplit(env.get("M365SYNC_MONGODB_URL") or defaults.mongodb_url)
    vhost, database = f"m365sync-demo-{suffix}", f"m365sync_demo_{suffix}"
    configured_vhost = amqp.path[1:] or "/"
    configured_database = database_name_from_url(urlunsplit(mongo))
    if vhost == configured_vhost or database == configured_database:
        raise DemoRefused("the demo's vhost or database is the one the service is configured with")
    return DemoTargets(
        amqp_url=urlunsplit(amqp._replace(path="/" + quote(vhost, safe=""))),
        mongodb_url=urlunsplit(mongo._replace(path="/" + database)),
        vhost=vhost,
        database=database,
        management_url=f"http://{amqp.hostname or '127.0.0.1'}:{_MANAGEMENT_PORT}/api",
        management_auth=aiohttp.encode_basic_auth(
            amqp.username or "guest", amqp.password or "guest"
        ),
    )


async def _management(targets: DemoTargets, method: str, path: str, body: Any = None) -> None:
    async with (
        aiohttp.ClientSession(
            trust_env=False,
            headers={"Authorization": targets.management_auth},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as http,
        http.request(method, targets.management_url + path, json=body) as resp,
    ):
        if resp.status >= 400:
            raise DemoRefused(f"{method} {path}: RabbitMQ's management API answered {resp.status}")


async def _make_vhost(targets: DemoTargets, user: str) -> None:
    vhost = quote(targets.vhost, safe="")
    try:
        await _management(targets, "PUT", f"/vhosts/{vhost}")
        await _management(
            targets,
            "PUT",
            f"/permissions/{vhost}/{quote(user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DemoRefused(
            f"cannot reach RabbitMQ's management API at {targets.management_url} "
            f"({type(exc).__name__}) to make the demo's own vhost"
        ) from exc


async def _remove(targets: DemoTargets) -> None:
    """Delete the run's vhost and drop its database (best effort: the demo is over)."""
    try:
        await _management(targets, "DELETE", f"/vhosts/{quote(targets.vhost, safe='')}")
    except (aiohttp.ClientError, TimeoutError, DemoRefused) as exc:
        _say(f"could not delete vhost {targets.vhost}: {exc}")
    client = mongo_client(targets.mongodb_url)
    try:
        await client.drop_database(targets.database)
    except Exception as exc:  # the server went away: nothing more to clean
        _say(f"could not drop database {targets.database}: {type(exc).__name__}")
    finally:
        await client.close()


def _script_event(rng: random.Random, n: int) -> dict[str, Any]:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(
        days=rng.randint(1, 30), hours=rng.randint(0, 8)
    )
    end = start + timedelta(minutes=rng.choice((30, 45, 60)))
    return {
        "subject": f"Customer meeting {n}",
        "body": {"contentType": "text", "content": f"Agenda item {n}"},
        "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        "end": {"dateTime": end.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        "location": {"displayName": f"Room {rng.randint(1, 9)}"},
    }


async def run_demo(*, changes: int = 40, env: dict[str, str] | None = None) -> int:
    """Run the demo; returns 0 when the database converged to Microsoft's ground truth,
    :data:`EXIT_REFUSED` when it cannot have a vhost and database of its own."""
    env = dict(os.environ if env is None else env)
    configure_logging(
        env.get("M365SYNC_LOG_LEVEL", "warning"),
        log_format=env.get("M365SYNC_LOG_FORMAT", "auto").lower(),
    )
    try:
        targets = demo_targets(env)
        user = urlsplit(targets.amqp_url).username or "guest"
        await _make_vhost(targets, user)
    except DemoRefused as exc:
        print(f"m365sync demo: refused: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    _say(f"own RabbitMQ vhost {targets.vhost} and database {targets.database} (removed at the end)")
    try:
        return await _run(targets, env, changes=changes)
    finally:
        await _remove(targets)


async def _run(targets: DemoTargets, env: dict[str, str], *, changes: int) -> int:
    from graphsim.client import SimControl  # noqa: PLC0415  the simulator is a dev tool
    from graphsim.server import SimConfig, Simulator  # noqa: PLC0415

    started = time.monotonic()
    rng = random.Random(42)  # noqa: S311  a reproducible script, not a secret
    async with AsyncExitStack() as stack:
        state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m365sync-demo-")))
        sim = Simulator(SimConfig(state_dir=state_dir / "sim", port=0))
        await sim.start()
        stack.push_async_callback(sim.stop)
        _say(f"Graph and identity simulator on {sim.base_url} (CA {sim.ca_file})")
        control = await stack.enter_async_context(SimControl(sim.base_url, sim.ca_file))
        settings = _demo_settings(targets, env, sim)
        _say("keys, secrets and tokens generated for this run")
        rt = await _start_service(stack, settings)
        user = await _connect(rt, settings, sim, control)
        await _switch_faults_on(control)
        script_started = time.monotonic()
        made = await _play_outlook(control, user["id"], rng, changes)
        crm_messages = await _play_relation(rt, rng)
        crm_expected = _crm_final_subjects(crm_messages)
        outcome = await _await_convergence(rt, settings, control, user["id"], crm_expected)
        converged_s = time.monotonic() - script_started
        summary = {
            "converged": outcome.diff.ok,
            "events_in_outlook": len(outcome.expected),
            "events_in_database": outcome.diff.compared,
            "outlook_changes": made,
            "relation_changes": len(crm_messages),
            "relation_events_in_outlook_as_intended": outcome.crm_in_outlook == crm_expected,
            **await _observed(rt, control),
            "seconds_to_converge": round(converged_s, 2),
        }
    summary["seconds_total"] = round(time.monotonic() - started, 2)
    _say("summary " + json.dumps(summary))
    if not outcome.diff.ok or outcome.crm_in_outlook != crm_expected:
        _say(
            f"NOT converged: {outcome.diff.summary()}; "
            f"1Relation's events in Outlook: {outcome.crm_in_outlook}"
        )
        return 1
    _say("the decrypted database equals Microsoft's ground truth, field by field")
    return 0


def _demo_settings(targets: DemoTargets, env: dict[str, str], sim: Simulator) -> Settings:
    """The service's settings for this run: the simulator, fresh keys, this run's targets."""
    port = int(env.get("M365SYNC_HTTP_PORT", "0")) or _free_port()
    return load_settings(
        {k: v for k, v in env.items() if k in _PASSED_THROUGH},
        required=frozenset(),
        overrides={
            "M365SYNC_AMQP_URL": targets.amqp_url,
            "M365SYNC_MONGODB_URL": targets.mongodb_url,
            "M365SYNC_METRICS_PORT": "0",
            "M365SYNC_GRAPH_URL": sim.graph_url,
            "M365SYNC_AUTHORITY_HOST": sim.authority_host,
            "M365SYNC_CA_BUNDLE": str(sim.ca_file),
            "M365SYNC_CLIENT_ID": sim.client_id,
            "M365SYNC_CLIENT_SECRET": sim.client_secret,
            "M365SYNC_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "M365SYNC_HTTP_HOST": "127.0.0.1",
            "M365SYNC_HTTP_PORT": str(port),
            "M365SYNC_MASTER_KEYS": generate_master_key_spec("demo1"),
            "M365SYNC_HASH_KEY": base64.b64encode(os.urandom(32)).decode(),
            "M365SYNC_CONNECT_SECRET": base64.b64encode(os.urandom(32)).decode(),
            "M365SYNC_API_TOKEN": base64.b64encode(os.urandom(24)).decode(),
            "M365SYNC_RETURN_URL_ORIGINS": f"http://127.0.0.1:{port}",
        },
    )


async def _start_service(stack: AsyncExitStack, settings: Settings) -> Runtime:
    """The receiver, the worker and the outbound writer in this process, until ``stack`` closes."""
    rt = await build_runtime(settings, stack, mailbox_concurrency=3)
    metrics_port = await stack.enter_async_context(internal_listener(rt))
    _say(f"metrics on http://{settings.metrics_host}:{metrics_port}/metrics")
    await stack.enter_async_context(receiver_role(rt))
    await stack.enter_async_context(worker_role(rt))
    await stack.enter_async_context(outbound_role(rt))
    _say(f"receiver on {settings.public_url}, worker consuming {settings.shard_count} shards")
    return rt


async def _connect(
    rt: Runtime, settings: Settings, sim: Simulator, control: SimControl
) -> dict[str, Any]:
    """Connect the simulator's first user as a person would; the user."""
    user: dict[str, Any] = (await control.users())[0]
    # Connect as a user would: 1Relation's signed link → /connect → Microsoft's sign-in →
    # /auth/callback → the return URL (the simulator approves the sign-in).
    await control.set_signin_user(user["id"])
    token = jwt.encode(
        {
            "sub": DEMO_ACCOUNT,
            "exp": int(time.time()) + 600,
            "jti": uuid.uuid4().hex,
            "return_url": f"{settings.public_url}/healthz",
            "tenant": sim.tenant_id,
        },
        settings.connect_secrets[0],
        algorithm="HS256",
    )
    url = f"{settings.public_url}/connect?token={quote(token)}"
    tls = ssl.create_default_context(cafile=str(sim.ca_file))
    # A browser keeps the sign-in cookie of /connect, also for an IP-address host.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(trust_env=False, cookie_jar=jar) as browser:
        for _ in range(3):
            async with browser.get(url, allow_redirects=False, ssl=tls) as resp:
                if resp.status != 302:
                    raise RuntimeError(f"connect failed: {resp.status}")
                url = resp.headers["Location"]
    if dict(parse_qsl(urlsplit(url).query)).get("status") != "connected":
        raise RuntimeError(f"connect failed: {url}")
    document = await rt.statuses.document(DEMO_ACCOUNT)
    expires = (document or {}).get("subscription_expires_at") or "unknown"
    _say(
        f"{user['userPrincipalName']} connected through /connect and MSAL (auth code + PKCE); "
        f"subscription valid until {expires}"
    )
    return user


async def _switch_faults_on(control: SimControl) -> None:
    """Graph's misbehaviour, as the simulator plays it, from here on; counters from zero."""
    await control.set_faults(
        seed=11,
        duplicates=True,
        reorder_ms=200,
        batch_max_items=5,
        batch_window_ms=30,
        deleted_ghosts=0.3,
        latency_ms=25,
        max_concurrent_per_mailbox=2,
        throttle_retry_after="0.25",
        random_503_rate=0.03,
        random_503_retry_after="0.2",
    )
    await control.reset_counters()


async def _play_outlook(control: SimControl, user_id: str, rng: random.Random, changes: int) -> int:
    """The user's side: ``changes`` creates, moves and deletes in Outlook; how many made."""
    ids: list[str] = []
    made = 0
    while made < changes:
        roll = rng.random()
        if not ids or roll < 0.5:
            event = await control.create_event(user_id, _script_event(rng, made), immutable=True)
            ids.append(event["id"])
        elif roll < 0.85:
            await control.update_event(
                user_id, rng.choice(ids), {"subject": f"Moved meeting {made}"}, immutable=True
            )
        else:
            await control.delete_event(user_id, ids.pop(rng.randrange(len(ids))))
        made += 1
    _say(
        f"made {made} changes in Outlook with duplicates, reordering, batching, "
        "429s, 503s and late notifications switched on"
    )
    return made


async def _play_relation(rt: Runtime, rng: random.Random) -> list[dict[str, Any]]:
    """The scripted 1Relation: creates, moves and deletes events of its own; its messages."""
    crm_messages = _crm_script(rng)
    await _publish_to_onerelation_outbound(rt, crm_messages)
    _say(
        f"1Relation published {len(crm_messages)} outbound changes "
        f"({len(_crm_final_subjects(crm_messages))} of its events should remain in Outlook)"
    )
    return crm_messages


@dataclass(frozen=True)
class _Convergence:
    diff: Diff
    expected: dict[str, Mapping[str, Any]]
    crm_in_outlook: list[str]


async def _await_convergence(
    rt: Runtime, settings: Settings, control: SimControl, user_id: str, crm_expected: list[str]
) -> _Convergence:
    """Compare the database with Microsoft's ground truth until they agree (or 120 s pass)."""
    window_start = datetime.now(UTC) - timedelta(days=settings.sync_window_past_days)
    window_end = datetime.now(UTC) + timedelta(days=settings.sync_window_future_days)
    deadline = time.monotonic() + 120
    while True:
        expected = expected_events(
            await control.events(user_id, immutable=True),
            await control.calendar_view(
                user_id, isoformat_z(window_start), isoformat_z(window_end), immutable=True
            ),
        )
        diff = await diff_account(rt.store, rt.events, DEMO_ACCOUNT, expected)
        crm_in_outlook = sorted(
            str(e["subject"])
            for e in expected.values()
            if str(e.get("subject", "")).startswith("CRM:")
        )
        done = diff.ok and crm_in_outlook == crm_expected and await control.is_idle()
        if done or time.monotonic() > deadline:
            return _Convergence(diff, expected, crm_in_outlook)
        await asyncio.sleep(0.3)


async def _observed(rt: Runtime, control: SimControl) -> dict[str, Any]:
    """What the scripted 1Relation read on onerelation.inbound, and what Graph saw."""
    channel = await rt.connection.channel()
    queue = await channel.get_queue(ONERELATION_INBOUND_QUEUE, ensure=False)
    announced: dict[str, int] = {}
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        if json.loads(message.body).get("account_id") == DEMO_ACCOUNT:
            key = str(message.routing_key)
            announced[key] = announced.get(key, 0) + 1
    await channel.close()
    counters = await control.counters()
    echoes = int(sum(m.samples[0].value for m in rt.metrics.echoes_suppressed.collect()))
    return {
        "announced_to_1relation": announced,
        "echoes_suppressed": echoes,
        "graph_requests": counters["total"],
        "graph_answers_by_status": counters["by_status"],
    }


def _crm_script(rng: random.Random) -> list[dict[str, Any]]:
    """1Relation's side: six events, three moved once, one deleted, sent out of order."""
    messages = []
    for n in range(6):
        event = {**_script_event(rng, 100 + n), "subject": f"CRM: account review {n}"}
        messages.append(_crm_message(f"crm-{n}", 1, event))
        if n % 2:
            moved = {**event, "subject": f"CRM: account review {n} (moved)"}
            messages.append(_crm_message(f"crm-{n}", 2, moved))
    messages.append(_crm_message("crm-0", 2, None))
    rng.shuffle(messages)
    return messages


def _crm_message(relation_id: str, revision: int, event: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "onerelation.event.v1",
        "op": "upsert" if event is not None else "delete",
        "account_id": DEMO_ACCOUNT,
        "relation_event_id": relation_id,
        "revision": revision,
        "occurred_at": isoformat_z(datetime.now(UTC)),
    }
    if event is not None:
        body["event"] = {
            **event,
            "start": {**event["start"], "timeZone": "Europe/Copenhagen"},
            "end": {**event["end"], "timeZone": "Europe/Copenhagen"},
        }
    return body


def _crm_final_subjects(messages: list[dict[str, Any]]) -> list[str]:
    latest: dict[str, dict[str, Any]] = {}
    for body in messages:
        current = latest.get(body["relation_event_id"])
        if current is None or body["revision"] > current["revision"]:
            latest[body["relation_event_id"]] = body
    return sorted(b["event"]["subject"] for b in latest.values() if b["op"] == "upsert")


async def _publish_to_onerelation_outbound(rt: Any, messages: list[dict[str, Any]]) -> None:
    channel = await rt.connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(ONERELATION_OUTBOUND, ensure=False)
    for body in messages:
        await exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=f"{body['relation_event_id']}:{body['revision']}:{body['op']}",
            ),
            routing_key=f"event.{body['op']}",
        )
    await channel.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


if __name__ == "__main__":  # pragma: no cover
    sys.exit(asyncio.run(run_demo()))

"""The composition root: builds the object graph from Settings and runs the chosen roles.

Every open has its close on one ``AsyncExitStack``. SIGTERM stops intake (the HTTP site
stops accepting, consumers are cancelled), lets in-flight work finish within
``shutdown_grace_s`` (keep it below Kubernetes' grace period), requeues the rest, then
closes channels, the broker connection, HTTP sessions and the database client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiohttp import web
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from contract.statuses import PAUSED_STATUSES
from crypto import CipherCache, Hasher, KeyRing
from handlers.delta import DeltaRunner, DeltaSettings
from handlers.inbound import InboundHandler, SyncWindow, validate_inbound
from handlers.outbound import (
    OUTBOUND_SCHEMA,
    IntakeHandler,
    OutboundHandler,
    validate_intake,
    validate_shard,
)
from handlers.ports import OutgoingMessage
from handlers.reports import Reporter
from handlers.routing import OUTBOUND_EXCHANGE, shard_routing_key
from handlers.timeutil import utcnow
from processor import broker as broker_mod
from processor.accounts import AccountStatuses
from processor.announce import Announcer, OutboxRelay
from processor.api import add_account_routes
from processor.balance import Balancer
from processor.broker import ConfirmPublisher
from processor.consumer import ShardConsumer
from processor.event_links import LinkStore
from processor.event_store import EventStore
from processor.graph import GraphClient, create_http_session
from processor.logs import configure_logging, get_logger
from processor.messages import MAX_CHANGES_ITEMS, split_changes
from processor.metrics import Metrics
from processor.repositories.base import Document
from processor.repositories.workers import Registry
from processor.resync import ResyncPublisher
from processor.settings import Settings, SettingsError
from processor.store import Store, wait_for_database
from processor.tokens import MsalApps, MsalTokenProvider
from processor.topology import (
    DEAD_QUEUE,
    LIFECYCLE_QUEUE,
    OUTBOUND_INTAKE_QUEUE,
    TopologyConfig,
    declare_topology,
    shard_queue_names,
)
from processor.web import build_app, build_internal_app
from subscriptions.lifecycle import (
    MAX_LIFECYCLE_MESSAGE_BYTES,
    LifecycleHandler,
    validate_lifecycle,
)
from subscriptions.manager import SubscriptionManager
from subscriptions.schedule import ManagerSettings

log = get_logger(__name__)

#: Inbound Graph budget per mailbox: Graph allows 4 concurrent requests per app and
#: mailbox; the inbound worker takes 3 and the outbound writer 1 (see README).
INBOUND_MAILBOX_CONCURRENCY = 3
OUTBOUND_MAILBOX_CONCURRENCY = 1


@dataclass
class Runtime:
    """Every collaborator, built once per process."""

    settings: Settings
    metrics: Metrics
    mongo: AsyncMongoClient[Document]
    db: AsyncDatabase[Document]
    keyring: KeyRing
    hasher: Hasher
    store: Store
    events: EventStore
    connection: AbstractRobustConnection
    publisher: ConfirmPublisher
    http: aiohttp.ClientSession
    tokens: MsalTokenProvider
    graph: GraphClient
    announcer: Announcer
    statuses: AccountStatuses
    links: LinkStore

    async def readiness(self) -> dict[str, bool]:
        """Readiness checks: the broker connection and the database answer."""
        database = True
        try:
            async with asyncio.timeout(2):
                await self.db.command("ping")
        except Exception:  # any failure means "not ready"; the reason is in the logs
            database = False
        return {"broker": not self.connection.is_closed, "database": database}


def mongo_client(url: str) -> AsyncMongoClient[Document]:
    """A client with the options the service relies on (aware UTC datetimes)."""
    return AsyncMongoClient(url, tz_aware=True, serverSelectionTimeoutMS=5000, maxPoolSize=20)


async def build_runtime(
    settings: Settings, stack: AsyncExitStack, *, mailbox_concurrency: int
) -> Runtime:
    """Connect to everything and wire the object graph; closes go on ``stack``."""
    metrics = Metrics()
    mongo = mongo_client(settings.mongodb_url)
    stack.push_async_callback(mongo.close)
    db = mongo[settings.database_name]
    await wait_for_database(db, timeout_s=30)
    keyring = KeyRing(settings.master_keys)
    hasher = Hasher(settings.hash_key)
    store = Store(
        db=db,
        keyring=keyring,
        hasher=hasher,
        cipher_cache=CipherCache(),
        on_key_unreadable=metrics.data_key_unreadable.inc,
    )
    await store.ensure_indexes()
    missing = await store.keys.missing_master_keys()
    if missing:
        # Fail fast: a process without these keys would leave those accounts unsynced.
        named = ", ".join(f"{kid!r} ({n} data keys)" for kid, n in sorted(missing.items()))
        raise SettingsError(f"M365SYNC_MASTER_KEYS lacks master key ids in use: {named}")
    events = EventStore(db=db, hasher=hasher, tombstone_ttl_s=settings.tombstone_ttl_days * 86400)

    connection = await broker_mod.connect(settings.amqp_urls, name=f"m365sync:{os.getpid()}")
    stack.push_async_callback(connection.close)
    channel = await connection.channel()
    await declare_topology(
        channel,
        TopologyConfig(
            shard_count=settings.shard_count,
            delivery_limit=settings.delivery_limit,
            dead_letter_ttl_days=settings.dead_letter_ttl_days,
        ),
    )
    await channel.close()
    publisher = await ConfirmPublisher.open(connection)
    stack.push_async_callback(publisher.close)

    http = create_http_session(ca_bundle=settings.ca_bundle, timeout_s=settings.graph_timeout_s)
    stack.push_async_callback(http.close)
    tokens = MsalTokenProvider(
        apps=MsalApps(
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            client_certificate=settings.client_certificate,
            authority_host=settings.authority_host,
            ca_bundle=settings.ca_bundle,
        ),
        store=store.token_caches,
    )
    store.keys.on_key_replaced(tokens.forget)
    graph = GraphClient(
        session=http,
        graph_url=settings.graph_url,
        tokens=tokens,
        max_concurrency_per_mailbox=mailbox_concurrency,
        request_timeout_s=settings.graph_timeout_s,
    )
    announcer = Announcer(
        publisher=publisher, events=events, metrics=metrics, timeout_s=settings.publish_timeout_s
    )
    statuses = AccountStatuses(
        store=store,
        events=events,
        publisher=publisher,
        metrics=metrics,
        timeout_s=settings.publish_timeout_s,
    )
    metrics.counts(
        "graph_calls_total",
        "Microsoft Graph calls of this process: requests (HTTP calls made), and by outcome "
        "succeeded, not_found, throttled (429/503/504 answers), retries, unauthorized, "
        "delta_resets, errors, gate_waits (held back by a mailbox's Retry-After), "
        "gate_refusals (failed without a request while the mailbox waits).",
        "outcome",
        lambda: graph.stats,
    )
    return Runtime(
        links=LinkStore(db=db, hasher=hasher),
        statuses=statuses,
        settings=settings,
        metrics=metrics,
        mongo=mongo,
        db=db,
        keyring=keyring,
        hasher=hasher,
        store=store,
        events=events,
        connection=connection,
        publisher=publisher,
        http=http,
        tokens=tokens,
        graph=graph,
        announcer=announcer,
    )


@contextlib.asynccontextmanager
async def receiver_role(rt: Runtime, *, sock: socket.socket | None = None) -> AsyncIterator[int]:
    """Serve the HTTP app; yields the bound port. Stops accepting on exit."""
    app = build_app(
        settings=rt.settings,
        lookup=rt.store.subscriptions,
        publisher=rt.publisher,
        hasher=rt.hasher,
        ciphers=rt.store.keys,
        readiness=rt.readiness,
        metrics=rt.metrics,
    )
    close_account_routes = await add_account_routes(app, rt)  # connect, consent, /api/v1
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=rt.settings.shutdown_grace_s)
    await runner.setup()
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, rt.settings.http_host, rt.settings.http_port)
    await site.start()
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else rt.settings.http_port
    log.info("receiver.started", port=port)
    try:
        yield port
    finally:
        await runner.cleanup()
        close_account_routes()
        log.info("receiver.stopped")


@contextlib.asynccontextmanager
async def internal_listener(
    rt: Runtime, *, sock: socket.socket | None = None
) -> AsyncIterator[int]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on the internal listener (every role,
    one per process: the roles of one process share their metrics); yields the bound port.

    Bound to ``M365SYNC_METRICS_HOST`` (loopback by default), away from the ingress.
    """
    app = build_internal_app(readiness=rt.readiness, metrics=rt.metrics)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, rt.settings.metrics_host, rt.settings.metrics_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeError(
            f"cannot listen for metrics on {rt.settings.metrics_host}:{rt.settings.metrics_port}"
            f" ({exc.strerror}); set M365SYNC_METRICS_PORT (0 picks a free port)"
        ) from exc
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else rt.settings.metrics_port
    log.info("metrics.started", host=rt.settings.metrics_host, port=port)
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def worker_role(rt: Runtime) -> AsyncIterator[ShardConsumer]:
    """Consume the inbound shard queues; drain within the grace period on exit."""
    window = SyncWindow(rt.settings.sync_window_past_days, rt.settings.sync_window_future_days)
    handler = InboundHandler(
        store=rt.store,
        events=rt.events,
        graph=rt.graph,
        announcer=rt.announcer,
        statuses=rt.statuses,
        metrics=rt.metrics,
        window=window,
        links=rt.links,
        burst_min_events=rt.settings.burst_min_events,
        run_delta=DeltaRunner(
            links=rt.links,
            store=rt.store,
            delta_links=rt.store.sync_state,
            events=rt.events,
            graph=rt.graph,
            statuses=rt.statuses,
            window=window,
            settings=DeltaSettings(
                mass_delete_ratio=rt.settings.mass_delete_ratio,
                mass_delete_min_events=rt.settings.mass_delete_min_events,
            ),
        ),
    )
    consumer = ShardConsumer(
        connection=rt.connection,
        queue_names=shard_queue_names("inbound", rt.settings.shard_count),
        handler=handler,
        publisher=rt.publisher,
        retry_target="inbound",
        metrics=rt.metrics,
        validate=validate_inbound,
        prefetch=rt.settings.prefetch,
        split=split_changes,
        max_message_bytes=INBOUND_MAX_MESSAGE_BYTES,
    )
    await consumer.start()
    balancer = Balancer(registry=Registry(rt.store.db), consumer=consumer, role="inbound")
    await balancer.start()
    relay = OutboxRelay(
        publisher=rt.publisher,
        events=rt.events,
        shard_count=rt.settings.shard_count,
        timeout_s=rt.settings.publish_timeout_s,
    )
    background = asyncio.create_task(_every(30.0, lambda: _relay_and_sweep(rt, relay)))
    log.info("worker.started", shards=rt.settings.shard_count)
    try:
        yield consumer
    finally:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await balancer.stop()
        await consumer.stop(grace_s=rt.settings.shutdown_grace_s)
        log.info("worker.stopped")


#: Largest inbound shard message parsed: a receiver's group of at most MAX_CHANGES_ITEMS
#: notifications, each well under 4 kB (the outbound consumers keep the default 4 MiB,
#: room for a 1 MiB 1Relation event encrypted and base64-encoded).
INBOUND_MAX_MESSAGE_BYTES = MAX_CHANGES_ITEMS * 4 * 1024


@contextlib.asynccontextmanager
async def outbound_role(rt: Runtime) -> AsyncIterator[ShardConsumer]:
    """Consume 1Relation's outbound intake and the outbound shards; drain on exit."""
    reporter = Reporter(
        publisher=rt.publisher, metrics=rt.metrics, timeout_s=rt.settings.publish_timeout_s
    )
    intake = ShardConsumer(
        connection=rt.connection,
        queue_names=[OUTBOUND_INTAKE_QUEUE],
        handler=IntakeHandler(
            store=rt.store,
            publisher=rt.publisher,
            reporter=reporter,
            shard_count=rt.settings.shard_count,
            timeout_s=rt.settings.publish_timeout_s,
        ),
        publisher=rt.publisher,
        retry_target="outbound",
        metrics=rt.metrics,
        validate=validate_intake,
        prefetch=rt.settings.prefetch,
    )
    applier = ShardConsumer(
        connection=rt.connection,
        queue_names=shard_queue_names("outbound", rt.settings.shard_count),
        handler=OutboundHandler(
            store=rt.store,
            events=rt.events,
            links=rt.links,
            graph=rt.graph,
            statuses=rt.statuses,
            reporter=reporter,
            metrics=rt.metrics,
            tombstone_ttl_s=rt.settings.tombstone_ttl_days * 86400,
            parked_ttl_s=rt.settings.parked_ttl_days * 86400,
            parked_max=rt.settings.parked_max_per_account,
        ),
        publisher=rt.publisher,
        retry_target="outbound",
        metrics=rt.metrics,
        validate=validate_shard,
        prefetch=rt.settings.prefetch,
    )
    await applier.start()
    balancer = Balancer(registry=Registry(rt.store.db), consumer=applier, role="outbound")
    await balancer.start()
    await intake.start()
    background = asyncio.create_task(_every(15.0, lambda: _wake_parked(rt)))
    log.info("outbound.started", shards=rt.settings.shard_count)
    try:
        yield applier
    finally:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await balancer.stop()
        await intake.stop(grace_s=rt.settings.shutdown_grace_s)
        await applier.stop(grace_s=rt.settings.shutdown_grace_s)
        log.info("outbound.stopped")


async def _wake_parked(rt: Runtime) -> None:
    """Send a ``replay`` to the shard of each reconnected account with parked changes, and
    of each account still paused whose oldest parked change is past the age limit (its
    handler drops and reports those, rather than waiting for the account's next change)."""
    expired_before = utcnow() - timedelta(days=rt.settings.parked_ttl_days)
    for account_id, oldest in (await rt.links.oldest_parked()).items():
        account = await rt.store.accounts.get(account_id)
        paused = account is None or account.status in PAUSED_STATUSES
        if paused and oldest >= expired_before:
            continue
        await rt.publisher.publish(
            OutgoingMessage(
                exchange=OUTBOUND_EXCHANGE,
                routing_key=shard_routing_key(account_id, rt.settings.shard_count),
                body={"schema": OUTBOUND_SCHEMA, "kind": "replay", "account_id": account_id},
                message_id=uuid.uuid4().hex,
            ),
            timeout_s=rt.settings.publish_timeout_s,
        )


async def _relay_and_sweep(rt: Runtime, relay: OutboxRelay) -> None:
    await relay.run_once(older_than_s=60.0, now=utcnow())
    await rt.store.leases.sweep_expired()
    await rt.store.erasures.resweep_due()


async def _every(interval_s: float, job: Callable[[], Awaitable[Any]]) -> None:
    """Run ``job`` every ``interval_s`` until cancelled; a failed run is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception:
            log.exception("background.failed", job=getattr(job, "__name__", "job"))


QUEUE_DEPTH_INTERVAL_S = 30.0
#: Lifecycle messages one subscriptions process works on at once.
LIFECYCLE_PREFETCH = 8


def queue_names(shard_count: int) -> list[str]:
    """The work and dead-letter queues whose depth the metrics report."""
    return [
        *shard_queue_names("inbound", shard_count),
        *shard_queue_names("outbound", shard_count),
        OUTBOUND_INTAKE_QUEUE,
        LIFECYCLE_QUEUE,
        DEAD_QUEUE,
    ]


class QueueDepths:
    """Reads queue depths with passive declares (no management API needed)."""

    def __init__(self, connection: AbstractRobustConnection, names: Sequence[str]) -> None:
        self._connection = connection
        self._names = list(names)
        self._channel: AbstractChannel | None = None
        #: Last read message count per queue name.
        self.messages: dict[str, int] = {}

    async def refresh(self) -> None:
        """Read every queue's message count (a missing queue closes the channel: reopen)."""
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        for name in self._names:
            queue = await self._channel.declare_queue(name, passive=True)
            self.messages[name] = int(queue.declaration_result.message_count or 0)

    async def close(self) -> None:
        """Close the channel, if open."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


@contextlib.asynccontextmanager
async def subscriptions_role(
    rt: Runtime,
    *,
    clock: Callable[[], datetime] = utcnow,
    manager_settings: ManagerSettings | None = None,
) -> AsyncIterator[SubscriptionManager]:
    """Run the subscription manager and the lifecycle consumer; stop both on exit.

    ``clock`` is what subscription expiries are compared with (tests pass the simulator's).
    """
    settings = manager_settings or ManagerSettings(
        public_url=rt.settings.public_url,
        shard_count=rt.settings.shard_count,
        resync_interval_s=rt.settings.resync_interval_s,
        publish_timeout_s=rt.settings.publish_timeout_s,
    )
    manager = SubscriptionManager(
        store=rt.store,
        graph=rt.graph,
        resyncs=ResyncPublisher(
            publisher=rt.publisher,
            shard_count=settings.shard_count,
            timeout_s=settings.publish_timeout_s,
        ),
        statuses=rt.statuses,
        settings=settings,
        clock=clock,
    )
    lifecycle = ShardConsumer(
        connection=rt.connection,
        queue_names=[LIFECYCLE_QUEUE],
        handler=LifecycleHandler(store=rt.store, manager=manager),
        publisher=rt.publisher,
        retry_target=None,
        metrics=rt.metrics,
        validate=validate_lifecycle,
        prefetch=LIFECYCLE_PREFETCH,
        max_message_bytes=MAX_LIFECYCLE_MESSAGE_BYTES,
    )
    await lifecycle.start()
    await manager.start()
    sweeper = asyncio.create_task(_every(60.0, rt.store.leases.sweep_expired))
    rt.metrics.gauges(
        "subscriptions_expiring",
        "Accounts (not paused) by how soon their subscription expires, at the last scan: "
        "within_1h, within_6h, within_24h (cumulative), none (no live subscription).",
        "horizon",
        lambda: manager.expiring,
    )
    depths = QueueDepths(rt.connection, queue_names(rt.settings.shard_count))
    rt.metrics.gauges(
        "queue_messages",
        "Messages waiting in each of the service's queues (ready, not yet delivered), read by the "
        "subscriptions role every 30 s.",
        "queue",
        lambda: depths.messages,
    )
    poller = asyncio.create_task(_every(QUEUE_DEPTH_INTERVAL_S, depths.refresh))
    log.info("subscriptions.started", owner=manager.owner)
    try:
        yield manager
    finally:
        sweeper.cancel()
        poller.cancel()
        await asyncio.gather(sweeper, poller, return_exceptions=True)
        await depths.close()
        await lifecycle.stop(grace_s=rt.settings.shutdown_grace_s)
        await manager.stop()
        log.info("subscriptions.stopped")


async def run_roles(settings: Settings, roles: Sequence[str]) -> int:
    """Run ``roles`` in this process until SIGTERM or SIGINT; returns the exit code."""
    configure_logging(settings.log_level, log_format=settings.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        concurrency = (
            INBOUND_MAILBOX_CONCURRENCY if "worker" in roles else OUTBOUND_MAILBOX_CONCURRENCY
        )
        rt = await build_runtime(settings, stack, mailbox_concurrency=concurrency)
        await stack.enter_async_context(internal_listener(rt))
        if "receiver" in roles:
            await stack.enter_async_context(receiver_role(rt))
        if "worker" in roles:
            await stack.enter_async_context(worker_role(rt))
        if "outbound" in roles:
            await stack.enter_async_context(outbound_role(rt))
        if "subscriptions" in roles:
            await stack.enter_async_context(subscriptions_role(rt))
        log.info("process.ready", roles=list(roles))
        await stop.wait()
        log.info("process.stopping")
    log.info("process.stopped")
    return 0

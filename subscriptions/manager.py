"""The subscription manager: one live Graph subscription per connected account, forever.

Every ``scan_interval_s`` a manager reads the accounts, our subscription records and its
own per-account state (plain reads, no locks) and picks the accounts with something due:

- no live subscription (never created, expired, removed, renewal answered 404): create
  one (``created,updated,deleted``, lifecycle URL, fresh clientState, longest lifetime),
  then ask the account's shard for a *full* delta resync (the gap had no notifications);
- renewal due: PATCH a new expiry once less than half the granted lifetime (or less than
  ``renew_margin_s``) remains, each account a little earlier by a stable jitter so that
  accounts created together do not renew together;
- more than one live record (a reconnect created another): delete the older ones;
- the Graph check (every ``check_interval_s``, spread by account): list what Graph holds
  and repair differences (ours missing: recreate + full resync; strays of ours for the
  account's mailbox: delete);
- the account came back from ``reauthorization_required`` (reconnect): full resync.

Accounts whose status pauses Graph calls (:data:`handlers.inbound.PAUSED_STATUSES`) are
skipped. Any number of managers may run: each due account is worked on under a per-account
lease in MongoDB (a unique-key insert, atomic on FerretDB too), and the decision is made
again from fresh reads *after* taking the lease, so a subscription is never created or
renewed twice. Periodic delta passes and Graph checks are deduplicated across copies by a
lease per account and time slot. Subscription writes pass a token bucket (per process) and
a concurrency limit, and the first scan waits a random delay, so a restart never fires
every account at once.

Time: subscription expiry is Graph's clock. ``clock`` (default: real UTC) is what the
manager compares expiries with; tests give it the simulator's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo.errors import PyMongoError

from handlers.inbound import PAUSED_STATUSES
from processor.accounts import AccountStatuses
from processor.errors import AccountUnavailable, PermanentError, ThrottledError, TransientError
from processor.graph import GraphClient
from processor.interfaces import OutgoingMessage, Publisher, PublishError
from processor.logs import get_logger
from processor.messages import resync_message
from processor.store import Document, Store
from processor.timeutil import as_utc, isoformat_z, parse_graph_datetime, utcnow
from processor.tokens import ReauthorizationRequired
from processor.topology import INBOUND_EXCHANGE, shard_routing_key
from subscriptions.registration import (
    MAX_EVENT_SUBSCRIPTION_MINUTES,
    OPTIMISTIC_SUBSCRIPTION_MINUTES,
    create_subscription,
)

log = get_logger(__name__)

STATE_COLLECTION = "subscription_state"
#: The lease the connect flow holds while it binds an account and creates its subscription.
CONNECT_LEASE_PREFIX = "connect:"
#: Lifetime assumed for a record that does not say when it was granted.
DEFAULT_LIFETIME_S = (MAX_EVENT_SUBSCRIPTION_MINUTES - 5) * 60.0

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class ManagerSettings:
    """Every interval and limit of the manager (seconds unless the name says otherwise)."""

    public_url: str
    shard_count: int = 8
    scan_interval_s: float = 30.0
    #: Renew when less than this share of the granted lifetime remains ...
    renew_fraction: float = 0.5
    #: ... or less than this (capped at 3/4 of the lifetime, for short-lived grants).
    renew_margin_s: float = 86_400.0
    #: Each account renews up to this share of the lifetime earlier (stable per account).
    renew_jitter_fraction: float = 0.1
    check_interval_s: float = 6 * 3600.0
    resync_interval_s: float = 3600.0
    lease_ttl_s: float = 120.0
    max_concurrency: int = 16
    #: Subscription writes per second and burst, per manager process. Graph allows 1,000
    #: per 20 s per app and tenant; 10/s leaves room for several copies and the connect flow.
    writes_per_s: float = 10.0
    write_burst: int = 20
    startup_delay_max_s: float = 5.0
    #: Wait after a failed account action before trying that account again.
    retry_after_failure_s: float = 60.0
    publish_timeout_s: float = 2.5


class TokenBucket:
    """At most ``rate_per_s`` takes per second on average, ``burst`` at once (monotonic time)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(max(1, burst))
        self._tokens = self._burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        """Wait for a token."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


def _fraction(*parts: str) -> float:
    """A stable number in [0, 1) per key: spreads accounts over intervals and jitter."""
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class SubscriptionManager:
    """Creates, renews, recreates and checks subscriptions; schedules delta passes."""

    def __init__(
        self,
        *,
        store: Store,
        graph: GraphClient,
        publisher: Publisher,
        statuses: AccountStatuses,
        settings: ManagerSettings,
        clock: Clock = utcnow,
        owner: str | None = None,
    ) -> None:
        self._store = store
        self._graph = graph
        self._publisher = publisher
        self._statuses = statuses
        self._settings = settings
        self._clock = clock
        self.owner = owner or f"manager-{uuid.uuid4().hex[:12]}"
        self._state = store.db[STATE_COLLECTION]
        self._bucket = TokenBucket(settings.writes_per_s, settings.write_burst)
        self._limit = asyncio.Semaphore(settings.max_concurrency)
        self._lifetime_minutes = OPTIMISTIC_SUBSCRIPTION_MINUTES
        self._slots: dict[tuple[str, str], int] = {}  # (kind, account) -> slot handled
        self._not_before: dict[str, float] = {}  # account -> monotonic time
        self._repairs: dict[str, set[str]] = {}  # account -> {"check", "renew"}
        self._stray_candidates: dict[str, set[str]] = {}  # account -> Graph ids without record
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: Counts by what happened: created, renewed, recreated, deleted_extra, checks,
        #: resyncs, lease_busy, failures, reauthorization_required, unknown_lifecycle …
        self.stats: Counter[str] = Counter()

    # ---- running ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the scan loop in the background."""
        self._task = asyncio.create_task(self._run(), name=f"subscriptions:{self.owner}")

    async def stop(self) -> None:
        """Stop the scan loop (an account action in progress is cancelled; its lease expires)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        """Scan now instead of at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        await asyncio.sleep(random.uniform(0, self._settings.startup_delay_max_s))  # noqa: S311
        while True:
            try:
                await self.scan_once()
            except Exception:  # a broken scan must not end the loop; the next one retries
                log.exception("subscriptions.scan_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.scan_interval_s)

    async def scan_once(self) -> int:
        """One pass over every account; returns how many accounts were worked on."""
        now = self._clock()
        accounts = [
            doc
            async for doc in self._store.accounts.find(
                {"user_ct": {"$exists": True}}, {"status": 1}
            )
        ]
        records: dict[str, list[Document]] = {}
        async for doc in self._store.subscriptions.find(
            {}, {"account_id": 1, "expires_at": 1, "granted_at": 1}
        ):
            records.setdefault(str(doc["account_id"]), []).append(doc)
        states = {str(doc["_id"]): doc async for doc in self._state.find({})}
        due: list[str] = []
        resyncs: list[str] = []
        for account in accounts:
            account_id = str(account["_id"])
            paused = account.get("status") in PAUSED_STATUSES
            state = states.get(account_id, {})
            if paused:
                if not state.get("paused"):
                    due.append(account_id)
                continue
            if self._slot_changed("resync", account_id, now, self._settings.resync_interval_s):
                resyncs.append(account_id)
            if self._needs_work(account_id, records.get(account_id, []), state, now):
                due.append(account_id)
        await asyncio.gather(*(self._periodic_resync(a, now) for a in resyncs))
        ready = [a for a in due if self._not_before.get(a, 0.0) <= time.monotonic()]
        await asyncio.gather(*(self._guarded(a) for a in ready))
        return len(ready)

    def _needs_work(
        self, account_id: str, records: list[Document], state: Document, now: datetime
    ) -> bool:
        if state.get("paused") or account_id in self._repairs:
            return True
        live = [r for r in records if as_utc(r["expires_at"]) > now]
        if len(live) != 1 or len(records) != 1:
            return True
        if self._renewal_due(account_id, live[0], now):
            return True
        return self._check_due(account_id, now)

    def _renewal_due(self, account_id: str, record: Document, now: datetime) -> bool:
        expires_at = as_utc(record["expires_at"])
        granted_at = record.get("granted_at")
        lifetime_s = (
            (expires_at - as_utc(granted_at)).total_seconds()
            if isinstance(granted_at, datetime)
            else DEFAULT_LIFETIME_S
        )
        lifetime_s = max(lifetime_s, 60.0)
        settings = self._settings
        threshold_s = max(
            lifetime_s * settings.renew_fraction, min(settings.renew_margin_s, 0.75 * lifetime_s)
        )
        threshold_s += _fraction("renew", account_id) * settings.renew_jitter_fraction * lifetime_s
        return (expires_at - now).total_seconds() < threshold_s

    def _check_due(self, account_id: str, now: datetime) -> bool:
        return self._slot_changed("check", account_id, now, self._settings.check_interval_s)

    async def _take_check_slot(self, account_id: str, now: datetime) -> bool:
        """Claim this slot's Graph check for the account (one copy wins); marks it seen."""
        interval_s = self._settings.check_interval_s
        slot = self._slot("check", account_id, now, interval_s)
        self._slots["check", account_id] = slot
        return await self._store.try_lease(
            f"check:{account_id}:{slot}", self.owner, ttl_s=2 * interval_s
        )

    def _slot(self, kind: str, account_id: str, now: datetime, interval_s: float) -> int:
        offset = _fraction(kind, account_id) * interval_s
        return int((now.timestamp() + offset) // interval_s)

    def _slot_changed(self, kind: str, account_id: str, now: datetime, interval_s: float) -> bool:
        """Whether a new slot began since this process last looked (first look: no)."""
        slot = self._slot(kind, account_id, now, interval_s)
        seen = self._slots.setdefault((kind, account_id), slot)
        return slot != seen

    async def _periodic_resync(self, account_id: str, now: datetime) -> None:
        """Publish the account's periodic delta pass once per slot, across all copies."""
        interval_s = self._settings.resync_interval_s
        slot = self._slot("resync", account_id, now, interval_s)
        async with self._limit:
            try:
                if await self._store.try_lease(
                    f"resync:{account_id}:{slot}", self.owner, ttl_s=2 * interval_s
                ):
                    await self.publish_resync(account_id, full=False, reason="periodic")
            except (PublishError, PyMongoError) as exc:
                log.warning("subscriptions.resync_failed", account_id=account_id, error=str(exc))
                return  # try again next scan (a published copy just means one more pass)
        self._slots["resync", account_id] = slot

    async def _guarded(self, account_id: str) -> None:
        async with self._limit:
            try:
                await self.service_account(account_id)
            except ReauthorizationRequired as exc:
                await self._reauthorization_required(account_id, exc.reason)
            except ThrottledError as exc:
                self.stats["throttled"] += 1
                self._not_before[account_id] = time.monotonic() + (exc.retry_after_s or 5.0)
            except (
                TransientError,
                PermanentError,
                PublishError,
                AccountUnavailable,
                PyMongoError,
            ) as exc:
                self.stats["failures"] += 1
                log.warning(
                    "subscriptions.account_failed", account_id=account_id, error=str(exc)[:200]
                )
                self._not_before[account_id] = (
                    time.monotonic() + self._settings.retry_after_failure_s
                )

    async def _reauthorization_required(self, account_id: str, reason: str) -> None:
        self.stats["reauthorization_required"] += 1
        try:
            await self._statuses.set(account_id, "reauthorization_required", reason)
        except TransientError:
            self._not_before[account_id] = time.monotonic() + 5.0

    # ---- one account, under its lease ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self, account_id: str, *, wait_s: float = 0.0) -> Any:
        name = f"subscription:{account_id}"
        deadline = time.monotonic() + wait_s
        while not await self._store.try_lease(name, self.owner, ttl_s=self._settings.lease_ttl_s):
            if time.monotonic() >= deadline:
                self.stats["lease_busy"] += 1
                yield False
                return
            await asyncio.sleep(0.1)
        try:
            yield True
        finally:
            with contextlib.suppress(Exception):  # it expires anyway
                await self._store.release_lease(name, self.owner)

    async def service_account(self, account_id: str, *, lease_wait_s: float = 0.0) -> bool:
        """Bring one account to its wanted state; False when another copy holds its lease."""
        async with self._lease(account_id, wait_s=lease_wait_s) as held:
            if not held:
                return False
            await self._service_locked(account_id)
            return True

    async def _service_locked(self, account_id: str) -> None:
        account = await self._store.get_account(account_id)
        if account is None or "user_ct" not in account:
            return
        state = await self._state.find_one({"_id": account_id}) or {}
        if account.get("status") in PAUSED_STATUSES:
            if not state.get("paused"):
                await self._set_state(account_id, paused=True)
            return
        repairs = self._repairs.pop(account_id, set())
        resync_reason: str | None = None
        if state.get("paused"):
            resync_reason = "reconnected"
        now = self._clock()
        records = await self._records(account_id)
        live = sorted(
            (r for r in records if as_utc(r["expires_at"]) > now),
            key=lambda r: as_utc(r["expires_at"]),
        )
        for record in records:
            if record not in live:  # expired: Graph has deleted it already
                await self._store.delete_subscription(str(record["_id"]))
        for record in live[:-1]:  # a reconnect made a newer one: keep only the newest
            await self._delete(account_id, record)
            self.stats["deleted_extra"] += 1
        current = live[-1] if live else None
        check = "check" in repairs
        if self._check_due(account_id, now):
            check = await self._take_check_slot(account_id, now) or check
        if current is not None and check:
            current = await self._check(account_id, current, now)
        if current is not None and (
            "renew" in repairs or self._renewal_due(account_id, current, now)
        ):
            current = await self._renew(account_id, current)
        if current is None:
            if await self._connecting(account_id):
                return  # the connect flow is creating it; look again next scan
            await self._create(account_id)
            resync_reason = "recreated" if records else "subscribed"
        if resync_reason is not None:
            await self.publish_resync(account_id, full=True, reason=resync_reason)
        if state.get("paused"):
            await self._set_state(account_id, paused=False)

    async def _connecting(self, account_id: str) -> bool:
        """Whether the connect flow holds the account (it creates the subscription itself)."""
        lease = await self._store.leases.find_one({"_id": f"{CONNECT_LEASE_PREFIX}{account_id}"})
        return lease is not None and as_utc(lease["expires_at"]) > utcnow()

    async def _records(self, account_id: str) -> list[Document]:
        return [doc async for doc in self._store.subscriptions.find({"account_id": account_id})]

    async def _create(self, account_id: str) -> None:
        await self._bucket.take()
        granted_at = self._clock()
        sub_hash, expires_at = await create_subscription(
            self._store,
            self._graph,
            account_id=account_id,
            public_url=self._settings.public_url,
            now=granted_at,
        )
        await self._store.set_subscription_expiry(
            sub_hash, expires_at=expires_at, granted_at=granted_at
        )
        self.stats["created"] += 1

    async def _renew(self, account_id: str, record: Document) -> Document | None:
        """PATCH a longer expiry (this also reauthorizes); None when Graph no longer has it."""
        sub_hash = str(record["_id"])
        sub_id = await self._store.subscription_id(account_id, sub_hash)
        if sub_id is None:
            return None
        answer: dict[str, Any] | None = None
        while True:
            granted_at = self._clock()
            await self._bucket.take()
            try:
                answer = await self._graph.renew_subscription(
                    account_id, sub_id, granted_at + timedelta(minutes=self._lifetime_minutes)
                )
            except PermanentError:
                if self._lifetime_minutes == MAX_EVENT_SUBSCRIPTION_MINUTES - 5:
                    raise
                # Graph refused the optimistic lifetime: use the documented maximum from now on.
                self._lifetime_minutes = MAX_EVENT_SUBSCRIPTION_MINUTES - 5
                continue
            break
        if answer is None:
            log.info("subscription.renewal_gone", account_id=account_id, subscription=sub_hash)
            await self._store.delete_subscription(sub_hash)
            return None
        expires_at = parse_graph_datetime(str(answer["expirationDateTime"]))
        await self._store.set_subscription_expiry(
            sub_hash, expires_at=expires_at, granted_at=granted_at
        )
        self.stats["renewed"] += 1
        log.info(
            "subscription.renewed",
            account_id=account_id,
            subscription=sub_hash,
            expires_at=isoformat_z(expires_at),
        )
        return {**record, "expires_at": expires_at, "granted_at": granted_at}

    async def _delete(self, account_id: str, record: Document) -> None:
        sub_hash = str(record["_id"])
        sub_id = await self._store.subscription_id(account_id, sub_hash)
        if sub_id is not None:
            await self._bucket.take()
            await self._graph.delete_subscription(account_id, sub_id)
        await self._store.delete_subscription(sub_hash)

    async def _check(self, account_id: str, record: Document, now: datetime) -> Document | None:
        """Compare with what Graph holds; returns the record if Graph still has it."""
        self.stats["checks"] += 1
        sub_hash = str(record["_id"])
        ours = await self._store.subscription_id(account_id, sub_hash)
        held = await self._graph.list_subscriptions(account_id)
        notification_url = f"{self._settings.public_url}/graph/notifications"
        identity = await self._store.identity(account_id)
        # A delegated token lists every subscription of the *user*, and several accounts may
        # be bound to one mailbox: only a subscription of ours that no account has a record
        # of is a stray (a crash's leftover). One that is being created right now has no
        # record for a moment, so a stray is deleted only when an earlier check saw it too.
        resource = f"users/{identity.user_id}/events".lower()
        others = {
            self._store.hasher.hash_id("subscription", str(h["id"])): str(h["id"])
            for h in held
            if h.get("id")
            and h.get("id") != ours
            and h.get("notificationUrl") == notification_url
            and str(h.get("resource", "")).lower() == resource
        }
        recorded: set[str] = set()
        if others:  # one query for all of them (a mailbox may serve many accounts)
            cursor = self._store.subscriptions.find({"_id": {"$in": list(others)}}, {"_id": 1})
            recorded = {str(doc["_id"]) async for doc in cursor}
        candidates = {graph_id for sub_hash, graph_id in others.items() if sub_hash not in recorded}
        seen_before = self._stray_candidates.get(account_id, set())
        self._stray_candidates[account_id] = candidates - seen_before
        for stray_id in sorted(candidates & seen_before):
            await self._bucket.take()
            await self._graph.delete_subscription(account_id, stray_id)
            self.stats["deleted_stray"] += 1
            log.info("subscription.stray_deleted", account_id=account_id)
        if ours is None or not any(s.get("id") == ours for s in held):
            log.info("subscription.missing_in_graph", account_id=account_id, subscription=sub_hash)
            await self._store.delete_subscription(sub_hash)
            self.stats["missing"] += 1
            return None
        return record

    async def _set_state(self, account_id: str, **fields: Any) -> None:
        await self._state.update_one(
            {"_id": account_id}, {"$set": {**fields, "updated_at": utcnow()}}, upsert=True
        )

    # ---- used by the lifecycle consumer -------------------------------------------------------

    async def publish_resync(self, account_id: str, *, full: bool, reason: str) -> None:
        """Ask the account's shard owner for a delta pass (raises PublishError)."""
        await self._publisher.publish(
            OutgoingMessage(
                exchange=INBOUND_EXCHANGE,
                routing_key=shard_routing_key(account_id, self._settings.shard_count),
                body=resync_message(
                    account_id=account_id, reason=reason, full=full, requested_at=utcnow()
                ),
                message_id=uuid.uuid4().hex,
            ),
            timeout_s=self._settings.publish_timeout_s,
        )
        self.stats[f"resync_{reason}"] += 1

    def request_repair(self, account_id: str, actions: Iterable[str]) -> None:
        """Have the next scan check (``check``) or renew (``renew``) the account."""
        self._repairs.setdefault(account_id, set()).update(actions)
        self._not_before.pop(account_id, None)
        self.wake()

    async def recreate(self, account_id: str, subscription_hash: str) -> bool:
        """Graph removed the subscription: forget it, create a new one, resync in full.

        Returns False when the work could not be done now (it is left to the next scan).
        """
        async with self._lease(account_id, wait_s=10.0) as held:
            if not held:
                return False
            await self._store.delete_subscription(subscription_hash)
            await self._service_locked(account_id)
            return True

    async def reauthorize(self, account_id: str, subscription_hash: str) -> bool:
        """Renew (which reauthorizes) with a fresh token, then an incremental delta pass for
        the changes made while notifications were paused. False: left to the next scan."""
        async with self._lease(account_id, wait_s=10.0) as held:
            if not held:
                return False
            record = await self._store.subscriptions.find_one(
                {"_id": subscription_hash, "account_id": account_id}
            )
            if record is None:
                return True  # already replaced
            renewed = await self._renew(account_id, record)
            if renewed is None:
                await self._service_locked(account_id)  # recreates and resyncs in full
                return True
            await self.publish_resync(account_id, full=False, reason="reauthorized")
            return True

    async def report_reauthorization(self, account_id: str, reason: str) -> None:
        """The account's sign-in is gone: set the status (and so stop its Graph calls)."""
        await self._reauthorization_required(account_id, reason)

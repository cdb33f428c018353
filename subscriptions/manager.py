"""The subscription manager: one live Graph subscription per connected account, forever.

Each scan reads every account, subscription record and per-account state (plain reads,
no locks) and works on the accounts with something due: create a missing subscription
(then a full delta resync, since the gap had no notifications), renew one past half its
granted lifetime (jittered per account so that accounts created together do not renew
together), delete extra ones a reconnect left, and check now and then against what Graph
holds. Accounts whose status pauses Graph calls are skipped.

Any number of managers may run. Each due account is decided again from reads made
*after* taking its lease, so a subscription is never created or renewed twice; periodic
delta passes and checks take a lease per account and time slot. Due accounts are worked
on in batches whose reads are one query each, because a query per account makes a scan
quadratic on a database that cannot push such filters to an index (docs/ferretdb.md).
Writes pass a token bucket and a concurrency limit, and the first scan waits a random
delay, so a restart never fires every account at once.

Subscription expiry is Graph's clock: ``clock`` (default: real UTC) is what expiries are
compared with; tests give it the simulator's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog
from pymongo.errors import PyMongoError

from contract.statuses import PAUSED_STATUSES
from handlers.errors import (
    AccountUnavailable,
    PermanentError,
    PublishError,
    ReauthorizationRequired,
    ThrottledError,
    TransientError,
)
from handlers.records import Account
from handlers.timeutil import as_utc, isoformat_z, parse_graph_datetime, utcnow
from subscriptions.ports import (
    AccountStatusPublisher,
    GraphSubscriptionApi,
    Record,
    Repositories,
    ResyncRequests,
)
from subscriptions.registration import (
    MAX_EVENT_SUBSCRIPTION_MINUTES,
    OPTIMISTIC_SUBSCRIPTION_MINUTES,
    SUBSCRIPTION_LEASE_PREFIX,
    create_subscription,
)
from subscriptions.schedule import (
    ManagerSettings,
    TokenBucket,
    expiry_summary,
    renewal_due,
    stable_fraction,
)

log = structlog.get_logger(__name__)

#: The lease the connect flow holds while it binds an account and creates its subscription.
CONNECT_LEASE_PREFIX = "connect:"

_T = TypeVar("_T")

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class _GraphView:
    """Graph's subscription list of a mailbox (``held``); of it, ours for its events
    (``mine``: Graph id -> record hash); and of those, the hashes that had a record when
    the list was read (``recorded``, read only when the mailbox holds several of ours)."""

    held: list[dict[str, Any]]
    mine: dict[str, str]
    recorded: frozenset[str]


@dataclass
class _Batch:
    """What a batch of accounts is decided from, read once after their leases were taken:
    the accounts, the manager's per-account state and the subscription records.

    ``read_at`` is when the read of the records *began* (monotonic): every write made
    under a lease taken before that is in it. ``listings`` holds Graph's subscription list
    per mailbox, fetched after the first read.
    """

    account_ids: list[str]
    accounts: dict[str, Account] = field(default_factory=dict)
    states: dict[str, Record] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict)  # account -> records
    read_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    listings: dict[tuple[str, str], _GraphView] = field(default_factory=dict)
    listing_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)


class SubscriptionManager:
    """Creates, renews, recreates and checks subscriptions; schedules delta passes."""

    def __init__(
        self,
        *,
        store: Repositories,
        graph: GraphSubscriptionApi,
        resyncs: ResyncRequests,
        statuses: AccountStatusPublisher,
        settings: ManagerSettings,
        clock: Clock = utcnow,
        owner: str | None = None,
    ) -> None:
        self._store = store
        self._graph = graph
        self._resyncs = resyncs
        self._statuses = statuses
        self._settings = settings
        self._clock = clock
        self.owner = owner or f"manager-{uuid.uuid4().hex[:12]}"
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
        #: What the last scan saw, for the metrics: :func:`expiry_summary` of the accounts
        #: that are not paused.
        self.expiring: dict[str, int] = {}

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
        accounts = await self._store.accounts.bound_statuses()
        records = await self._store.subscriptions.renewal_view()
        states = await self._store.renewals.get_many()
        due: list[str] = []
        resyncs: list[str] = []
        self.expiring = expiry_summary(
            (
                records.get(account_id, [])
                for account_id, status in accounts.items()
                if status not in PAUSED_STATUSES
            ),
            now,
        )
        for account_id, status in accounts.items():
            paused = status in PAUSED_STATUSES
            state = states.get(account_id, {})
            if paused:
                if not state.get("paused"):
                    due.append(account_id)
                continue
            if self._slot_changed("resync", account_id, now, self._settings.resync_interval_s):
                resyncs.append(account_id)
            if self._needs_work(account_id, records.get(account_id, []), state, now):
                due.append(account_id)
        ready = [a for a in due if self._not_before.get(a, 0.0) <= time.monotonic()]
        size = self._batch_size()
        for start in range(0, len(ready), size):
            await self._service_batch(ready[start : start + size])
        # After the subscriptions (a late renewal loses notifications, a late pass does not).
        await asyncio.gather(*(self._periodic_resync(a, now) for a in resyncs))
        return len(ready)

    def _batch_size(self) -> int:
        settings = self._settings
        by_rate = int(settings.writes_per_s * settings.batch_hold_s)
        return max(1, min(settings.batch_size, max(settings.max_concurrency, by_rate)))

    async def _service_batch(self, account_ids: list[str]) -> None:
        """Take the batch's leases, read the records once, then work on each held account."""
        taken: dict[str, float] = {}  # account -> monotonic time its lease was taken

        async def take(account_id: str) -> None:
            async with self._limit:
                try:
                    if await self._store.leases.try_take(
                        self._lease_name(account_id), self.owner, ttl_s=self._settings.lease_ttl_s
                    ):
                        taken[account_id] = time.monotonic()
                    else:
                        self.stats["lease_busy"] += 1
                except PyMongoError as exc:
                    self._failed(account_id, exc)

        await asyncio.gather(*(take(a) for a in account_ids))
        if not taken:
            return
        batch = _Batch(account_ids=sorted(taken))
        try:
            await self._read_batch(batch)
        except PyMongoError as exc:
            log.warning("subscriptions.records_unreadable", error=str(exc)[:200])
            await asyncio.gather(*(self._release(a) for a in taken))
            return
        await asyncio.gather(*(self._guarded(a, batch=batch, taken_at=t) for a, t in taken.items()))

    async def _read_batch(self, batch: _Batch) -> None:
        """Read the batch's accounts, states and subscription records: one query each."""
        batch.accounts = await self._store.accounts.get_many(batch.account_ids)
        batch.states = await self._store.renewals.get_many(batch.account_ids)
        await self._read_records(batch)

    async def _read_records(self, batch: _Batch) -> None:
        """(Re)read the subscription records of the batch's accounts into ``batch``."""
        began = time.monotonic()
        records = await self._store.subscriptions.renewal_view(batch.account_ids)
        batch.records, batch.read_at = records, began

    async def _records_since(self, batch: _Batch, account_id: str, since: float) -> list[Record]:
        """The account's records from a read that began at or after ``since`` (monotonic)."""
        async with batch.lock:  # concurrent callers share one re-read
            if batch.read_at < since:
                await self._read_records(batch)
        return batch.records.get(account_id, [])

    def _needs_work(
        self, account_id: str, records: list[Record], state: Record, now: datetime
    ) -> bool:
        if state.get("paused") or account_id in self._repairs:
            return True
        live = [r for r in records if as_utc(r["expires_at"]) > now]
        if len(live) != 1 or len(records) != 1:
            return True
        if self._renewal_due(account_id, live[0], now):
            return True
        return self._check_due(account_id, now)

    def _renewal_due(self, account_id: str, record: Record, now: datetime) -> bool:
        return renewal_due(account_id, record, now, self._settings)

    def _check_due(self, account_id: str, now: datetime) -> bool:
        return self._slot_changed("check", account_id, now, self._settings.check_interval_s)

    async def _take_check_slot(self, account_id: str, now: datetime) -> bool:
        """Claim this slot's Graph check for the account (one copy wins); marks it seen."""
        interval_s = self._settings.check_interval_s
        slot = self._slot("check", account_id, now, interval_s)
        self._slots["check", account_id] = slot
        return await self._store.leases.try_take(
            f"check:{account_id}:{slot}", self.owner, ttl_s=2 * interval_s
        )

    def _slot(self, kind: str, account_id: str, now: datetime, interval_s: float) -> int:
        offset = stable_fraction(kind, account_id) * interval_s
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
                if await self._store.leases.try_take(
                    f"resync:{account_id}:{slot}", self.owner, ttl_s=2 * interval_s
                ):
                    await self.publish_resync(account_id, full=False, reason="periodic")
            except (PublishError, PyMongoError) as exc:
                log.warning("subscriptions.resync_failed", account_id=account_id, error=str(exc))
                return  # try again next scan (a published copy just means one more pass)
        self._slots["resync", account_id] = slot

    async def _guarded(self, account_id: str, *, batch: _Batch, taken_at: float) -> None:
        async with self._limit:
            try:
                await self._service_held(account_id, batch, taken_at)
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
                self._failed(account_id, exc)

    def _failed(self, account_id: str, exc: Exception) -> None:
        self.stats["failures"] += 1
        log.warning("subscriptions.account_failed", account_id=account_id, error=str(exc)[:200])
        self._not_before[account_id] = time.monotonic() + self._settings.retry_after_failure_s

    async def _reauthorization_required(self, account_id: str, reason: str) -> None:
        self.stats["reauthorization_required"] += 1
        try:
            await self._statuses.set(account_id, "reauthorization_required", reason)
        except TransientError:
            self._not_before[account_id] = time.monotonic() + 5.0

    # ---- one account, under its lease ---------------------------------------------------------

    @staticmethod
    def _lease_name(account_id: str) -> str:
        return f"{SUBSCRIPTION_LEASE_PREFIX}{account_id}"

    async def _release(self, account_id: str) -> None:
        with contextlib.suppress(Exception):  # it expires anyway
            await self._store.leases.release(self._lease_name(account_id), self.owner)

    @contextlib.asynccontextmanager
    async def _lease(self, account_id: str, *, wait_s: float = 0.0) -> Any:
        if not await self._store.leases.take(
            self._lease_name(account_id),
            self.owner,
            ttl_s=self._settings.lease_ttl_s,
            wait_s=wait_s,
        ):
            self.stats["lease_busy"] += 1
            yield False
            return
        try:
            yield True
        finally:
            await self._release(account_id)

    async def _service_held(self, account_id: str, batch: _Batch, taken_at: float) -> None:
        """Work on an account of a batch whose lease this manager took at ``taken_at``."""
        try:
            if time.monotonic() - taken_at > self._settings.lease_ttl_s / 2:
                # Waited too long for its turn: the lease might lapse while working on it.
                self.stats["lease_stale"] += 1
                return  # the next scan takes it again
            await self._service_locked(account_id, batch)
        finally:
            await self._release(account_id)

    async def service_account(self, account_id: str, *, lease_wait_s: float = 0.0) -> bool:
        """Bring one account to its wanted state; False when another copy holds its lease."""
        async with self._lease(account_id, wait_s=lease_wait_s) as held:
            if not held:
                return False
            await self._service_locked(account_id)
            return True

    async def _service_locked(self, account_id: str, batch: _Batch | None = None) -> None:
        """Decide and act for one account whose lease is held.

        ``batch``: what was read after the lease was taken (None: read it now).
        """
        if batch is None:
            account = await self._store.accounts.get(account_id)
            state = await self._store.renewals.get(account_id)
        else:
            account = batch.accounts.get(account_id)
            state = batch.states.get(account_id, {})
        if account is None or not account.bound:
            return
        if account.status in PAUSED_STATUSES:
            if not state.get("paused"):
                await self._set_state(account_id, paused=True)
            return
        repairs = self._repairs.pop(account_id, set())
        resync_reason: str | None = None
        if state.get("paused"):
            resync_reason = "reconnected"
        now = self._clock()
        if batch is None:
            records = await self._records(account_id)
        else:
            records = batch.records.get(account_id, [])
        live = sorted(
            (r for r in records if as_utc(r["expires_at"]) > now),
            key=lambda r: as_utc(r["expires_at"]),
        )
        for record in records:
            if record not in live:  # expired: Graph has deleted it already
                await self._store.subscriptions.delete(str(record["_id"]))
        for record in live[:-1]:  # a reconnect made a newer one: keep only the newest
            await self._delete(account_id, record)
            self.stats["deleted_extra"] += 1
        current = live[-1] if live else None
        check = "check" in repairs
        if self._check_due(account_id, now):
            check = await self._take_check_slot(account_id, now) or check
        if current is not None and check:
            current = await self._check(account_id, account, current, batch)
        if current is not None and (
            "renew" in repairs or self._renewal_due(account_id, current, now)
        ):
            current = await self._renew(account_id, current)
        if current is None:
            checked_at = time.monotonic()
            if await self._connecting(account_id):
                return  # the connect flow is creating it; look again next scan
            # The connect flow's lease was gone at ``checked_at``: a record it made is in
            # any read begun after that.
            if batch is not None and await self._made_meanwhile(
                batch, account_id, records, now, since=checked_at
            ):
                return  # someone else (the connect flow) made one since the batch's read
            await self._create(account_id, account)
            resync_reason = "recreated" if records else "subscribed"
        if resync_reason is not None:
            await self.publish_resync(account_id, full=True, reason=resync_reason)
        if state.get("paused"):
            await self._set_state(account_id, paused=False)

    async def _connecting(self, account_id: str) -> bool:
        """Whether the connect flow holds the account (it creates the subscription itself)."""
        return await self._store.leases.is_held(f"{CONNECT_LEASE_PREFIX}{account_id}")

    async def _records(self, account_id: str) -> list[Record]:
        return await self._store.subscriptions.for_account(account_id)

    async def _made_meanwhile(
        self, batch: _Batch, account_id: str, records: list[Record], now: datetime, since: float
    ) -> bool:
        """Whether a recent read shows a live record the batch's first read did not have."""
        known = {str(r["_id"]) for r in records}
        return any(
            str(r["_id"]) not in known and as_utc(r["expires_at"]) > now
            for r in await self._records_since(batch, account_id, since)
        )

    async def _create(self, account_id: str, account: Account) -> None:
        identity = await self._store.accounts.decrypt_identity(account)

        async def write(minutes: int) -> None:
            await create_subscription(
                self._store,
                self._graph,
                account_id=account_id,
                public_url=self._settings.public_url,
                now=self._clock(),
                lifetimes_minutes=(minutes,),
                identity=identity,
                record_granted_at=True,
            )

        await self._with_lifetime(write)
        self.stats["created"] += 1

    async def _with_lifetime(self, write: Callable[[int], Awaitable[_T]]) -> _T:
        """One subscription write (a token of the bucket each try) asking for the lifetime
        Graph grants: the optimistic one until a 400 refuses it, then, from then on, the
        documented maximum."""
        while True:
            await self._bucket.take()
            minutes = self._lifetime_minutes  # another account's answer may change it meanwhile
            try:
                return await write(minutes)
            except PermanentError:
                if minutes == MAX_EVENT_SUBSCRIPTION_MINUTES - 5:
                    raise
                self._lifetime_minutes = MAX_EVENT_SUBSCRIPTION_MINUTES - 5

    async def _renew(self, account_id: str, record: Record) -> Record | None:
        """PATCH a longer expiry (this also reauthorizes); None when Graph no longer has it."""
        sub_hash = str(record["_id"])
        sub_id = await self._store.subscriptions.decrypt_graph_id(account_id, record)
        if sub_id is None:
            return None
        granted_at = self._clock()

        async def write(minutes: int) -> dict[str, Any] | None:
            nonlocal granted_at
            granted_at = self._clock()
            return await self._graph.renew_subscription(
                account_id, sub_id, granted_at + timedelta(minutes=minutes)
            )

        answer = await self._with_lifetime(write)
        if answer is None:
            log.info("subscription.renewal_gone", account_id=account_id, subscription=sub_hash)
            await self._store.subscriptions.delete(sub_hash)
            return None
        expires_at = parse_graph_datetime(str(answer["expirationDateTime"]))
        await self._store.subscriptions.set_expiry(
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

    async def _delete(self, account_id: str, record: Record) -> None:
        sub_hash = str(record["_id"])
        sub_id = await self._store.subscriptions.decrypt_graph_id(account_id, record)
        if sub_id is not None:
            await self._bucket.take()
            await self._graph.delete_subscription(account_id, sub_id)
        await self._store.subscriptions.delete(sub_hash)

    async def _check(
        self, account_id: str, account: Account, record: Record, batch: _Batch | None
    ) -> Record | None:
        """Compare with what Graph holds; returns the record if Graph still has it."""
        self.stats["checks"] += 1
        sub_hash = str(record["_id"])
        ours = await self._store.subscriptions.decrypt_graph_id(account_id, record)
        view = await self._graph_view(account_id, account, batch)
        held, mine = view.held, view.mine
        # A delegated token lists every subscription of the *user*, and several accounts may
        # be bound to one mailbox: only a subscription of ours that no account has a record
        # of is a stray (a crash's leftover). One that is being created right now has no
        # record for a moment, so a stray is deleted only when an earlier check saw it too,
        # and only if an ``_id`` read just before deleting still finds no record of it.
        others = {h: graph_id for graph_id, h in mine.items() if graph_id != ours}
        candidates = {
            graph_id for sub_hash, graph_id in others.items() if sub_hash not in view.recorded
        }
        seen_before = self._stray_candidates.get(account_id, set())
        self._stray_candidates[account_id] = candidates - seen_before
        for stray_id in sorted(candidates & seen_before):
            if await self._store.subscriptions.exists(mine[stray_id]):
                continue  # recorded meanwhile: not a stray
            await self._bucket.take()
            await self._graph.delete_subscription(account_id, stray_id)
            self.stats["deleted_stray"] += 1
            log.info("subscription.stray_deleted", account_id=account_id)
        if ours is None or not any(s.get("id") == ours for s in held):
            log.info("subscription.missing_in_graph", account_id=account_id, subscription=sub_hash)
            await self._store.subscriptions.delete(sub_hash)
            self.stats["missing"] += 1
            return None
        return record

    async def _graph_view(
        self, account_id: str, account: Account, batch: _Batch | None
    ) -> _GraphView:
        """What Graph lists for the account's mailbox, and of that the event subscriptions
        with our notification URL (Graph id -> record hash).

        Within a batch a mailbox is listed once (after the batch's read of the records):
        a delegated listing is the same for every account bound to that user, and so is
        the one query for which of them have records.
        """
        key = (account.tenant_hash or "", account.user_hash or "")
        if batch is None or not all(key):
            return await self._list_mine(account_id, account)
        async with batch.listing_locks.setdefault(key, asyncio.Lock()):
            view = batch.listings.get(key)
            if view is None:  # first of the mailbox, or the one before failed
                view = batch.listings[key] = await self._list_mine(account_id, account)
            return view

    async def _list_mine(self, account_id: str, account: Account) -> _GraphView:
        held = await self._graph.list_subscriptions(account_id)
        identity = await self._store.accounts.decrypt_identity(account)
        notification_url = f"{self._settings.public_url}/graph/notifications"
        resource = f"users/{identity.user_id}/events".lower()
        mine = {
            str(h["id"]): self._store.subscriptions.hash_graph_id(str(h["id"]))
            for h in held
            if h.get("id")
            and h.get("notificationUrl") == notification_url
            and str(h.get("resource", "")).lower() == resource
        }
        recorded: set[str] = set()
        if len(mine) > 1:  # a mailbox serving several accounts (or holding a stray)
            recorded = await self._store.subscriptions.recorded_among(list(mine.values()))
        return _GraphView(held=held, mine=mine, recorded=frozenset(recorded))

    async def _set_state(self, account_id: str, **fields: Any) -> None:
        await self._store.renewals.update(account_id, **fields)

    # ---- used by the lifecycle consumer -------------------------------------------------------

    async def publish_resync(self, account_id: str, *, full: bool, reason: str) -> None:
        """Ask the account's shard owner for a delta pass (raises PublishError)."""
        await self._resyncs.request(account_id, full=full, reason=reason)
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
            await self._store.subscriptions.delete(subscription_hash)
            await self._service_locked(account_id)
            return True

    async def reauthorize(self, account_id: str, subscription_hash: str) -> bool:
        """Renew (which reauthorizes) with a fresh token, then an incremental delta pass for
        the changes made while notifications were paused. False: left to the next scan."""
        async with self._lease(account_id, wait_s=10.0) as held:
            if not held:
                return False
            record = await self._store.subscriptions.get_for_account(account_id, subscription_hash)
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

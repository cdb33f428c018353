"""Delta sync: backfill an account's calendar and repair drift through calendarView delta.

Runs inside the inbound worker for ``resync`` messages, so the account's shard owner stays
the only writer of its events and of its ``sync_state`` document. One pass:

1. follows the stored delta link (decrypted), or starts a *full* round over the sync
   window when there is none, when it was asked for (connect, ``missed``, recreated
   subscription, operator), when the window has moved on, or when Graph refuses the link;
2. reconciles every returned instance through the version-guarded upsert, page by page,
   and fetches the series masters of returned occurrences (calendarView never returns
   masters);
3. collects deletions: ``@removed`` ids whose stored event overlaps the window (Graph
   reports out-of-window changes as ``@removed`` too) and, in a full round, the stored
   live events of the window that the round did not return (repairs missed deletes);
4. applies the mass-deletion brake, then the deletions, then stores the new link
   encrypted and marks the account synced.

The brake: a pass that would delete more than ``mass_delete_ratio`` of the account's live
events (accounts with at least ``mass_delete_min_events``), or a full round that comes
back empty while the window held events, deletes nothing, sets ``deletions_paused`` and
does not store its delta link (the next pass sees the same deletions again). Only a
resync requested by an operator (``reason="operator"``) passes the brake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from crypto import DataCipher, DecryptionError
from handlers.errors import AccountUnavailable, DeltaResetRequired
from handlers.inbound import SELECT, SyncWindow
from handlers.ports import (
    Accounts,
    AccountStatus,
    CalendarGraph,
    DeltaLinks,
    Document,
    Events,
    LinkReader,
)
from handlers.records import Change, StoredVersion
from handlers.timeutil import utcnow

log = structlog.get_logger(__name__)

#: The reason an operator's resync carries (``POST /api/v1/accounts/{id}/resync``).
OPERATOR_REASON = "operator"


@dataclass(frozen=True)
class DeltaSettings:
    """Tunables of a delta pass."""

    page_size: int = 100
    mass_delete_ratio: float = 0.5
    mass_delete_min_events: int = 10
    #: Up to this many deletions are confirmed by a GET each (an event moved out of the
    #: window is also ``@removed``); above it the delta answer is trusted as it is.
    confirm_deletions_max: int = 100
    #: A stored link whose window started this much earlier than today's window is
    #: replaced by a full round over the current window (the window rolls forward).
    window_refresh_s: float = 86_400.0
    #: Concurrent upserts within one page (distinct events; one writer per account). One
    #: by default: FerretDB's SQLite has a single writer per database anyway, and bursts of
    #: concurrent writes while a long read held the WAL crashed it (SIGBUS) in our tests.
    upsert_concurrency: int = 1


@dataclass
class DeltaReport:
    """What one pass did (logged; tests read the last one)."""

    account_id: str
    full: bool
    reason: str
    items: int = 0
    removed: int = 0
    upserted: int = 0
    deleted: int = 0
    candidates: int = 0
    live_before: int = 0
    braked: bool = False
    resets: int = 0


@dataclass(frozen=True)
class _Pass:
    account_id: str
    cipher: DataCipher
    user_id: str
    start: datetime
    end: datetime


@dataclass
class _Round:
    full: bool
    seen: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    master_ids: dict[str, str] = field(default_factory=dict)  # master key -> Graph id
    items: int = 0
    pages: int = 0
    delta_link: str | None = None
    linked: set[str] | None = None  # link_index keys of the account (full rounds)


class DeltaRunner:
    """The ``run_delta`` of :class:`handlers.inbound.InboundHandler`."""

    def __init__(
        self,
        *,
        store: Accounts,
        delta_links: DeltaLinks,
        events: Events,
        graph: CalendarGraph,
        statuses: AccountStatus,
        window: SyncWindow,
        settings: DeltaSettings | None = None,
        now: Callable[[], datetime] = utcnow,
        links: LinkReader | None = None,
    ) -> None:
        self._links = links
        self._store = store
        self._events = events
        self._graph = graph
        self._statuses = statuses
        self._window = window
        self._settings = settings or DeltaSettings()
        self._now = now
        self._delta_links = delta_links
        self.last_report: DeltaReport | None = None

    async def __call__(
        self, account_id: str, cipher: DataCipher, user_id: str, full: bool, reason: str
    ) -> list[Change]:
        """Run one pass; returns the changes written (the handler announces them)."""
        start, end = self._window.bounds()
        link = None if full else await self._load_link(account_id, cipher, start)
        report = DeltaReport(account_id=account_id, full=link is None, reason=reason)
        changes: list[Change] = []
        ctx = _Pass(account_id, cipher, user_id, start, end)
        try:
            rnd = await self._round(ctx, link, changes)
        except DeltaResetRequired:
            if link is None:
                raise  # a fresh round refused: transient, the message is retried
            report.resets += 1
            report.full = True
            log.info("delta.reset", account_id=account_id, reason=reason)
            await self._clear_link(account_id)
            rnd = await self._round(ctx, None, changes)
        report.items = rnd.items
        report.removed = len(rnd.removed)
        changes += await self._refresh_masters(account_id, cipher, user_id, rnd)

        if rnd.full:
            live = await self._live_docs(account_id)
            live_count = len(live)
        else:
            # An incremental pass looks only at what it reported removed (and their series):
            # reading every live event would make each pass cost the mailbox's size.
            live = await self._live_docs(account_id, rnd.removed)
            series = {str(d["series"]) for d in live.values() if d.get("series")}
            live.update(await self._live_docs(account_id, series - set(live)))
            live_count = await self._events.count_live(account_id) if rnd.removed else 0
        candidates = self._deletion_candidates(rnd, live, start, end)
        report.live_before = live_count
        report.candidates = len(candidates)
        brake = self._brake_reason(rnd, live, candidates, start, end, total=live_count)
        if brake is not None and reason != OPERATOR_REASON:
            report.braked = True
            report.upserted = sum(1 for c in changes if c.change == "upserted")
            self.last_report = report
            log.warning(
                "delta.deletions_paused",
                account_id=account_id,
                would_delete=len(candidates),
                live=live_count,
                full=rnd.full,
            )
            await self._fence(account_id, cipher)
            if rnd.full:
                await self._clear_link(account_id)
            # An incremental pass keeps the previous link: the next pass meets the same
            # deletions again, so the brake holds until an operator's resync.
            # Setting a failure status also records last_error, in words and with its time.
            await self._statuses.set(account_id, "deletions_paused", brake)
            return changes

        changes += await self._delete(ctx, candidates, live, rnd)
        report.upserted = sum(1 for c in changes if c.change == "upserted")
        report.deleted = sum(1 for c in changes if c.change == "deleted")
        await self._fence(account_id, cipher)
        if rnd.delta_link is not None:
            await self._save_link(account_id, cipher, rnd.delta_link, start, end)
        await self._statuses.record_sync(account_id)
        account = await self._store.account(account_id)
        if account is not None and account.status in ("backfilling", "deletions_paused"):
            await self._statuses.set(account_id, "connected")
        self.last_report = report
        log.info(
            "delta.pass_done",
            account_id=account_id,
            full=report.full,
            reason=reason,
            items=report.items,
            upserted=report.upserted,
            deleted=report.deleted,
            resets=report.resets,
        )
        return changes

    async def _fence(self, account_id: str, cipher: DataCipher) -> None:
        """Stop the pass when the account was erased meanwhile, or erased and connected
        again under a new key (checked before each write)."""
        if await self._store.fenced(account_id, cipher):
            log.info("delta.fenced", account_id=account_id)
            raise AccountUnavailable(account_id, "erased")

    # ---- the round --------------------------------------------------------------------------

    async def _round(self, ctx: _Pass, link: str | None, changes: list[Change]) -> _Round:
        account_id, cipher = ctx.account_id, ctx.cipher
        rnd = _Round(full=link is None)
        limit = asyncio.Semaphore(self._settings.upsert_concurrency)
        # A full round reads every stored version (and link key) once instead of once per
        # item; an incremental one reads by ``_id`` per item, so that its cost follows the
        # changes, not the mailbox's size (``$in`` is not served by an index on FerretDB).
        known: dict[str, StoredVersion] | None = None
        linked: set[str] | None = None
        if rnd.full:
            known = await self._events.stored_versions(account_id)
            linked = await self._links.indexed_keys(account_id) if self._links else set()
        rnd.linked = linked

        async def upsert(item: Mapping[str, Any]) -> Change | None:
            async with limit:
                await self._fence(account_id, cipher)
                echo, relation_event_id = False, None
                key = self._events.event_key(account_id, str(item["id"]))
                txn = item.get("transactionId")
                if self._links is not None and (
                    linked is None
                    or key in linked
                    or (
                        isinstance(txn, str)
                        and self._links.transaction_key(account_id, txn) in linked
                    )
                ):
                    # An event linked to 1Relation: its version may be our own write.
                    echo, relation_event_id = await self._links.echo_of(
                        account_id, key, item, cipher
                    )
                return await self._events.upsert_version(
                    account_id,
                    item,
                    cipher=cipher,
                    known=known,
                    announce=not echo,
                    relation_event_id=relation_event_id,
                )

        pages = self._graph.calendar_view_delta(
            account_id,
            ctx.user_id,
            delta_link=link,
            start=ctx.start,
            end=ctx.end,
            page_size=self._settings.page_size,
        )
        async for page in pages:
            await self._fence(account_id, cipher)
            # The same entity may appear twice in a page: keep the last (two concurrent
            # upserts of one document could race on FerretDB).
            by_id = {str(item["id"]): item for item in page.items if item.get("id")}
            rnd.items += len(by_id)
            for graph_id, item in by_id.items():
                rnd.seen.add(self._events.event_key(account_id, graph_id))
                master = item.get("seriesMasterId")
                if master:
                    rnd.master_ids[self._events.event_key(account_id, str(master))] = str(master)
            written = await asyncio.gather(*(upsert(item) for item in by_id.values()))
            changes.extend(c for c in written if c is not None)
            rnd.removed.update(self._events.event_key(account_id, gid) for gid in page.removed_ids)
            rnd.pages += 1
            if rnd.pages % 20 == 0:
                log.info("delta.progress", account_id=account_id, pages=rnd.pages, items=rnd.items)
            if page.delta_link is not None:
                rnd.delta_link = page.delta_link
        return rnd

    async def _refresh_masters(
        self, account_id: str, cipher: DataCipher, user_id: str, rnd: _Round
    ) -> list[Change]:
        """Fetch the series masters of the returned occurrences (delta never returns them)."""
        changes: list[Change] = []
        for key, graph_id in rnd.master_ids.items():
            master = await self._graph.get_event(account_id, user_id, graph_id, select=SELECT)
            await self._fence(account_id, cipher)
            if master is None:
                gone = await self._events.mark_deleted(account_id, key)
                if gone is not None:
                    changes.append(gone)
                continue
            rnd.seen.add(key)
            written = await self._events.upsert_version(account_id, master, cipher=cipher)
            if written is not None:
                changes.append(written)
        return changes

    # ---- deletions and the brake ------------------------------------------------------------

    async def _live_docs(
        self, account_id: str, keys: Iterable[str] | None = None
    ) -> dict[str, Document]:
        """The account's live events (only those of ``keys`` when given)."""
        return dict(
            await self._events.live_docs(account_id, None if keys is None else sorted(keys))
        )

    @staticmethod
    def _in_window(doc: Mapping[str, Any], start: datetime, end: datetime) -> bool:
        first, last = doc.get("start"), doc.get("end")
        if not isinstance(first, datetime) or not isinstance(last, datetime):
            return False  # unknown extent: never deleted on a guess
        return _aware(first) < end and _aware(last) > start

    def _deletion_candidates(
        self, rnd: _Round, live: Mapping[str, Document], start: datetime, end: datetime
    ) -> set[str]:
        keys: Iterable[str] = rnd.removed
        if rnd.full:
            keys = rnd.removed | (set(live) - rnd.seen)
        return {k for k in keys if k in live and self._in_window(live[k], start, end)}

    def _brake_reason(
        self,
        rnd: _Round,
        live: Mapping[str, Document],
        candidates: set[str],
        start: datetime,
        end: datetime,
        *,
        total: int,
    ) -> str | None:
        if not candidates:
            return None
        settings = self._settings
        if total >= settings.mass_delete_min_events and (
            len(candidates) > settings.mass_delete_ratio * total
        ):
            return (
                f"Microsoft reported {len(candidates)} of {total} events as deleted, more than "
                f"{settings.mass_delete_ratio:.0%}; deleting was paused to protect the data. "
                "If the deletions are real, an operator's resync applies them."
            )
        if (
            rnd.full
            and rnd.items == 0
            and any(self._in_window(d, start, end) for d in live.values())
        ):
            return (
                "Microsoft returned an empty calendar although events were synced; deleting "
                "was paused to protect the data. If the calendar really is empty, an "
                "operator's resync applies it."
            )
        return None

    async def _delete(
        self, ctx: _Pass, candidates: set[str], live: Mapping[str, Document], rnd: _Round
    ) -> list[Change]:
        account_id, cipher, user_id = ctx.account_id, ctx.cipher, ctx.user_id
        changes: list[Change] = []
        confirm = len(candidates) <= self._settings.confirm_deletions_max
        touched_series: set[str] = set()
        for key in sorted(candidates):
            doc = live[key]
            current = await self._fetch(account_id, cipher, user_id, key, doc) if confirm else None
            await self._fence(account_id, cipher)
            if current is not None:
                # Still there (moved out of the window, or a replayed @removed).
                written = await self._events.upsert_version(account_id, current, cipher=cipher)
                if written is not None:
                    changes.append(written)
                continue
            ours = (
                self._links is not None
                and (rnd.linked is None or key in rnd.linked)
                and self._links.deleted_by_us(await self._links.doc_for(account_id, key), key)
            )
            gone = await self._events.mark_deleted(account_id, key, announce=not ours)
            if gone is not None:
                changes.append(gone)
            if doc.get("type") == "seriesMaster":
                for instance in await self._events.series_instance_keys(account_id, key):
                    dropped = await self._events.mark_deleted(account_id, instance)
                    if dropped is not None:
                        changes.append(dropped)
            elif doc.get("series"):
                touched_series.add(str(doc["series"]))
        # A series whose occurrences went away may itself be gone: ask for its master.
        for series_key in touched_series - rnd.seen - candidates:
            master_doc = live.get(series_key)
            if master_doc is None:
                continue
            master = await self._fetch(account_id, cipher, user_id, series_key, master_doc)
            await self._fence(account_id, cipher)
            if master is None:
                for key in {series_key} | await self._events.series_instance_keys(
                    account_id, series_key
                ):
                    dropped = await self._events.mark_deleted(account_id, key)
                    if dropped is not None:
                        changes.append(dropped)
        return changes

    async def _fetch(
        self, account_id: str, cipher: DataCipher, user_id: str, key: str, doc: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        graph_id = self._events.graph_id_of(account_id, doc, cipher)
        return await self._graph.get_event(account_id, user_id, graph_id, select=SELECT)

    # ---- the stored delta link ----------------------------------------------------------------

    async def _load_link(self, account_id: str, cipher: DataCipher, start: datetime) -> str | None:
        try:
            stored = await self._delta_links.load(account_id, cipher)
        except DecryptionError:
            log.warning("delta.link_unreadable", account_id=account_id)
            return None
        if stored is None:
            return None
        link, window_start = stored
        if window_start is not None and start - _aware(window_start) > timedelta(
            seconds=self._settings.window_refresh_s
        ):
            log.info("delta.window_moved", account_id=account_id)
            return None
        return link

    async def _save_link(
        self, account_id: str, cipher: DataCipher, link: str, start: datetime, end: datetime
    ) -> None:
        await self._delta_links.save(account_id, cipher, link, start=start, end=end, at=self._now())

    async def _clear_link(self, account_id: str) -> None:
        await self._delta_links.clear(account_id)


def _aware(value: datetime) -> datetime:
    """Datetimes from a client without ``tz_aware`` come back naive; they are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

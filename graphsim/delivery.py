"""Pushes notifications to receivers: batching, 3 s timeout, backoff retries, the handshake."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from .clock import SimClock
from .faults import Faults

MAX_ITEMS_PER_POST = 100
MAX_PARALLEL_POSTS_PER_URL = 4


@dataclass
class QueuedItem:
    subscription_id: str
    item: dict[str, Any]
    kind: str  # "change" | "lifecycle"
    enqueued_sim_s: float
    cancelled: bool = False


@dataclass
class _UrlQueue:
    items: deque[QueuedItem] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_PARALLEL_POSTS_PER_URL)
    )
    worker: asyncio.Task[None] | None = None


def validation_token() -> str:
    """A token shaped like Graph's: a sentence, not a JWT."""
    return (
        "Validation: Testing client application reachability for subscription "
        f"Request-Id: {uuid.uuid4()}"
    )


class DeliveryEngine:
    """One queue and worker per notificationUrl; every attempt is recorded in `log`."""

    def __init__(
        self, *, clock: SimClock, faults: Faults, ssl_context: ssl.SSLContext | bool = True
    ) -> None:
        self.clock = clock
        self.faults = faults
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._queues: dict[str, _UrlQueue] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._busy = 0
        self._by_sub: dict[str, set[int]] = {}
        self._pending: dict[int, QueuedItem] = {}
        self.log: list[dict[str, Any]] = []
        self.on_dropped: Callable[[list[QueuedItem]], None] | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=200)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)

    async def stop(self) -> None:
        for q in self._queues.values():
            if q.worker:
                q.worker.cancel()
        tasks = [q.worker for q in self._queues.values() if q.worker] + list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._queues.clear()
        self._tasks.clear()
        if self._session:
            await self._session.close()
            self._session = None

    def reset(self) -> None:
        for q in self._queues.values():
            for item in q.items:
                item.cancelled = True
            q.items.clear()
        for item in self._pending.values():
            item.cancelled = True
        self._pending.clear()
        self._by_sub.clear()
        self.log.clear()

    def idle(self) -> bool:
        """Nothing queued, delayed, or being posted."""
        return self._busy == 0 and all(not q.items for q in self._queues.values())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- enqueueing ------------------------------------------------------------------------

    def enqueue(
        self, url: str, subscription_id: str, item: dict[str, Any], kind: str, delay_s: float = 0.0
    ) -> None:
        """Queue one notification item for `url`, after `delay_s` (plus any reorder fault)."""
        queued = QueuedItem(subscription_id, item, kind, self.clock.now_s())
        self._pending[id(queued)] = queued
        self._by_sub.setdefault(subscription_id, set()).add(id(queued))
        if self.faults.reorder_ms > 0:
            delay_s += self.faults.rng.uniform(0, self.faults.reorder_ms) / 1000
        if delay_s > 0:
            self._busy += 1
            self._spawn(self._push_later(url, queued, delay_s))
        else:
            self._push(url, queued)

    async def _push_later(self, url: str, queued: QueuedItem, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
            self._push(url, queued)
        finally:
            self._busy -= 1

    def _push(self, url: str, queued: QueuedItem) -> None:
        q = self._queues.get(url)
        if q is None:
            q = self._queues[url] = _UrlQueue()
            q.worker = asyncio.get_running_loop().create_task(self._worker(url, q))
        q.items.append(queued)
        q.wake.set()

    def drop_subscription(self, subscription_id: str) -> int:
        """Cancel everything queued or retrying for a subscription; returns how many."""
        dropped = 0
        for key in self._by_sub.pop(subscription_id, set()):
            item = self._pending.pop(key, None)
            if item and not item.cancelled:
                item.cancelled = True
                dropped += 1
        return dropped

    def _forget(self, items: list[QueuedItem]) -> None:
        for item in items:
            self._pending.pop(id(item), None)
            keys = self._by_sub.get(item.subscription_id)
            if keys:
                keys.discard(id(item))

    # ---- worker ----------------------------------------------------------------------------

    async def _worker(self, url: str, q: _UrlQueue) -> None:
        while True:
            await q.wake.wait()
            q.wake.clear()
            while q.items:
                self._busy += 1
                try:
                    limit = self.faults.batch_max_items or MAX_ITEMS_PER_POST
                    if self.faults.batch_max_items and self.faults.batch_window_ms:
                        deadline = time.monotonic() + self.faults.batch_window_ms / 1000
                        while len(q.items) < limit:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                break
                            q.wake.clear()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(q.wake.wait(), remaining)
                    batch: list[QueuedItem] = []
                    while q.items and len(batch) < limit:
                        item = q.items.popleft()
                        if not item.cancelled:
                            batch.append(item)
                    if batch:
                        await q.slots.acquire()
                        self._busy += 1
                        self._spawn(self._deliver(url, batch, q.slots))
                finally:
                    self._busy -= 1

    async def _deliver(self, url: str, batch: list[QueuedItem], slots: asyncio.Semaphore) -> None:
        attempt = 0
        try:
            while True:
                batch = [b for b in batch if not b.cancelled]
                if not batch:
                    return
                attempt += 1
                ok = await self._post(url, batch, attempt)
                if ok:
                    self._forget(batch)
                    return
                oldest = min(b.enqueued_sim_s for b in batch)
                if self.clock.now_s() - oldest >= self.faults.delivery_max_age_s:
                    self._forget(batch)
                    self.log.append(
                        {
                            "seq": len(self.log) + 1,
                            "url": url,
                            "kind": "dropped",
                            "attempt": attempt,
                            "status": None,
                            "delivered": False,
                            "sim_time": self.clock.now_s(),
                            "real_time": time.time(),
                            "items": [b.item for b in batch],
                            "subscription_ids": sorted({b.subscription_id for b in batch}),
                        }
                    )
                    if self.on_dropped:
                        self.on_dropped([b for b in batch if b.kind == "change"])
                    return
                backoff = min(
                    self.faults.delivery_retry_base_s * 2 ** (attempt - 1),
                    self.faults.delivery_retry_cap_s,
                )
                await asyncio.sleep(backoff * self.faults.rng.uniform(0.8, 1.0))
        finally:
            slots.release()
            self._busy -= 1

    async def _post(self, url: str, batch: list[QueuedItem], attempt: int) -> bool:
        assert self._session is not None
        body = {"value": [b.item for b in batch]}
        status: int | None = None
        error: str | None = None
        started = time.monotonic()
        try:
            async with self._session.post(
                URL(url, encoded=True),
                json=body,
                timeout=aiohttp.ClientTimeout(total=self.faults.delivery_timeout_s),
            ) as resp:
                status = resp.status
                await resp.read()
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        delivered = status is not None and 200 <= status < 300
        self.log.append(
            {
                "seq": len(self.log) + 1,
                "url": url,
                "kind": "lifecycle" if batch[0].kind == "lifecycle" else "change",
                "attempt": attempt,
                "status": status,
                "error": error,
                "delivered": delivered,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "sim_time": self.clock.now_s(),
                "real_time": time.time(),
                "items": body["value"],
                "subscription_ids": sorted({b.subscription_id for b in batch}),
            }
        )
        return delivered

    # ---- validation handshake --------------------------------------------------------------

    async def validate(self, url: str) -> tuple[bool, str]:
        """Graph's handshake: POST ?validationToken=..., expect 200 text/plain echoing it."""
        assert self._session is not None
        token = validation_token()
        sep = "&" if "?" in url else "?"
        target = URL(f"{url}{sep}validationToken={quote(token, safe='')}", encoded=True)
        started = time.monotonic()
        status: int | None = None
        reason = ""
        try:
            async with self._session.post(
                target,
                data=b"",
                headers={"Content-Type": "text/plain; charset=utf-8"},
                timeout=aiohttp.ClientTimeout(total=self.faults.validation_timeout_s),
            ) as resp:
                status = resp.status
                text = (await resp.read()).decode("utf-8", "replace")
                ctype = resp.headers.get("Content-Type", "")
                if status != 200:
                    reason = f"status {status}"
                elif not ctype.lower().startswith("text/plain"):
                    reason = f"content type {ctype!r}"
                elif text != token:
                    reason = "body does not equal the validation token"
        except TimeoutError:
            reason = "timeout"
        except aiohttp.ClientError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self.log.append(
            {
                "seq": len(self.log) + 1,
                "url": url,
                "kind": "validation",
                "attempt": 1,
                "status": status,
                "error": reason or None,
                "delivered": not reason,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "sim_time": self.clock.now_s(),
                "real_time": time.time(),
                "items": [],
                "subscription_ids": [],
                "token": token,
            }
        )
        return not reason, reason

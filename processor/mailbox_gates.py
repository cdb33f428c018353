"""The Graph client's gate per mailbox: how many requests may be in flight to it, and the
time before which none may be sent.

Graph throttles a mailbox, not a request: a ``Retry-After`` on any answer for a mailbox
closes that mailbox's gate until it has elapsed, so every later request of the process to
the mailbox (inbound fetches, outbound writes, their retries) waits too, or, when the wait
is longer than an inline retry may take, fails at once with :class:`ThrottledError`
carrying the time left, without reaching Graph.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime

from handlers.errors import ThrottledError


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (maybe fractional) or a date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class _Gate:
    """A mailbox's semaphore, until when Graph told it to wait, and how many callers hold or
    wait for it (to drop idle gates)."""

    __slots__ = ("not_before", "semaphore", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0
        #: Monotonic time before which no request may be sent to the mailbox.
        self.not_before = 0.0


class MailboxGates:
    """One gate per mailbox (or account) key; idle open gates are dropped."""

    def __init__(
        self,
        *,
        limit: int,
        inline_max_s: float,
        stats: Counter[str],
        sleep: Callable[[float], Awaitable[None]],
        monotonic: Callable[[], float],
    ) -> None:
        self._limit = limit
        self._inline_max_s = inline_max_s
        self._stats = stats
        self._sleep = sleep
        self._monotonic = monotonic
        self._gates: dict[str, _Gate] = {}

    def __len__(self) -> int:
        return len(self._gates)

    @asynccontextmanager
    async def passage(self, gate: str, *, method: str, template: str) -> AsyncIterator[None]:
        """Hold one of the mailbox's slots, once its Retry-After has elapsed."""
        entry = self._entry(gate)
        entry.users += 1
        try:
            async with entry.semaphore:
                # Checked with the slot held: a Retry-After that arrived while this caller
                # queued for the slot still applies, and no request overtakes the wait.
                await self._wait(entry, method=method, template=template)
                yield
        finally:
            entry.users -= 1
            if (
                entry.users == 0
                and entry.not_before <= self._monotonic()
                and self._gates.get(gate) is entry
            ):
                del self._gates[gate]

    def close(self, gate: str, wait_s: float) -> None:
        """Graph asked the mailbox to wait ``wait_s``: no request of this client goes before."""
        entry = self._entry(gate)
        entry.not_before = max(entry.not_before, self._monotonic() + wait_s)

    def _entry(self, gate: str) -> _Gate:
        entry = self._gates.get(gate)
        if entry is None:
            entry = self._gates[gate] = _Gate(self._limit)
        return entry

    async def _wait(self, entry: _Gate, *, method: str, template: str) -> None:
        """Wait until the mailbox's Retry-After has elapsed, or raise :class:`ThrottledError`
        with the time left when that is longer than an inline retry may wait."""
        counted = False
        while (left_s := entry.not_before - self._monotonic()) > 0:
            if left_s > self._inline_max_s:
                self._stats["gate_refusals"] += 1
                raise ThrottledError(
                    f"Graph {method} {template}: mailbox throttled", retry_after_s=left_s
                )
            if not counted:
                counted = True
                self._stats["gate_waits"] += 1
            await self._sleep(left_s)

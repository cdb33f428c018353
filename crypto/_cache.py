"""A bounded LRU cache of unwrapped data ciphers with an absolute time-to-live.

Crypto-shredding needs unwrapped keys to be forgotten: the TTL counts from `put`, not from the
last `get`, so a busy account's key is re-read from storage at least every `ttl_s`, and a key
erased by another process stops working here within that time. `evict` forgets it at once.
Not thread-safe: it is meant for the event loop's thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from crypto._aead import DataCipher

__all__ = ["CipherCache"]


class CipherCache:
    """Unwrapped `DataCipher`s keyed by account id, at most `max_entries`, each for `ttl_s`."""

    __slots__ = ("_clock", "_entries", "_max_entries", "_ttl_s")

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, DataCipher]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"CipherCache(entries={len(self._entries)}, max_entries={self._max_entries})"

    def get(self, account_id: str) -> DataCipher | None:
        """The cached cipher of `account_id`, or None if absent or expired."""
        entry = self._entries.get(account_id)
        if entry is None:
            return None
        expires_at, cipher = entry
        if self._clock() >= expires_at:
            del self._entries[account_id]
            return None
        self._entries.move_to_end(account_id)
        return cipher

    def put(self, account_id: str, cipher: DataCipher) -> None:
        """Cache `cipher` for `ttl_s`, dropping the least recently used entry when full."""
        self._entries[account_id] = (self._clock() + self._ttl_s, cipher)
        self._entries.move_to_end(account_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def evict(self, account_id: str) -> None:
        """Forget `account_id`'s cipher (on erasure or key replacement); absent is fine."""
        self._entries.pop(account_id, None)

    def clear(self) -> None:
        """Forget every cipher."""
        self._entries.clear()

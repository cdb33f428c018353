"""Keyed hashes (HMAC-SHA256) for looking up Microsoft-assigned identifiers."""

from __future__ import annotations

import base64
import hmac
import os
from typing import NoReturn

from crypto._errors import KeyConfigError
from crypto._keyring import decode_b64_key

__all__ = [
    "MIN_HASH_KEY_LEN",
    "Hasher",
    "constant_time_equal",
    "generate_hash_key_spec",
    "parse_hash_key",
]

MIN_HASH_KEY_LEN = 32
_ENV = "M365SYNC_HASH_KEY"


def parse_hash_key(value: str) -> bytes:
    """Decode `M365SYNC_HASH_KEY` (base64, at least 32 bytes)."""
    text = value.strip()
    if not text:
        raise KeyConfigError(f"{_ENV} is empty")
    try:
        key = decode_b64_key(text)
    except KeyConfigError as exc:
        raise KeyConfigError(f"{_ENV} {exc}") from None
    if len(key) < MIN_HASH_KEY_LEN:
        raise KeyConfigError(
            f"{_ENV} decodes to {len(key)} bytes, expected at least {MIN_HASH_KEY_LEN}"
        )
    return key


def generate_hash_key_spec() -> str:
    """A fresh base64 value for `M365SYNC_HASH_KEY` (demo and dev set-up)."""
    return base64.b64encode(os.urandom(MIN_HASH_KEY_LEN)).decode()


def _encode(items: tuple[str, ...]) -> bytes:
    # Each item is length-prefixed so that no two different tuples encode alike:
    # ("a|b", "c") and ("a", "b|c") differ, and so do the namespace and the parts.
    out = bytearray()
    for item in items:
        raw = item.encode()
        out += len(raw).to_bytes(4, "big")
        out += raw
    return bytes(out)


class Hasher:
    """HMAC-SHA256 under the hash key, domain-separated by a namespace."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_HASH_KEY_LEN:
            raise KeyConfigError(f"hash key must be at least {MIN_HASH_KEY_LEN} bytes")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "Hasher(key=<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("Hasher cannot be pickled")

    def hash_id(self, namespace: str, *parts: str) -> str:
        """The 43-character URL-safe base64 (no padding) HMAC of `namespace` and `parts`."""
        if not namespace:
            raise ValueError("namespace must not be empty")
        digest = hmac.digest(self._key, _encode((namespace, *parts)), "sha256")
        return base64.urlsafe_b64encode(digest)[:-1].decode()


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets (e.g. client states) in time independent of where they differ."""
    a_raw = a.encode() if isinstance(a, str) else a
    b_raw = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_raw, b_raw)

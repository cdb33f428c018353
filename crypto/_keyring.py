"""Master keys, per-account data keys wrapped by them (envelope encryption), and rotation.

Each account's 256-bit data key is stored only wrapped (AES-256-GCM under a master key, AAD
``b"datakey|" + account_id``). Deleting the wrapped key shreds the account's data. Rotating the
master key rewraps data keys; the data ciphertext is never touched.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto._aead import KEY_LEN, DataCipher, open_blob, seal
from crypto._errors import DecryptionError, KeyConfigError

__all__ = [
    "KeyRing",
    "MasterKey",
    "WrappedKey",
    "decode_b64_key",
    "generate_master_key_spec",
    "parse_master_keys",
]

_KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ENV = "M365SYNC_MASTER_KEYS"


def decode_b64_key(text: str) -> bytes:
    """Decode standard or URL-safe base64 strictly; raise `KeyConfigError` without echoing it."""
    try:
        return base64.b64decode(text.translate(_URLSAFE_TO_STD), validate=True)
    except (binascii.Error, ValueError):
        raise KeyConfigError("is not valid base64") from None


_URLSAFE_TO_STD = str.maketrans("-_", "+/")


def _check_key_id(key_id: str, where: str) -> None:
    if not _KEY_ID_RE.fullmatch(key_id):
        # The id is not echoed: a malformed entry may be key material in the wrong place.
        raise KeyConfigError(f"{where}: key id must match [A-Za-z0-9_-]{{1,32}}")


@dataclass(frozen=True)
class MasterKey:
    """A key-encryption key and its id (the id is stored beside every key it wraps)."""

    key_id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_key_id(self.key_id, "master key")
        if len(self.key) != KEY_LEN:
            raise KeyConfigError(
                f"master key {self.key_id!r}: must be {KEY_LEN} bytes, got {len(self.key)}"
            )


def parse_master_keys(value: str) -> tuple[MasterKey, ...]:
    """Parse ``id:base64key,id2:base64key2``; the first key is the active one."""
    entries = value.split(",")
    if not value.strip():
        raise KeyConfigError(f"{_ENV} is empty")
    keys: list[MasterKey] = []
    seen: set[str] = set()
    for n, raw in enumerate(entries, start=1):
        entry = raw.strip()
        where = f"{_ENV} entry {n}"
        if not entry:
            raise KeyConfigError(f"{where} is empty")
        key_id, sep, b64 = entry.partition(":")
        if not sep:
            raise KeyConfigError(f"{where}: expected id:base64key")
        key_id = key_id.strip()
        _check_key_id(key_id, where)
        where = f"{where} (id {key_id!r})"
        if key_id in seen:
            raise KeyConfigError(f"{where}: duplicate key id")
        seen.add(key_id)
        try:
            key = decode_b64_key(b64.strip())
        except KeyConfigError as exc:
            raise KeyConfigError(f"{where}: key {exc}") from None
        if len(key) != KEY_LEN:
            raise KeyConfigError(f"{where}: key decodes to {len(key)} bytes, expected {KEY_LEN}")
        keys.append(MasterKey(key_id, key))
    return tuple(keys)


def generate_master_key_spec(key_id: str) -> str:
    """A fresh ``id:base64key`` entry for `M365SYNC_MASTER_KEYS` (demo and dev set-up)."""
    _check_key_id(key_id, "generate_master_key_spec")
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_LEN)).decode()}"


@dataclass(frozen=True)
class WrappedKey:
    """An account's data key encrypted under the master key `master_key_id`."""

    master_key_id: str
    blob: bytes = field(repr=False)

    def to_doc(self) -> dict[str, Any]:
        """The MongoDB sub-document (`blob` is stored as BSON Binary)."""
        return {"kid": self.master_key_id, "blob": self.blob}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> WrappedKey:
        """Read a sub-document written by `to_doc`; a malformed one is a `DecryptionError`."""
        kid = doc.get("kid")
        blob = doc.get("blob")
        if not isinstance(kid, str) or not isinstance(blob, bytes | bytearray | memoryview):
            raise DecryptionError("malformed wrapped key document")
        return cls(kid, bytes(blob))


def _wrap_aad(account_id: str) -> bytes:
    if not account_id:
        raise ValueError("account_id must not be empty")
    return b"datakey|" + account_id.encode()


class KeyRing:
    """The master keys: the first wraps new data keys, every one can unwrap."""

    __slots__ = ("_active_id", "_aeads")

    def __init__(self, master_keys: Sequence[MasterKey]) -> None:
        if not master_keys:
            raise KeyConfigError("key ring needs at least one master key")
        self._aeads: dict[str, AESGCM] = {}
        for mk in master_keys:
            if mk.key_id in self._aeads:
                raise KeyConfigError(f"duplicate master key id {mk.key_id!r}")
            self._aeads[mk.key_id] = AESGCM(mk.key)
        self._active_id = master_keys[0].key_id

    def __repr__(self) -> str:
        return f"KeyRing(active={self._active_id!r}, key_ids={list(self._aeads)!r})"

    @property
    def active_key_id(self) -> str:
        """Id of the master key that wraps new and rewrapped data keys."""
        return self._active_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every master key, active first."""
        return tuple(self._aeads)

    def new_data_key(self, account_id: str) -> tuple[WrappedKey, DataCipher]:
        """A fresh data key for `account_id`: the wrapped form to store, and its cipher."""
        key = AESGCM.generate_key(bit_length=KEY_LEN * 8)
        return self._wrap(account_id, key), DataCipher(key)

    def unwrap(self, account_id: str, wrapped: WrappedKey) -> DataCipher:
        """The cipher of `account_id`'s stored data key."""
        return DataCipher(self._unwrap_raw(account_id, wrapped))

    def rewrap(self, account_id: str, wrapped: WrappedKey) -> WrappedKey:
        """`wrapped` under the active master key (the same object if already there)."""
        if not self.needs_rewrap(wrapped):
            return wrapped
        return self._wrap(account_id, self._unwrap_raw(account_id, wrapped))

    def needs_rewrap(self, wrapped: WrappedKey) -> bool:
        """Whether `wrapped` is under a master key other than the active one."""
        return wrapped.master_key_id != self._active_id

    def _wrap(self, account_id: str, key: bytes) -> WrappedKey:
        blob = seal(self._aeads[self._active_id], key, _wrap_aad(account_id))
        return WrappedKey(self._active_id, blob)

    def _unwrap_raw(self, account_id: str, wrapped: WrappedKey) -> bytes:
        aead = self._aeads.get(wrapped.master_key_id)
        if aead is None:
            raise DecryptionError(f"unknown master key id {wrapped.master_key_id!r}")
        key = open_blob(aead, wrapped.blob, _wrap_aad(account_id))
        if len(key) != KEY_LEN:
            raise DecryptionError("wrapped data key has the wrong length")
        return key

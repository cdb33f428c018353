"""AES-256-GCM with a self-describing, versioned ciphertext format.

Format v1: ``0x01 | nonce (12 bytes) | ciphertext | tag (16 bytes)``. The version byte is also
prepended to the caller's associated data, so a future format cannot be confused with this one.
Nonces are random: under one key, well below 2**32 values keep the collision risk negligible,
and every account has its own data key, so no single key comes near that.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto._errors import DecryptionError, KeyConfigError

__all__ = [
    "KEY_LEN",
    "NONCE_LEN",
    "TAG_LEN",
    "VERSION_1",
    "DataCipher",
    "KeyCheck",
    "open_blob",
    "opens",
    "seal",
]

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
VERSION_1 = 1
_V1_HEADER = bytes([VERSION_1])
_MIN_LEN = 1 + NONCE_LEN + TAG_LEN


def seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt under a fresh random nonce and return the v1 blob."""
    nonce = os.urandom(NONCE_LEN)
    return b"".join((_V1_HEADER, nonce, aead.encrypt(nonce, plaintext, _V1_HEADER + aad)))


def open_blob(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    """Authenticate and decrypt a v1 blob; any failure is a `DecryptionError`."""
    if len(blob) < _MIN_LEN:
        raise DecryptionError("ciphertext too short")
    if blob[0] != VERSION_1:
        raise DecryptionError(f"unknown ciphertext version {blob[0]}")
    view = memoryview(blob)
    try:
        return aead.decrypt(view[1 : 1 + NONCE_LEN], view[1 + NONCE_LEN :], _V1_HEADER + aad)
    except InvalidTag:
        raise DecryptionError(
            "ciphertext failed authentication: wrong key or AAD, or tampered"
        ) from None


def _dumps(obj: Any) -> bytes:
    # Compact and strict (no NaN/Infinity) so that any JSON reader can consume the plaintext.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class DataCipher:
    """One account's data key: encrypts and decrypts values bound to their record by AAD."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise KeyConfigError(f"data key must be {KEY_LEN} bytes, got {len(key)}")
        self._aead = AESGCM(bytes(key))

    @classmethod
    def generate(cls) -> DataCipher:
        """A cipher under a fresh random key (tests and throwaway data)."""
        return cls(AESGCM.generate_key(bit_length=KEY_LEN * 8))

    def __repr__(self) -> str:
        return "DataCipher(key=<redacted>)"

    def __reduce__(self) -> NoReturn:
        # Keys must not leave the process by accident (pickling into a queue, a cache, a log).
        raise TypeError("DataCipher cannot be pickled")

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt bytes bound to `aad` (e.g. b"events|acc-42|<event_key>|doc")."""
        return seal(self._aead, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt bytes encrypted with the same key and `aad`."""
        return open_blob(self._aead, blob, aad)

    def encrypt_json(self, obj: Any, aad: bytes) -> bytes:
        """Encrypt `obj` as compact UTF-8 JSON."""
        return seal(self._aead, _dumps(obj), aad)

    def decrypt_json(self, blob: bytes, aad: bytes) -> Any:
        """Decrypt a value written by `encrypt_json`."""
        plaintext = open_blob(self._aead, blob, aad)
        try:
            return json.loads(plaintext)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise DecryptionError("decrypted value is not JSON") from None

    def encrypt_str(self, s: str, aad: bytes) -> bytes:
        """Encrypt a string as UTF-8."""
        return seal(self._aead, s.encode(), aad)

    def decrypt_str(self, blob: bytes, aad: bytes) -> str:
        """Decrypt a value written by `encrypt_str`."""
        plaintext = open_blob(self._aead, blob, aad)
        try:
            return plaintext.decode()
        except UnicodeDecodeError:
            raise DecryptionError("decrypted value is not UTF-8") from None


@dataclass(frozen=True)
class KeyCheck:
    """A ciphertext written under an account's current data key, and its associated data."""

    blob: bytes
    aad: bytes


def opens(cipher: DataCipher, check: KeyCheck) -> bool:
    """Whether ``cipher`` is the key ``check`` was written under."""
    try:
        cipher.decrypt(check.blob, check.aad)
    except DecryptionError:
        return False
    return True

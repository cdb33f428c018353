"""The crypto package's exception taxonomy: callers never see `cryptography`'s own exceptions."""

from __future__ import annotations

__all__ = ["CryptoError", "DecryptionError", "KeyConfigError"]


class CryptoError(Exception):
    """Base of every error this package raises."""


class DecryptionError(CryptoError):
    """A ciphertext or wrapped key failed to open: wrong key, wrong AAD, tampered or malformed."""


class KeyConfigError(CryptoError, ValueError):
    """Configured key material is malformed; the message names the problem, never the key."""

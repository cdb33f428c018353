"""How stored documents are written (docs/contract.md §4): the schema version every
document carries and the associated data binding each ciphertext to its place."""

from __future__ import annotations

from typing import Final

SCHEMA_VERSION: Final = 1


def aad(*parts: str) -> bytes:
    """Associated data binding a ciphertext to its place: ``collection|account|record|field``."""
    return "|".join(parts).encode("utf-8")

"""Sealing whole JSON messages: every field authenticated under an account's data key."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from crypto._aead import DataCipher
from crypto._errors import DecryptionError

#: The field that carries the seal; every other field of the message is authenticated.
SEAL_FIELD = "seal"


def _associated_data(purpose: str, body: Mapping[str, Any]) -> bytes:
    fields = {name: value for name, value in body.items() if name != SEAL_FIELD}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"seal|{purpose}|".encode() + canonical.encode("ascii")


def seal_message(cipher: DataCipher, body: Mapping[str, Any], *, purpose: str) -> dict[str, Any]:
    """``body`` with a ``seal``: AES-GCM over nothing, the whole body as associated data.

    ``purpose`` (``inbound``, ``outbound``) keeps a message of one queue from passing as
    another's. Values must survive a JSON round trip unchanged (no floats).
    """
    tag = cipher.encrypt(b"", _associated_data(purpose, body))
    return {**body, SEAL_FIELD: base64.b64encode(tag).decode("ascii")}


def seal_valid(cipher: DataCipher, body: Mapping[str, Any], *, purpose: str) -> bool:
    """Whether ``body`` carries a seal made by :func:`seal_message` under this key, for
    this purpose, over exactly these fields and values."""
    seal = body.get(SEAL_FIELD)
    if not isinstance(seal, str):
        return False
    try:
        blob = base64.b64decode(seal.encode("ascii"), validate=True)
        cipher.decrypt(blob, _associated_data(purpose, body))
    except (DecryptionError, binascii.Error, UnicodeEncodeError, ValueError, TypeError):
        return False
    return True

"""Event ids: a REST form and an immutable form, both decodable to (event key, occurrence start)."""

from __future__ import annotations

import base64
import binascii
import hashlib

REST_PREFIX = "AAMkAG"
IMMUTABLE_PREFIX = "AAkALg"


def make_id(key: bytes, orig: int | None = None, *, immutable: bool = False) -> str:
    """The id of an event (orig None) or of its occurrence originally starting at `orig`."""
    payload = (b"I" if immutable else b"R") + key
    if orig is not None:
        payload += orig.to_bytes(8, "big", signed=True)
    prefix = IMMUTABLE_PREFIX if immutable else REST_PREFIX
    return prefix + base64.urlsafe_b64encode(payload).decode("ascii")


def parse_id(event_id: str) -> tuple[bytes, int | None] | None:
    """(key, orig) from either id form, or None if it is not an id this simulator made."""
    if event_id.startswith(REST_PREFIX):
        marker = b"R"
    elif event_id.startswith(IMMUTABLE_PREFIX):
        marker = b"I"
    else:
        return None
    try:
        raw = base64.urlsafe_b64decode(event_id[len(REST_PREFIX) :].encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    if not raw.startswith(marker) or len(raw) not in (17, 25):
        return None
    key = raw[1:17]
    orig = int.from_bytes(raw[17:], "big", signed=True) if len(raw) == 25 else None
    return key, orig


def ical_uid(key: bytes, orig: int | None = None) -> str:
    """An Exchange-looking iCalUId, different per occurrence."""
    digest = hashlib.sha256(key + (b"" if orig is None else orig.to_bytes(8, "big", signed=True)))
    return "040000008200E00074C5B7101A82E00800000000" + digest.hexdigest()[:56].upper()


def change_key(seed: bytes) -> str:
    """A changeKey-looking string."""
    return "DwAAABYAAAA" + base64.b64encode(hashlib.sha256(seed).digest()[:15]).decode("ascii")

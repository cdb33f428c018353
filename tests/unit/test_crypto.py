"""Unit tests of the crypto package: envelope encryption, rotation, keyed hashes, cipher cache."""

from __future__ import annotations

import base64
import os
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto import (
    CipherCache,
    CryptoError,
    DataCipher,
    DecryptionError,
    Hasher,
    KeyConfigError,
    KeyRing,
    MasterKey,
    WrappedKey,
    constant_time_equal,
    generate_hash_key_spec,
    generate_master_key_spec,
    parse_hash_key,
    parse_master_keys,
)

AAD = b"events|acc-42|evk-1|doc"


def _mk(key_id: str) -> MasterKey:
    return MasterKey(key_id, os.urandom(32))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing([_mk("k1")])


@pytest.fixture
def cipher(ring: KeyRing) -> DataCipher:
    return ring.new_data_key("acc-42")[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- round trips -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(plaintext=st.binary(max_size=4096), aad=st.binary(max_size=64))
def test_bytes_round_trip_property(plaintext: bytes, aad: bytes) -> None:
    """Any bytes encrypted under any AAD decrypt back to themselves with that AAD."""
    c = DataCipher(b"\x01" * 32)
    assert c.decrypt(c.encrypt(plaintext, aad), aad) == plaintext


@given(s=st.text(max_size=512))
def test_str_round_trip_property(s: str) -> None:
    """Any string, including non-ASCII, survives encrypt_str and decrypt_str."""
    c = DataCipher(b"\x02" * 32)
    assert c.decrypt_str(c.encrypt_str(s, AAD), AAD) == s


@given(obj=json_values)
def test_json_round_trip_property(obj: Any) -> None:
    """Any JSON value survives encrypt_json and decrypt_json."""
    c = DataCipher(b"\x03" * 32)
    assert c.decrypt_json(c.encrypt_json(obj, AAD), AAD) == obj


def test_json_is_compact(cipher: DataCipher) -> None:
    """encrypt_json adds exactly 29 bytes of overhead to compact UTF-8 JSON."""
    obj = {"subject": "Réunion", "attendees": [1, 2]}
    compact = b'{"subject":"R\xc3\xa9union","attendees":[1,2]}'
    assert len(cipher.encrypt_json(obj, AAD)) == len(compact) + 1 + 12 + 16


def test_format_is_versioned(cipher: DataCipher) -> None:
    """A ciphertext starts with version byte 1 followed by a 12-byte nonce and a 16-byte tag."""
    blob = cipher.encrypt(b"", AAD)
    assert blob[0] == 1
    assert len(blob) == 29


def test_unwrapped_cipher_reads_what_the_new_one_wrote(ring: KeyRing) -> None:
    """A data key unwrapped from storage decrypts what the freshly created cipher encrypted."""
    wrapped, fresh = ring.new_data_key("acc-42")
    blob = fresh.encrypt_str("hello", AAD)
    stored = WrappedKey.from_doc(wrapped.to_doc())
    assert ring.unwrap("acc-42", stored).decrypt_str(blob, AAD) == "hello"


def test_accepts_bytes_subclasses_like_bson_binary(cipher: DataCipher) -> None:
    """Ciphertext handed back as a bytes subclass (as BSON Binary is) still decrypts."""

    class Binary(bytes):
        pass

    blob = Binary(cipher.encrypt(b"x", AAD))
    assert cipher.decrypt(blob, AAD) == b"x"


# --- rejection -------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 12, 13, -1])
def test_tampered_ciphertext_is_rejected(cipher: DataCipher, index: int) -> None:
    """Flipping one bit anywhere in the blob (version, nonce, body, tag) raises DecryptionError."""
    blob = bytearray(cipher.encrypt(b"secret payload", AAD))
    blob[index] ^= 0x01
    with pytest.raises(DecryptionError):
        cipher.decrypt(bytes(blob), AAD)


def test_truncated_ciphertext_is_rejected(cipher: DataCipher) -> None:
    """A blob shorter than header plus tag, or cut short, raises DecryptionError."""
    blob = cipher.encrypt(b"secret payload", AAD)
    for cut in (b"", blob[:10], blob[:28], blob[:-1]):
        with pytest.raises(DecryptionError):
            cipher.decrypt(cut, AAD)


def test_wrong_aad_is_rejected(cipher: DataCipher) -> None:
    """Ciphertext moved to another record (different AAD) raises DecryptionError."""
    blob = cipher.encrypt_json({"a": 1}, AAD)
    with pytest.raises(DecryptionError):
        cipher.decrypt_json(blob, b"events|acc-42|evk-2|doc")


def test_other_accounts_key_is_rejected(ring: KeyRing) -> None:
    """Data encrypted under one account's key cannot be read with another account's key."""
    _, a = ring.new_data_key("acc-a")
    _, b = ring.new_data_key("acc-b")
    with pytest.raises(DecryptionError):
        b.decrypt(a.encrypt(b"x", AAD), AAD)


def test_wrapped_key_is_bound_to_its_account(ring: KeyRing) -> None:
    """Unwrapping an account's wrapped key under another account id raises DecryptionError."""
    wrapped, _ = ring.new_data_key("acc-a")
    with pytest.raises(DecryptionError):
        ring.unwrap("acc-b", wrapped)


def test_decryption_error_hides_library_exceptions(cipher: DataCipher) -> None:
    """DecryptionError is a CryptoError raised without a chained cryptography exception."""
    blob = bytearray(cipher.encrypt(b"x", AAD))
    blob[-1] ^= 0x80
    with pytest.raises(CryptoError) as info:
        cipher.decrypt(bytes(blob), AAD)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_non_json_plaintext_is_a_decryption_error(cipher: DataCipher) -> None:
    """decrypt_json of an authentic value that is not JSON raises DecryptionError."""
    with pytest.raises(DecryptionError):
        cipher.decrypt_json(cipher.encrypt(b"\xff not json", AAD), AAD)


def test_non_utf8_plaintext_is_a_decryption_error(cipher: DataCipher) -> None:
    """decrypt_str of an authentic value that is not UTF-8 raises DecryptionError."""
    with pytest.raises(DecryptionError):
        cipher.decrypt_str(cipher.encrypt(b"\xff\xfe", AAD), AAD)


def test_nonces_differ_for_same_plaintext(cipher: DataCipher) -> None:
    """Encrypting the same value twice gives different nonces and ciphertexts."""
    blobs = [cipher.encrypt(b"same", AAD) for _ in range(100)]
    assert len({b[1:13] for b in blobs}) == 100
    assert len(set(blobs)) == 100


# --- master keys and rotation ----------------------------------------------------------------


def test_rotation_rewraps_and_lets_old_master_go() -> None:
    """A key wrapped under the old master unwraps after rotation, rewraps to the new kid,
    and then reads with the old master removed, with the data ciphertext untouched."""
    old, new = _mk("old"), _mk("new")
    wrapped, cipher = KeyRing([old]).new_data_key("acc-42")
    blob = cipher.encrypt_str("event body", AAD)

    rotating = KeyRing([new, old])
    assert rotating.active_key_id == "new"
    assert rotating.needs_rewrap(wrapped)
    assert rotating.unwrap("acc-42", wrapped).decrypt_str(blob, AAD) == "event body"

    rewrapped = rotating.rewrap("acc-42", wrapped)
    assert rewrapped.master_key_id == "new"
    assert not rotating.needs_rewrap(rewrapped)
    assert rotating.rewrap("acc-42", rewrapped) is rewrapped

    only_new = KeyRing([new])
    assert only_new.unwrap("acc-42", rewrapped).decrypt_str(blob, AAD) == "event body"
    with pytest.raises(DecryptionError):
        only_new.unwrap("acc-42", wrapped)


def test_new_data_keys_use_active_master(ring: KeyRing) -> None:
    """New data keys are wrapped under the first (active) master key."""
    two = KeyRing([_mk("a"), _mk("b")])
    assert two.new_data_key("acc")[0].master_key_id == "a"
    assert two.key_ids == ("a", "b")


def test_unknown_kid_is_rejected(ring: KeyRing) -> None:
    """A wrapped key naming a master key the ring does not hold raises DecryptionError."""
    wrapped, _ = ring.new_data_key("acc-42")
    with pytest.raises(DecryptionError, match="unknown master key id"):
        ring.unwrap("acc-42", WrappedKey("gone", wrapped.blob))


def test_same_kid_different_key_is_rejected(ring: KeyRing) -> None:
    """A wrapped key under a master key with the same id but other bytes raises DecryptionError."""
    wrapped, _ = ring.new_data_key("acc-42")
    with pytest.raises(DecryptionError):
        KeyRing([_mk("k1")]).unwrap("acc-42", wrapped)


def test_wrapped_key_doc_round_trip(ring: KeyRing) -> None:
    """to_doc gives {"kid", "blob": bytes} and from_doc reads it back; bad docs are rejected."""
    wrapped, _ = ring.new_data_key("acc-42")
    doc = wrapped.to_doc()
    assert doc == {"kid": "k1", "blob": wrapped.blob}
    assert isinstance(doc["blob"], bytes)
    assert WrappedKey.from_doc(doc) == wrapped
    for bad in ({}, {"kid": "k1"}, {"kid": 1, "blob": b"x"}, {"kid": "k1", "blob": "str"}):
        with pytest.raises(DecryptionError):
            WrappedKey.from_doc(bad)


def test_key_ring_rejects_empty_and_duplicates() -> None:
    """A ring needs at least one master key and unique ids."""
    with pytest.raises(KeyConfigError):
        KeyRing([])
    with pytest.raises(KeyConfigError, match="duplicate"):
        KeyRing([_mk("a"), _mk("a")])


def test_parse_master_keys_accepts_valid_spec() -> None:
    """parse_master_keys keeps order, tolerates spaces, and accepts URL-safe base64."""
    k1, k2 = os.urandom(32), os.urandom(32)
    urlsafe = base64.urlsafe_b64encode(k2).decode()
    keys = parse_master_keys(f" k-1:{_b64(k1)} , K_2:{urlsafe}")
    assert keys == (MasterKey("k-1", k1), MasterKey("K_2", k2))


def test_generated_master_key_spec_parses() -> None:
    """generate_master_key_spec yields an entry that parse_master_keys accepts."""
    (key,) = parse_master_keys(generate_master_key_spec("dev"))
    assert key.key_id == "dev"
    assert len(key.key) == 32


SECRET_32 = b"S" * 32
SECRET_16 = b"T" * 16


@pytest.mark.parametrize(
    ("value", "secret", "expected"),
    [
        ("", "", "empty"),
        ("   ", "", "empty"),
        (f"k1:{_b64(SECRET_32)},", _b64(SECRET_32), "entry 2 is empty"),
        ("k1:not*base64!!", "not*base64!!", "not valid base64"),
        (f"k1:{_b64(SECRET_32)[:-2]}", _b64(SECRET_32)[:-2], "not valid base64"),
        (f"k1:{_b64(SECRET_16)}", _b64(SECRET_16), "16 bytes"),
        (f"k1:{_b64(SECRET_32)},k1:{_b64(SECRET_32)}", _b64(SECRET_32), "duplicate"),
        (_b64(SECRET_32), _b64(SECRET_32), "expected id:base64key"),
        (f"{_b64(SECRET_32)}:k1", _b64(SECRET_32), "key id must match"),
        (f"bad id:{_b64(SECRET_32)}", _b64(SECRET_32), "key id must match"),
        (f"{'x' * 33}:{_b64(SECRET_32)}", _b64(SECRET_32), "key id must match"),
    ],
)
def test_parse_master_keys_errors_hide_key_material(value: str, secret: str, expected: str) -> None:
    """Malformed M365SYNC_MASTER_KEYS raises KeyConfigError naming the problem, not the key."""
    with pytest.raises(KeyConfigError, match=expected) as info:
        parse_master_keys(value)
    message = str(info.value)
    assert "M365SYNC_MASTER_KEYS" in message
    if secret:
        assert secret not in message
        assert secret[:8] not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("value", "secret", "expected"),
    [
        ("", "", "empty"),
        ("not*base64!!", "not*base64!!", "not valid base64"),
        (_b64(SECRET_16), _b64(SECRET_16), "16 bytes"),
    ],
)
def test_parse_hash_key_errors_hide_key_material(value: str, secret: str, expected: str) -> None:
    """Malformed M365SYNC_HASH_KEY raises KeyConfigError naming the problem, not the key."""
    with pytest.raises(KeyConfigError, match=expected) as info:
        parse_hash_key(value)
    assert "M365SYNC_HASH_KEY" in str(info.value)
    if secret:
        assert secret[:8] not in str(info.value)


def test_parse_hash_key_accepts_long_keys() -> None:
    """A hash key of 32 or more bytes is accepted as is, and the generated one parses."""
    assert parse_hash_key(_b64(b"h" * 48)) == b"h" * 48
    assert len(parse_hash_key(generate_hash_key_spec())) >= 32


def test_master_key_validates_itself() -> None:
    """MasterKey rejects a short key or a malformed id."""
    with pytest.raises(KeyConfigError):
        MasterKey("ok", b"x" * 31)
    with pytest.raises(KeyConfigError):
        MasterKey("bad:id", b"x" * 32)


def test_reprs_hide_key_bytes() -> None:
    """repr of MasterKey, DataCipher, Hasher and KeyRing shows no key material."""
    key = b"K" * 32
    mk = MasterKey("k1", key)
    reprs = [repr(mk), repr(DataCipher(key)), repr(Hasher(key)), repr(KeyRing([mk]))]
    for text in reprs:
        assert "KKKK" not in text
        assert repr(key) not in text
        assert _b64(key)[:8] not in text
    assert "k1" in repr(mk)


def test_ciphers_refuse_pickling() -> None:
    """DataCipher and Hasher cannot be pickled, so keys do not leave the process by accident."""
    for obj in (DataCipher.generate(), Hasher(b"h" * 32)):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


# --- keyed hashes ----------------------------------------------------------------------------


@pytest.fixture
def hasher() -> Hasher:
    return Hasher(b"h" * 32)


def test_hash_is_deterministic_and_43_urlsafe_chars(hasher: Hasher) -> None:
    """The same input hashes alike, as 43 URL-safe base64 characters without padding."""
    h = hasher.hash_id("event", "acc-42", "AAMkAGI2TG93AAA=")
    assert h == Hasher(b"h" * 32).hash_id("event", "acc-42", "AAMkAGI2TG93AAA=")
    assert len(h) == 43
    assert set(h) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_hash_depends_on_key(hasher: Hasher) -> None:
    """Another hash key gives another hash."""
    assert hasher.hash_id("event", "a") != Hasher(b"i" * 32).hash_id("event", "a")


def test_hash_namespaces_are_separated(hasher: Hasher) -> None:
    """The same parts under different namespaces hash differently."""
    assert hasher.hash_id("event", "acc", "id") != hasher.hash_id("subscription", "acc", "id")


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("ns", "a|b", "c"), ("ns", "a", "b|c")),
        (("ns", "ab", "c"), ("ns", "a", "bc")),
        (("ns", "a", ""), ("ns", "a")),
        (("nsa",), ("ns", "a")),
        (("ns", "\x00\x00\x00\x01a"), ("ns", "", "a")),
    ],
)
def test_hash_encoding_is_unambiguous(
    hasher: Hasher, left: tuple[str, ...], right: tuple[str, ...]
) -> None:
    """Part boundaries are length-prefixed, so different splits of the same text differ."""
    assert hasher.hash_id(*left) != hasher.hash_id(*right)


def test_hasher_rejects_short_key_and_empty_namespace(hasher: Hasher) -> None:
    """A hash key under 32 bytes, or an empty namespace, is refused."""
    with pytest.raises(KeyConfigError):
        Hasher(b"x" * 31)
    with pytest.raises(ValueError):
        hasher.hash_id("", "a")


def test_constant_time_equal() -> None:
    """constant_time_equal compares str and bytes, in any mix, including non-ASCII."""
    assert constant_time_equal("abc", "abc")
    assert constant_time_equal("abc", b"abc")
    assert constant_time_equal("é", "é")
    assert not constant_time_equal("abc", "abd")
    assert not constant_time_equal(b"abc", b"abcd")
    assert not constant_time_equal("", "a")


# --- cipher cache ----------------------------------------------------------------------------


def test_cache_returns_put_cipher_until_ttl() -> None:
    """A cached cipher is returned until ttl_s after put, then forgotten."""
    clock = FakeClock()
    cache = CipherCache(ttl_s=10.0, clock=clock)
    c = DataCipher.generate()
    cache.put("acc", c)
    clock.now += 9.9
    assert cache.get("acc") is c
    clock.now += 0.1
    assert cache.get("acc") is None
    assert len(cache) == 0


def test_cache_ttl_is_not_extended_by_reads() -> None:
    """Reading a cached cipher does not extend its lifetime, so erasure elsewhere takes effect."""
    clock = FakeClock()
    cache = CipherCache(ttl_s=10.0, clock=clock)
    cache.put("acc", DataCipher.generate())
    for _ in range(5):
        clock.now += 2.5
        cache.get("acc")
    assert cache.get("acc") is None


def test_cache_put_refreshes_ttl() -> None:
    """Putting an account again restarts its TTL with the new cipher."""
    clock = FakeClock()
    cache = CipherCache(ttl_s=10.0, clock=clock)
    cache.put("acc", DataCipher.generate())
    clock.now += 8
    newer = DataCipher.generate()
    cache.put("acc", newer)
    clock.now += 8
    assert cache.get("acc") is newer


def test_cache_lru_bound() -> None:
    """Past max_entries the least recently used account is dropped; a get counts as a use."""
    cache = CipherCache(max_entries=2, clock=FakeClock())
    a, b, c = DataCipher.generate(), DataCipher.generate(), DataCipher.generate()
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a
    cache.put("c", c)
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.get("a") is a
    assert cache.get("c") is c


def test_cache_evict_and_clear() -> None:
    """evict forgets one account (absent is fine) and clear forgets all."""
    cache = CipherCache(clock=FakeClock())
    cache.put("a", DataCipher.generate())
    cache.put("b", DataCipher.generate())
    cache.evict("a")
    cache.evict("never-there")
    assert cache.get("a") is None
    assert cache.get("b") is not None
    cache.clear()
    assert len(cache) == 0


def test_cache_rejects_bad_bounds() -> None:
    """max_entries below 1 or a non-positive TTL is refused."""
    with pytest.raises(ValueError):
        CipherCache(max_entries=0)
    with pytest.raises(ValueError):
        CipherCache(ttl_s=0)

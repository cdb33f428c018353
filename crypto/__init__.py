"""Key ring, envelope encryption and keyed hashes: the only package that imports `cryptography`.

- `KeyRing` holds the master keys (`M365SYNC_MASTER_KEYS`, parsed by `parse_master_keys`) and
  wraps, unwraps and rewraps each account's data key (`WrappedKey`, stored per account).
- `DataCipher` is one account's data key: AES-256-GCM, fresh nonce per value, AAD binding the
  ciphertext to its record (e.g. ``b"events|acc-42|<event_key>|doc"``).
- `CipherCache` keeps unwrapped ciphers for a bounded time so that erasure takes effect;
  `KeyCheck` (a ciphertext under the current key) lets a cached cipher prove it is current.
- `Hasher` computes HMAC-SHA256 lookup keys for Microsoft IDs (`M365SYNC_HASH_KEY`).
"""

from crypto._aead import DataCipher, KeyCheck, opens
from crypto._cache import CipherCache
from crypto._errors import CryptoError, DecryptionError, KeyConfigError
from crypto._hashing import Hasher, constant_time_equal, generate_hash_key_spec, parse_hash_key
from crypto._keyring import (
    KeyRing,
    MasterKey,
    WrappedKey,
    generate_master_key_spec,
    parse_master_keys,
)
from crypto._seal import SEAL_FIELD, seal_message, seal_valid

__all__ = [
    "SEAL_FIELD",
    "CipherCache",
    "CryptoError",
    "DataCipher",
    "DecryptionError",
    "Hasher",
    "KeyCheck",
    "KeyConfigError",
    "KeyRing",
    "MasterKey",
    "WrappedKey",
    "constant_time_equal",
    "generate_hash_key_spec",
    "generate_master_key_spec",
    "opens",
    "parse_hash_key",
    "parse_master_keys",
    "seal_message",
    "seal_valid",
]

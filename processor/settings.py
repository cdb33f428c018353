"""Typed, frozen settings parsed once from the environment (docs/contract.md §1)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from crypto import KeyConfigError, MasterKey, parse_hash_key, parse_master_keys
from subscriptions.links import canonical_origin

T = TypeVar("T")

#: Settings every long-running role needs outside `demo` (docs/contract.md §1).
SERVICE_REQUIRED: frozenset[str] = frozenset(
    {
        "M365SYNC_CLIENT_ID",
        "M365SYNC_CLIENT_SECRET",
        "M365SYNC_PUBLIC_URL",
        "M365SYNC_MASTER_KEYS",
        "M365SYNC_HASH_KEY",
        "M365SYNC_CONNECT_SECRET",
        "M365SYNC_API_TOKEN",
        "M365SYNC_RETURN_URL_ORIGINS",
    }
)
#: Operator commands (`keys rotate`, `dlq …`) touch only the database, broker and keys.
OPERATOR_REQUIRED: frozenset[str] = frozenset({"M365SYNC_MASTER_KEYS", "M365SYNC_HASH_KEY"})


class SettingsError(ValueError):
    """A setting is missing or malformed; the message is one line naming the variable."""


@dataclass(frozen=True)
class ClientCertificate:
    """The app registration's certificate credential, read and checked at start."""

    #: Unencrypted PKCS#8 PEM, in memory only (the file may hold it encrypted).
    private_key_pem: str = field(repr=False)
    certificate_pem: str
    #: Hex SHA-256 of the certificate: what Entra ID shows and MSAL signs with (x5t#S256).
    thumbprint_sha256: str


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with; built once by :func:`load_settings`."""

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    mongodb_url: str = "mongodb://127.0.0.1:27017/m365sync"
    graph_url: str = "https://graph.microsoft.com/v1.0"
    authority_host: str = "https://login.microsoftonline.com"
    ca_bundle: str | None = None
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    client_certificate: ClientCertificate | None = None
    public_url: str = ""
    http_host: str = "0.0.0.0"  # noqa: S104  the contract's default: the receiver sits behind an ingress
    http_port: int = 8080
    #: The internal listener for ``/metrics`` (and health), never exposed through the ingress.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    #: Refuse connect/consent links without an ``aud`` naming their route.
    link_audience_required: bool = False
    master_keys: tuple[MasterKey, ...] = ()
    hash_key: bytes = field(default=b"", repr=False)
    connect_secrets: tuple[str, ...] = field(default=(), repr=False)
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    return_url_origins: tuple[str, ...] = ()

    # Internal tunables: not part of the contract, safe defaults for one machine.
    shard_count: int = 8
    prefetch: int = 32
    #: A batch with this many distinct events to fetch takes one delta pass instead.
    burst_min_events: int = 16
    delivery_limit: int = 5
    publish_timeout_s: float = 2.5
    receiver_group_window_ms: float = 1.0
    receiver_group_max_items: int = 100
    max_body_bytes: int = 1_048_576
    graph_timeout_s: float = 30.0
    graph_max_concurrency_per_mailbox: int = 4
    sync_window_past_days: int = 30
    sync_window_future_days: int = 365
    resync_interval_s: float = 3600.0
    dead_letter_ttl_days: int = 14
    tombstone_ttl_days: int = 30
    parked_ttl_days: int = 14
    parked_max_per_account: int = 10_000
    mass_delete_ratio: float = 0.5
    mass_delete_min_events: int = 10
    shutdown_grace_s: float = 25.0
    log_level: str = "info"
    log_format: str = "auto"

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker's node URLs, in the order they are tried (``amqp_url`` split at commas)."""
        return split_amqp_urls(self.amqp_url)

    @property
    def database_name(self) -> str:
        """The database named by the MongoDB URL's path."""
        return database_name_from_url(self.mongodb_url)


def database_name_from_url(url: str) -> str:
    """Return the database in a MongoDB URL's path, or raise :class:`SettingsError`."""
    path = urlsplit(url).path.lstrip("/")
    if not path:
        raise SettingsError("M365SYNC_MONGODB_URL: must name the database in its path")
    return path


def _https_or_loopback(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name}: must be an http(s) URL, got {value!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise SettingsError(f"{name}: must be https:// outside loopback, got {value!r}")
    return value.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise SettingsError(f"{name}: {value!r} is not an origin (scheme://host[:port])")
    if parts.query or parts.fragment or parts.username:
        raise SettingsError(f"{name}: {value!r} is not an origin (scheme://host[:port])")
    return canonical_origin(value)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


class _Reader:
    def __init__(self, env: Mapping[str, str], required: frozenset[str]) -> None:
        self._env = env
        self._required = required

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            if name in self._required:
                raise SettingsError(f"{name}: required but not set")
            return default
        return value.strip()

    def parse(self, name: str, convert: Callable[[str], T], default: T) -> T:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            return convert(raw)
        except SettingsError:
            raise
        except (ValueError, KeyConfigError) as exc:
            raise SettingsError(f"{name}: {exc}") from None


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"must be a TCP port, got {value!r}")
    return number


def _ratio(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError(f"must be a share between 0 and 1, got {value!r}")
    return number


def _non_empty_list(name: str) -> Callable[[str], tuple[str, ...]]:
    def convert(value: str) -> tuple[str, ...]:
        items = _csv(value)
        if not items:
            raise SettingsError(f"{name}: must list at least one value")
        return items

    return convert


def _secret_list(name: str, min_length: int) -> Callable[[str], tuple[str, ...]]:
    def convert(value: str) -> tuple[str, ...]:
        items = _non_empty_list(name)(value)
        if any(len(item) < min_length for item in items):
            raise SettingsError(f"{name}: every value must be at least {min_length} characters")
        return items

    return convert


def _mongodb_url(value: str) -> str:
    if not value.startswith(("mongodb://", "mongodb+srv://")):
        raise SettingsError("M365SYNC_MONGODB_URL: must start with mongodb:// or mongodb+srv://")
    database_name_from_url(value)
    return value


def _amqp_url(value: str) -> str:
    # Several comma-separated URLs name the nodes of one cluster: the connection tries them
    # in turn, at start and after every loss.
    urls = split_amqp_urls(value)
    if not urls:
        raise SettingsError("M365SYNC_AMQP_URL: must name at least one amqp:// URL")
    for url in urls:
        if not url.startswith(("amqp://", "amqps://")):
            raise SettingsError("M365SYNC_AMQP_URL: each URL must start with amqp:// or amqps://")
    return value


def split_amqp_urls(value: str) -> tuple[str, ...]:
    """The URLs of a ``M365SYNC_AMQP_URL`` value (one, or several separated by commas)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _ca_bundle(value: str) -> str:
    if not os.path.isfile(value):
        raise SettingsError(f"M365SYNC_CA_BUNDLE: no such file {value!r}")
    return value


def _boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _log_level(value: str) -> str:
    level = value.lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"must be debug, info, warning or error, got {value!r}")
    return level


def _log_format(value: str) -> str:
    log_format = value.lower()
    if log_format not in ("auto", "console", "json"):
        raise ValueError(f"must be auto, console or json, got {value!r}")
    return log_format


_PEM_KEY = re.compile(
    r"-----BEGIN ((?:ENCRYPTED |RSA |EC )?PRIVATE KEY)-----.+?-----END \1-----", re.S
)
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
CERTIFICATE_PATH = "M365SYNC_CLIENT_CERTIFICATE_PATH"
CERTIFICATE_PASSWORD = "M365SYNC_CLIENT_CERTIFICATE_PASSWORD"  # noqa: S105  a variable name


def load_client_certificate(path: str, password: str | None) -> ClientCertificate:
    """Read a PEM file holding the private key and its certificate; check they belong together."""
    from cryptography import x509  # noqa: PLC0415  only deployments with a certificate need it
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    name = CERTIFICATE_PATH
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{name}: cannot read {path!r} ({type(exc).__name__})") from None
    key_block = _PEM_KEY.search(text)
    cert_block = _PEM_CERT.search(text)
    if key_block is None or cert_block is None:
        raise SettingsError(f"{name}: {path!r} must hold a PEM private key and its certificate")
    try:
        key = serialization.load_pem_private_key(
            key_block.group(0).encode(), password.encode() if password else None
        )
    except (ValueError, TypeError):
        raise SettingsError(
            f"{name}: the private key in {path!r} does not load (wrong or missing "
            f"{CERTIFICATE_PASSWORD}?)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SettingsError(f"{name}: the private key in {path!r} must be RSA (Entra ID's kind)")
    try:
        certificate = x509.load_pem_x509_certificate(cert_block.group(0).encode())
    except ValueError:
        raise SettingsError(f"{name}: the certificate in {path!r} does not parse") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if key.public_key().public_bytes(pem, public) != certificate.public_key().public_bytes(
        pem, public
    ):
        raise SettingsError(f"{name}: the private key in {path!r} is not the certificate's")
    private_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    der = certificate.public_bytes(serialization.Encoding.DER)
    return ClientCertificate(
        private_key_pem=private_pem,
        certificate_pem=certificate.public_bytes(pem).decode(),
        thumbprint_sha256=hashlib.sha256(der).hexdigest(),
    )


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    required: frozenset[str] = SERVICE_REQUIRED,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Parse settings from ``env`` (default: the process environment plus ``.env``).

    ``overrides`` fill in values that are absent from ``env`` (the demo uses it for the keys
    and secrets it generates). Raises :class:`SettingsError` naming the first bad variable.
    """
    if env is None:
        env = _environment_with_dotenv()
    merged = dict(overrides or {})
    merged.update({key: value for key, value in env.items() if value.strip()})
    certificate_path = merged.get(CERTIFICATE_PATH, "").strip()
    if certificate_path:
        # A certificate is the app's credential instead of the secret, never beside it.
        if merged.get("M365SYNC_CLIENT_SECRET", "").strip():
            raise SettingsError(
                f"{CERTIFICATE_PATH}: set either it or M365SYNC_CLIENT_SECRET, not both"
            )
        required = required - {"M365SYNC_CLIENT_SECRET"}
    r = _Reader(merged, required)
    defaults = Settings()
    no_keys: tuple[MasterKey, ...] = ()
    master_keys = r.parse("M365SYNC_MASTER_KEYS", parse_master_keys, no_keys)
    hash_key = r.parse("M365SYNC_HASH_KEY", parse_hash_key, b"")
    public_url = r.get("M365SYNC_PUBLIC_URL")
    return Settings(
        amqp_url=r.parse("M365SYNC_AMQP_URL", _amqp_url, defaults.amqp_url),
        mongodb_url=r.parse("M365SYNC_MONGODB_URL", _mongodb_url, defaults.mongodb_url),
        graph_url=r.parse(
            "M365SYNC_GRAPH_URL",
            lambda v: _https_or_loopback("M365SYNC_GRAPH_URL", v),
            defaults.graph_url,
        ),
        authority_host=r.parse(
            "M365SYNC_AUTHORITY_HOST",
            lambda v: _https_or_loopback("M365SYNC_AUTHORITY_HOST", v),
            defaults.authority_host,
        ),
        ca_bundle=r.parse("M365SYNC_CA_BUNDLE", _ca_bundle, None),
        client_id=r.get("M365SYNC_CLIENT_ID", "") or "",
        client_secret=r.get("M365SYNC_CLIENT_SECRET", "") or "",
        client_certificate=(
            load_client_certificate(r.get(CERTIFICATE_PATH) or "", r.get(CERTIFICATE_PASSWORD))
            if r.get(CERTIFICATE_PATH)
            else None
        ),
        public_url=(
            _https_or_loopback("M365SYNC_PUBLIC_URL", public_url) if public_url is not None else ""
        ),
        http_host=r.get("M365SYNC_HTTP_HOST", defaults.http_host) or defaults.http_host,
        http_port=r.parse("M365SYNC_HTTP_PORT", _port, defaults.http_port),
        metrics_host=r.get("M365SYNC_METRICS_HOST", defaults.metrics_host) or defaults.metrics_host,
        metrics_port=r.parse("M365SYNC_METRICS_PORT", _port, defaults.metrics_port),
        link_audience_required=r.parse(
            "M365SYNC_LINK_AUDIENCE_REQUIRED", _boolean, defaults.link_audience_required
        ),
        master_keys=master_keys,
        hash_key=hash_key,
        connect_secrets=r.parse(
            "M365SYNC_CONNECT_SECRET", _secret_list("M365SYNC_CONNECT_SECRET", 32), ()
        ),
        api_tokens=r.parse("M365SYNC_API_TOKEN", _secret_list("M365SYNC_API_TOKEN", 16), ()),
        return_url_origins=r.parse(
            "M365SYNC_RETURN_URL_ORIGINS",
            lambda v: tuple(_origin("M365SYNC_RETURN_URL_ORIGINS", o) for o in _csv(v)),
            (),
        ),
        shard_count=r.parse("M365SYNC_SHARDS", _positive_int, defaults.shard_count),
        prefetch=r.parse("M365SYNC_PREFETCH", _positive_int, defaults.prefetch),
        burst_min_events=r.parse(
            "M365SYNC_BURST_MIN_EVENTS", _positive_int, defaults.burst_min_events
        ),
        delivery_limit=r.parse("M365SYNC_DELIVERY_LIMIT", _positive_int, defaults.delivery_limit),
        publish_timeout_s=r.parse(
            "M365SYNC_PUBLISH_TIMEOUT_S", _positive_float, defaults.publish_timeout_s
        ),
        receiver_group_window_ms=r.parse(
            "M365SYNC_RECEIVER_GROUP_WINDOW_MS", _positive_float, defaults.receiver_group_window_ms
        ),
        receiver_group_max_items=r.parse(
            "M365SYNC_RECEIVER_GROUP_MAX_ITEMS", _positive_int, defaults.receiver_group_max_items
        ),
        max_body_bytes=r.parse("M365SYNC_MAX_BODY_BYTES", _positive_int, defaults.max_body_bytes),
        graph_timeout_s=r.parse(
            "M365SYNC_GRAPH_TIMEOUT_S", _positive_float, defaults.graph_timeout_s
        ),
        sync_window_past_days=r.parse(
            "M365SYNC_SYNC_WINDOW_PAST_DAYS", _positive_int, defaults.sync_window_past_days
        ),
        sync_window_future_days=r.parse(
            "M365SYNC_SYNC_WINDOW_FUTURE_DAYS", _positive_int, defaults.sync_window_future_days
        ),
        resync_interval_s=r.parse(
            "M365SYNC_RESYNC_INTERVAL_S", _positive_float, defaults.resync_interval_s
        ),
        dead_letter_ttl_days=r.parse(
            "M365SYNC_DEAD_LETTER_TTL_DAYS", _positive_int, defaults.dead_letter_ttl_days
        ),
        tombstone_ttl_days=r.parse(
            "M365SYNC_TOMBSTONE_TTL_DAYS", _positive_int, defaults.tombstone_ttl_days
        ),
        parked_ttl_days=r.parse(
            "M365SYNC_PARKED_TTL_DAYS", _positive_int, defaults.parked_ttl_days
        ),
        parked_max_per_account=r.parse(
            "M365SYNC_PARKED_MAX_PER_ACCOUNT", _positive_int, defaults.parked_max_per_account
        ),
        mass_delete_ratio=r.parse("M365SYNC_MASS_DELETE_RATIO", _ratio, defaults.mass_delete_ratio),
        shutdown_grace_s=r.parse(
            "M365SYNC_SHUTDOWN_GRACE_S", _positive_float, defaults.shutdown_grace_s
        ),
        log_level=r.parse("M365SYNC_LOG_LEVEL", _log_level, defaults.log_level),
        log_format=r.parse("M365SYNC_LOG_FORMAT", _log_format, defaults.log_format),
    )


def _environment_with_dotenv() -> dict[str, str]:
    """The process environment, with a ``.env`` file in the working directory underneath."""
    from dotenv import dotenv_values  # noqa: PLC0415  only the CLI path reads .env

    values = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    values.update(os.environ)
    return values

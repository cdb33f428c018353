"""A certificate credential for the app registration instead of a client secret."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from typing import Any
from urllib.parse import parse_qsl

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from processor.settings import SERVICE_REQUIRED, SettingsError, load_settings
from processor.tokens import MsalApps
from tests.unit.test_settings import FULL

CLIENT_ID = "11111111-2222-3333-4444-555555555555"


def _certificate(key: Any) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m365sync")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


def _pem_file(
    tmp_path, key: Any, certificate: x509.Certificate | None, password: bytes | None = None
):
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    text = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    if certificate is not None:
        text += certificate.public_bytes(serialization.Encoding.PEM)
    path = tmp_path / "client.pem"
    path.write_bytes(text)
    return path


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _env_with_certificate(path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in FULL.items() if k != "M365SYNC_CLIENT_SECRET"}
    env["M365SYNC_CLIENT_CERTIFICATE_PATH"] = str(path)
    env.update(extra)
    return env


def test_a_certificate_replaces_the_client_secret(tmp_path, rsa_key):
    """With a certificate file the secret is not required, and the thumbprint is the certificate's SHA-256."""
    certificate = _certificate(rsa_key)
    path = _pem_file(tmp_path, rsa_key, certificate, password=b"pw")
    settings = load_settings(
        _env_with_certificate(path, M365SYNC_CLIENT_CERTIFICATE_PASSWORD="pw"),
        required=SERVICE_REQUIRED,
    )
    assert settings.client_certificate is not None
    assert settings.client_secret == ""
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert settings.client_certificate.thumbprint_sha256 == hashlib.sha256(der).hexdigest()
    assert "PRIVATE KEY" not in repr(settings)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_file", "cannot read"),
        ("no_certificate", "must hold a PEM private key and its certificate"),
        ("wrong_password", "does not load"),
        ("other_key", "is not the certificate's"),
        ("ec_key", "must be RSA"),
        ("with_secret", "not both"),
    ],
)
def test_an_unusable_certificate_stops_the_start_with_one_line(tmp_path, rsa_key, case, message):
    """A missing, incomplete, locked, mismatched or non-RSA certificate, or one beside a secret, is a settings error naming the variable."""
    certificate = _certificate(rsa_key)
    extra: dict[str, str] = {}
    if case == "missing_file":
        path = tmp_path / "absent.pem"
    elif case == "no_certificate":
        path = _pem_file(tmp_path, rsa_key, None)
    elif case == "wrong_password":
        path = _pem_file(tmp_path, rsa_key, certificate, password=b"right")
        extra["M365SYNC_CLIENT_CERTIFICATE_PASSWORD"] = "wrong"
    elif case == "other_key":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path = _pem_file(tmp_path, other, certificate)
    elif case == "ec_key":
        key = ec.generate_private_key(ec.SECP256R1())
        path = _pem_file(tmp_path, key, _certificate(key))
    else:
        path = _pem_file(tmp_path, rsa_key, certificate)
        extra["M365SYNC_CLIENT_SECRET"] = "also-a-secret"
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings(_env_with_certificate(path, **extra), required=SERVICE_REQUIRED)
    assert str(caught.value).startswith("M365SYNC_CLIENT_CERTIFICATE_PATH:")
    assert "\n" not in str(caught.value)


def test_without_certificate_the_secret_stays_required():
    """Neither a secret nor a certificate: the start stops naming M365SYNC_CLIENT_SECRET."""
    env = {k: v for k, v in FULL.items() if k != "M365SYNC_CLIENT_SECRET"}
    with pytest.raises(SettingsError, match="M365SYNC_CLIENT_SECRET: required"):
        load_settings(env, required=SERVICE_REQUIRED)


class _Response:
    def __init__(self, body: dict[str, Any]) -> None:
        self.status_code = 200
        self.text = json.dumps(body)
        self.headers: dict[str, str] = {}

    def raise_for_status(self) -> None:
        return None


class _IdentityPlatform:
    """MSAL's HTTP client, answering discovery and the token endpoint; keeps token requests."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.token_requests: list[dict[str, str]] = []

    def get(self, url: str, **_: Any) -> _Response:
        return _Response(
            {
                "issuer": f"{self.authority}/v2.0",
                "authorization_endpoint": f"{self.authority}/oauth2/v2.0/authorize",
                "token_endpoint": f"{self.authority}/oauth2/v2.0/token",
            }
        )

    def post(self, url: str, data: Any = None, **_: Any) -> _Response:
        form = dict(parse_qsl(data)) if isinstance(data, str) else dict(data or {})
        self.token_requests.append({"url": url, **form})
        return _Response({"access_token": "at", "token_type": "Bearer", "expires_in": 3600})

    def close(self) -> None:
        return None


def test_msal_authenticates_with_an_assertion_signed_by_the_certificate(tmp_path, rsa_key):
    """The token request carries no secret but a client assertion signed with the key, naming the certificate's SHA-256 thumbprint."""
    certificate = _certificate(rsa_key)
    path = _pem_file(tmp_path, rsa_key, certificate)
    settings = load_settings(_env_with_certificate(path), required=SERVICE_REQUIRED)
    apps = MsalApps(
        client_id=CLIENT_ID,
        client_secret=settings.client_secret,
        client_certificate=settings.client_certificate,
        authority_host="https://login.example.test",
        ca_bundle=None,
    )
    identity = _IdentityPlatform("https://login.example.test/tenant-1")
    apps._http = identity  # type: ignore[assignment]  the identity platform, in memory
    app = apps.build(tenant="tenant-1")
    result = app.acquire_token_for_client(["https://graph.microsoft.com/.default"])
    assert result.get("access_token") == "at", result
    (request,) = identity.token_requests
    assert "client_secret" not in request
    assert (
        request["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assertion = request["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    der = certificate.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert header["x5t#S256"].rstrip("=") == expected
    claims = jwt.decode(
        assertion,
        certificate.public_key(),
        algorithms=[header["alg"]],
        audience=request["url"],
    )
    assert claims["iss"] == claims["sub"] == CLIENT_ID

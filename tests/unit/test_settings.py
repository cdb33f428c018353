"""Settings come from the environment exactly as docs/contract.md §1 names them."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from processor.settings import SERVICE_REQUIRED, SettingsError, load_settings

KEY = base64.b64encode(b"k" * 32).decode()
FULL = {
    "M365SYNC_CLIENT_ID": "app-id",
    "M365SYNC_CLIENT_SECRET": "app-secret",
    "M365SYNC_PUBLIC_URL": "https://sync.example.org",
    "M365SYNC_MASTER_KEYS": f"k2:{KEY},k1:{base64.b64encode(b'j' * 32).decode()}",
    "M365SYNC_HASH_KEY": base64.b64encode(b"h" * 32).decode(),
    "M365SYNC_CONNECT_SECRET": "s" * 32 + ",t" + "u" * 31,
    "M365SYNC_API_TOKEN": "token-aaaaaaaaaaaaaaaa",
    "M365SYNC_RETURN_URL_ORIGINS": "https://crm.example.org, http://localhost:3000",
}


def test_defaults_follow_the_contract() -> None:
    """Unset optional variables take the defaults docs/contract.md §1 fixes."""
    settings = load_settings(FULL)
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.mongodb_url == "mongodb://127.0.0.1:27017/m365sync"
    assert settings.database_name == "m365sync"
    assert settings.graph_url == "https://graph.microsoft.com/v1.0"
    assert settings.authority_host == "https://login.microsoftonline.com"
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", 8080)
    assert settings.ca_bundle is None


def test_lists_and_keys_are_parsed() -> None:
    """Comma-separated secrets, tokens, origins and master keys are all kept, active key first."""
    settings = load_settings(FULL)
    assert [k.key_id for k in settings.master_keys] == ["k2", "k1"]
    assert len(settings.connect_secrets) == 2
    assert settings.api_tokens == ("token-aaaaaaaaaaaaaaaa",)
    assert settings.return_url_origins == ("https://crm.example.org", "http://localhost:3000")


@pytest.mark.parametrize("name", sorted(SERVICE_REQUIRED))
def test_each_missing_required_variable_is_named(name: str) -> None:
    """Leaving out any required variable fails with a message that names it."""
    env = {k: v for k, v in FULL.items() if k != name}
    with pytest.raises(SettingsError, match=name):
        load_settings(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("M365SYNC_MASTER_KEYS", "k1:not-base64!"),
        ("M365SYNC_MASTER_KEYS", "k1:" + base64.b64encode(b"short").decode()),
        ("M365SYNC_HASH_KEY", "abc"),
        ("M365SYNC_HTTP_PORT", "eighty"),
        ("M365SYNC_HTTP_PORT", "70000"),
        ("M365SYNC_PUBLIC_URL", "http://sync.example.org"),
        ("M365SYNC_MONGODB_URL", "mongodb://127.0.0.1:27017"),
        ("M365SYNC_AMQP_URL", "http://127.0.0.1:5672"),
        ("M365SYNC_RETURN_URL_ORIGINS", "https://crm.example.org/path"),
        ("M365SYNC_CONNECT_SECRET", "short"),
        ("M365SYNC_CA_BUNDLE", "/nonexistent/ca.pem"),
    ],
)
def test_malformed_values_are_rejected_naming_the_variable(name: str, value: str) -> None:
    """A malformed value stops start-up with a message naming the variable and not the secret."""
    with pytest.raises(SettingsError, match=name) as info:
        load_settings({**FULL, name: value})
    if name in ("M365SYNC_MASTER_KEYS", "M365SYNC_HASH_KEY", "M365SYNC_CONNECT_SECRET"):
        assert value.rsplit(":", maxsplit=1)[-1] not in str(info.value)


def test_http_public_url_is_allowed_on_loopback() -> None:
    """Graph delivers only to HTTPS, but a loopback receiver in development may be plain HTTP."""
    settings = load_settings({**FULL, "M365SYNC_PUBLIC_URL": "http://127.0.0.1:8080/"})
    assert settings.public_url == "http://127.0.0.1:8080"


def test_settings_are_frozen_and_hide_secrets() -> None:
    """Settings cannot be changed after parsing and their repr shows no secret."""
    settings = load_settings(FULL)
    with pytest.raises(AttributeError):
        settings.client_id = "x"  # type: ignore[misc]
    text = repr(settings)
    assert "app-secret" not in text
    assert KEY not in text
    assert "token-aaaa" not in text


def test_cli_reports_a_missing_variable_in_one_line() -> None:
    """`m365sync worker` without configuration exits 2 with one line naming the variable."""
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "processor.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("m365sync: configuration error: M365SYNC_")


def test_amqp_url_may_list_the_nodes_of_a_cluster() -> None:
    """Comma-separated AMQP URLs are the nodes of one cluster, tried in the order given."""
    value = "amqp://u:p@rabbit-0:5672/v, amqp://u:p@rabbit-1:5672/v,amqps://u:p@rabbit-2:5671/v"
    settings = load_settings({**FULL, "M365SYNC_AMQP_URL": value})
    assert settings.amqp_urls == (
        "amqp://u:p@rabbit-0:5672/v",
        "amqp://u:p@rabbit-1:5672/v",
        "amqps://u:p@rabbit-2:5671/v",
    )
    assert load_settings(FULL).amqp_urls == ("amqp://guest:guest@127.0.0.1:5672/",)
    with pytest.raises(SettingsError, match="M365SYNC_AMQP_URL"):
        load_settings({**FULL, "M365SYNC_AMQP_URL": "amqp://a/, http://b/"})

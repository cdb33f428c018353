"""Connect and consent links (docs/contract.md §2): what is accepted, what is refused, and with what."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pymongo.asynchronous.database import AsyncDatabase

from crypto import Hasher, KeyRing, generate_master_key_spec, parse_master_keys
from processor.repositories.sign_in import UsedLinkRepository
from processor.store import Store
from subscriptions.links import USED_LINKS, LinkRejected, LinkVerifier

SECRET = "s" * 32 + "first-connect-secret-of-64-characters-long-xx"
SECOND = "t" * 32 + "second-connect-secret-of-64-characters-long-x"
ORIGIN = "https://app.onerelation.example"


class FakeUsedLinks:
    """An in-memory used-link store."""

    def __init__(self) -> None:
        self.used: dict[str, datetime] = {}

    async def consume(self, link_hash: str, *, expires_at: datetime) -> bool:
        if link_hash in self.used:
            return False
        self.used[link_hash] = expires_at
        return True


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "acc-42",
        "exp": int(time.time()) + 600,
        "jti": uuid.uuid4().hex,
        "return_url": f"{ORIGIN}/settings/calendar?tab=1",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def token(secret: str = SECRET, algorithm: str = "HS256", **changes: Any) -> str:
    return jwt.encode(claims(**changes), secret, algorithm=algorithm)


def verifier(used: Any = None, secrets: tuple[str, ...] = (SECRET,)) -> LinkVerifier:
    return LinkVerifier(
        secrets=secrets,
        return_url_origins=(ORIGIN, "http://127.0.0.1:9"),
        used=used if used is not None else FakeUsedLinks(),
        hasher=Hasher(os.urandom(32)),
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(body).encode()), _b64(signature))
    )


async def rejected(v: LinkVerifier, value: str | None) -> LinkRejected:
    with pytest.raises(LinkRejected) as info:
        await v.verify(value)
    return info.value


async def test_good_token_is_accepted() -> None:
    """A fresh HS256 token with sub, exp, jti and an allowed return_url verifies."""
    used = FakeUsedLinks()
    link = await verifier(used).verify(token(tenant="Contoso.onmicrosoft.com"))
    assert link.account_id == "acc-42"
    assert link.return_url == f"{ORIGIN}/settings/calendar?tab=1"
    assert link.tenant == "contoso.onmicrosoft.com"
    assert not link.tenant_is_guid
    assert len(used.used) == 1


async def test_token_without_return_url_or_tenant_is_accepted() -> None:
    """return_url and tenant are optional."""
    link = await verifier().verify(token(return_url=None))
    assert link.return_url is None
    assert link.tenant is None


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",  # payload is not JSON, signature wrong
        "x" * 5000,
    ],
)
async def test_not_a_jwt_is_400(value: str | None) -> None:
    """Anything that is not a JWT is refused with 400 and consumes nothing."""
    used = FakeUsedLinks()
    exc = await rejected(verifier(used), value)
    assert exc.status in (400, 403)
    if value != "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln":
        assert (exc.status, exc.code) == (400, "invalid_token")
    assert used.used == {}


async def test_correctly_signed_non_json_payload_is_400() -> None:
    """A correctly signed token whose payload is not a JSON object is not a JWT: 400."""
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(b"not json")
    signature = jwt.api_jws.PyJWS().encode(b"not json", SECRET, algorithm="HS256").split(".")[2]
    exc = await rejected(verifier(), f"{header}.{body}.{signature}")
    assert (exc.status, exc.code) == (400, "invalid_token")


async def test_expired_token_is_403() -> None:
    """A token past its exp (beyond the small leeway) is refused with 403."""
    used = FakeUsedLinks()
    exc = await rejected(verifier(used), token(exp=int(time.time()) - 120))
    assert (exc.status, exc.code) == (403, "token_expired")
    assert used.used == {}


async def test_token_within_clock_skew_is_accepted() -> None:
    """A token that expired a few seconds ago is still accepted (clock skew)."""
    link = await verifier().verify(token(exp=int(time.time()) - 5))
    assert link.account_id == "acc-42"


async def test_wrong_signature_is_403() -> None:
    """A token signed with a secret we do not hold is refused with 403."""
    used = FakeUsedLinks()
    exc = await rejected(verifier(used), token(secret="x" * 64))
    assert (exc.status, exc.code) == (403, "bad_signature")
    assert used.used == {}


async def test_tampered_payload_is_403() -> None:
    """Changing the payload of a signed token breaks its signature: 403."""
    header, _, signature = token().split(".")
    forged = _b64(json.dumps(claims(sub="acc-other")).encode())
    exc = await rejected(verifier(), f"{header}.{forged}.{signature}")
    assert (exc.status, exc.code) == (403, "bad_signature")


async def test_second_configured_secret_verifies() -> None:
    """With two secrets configured (rotation), a token signed with the second is accepted."""
    link = await verifier(secrets=(SECRET, SECOND)).verify(token(secret=SECOND))
    assert link.account_id == "acc-42"


async def test_alg_none_is_403() -> None:
    """An unsigned token (alg none) is refused with 403."""
    used = FakeUsedLinks()
    exc = await rejected(verifier(used), unsigned({"alg": "none", "typ": "JWT"}, claims()))
    assert (exc.status, exc.code) == (403, "unsupported_algorithm")
    exc = await rejected(verifier(used), unsigned({"alg": "None"}, claims(), b"x"))
    assert exc.status == 403
    assert used.used == {}


@pytest.mark.parametrize("algorithm", ["HS512", "HS384"])
async def test_other_hmac_algorithm_is_403(algorithm: str) -> None:
    """A token signed with the right secret but another HMAC algorithm is refused with 403."""
    exc = await rejected(verifier(), token(algorithm=algorithm))
    assert (exc.status, exc.code) == (403, "unsupported_algorithm")


async def test_rs256_is_403() -> None:
    """An RS256 token is refused with 403 (no algorithm confusion)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    exc = await rejected(verifier(), jwt.encode(claims(), key, algorithm="RS256"))
    assert (exc.status, exc.code) == (403, "unsupported_algorithm")


async def test_replayed_token_is_403() -> None:
    """A token works once: its second use is refused with 403."""
    v = verifier()
    value = token()
    await v.verify(value)
    exc = await rejected(v, value)
    assert (exc.status, exc.code) == (403, "token_replayed")


async def test_two_tokens_with_the_same_jti_work_once() -> None:
    """Two differently built tokens sharing a jti: only the first one works."""
    v = verifier()
    await v.verify(token(jti="same-id", return_url=None))
    exc = await rejected(v, token(jti="same-id"))
    assert exc.code == "token_replayed"


@pytest.mark.parametrize(
    "return_url",
    [
        "https://evil.example/cb",
        "https://app.onerelation.example.evil.example/cb",
        "http://app.onerelation.example/cb",  # another scheme is another origin
        "https://app.onerelation.example:8443/cb",
        "javascript:alert(1)",
        "//evil.example/cb",
        "https://user@app.onerelation.example/cb",
        "",
        42,
    ],
)
async def test_foreign_return_url_is_403(return_url: object) -> None:
    """A return_url whose origin is not configured is refused with 403; nothing is used."""
    used = FakeUsedLinks()
    exc = await rejected(verifier(used), token(return_url=return_url))
    assert (exc.status, exc.code) == (403, "return_url_not_allowed")
    assert used.used == {}


async def test_return_url_origin_is_compared_canonically() -> None:
    """Case and default ports do not matter when comparing origins."""
    link = await verifier().verify(token(return_url="HTTPS://App.OneRelation.example:443/x"))
    assert link.return_url == "HTTPS://App.OneRelation.example:443/x"


@pytest.mark.parametrize("missing", ["sub", "jti", "exp"])
async def test_missing_required_claim_is_403(missing: str) -> None:
    """A signed token without sub, jti or exp is refused with 403 and consumes nothing."""
    used = FakeUsedLinks()
    body = claims()
    del body[missing]
    exc = await rejected(verifier(used), jwt.encode(body, SECRET, algorithm="HS256"))
    assert (exc.status, exc.code) == (403, "invalid_claims")
    assert used.used == {}


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": ""},
        {"sub": "acc 42"},
        {"sub": "_service"},
        {"sub": "a" * 200},
        {"sub": 42},
        {"jti": ""},
        {"jti": 7},
        {"exp": "tomorrow"},
        {"tenant": "not a tenant"},
        {"tenant": "../../evil"},
        {"tenant": 5},
    ],
)
async def test_malformed_claims_are_403(changes: dict[str, Any]) -> None:
    """Claims of the wrong shape (account id charset, types, tenant) are refused with 403."""
    used = FakeUsedLinks()
    exc = await rejected(verifier(used), token(**changes))
    assert exc.status == 403
    assert used.used == {}


async def test_far_future_exp_is_403() -> None:
    """A link valid for days is refused: links are short-lived by contract."""
    exc = await rejected(verifier(), token(exp=int(time.time()) + 7 * 86400))
    assert (exc.status, exc.code) == (403, "lifetime_too_long")


async def test_not_yet_valid_token_is_403() -> None:
    """A token whose nbf lies in the future is refused with 403."""
    exc = await rejected(verifier(), token(nbf=int(time.time()) + 300))
    assert (exc.status, exc.code) == (403, "token_not_yet_valid")


async def test_guid_tenant_is_recognised() -> None:
    """A GUID tenant claim is kept as a tenant id."""
    tenant = str(uuid.uuid4()).upper()
    link = await verifier().verify(token(tenant=tenant))
    assert link.tenant == tenant.lower()
    assert link.tenant_is_guid


async def test_used_links_on_ferretdb_are_once_only(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """On the real database the jti is consumed by a unique insert, with an expiry, once."""
    v = verifier(UsedLinkRepository(db=mongo_db))  # type: ignore[arg-type]
    value = token()
    bad = token(secret="y" * 64)
    with pytest.raises(LinkRejected):
        await v.verify(bad)
    assert await mongo_db[USED_LINKS].count_documents({}) == 0
    link = await v.verify(value)
    exc = await rejected(v, value)
    assert exc.code == "token_replayed"
    docs = await mongo_db[USED_LINKS].find({}).to_list()
    assert len(docs) == 1
    assert link.jti not in json.dumps(docs, default=str)  # kept as a keyed hash
    assert docs[0]["expires_at"] > link.expires_at.replace(tzinfo=None)


async def test_sweeper_removes_expired_link_and_flow_records(
    mongo_db: AsyncDatabase[dict[str, object]],
) -> None:
    """Used link ids and connect/consent flow state past their expiry are swept; live ones stay."""
    store = Store(
        db=mongo_db,  # type: ignore[arg-type]
        keyring=KeyRing(parse_master_keys(generate_master_key_spec("k1"))),
        hasher=Hasher(os.urandom(32)),
    )
    now = datetime.now(UTC)
    for name in ("used_links", "connect_flows", "consent_flows"):
        await mongo_db[name].insert_many(
            [
                {"_id": "old", "expires_at": now - timedelta(seconds=1)},
                {"_id": "live", "expires_at": now + timedelta(minutes=5)},
            ]
        )
    counts = await store.leases.sweep_expired()
    for name in ("used_links", "connect_flows", "consent_flows"):
        assert counts[name] == 1
        assert [doc["_id"] for doc in await mongo_db[name].find({}).to_list()] == ["live"]


async def test_audience_names_the_route() -> None:
    """A link whose aud names the route is accepted there and refused on the other route;
    a foreign aud is refused; a missing aud passes unless the verifier requires one."""
    from subscriptions.links import CONNECT_AUDIENCE, CONSENT_AUDIENCE  # noqa: PLC0415

    v = verifier()
    assert (await v.verify(token(aud=CONNECT_AUDIENCE), audience=CONNECT_AUDIENCE)).jti
    assert (await v.verify(token(aud=[CONSENT_AUDIENCE]), audience=CONSENT_AUDIENCE)).jti
    assert (await v.verify(token(), audience=CONSENT_AUDIENCE)).jti
    for aud, route in (
        (CONSENT_AUDIENCE, CONNECT_AUDIENCE),
        (CONNECT_AUDIENCE, CONSENT_AUDIENCE),
        ("https://other-app.example", CONNECT_AUDIENCE),
        ([CONNECT_AUDIENCE, CONSENT_AUDIENCE], CONNECT_AUDIENCE),
        (7, CONNECT_AUDIENCE),
    ):
        with pytest.raises(LinkRejected) as info:
            await v.verify(token(aud=aud), audience=route)
        assert (info.value.status, info.value.code) == (403, "wrong_audience"), aud
    strict = LinkVerifier(
        secrets=(SECRET,),
        return_url_origins=(ORIGIN,),
        used=FakeUsedLinks(),
        hasher=Hasher(os.urandom(32)),
        require_audience=True,
    )
    with pytest.raises(LinkRejected) as info:
        await strict.verify(token(), audience=CONNECT_AUDIENCE)
    assert info.value.code == "wrong_audience"
    assert (await strict.verify(token(aud=CONNECT_AUDIENCE), audience=CONNECT_AUDIENCE)).jti


def test_link_audience_required_setting() -> None:
    """M365SYNC_LINK_AUDIENCE_REQUIRED parses true/false and refuses anything else."""
    from processor.settings import SettingsError, load_settings  # noqa: PLC0415

    assert not load_settings({}, required=frozenset()).link_audience_required
    env = {"M365SYNC_LINK_AUDIENCE_REQUIRED": "true"}
    assert load_settings(env, required=frozenset()).link_audience_required
    with pytest.raises(SettingsError, match="M365SYNC_LINK_AUDIENCE_REQUIRED"):
        load_settings({"M365SYNC_LINK_AUDIENCE_REQUIRED": "maybe"}, required=frozenset())

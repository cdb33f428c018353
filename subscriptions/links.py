"""Connect and consent links: the HS256 JWTs 1Relation signs (docs/contract.md §2).

A link is checked completely (format, algorithm, signature under any configured secret,
claims, ``return_url`` origin) before its ``jti`` is consumed, so a rejected token never
uses up anything. The ``jti`` is consumed by a unique-key insert into ``used_links``,
atomic on FerretDB too (an update would not be); the record expires a while after the
token does, when a replay would fail on ``exp`` anyway, and the sweeper removes it.

Each route has its own audience (:data:`CONNECT_AUDIENCE`, :data:`CONSENT_AUDIENCE`), so
a connect link cannot start an admin consent or the other way round. docs/contract.md §2 names no
``aud``, so a link without one is accepted on either route unless the verifier is told
to require it (``M365SYNC_LINK_AUDIENCE_REQUIRED``, once 1Relation's signer sets it); a
link whose ``aud`` does not name the route is always refused.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import jwt

from crypto import Hasher

__all__ = [
    "ACCOUNT_ID_PATTERN",
    "CONNECT_AUDIENCE",
    "CONSENT_AUDIENCE",
    "USED_LINKS",
    "Link",
    "LinkRejected",
    "LinkVerifier",
    "UsedLinkStore",
    "is_account_id",
    "is_guid",
]

USED_LINKS: Final = "used_links"
#: ``aud`` of a link for ``GET /connect``.
CONNECT_AUDIENCE: Final = "m365sync:connect"
#: ``aud`` of a link for ``GET /admin-consent``.
CONSENT_AUDIENCE: Final = "m365sync:admin-consent"
_AUDIENCES: Final = frozenset({CONNECT_AUDIENCE, CONSENT_AUDIENCE})
ALGORITHM: Final = "HS256"
#: Longest token looked at; a real link is a few hundred characters.
MAX_TOKEN_CHARS: Final = 4096
#: Clock skew tolerated between 1Relation and us on ``exp``/``nbf``/``iat``.
LEEWAY_S: Final = 30
#: Longest lifetime accepted: docs/contract.md suggests 15 minutes; an hour allows for slow clocks
#: and keeps the used-link records (which live as long as the token) short-lived.
MAX_LIFETIME_S: Final = 3600
#: How long a used ``jti`` is kept beyond the token's expiry (more than the leeway).
USED_LINK_MARGIN_S: Final = 600
MAX_RETURN_URL_CHARS: Final = 2048
#: 1Relation account ids: a conservative charset, safe in URLs, logs and lease names.
ACCOUNT_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_JWS: Final = jwt.PyJWS()
_JTI: Final = re.compile(r"[\x21-\x7e]{1,256}")
_GUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_DOMAIN: Final = re.compile(
    r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)


def canonical_origin(url: str) -> str:
    """Return ``scheme://host[:port]`` of a URL, lower-cased, default ports dropped."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme)
    suffix = f":{port}" if port is not None and port != default else ""
    return f"{parts.scheme.lower()}://{host}{suffix}"


def is_guid(value: object) -> bool:
    """True when ``value`` is a GUID (a tenant id, as opposed to a domain)."""
    return isinstance(value, str) and _GUID.fullmatch(value) is not None


def is_account_id(value: object) -> bool:
    """True when ``value`` is a well-formed 1Relation account id."""
    return isinstance(value, str) and ACCOUNT_ID_PATTERN.fullmatch(value) is not None


class LinkRejected(Exception):
    """A link that starts nothing: ``status`` 400 (not a JWT) or 403, and a stable ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Link:
    """A verified, consumed link."""

    account_id: str
    jti: str
    expires_at: datetime
    return_url: str | None
    tenant: str | None

    @property
    def tenant_is_guid(self) -> bool:
        """True when ``tenant`` names a tenant id rather than a domain."""
        return is_guid(self.tenant)


class UsedLinkStore(Protocol):
    """Remembers consumed link ids."""

    async def consume(self, link_hash: str, *, expires_at: datetime) -> bool:
        """Record the id; False when it was recorded before (a replay)."""


_MISSING: Final = object()


def _forbidden(code: str, message: str) -> LinkRejected:
    return LinkRejected(403, code, message)


class LinkVerifier:
    """Verifies connect and consent tokens as docs/contract.md §2 says, then consumes them."""

    def __init__(
        self,
        *,
        secrets: tuple[str, ...],
        return_url_origins: tuple[str, ...],
        used: UsedLinkStore,
        hasher: Hasher,
        max_lifetime_s: float = MAX_LIFETIME_S,
        require_audience: bool = False,
    ) -> None:
        if not secrets:
            raise ValueError("at least one connect secret is required")
        self._secrets = tuple(s.encode("utf-8") for s in secrets)
        self._origins = frozenset(canonical_origin(o) for o in return_url_origins)
        self._used = used
        self._hasher = hasher
        self._max_lifetime_s = max_lifetime_s
        self._require_audience = require_audience

    async def verify(self, token: str | None, *, audience: str = CONNECT_AUDIENCE) -> Link:
        """Check ``token`` for the route ``audience`` names completely, then consume its ``jti``.

        Raises :class:`LinkRejected`.
        """
        link = self.check(token, audience=audience)
        consumed = await self._used.consume(
            self._hasher.hash_id("link_jti", link.jti),
            expires_at=link.expires_at + timedelta(seconds=LEEWAY_S + USED_LINK_MARGIN_S),
        )
        if not consumed:
            raise _forbidden("token_replayed", "this link was used already; ask for a new one")
        return link

    def check(self, token: str | None, *, audience: str = CONNECT_AUDIENCE) -> Link:
        """Format, algorithm, signature and claims for the route ``audience``; consumes nothing."""
        if audience not in _AUDIENCES:
            raise ValueError(f"unknown link audience {audience!r}")
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise LinkRejected(400, "invalid_token", "the token is not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:  # also a non-string kid or an unknown crit extension
            raise LinkRejected(400, "invalid_token", "the token is not a usable JWT") from None
        if header.get("alg") != ALGORITHM:
            raise _forbidden("unsupported_algorithm", "the token must be signed with HS256")
        claims = self._decode(token)
        self._audience(claims.get("aud", _MISSING), audience)
        return self._claims(claims)

    def _audience(self, value: object, expected: str) -> None:
        if value is _MISSING:
            if self._require_audience:
                raise _forbidden("wrong_audience", f"the token must have aud {expected!r}")
            return
        names = value if isinstance(value, list) else [value]
        # A list naming both routes would make the link work on both again.
        if expected not in names or any(n in _AUDIENCES and n != expected for n in names):
            raise _forbidden(
                "wrong_audience", f"the token is not meant for this route ({expected})"
            )

    def _decode(self, token: str) -> dict[str, Any]:
        for secret in self._secrets:
            try:
                payload = _JWS.decode(token, secret, algorithms=[ALGORITHM])
            except jwt.InvalidSignatureError:
                continue  # try the next secret (rotation)
            except jwt.InvalidTokenError:
                raise LinkRejected(400, "invalid_token", "the token is not a JWT") from None
            try:
                body = json.loads(payload)
            except ValueError:
                body = None
            if not isinstance(body, dict):  # a JWS, but its payload is no claims set
                raise LinkRejected(400, "invalid_token", "the token is not a JWT")
            return self._validated(token, secret)
        raise _forbidden("bad_signature", "the token's signature does not verify")

    @staticmethod
    def _validated(token: str, secret: bytes) -> dict[str, Any]:
        """The registered claims checked by PyJWT (signature known good by now)."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub", "jti"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise _forbidden("token_expired", "the link has expired; ask for a new one") from None
        except jwt.ImmatureSignatureError:
            raise _forbidden("token_not_yet_valid", "the link is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _forbidden("invalid_claims", f"the token lacks {exc.claim!r}") from None
        except jwt.InvalidTokenError as exc:  # exp/iat/nbf/sub/jti of the wrong type
            raise _forbidden("invalid_claims", f"the token's claims are invalid: {exc}") from None
        return claims

    def _claims(self, claims: dict[str, Any]) -> Link:
        sub, jti, exp = claims.get("sub"), claims.get("jti"), claims.get("exp")
        if not is_account_id(sub):
            raise _forbidden("invalid_claims", "sub is not a valid account id")
        if not isinstance(jti, str) or not _JTI.fullmatch(jti):
            raise _forbidden("invalid_claims", "jti must be a short printable string")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise _forbidden("invalid_claims", "exp must be a number")
        if exp > time.time() + self._max_lifetime_s + LEEWAY_S:
            raise _forbidden("lifetime_too_long", "the link's exp is too far in the future")
        return Link(
            account_id=str(sub),
            jti=jti,
            expires_at=datetime.fromtimestamp(float(exp), UTC),
            return_url=self._return_url(claims.get("return_url")),
            tenant=_tenant(claims.get("tenant")),
        )

    def _return_url(self, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value or len(value) > MAX_RETURN_URL_CHARS:
            raise _forbidden("return_url_not_allowed", "return_url is not a usable URL")
        try:
            parts = urlsplit(value)
            origin = canonical_origin(value)
        except ValueError:
            raise _forbidden("return_url_not_allowed", "return_url is not a usable URL") from None
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or origin not in self._origins
        ):
            raise _forbidden("return_url_not_allowed", "return_url's origin is not allowed")
        return value


def _tenant(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and (_GUID.fullmatch(value) or _DOMAIN.fullmatch(value)):
        return value.lower()
    raise _forbidden("invalid_claims", "tenant must be a tenant id (GUID) or a domain")

"""Delegated Graph access tokens through MSAL, with a shared, compare-and-swap token cache.

MSAL Python is synchronous, so every MSAL call runs in a worker thread. Several processes
share one account's serialized MSAL cache (stored encrypted by the store); refresh tokens
rotate on every use and the old one stays valid, so a refresh that loses the race to save
its cache simply reloads the winner's cache (docs/design.md "Hard-won details").
"""

from __future__ import annotations

import asyncio
import ssl
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import msal
import requests
from requests.adapters import HTTPAdapter

from handlers.errors import ReauthorizationRequired, TransientError
from processor.graph import build_ssl_context
from processor.logs import get_logger
from processor.settings import ClientCertificate

log = get_logger(__name__)

#: MSAL adds openid, profile and offline_access itself (and refuses them here).
DEFAULT_SCOPES: Final = ("Calendars.ReadWrite", "User.Read")
#: Hosts MSAL knows without instance discovery (docs/graph.md §8, msal/authority.py).
WELL_KNOWN_AUTHORITY_HOSTS: Final = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login.microsoftonline.de",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login-us.microsoftonline.com",
        "login.usgovcloudapi.net",
    }
)
#: OAuth errors that only the user (or an admin) can fix by connecting again.
_REAUTH_ERRORS: Final = frozenset(
    {"invalid_grant", "interaction_required", "consent_required", "login_required"}
)
_MSAL_TIMEOUT_S: Final = 30.0
_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access"})


class TokenCacheStore(Protocol):
    """Where an account's serialized MSAL cache lives (encrypted at rest by the store)."""

    async def load(self, account_id: str) -> tuple[str, int] | None:
        """The decrypted serialized cache and its version, or None when there is none."""

    async def save(self, account_id: str, serialized: str, expected_version: int) -> bool:
        """Store a new cache if the version is still ``expected_version``; False otherwise."""


class _HttpClient(requests.Session):
    """MSAL's HTTP client: ignores REQUESTS_CA_BUNDLE & co, has a timeout, trusts our CA."""

    def __init__(self, *, ca_bundle: str | None, timeout_s: float) -> None:
        super().__init__()
        # requests merges REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE over `verify` unless told not to
        # (docs/graph.md §8): our settings decide what is trusted, not the environment.
        self.trust_env = False
        self.verify = True
        self._timeout_s = timeout_s
        if ca_bundle:
            # The system store *plus* the extra CA (verify=<file> would replace the store).
            adapter = _ContextAdapter(build_ssl_context(ca_bundle))
            self.mount("https://", adapter)

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout_s)
        return super().request(method, url, *args, **kwargs)


class _ContextAdapter(HTTPAdapter):
    """An adapter whose connections verify with a given SSL context."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(*args, **kwargs)


class MsalApps:
    """Builds MSAL confidential client applications for the configured app registration."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        authority_host: str,
        ca_bundle: str | None,
        client_certificate: ClientCertificate | None = None,
        timeout_s: float = _MSAL_TIMEOUT_S,
    ) -> None:
        self.client_id = client_id
        # MSAL signs a client assertion with the key (PS256, x5t#S256 of the certificate)
        # when given a certificate; the secret is then unused.
        self._credential: str | dict[str, str] = (
            {
                "private_key": client_certificate.private_key_pem,
                "public_certificate": client_certificate.certificate_pem,
            }
            if client_certificate is not None
            else client_secret
        )
        self.authority_host = authority_host.rstrip("/")
        host = (urlsplit(self.authority_host).hostname or "").lower()
        # Instance discovery calls login.microsoftonline.com; a private IdP must skip it.
        self._instance_discovery = host in WELL_KNOWN_AUTHORITY_HOSTS
        # One session (connection pool) shared by every app; MSAL's HTTP *cache* is per app.
        self._http = _HttpClient(ca_bundle=ca_bundle, timeout_s=timeout_s)

    def build(
        self,
        *,
        tenant: str = "organizations",
        token_cache: msal.SerializableTokenCache | None = None,
    ) -> msal.ConfidentialClientApplication:
        """A fresh app for ``tenant`` (blocking: MSAL fetches the tenant's discovery document)."""
        return msal.ConfidentialClientApplication(
            self.client_id,
            client_credential=self._credential,
            authority=f"{self.authority_host}/{tenant}",
            token_cache=token_cache,
            http_client=self._http,
            instance_discovery=self._instance_discovery,
        )

    def close(self) -> None:
        """Close the shared HTTP connection pool."""
        self._http.close()


@dataclass(frozen=True)
class _Held:
    token: str
    fresh_until: float


@dataclass(frozen=True)
class _Silent:
    """What one off-loop MSAL attempt produced."""

    result: dict[str, Any] | None
    cache: str | None  # the new serialized cache, when MSAL changed it
    problem: str | None = None  # set when the cache has no usable account


class MsalTokenProvider:
    """Implements :class:`processor.interfaces.AccessTokens` with MSAL and a shared store."""

    def __init__(
        self,
        *,
        apps: MsalApps,
        store: TokenCacheStore,
        scopes: Sequence[str] = DEFAULT_SCOPES,
        refresh_margin_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        reserved = {s.lower() for s in scopes} & _RESERVED_SCOPES
        if reserved:  # MSAL adds these itself and raises ValueError if given
            raise ValueError(f"scopes must not include {sorted(reserved)}")
        self._apps = apps
        self._store = store
        self._scopes = list(scopes)
        self._margin_s = refresh_margin_s
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Counts for the metrics module: refreshed, served_from_memory, cas_conflicts,
        #: reauthorization_required, transient_errors.
        self.stats: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    async def access_token(self, account_id: str) -> str:
        """A token valid for at least ``refresh_margin_s`` (refreshed through MSAL if needed)."""
        held = self._held.get(account_id)
        if held is not None and self._clock() < held.fresh_until:
            self._count("served_from_memory")
            return held.token
        lock = self._locks.setdefault(account_id, asyncio.Lock())
        async with lock:
            held = self._held.get(account_id)
            if held is not None and self._clock() < held.fresh_until:
                self._count("served_from_memory")
                return held.token  # a concurrent caller refreshed while we waited
            stale = held.token if held is not None else None
            token, expires_in_s = await self._acquire(account_id, stale)
            now = self._clock()
            # Hold it until `margin` before expiry, but at least half its life, so that an IdP
            # issuing short tokens does not turn every Graph call into a refresh.
            life = max(expires_in_s - self._margin_s, expires_in_s / 2)
            self._held[account_id] = _Held(token, now + life)
            return token

    def invalidate(self, account_id: str) -> None:
        """Graph refused the token: the next call must not be served that token again.

        The refused token is kept, already expired, so that if MSAL's own cache hands the
        same token back (it still looks valid to MSAL) the refresh is forced; forgetting it
        would let a revoked access token be served until its natural expiry.
        """
        held = self._held.get(account_id)
        if held is not None:
            self._held[account_id] = _Held(held.token, float("-inf"))

    def forget(self, account_id: str) -> None:
        """The account was erased and connected again (perhaps as another Microsoft user):
        the token held for the erased connection must never be served for the new one."""
        self._held.pop(account_id, None)

    async def _acquire(self, account_id: str, stale: str | None) -> tuple[str, float]:
        ours: tuple[str, float] | None = None  # a token we got but lost the race to save
        while True:
            loaded = await self._store.load(account_id)
            if loaded is None:
                self._count("reauthorization_required")
                raise ReauthorizationRequired(
                    account_id,
                    "no stored Microsoft sign-in for this account: the user must connect",
                )
            serialized, version = loaded
            silent = await self._silent(
                account_id, serialized, stale, refresh_if_stale=ours is None
            )
            result = self._check(account_id, silent)
            token = str(result["access_token"])
            expires_in_s = float(result.get("expires_in") or 0)
            if ours is not None:
                # Retry on the winner's cache. If it only offers the token we already found
                # stale, keep the one we were issued: it is valid, and refreshing again would
                # just rotate the refresh token once more. The store keeps the winner's cache.
                if token == stale:
                    return ours
                if silent.cache is None:
                    return token, expires_in_s
            if silent.cache is not None:
                saved = await self._store.save(account_id, silent.cache, version)
                if not saved:
                    self._count("cas_conflicts")
                    log.info("tokens.cache.conflict", account_id=account_id, retried=ours is None)
                    if ours is None:
                        # Another process saved first: its cache is the newest; reload it.
                        ours = (token, expires_in_s)
                        continue
            if result.get("token_source") != "cache":
                self._count("refreshed")
                log.info("tokens.refreshed", account_id=account_id, expires_in_s=expires_in_s)
            return token, expires_in_s

    async def _silent(
        self, account_id: str, serialized: str, stale: str | None, *, refresh_if_stale: bool
    ) -> _Silent:
        try:
            return await asyncio.to_thread(
                self._silent_blocking, serialized, stale if refresh_if_stale else None
            )
        except requests.RequestException as exc:
            self._count("transient_errors")
            log.warning("tokens.refresh.failed", account_id=account_id, reason=type(exc).__name__)
            raise TransientError(f"identity platform unreachable: {type(exc).__name__}") from exc
        except ValueError as exc:
            # MSAL raises ValueError when the authority's discovery document is unusable.
            self._count("transient_errors")
            log.warning("tokens.refresh.failed", account_id=account_id, reason="authority")
            raise TransientError("identity platform answered unusably (authority)") from exc

    def _silent_blocking(self, serialized: str, stale: str | None) -> _Silent:
        cache = msal.SerializableTokenCache()
        try:
            cache.deserialize(serialized)
        except (ValueError, TypeError):
            return _Silent(None, None, "the stored sign-in is unreadable")
        accounts = list(cache.search(msal.TokenCache.CredentialType.ACCOUNT))
        if not accounts:
            return _Silent(None, None, "the stored sign-in holds no account")
        account = accounts[0]
        tenant = str(account.get("realm") or "")
        if not tenant:
            tenant = str(account.get("home_account_id") or "").partition(".")[2] or "organizations"
        app = self._apps.build(tenant=tenant, token_cache=cache)
        matched = [
            a for a in app.get_accounts() if a.get("home_account_id") == account["home_account_id"]
        ]
        if not matched:
            return _Silent(None, None, "the stored sign-in holds no account for this authority")
        result = app.acquire_token_silent_with_error(self._scopes, account=matched[0])
        if result and stale is not None and result.get("access_token") == stale:
            # By our clock the token is near expiry, but MSAL (which refreshes only in the
            # last 5 minutes) handed back the same one: refresh it now.
            result = app.acquire_token_silent_with_error(
                self._scopes, account=matched[0], force_refresh=True
            )
        changed = cache.serialize() if cache.has_state_changed else None
        return _Silent(result, changed)

    def _check(self, account_id: str, silent: _Silent) -> Mapping[str, Any]:
        result = silent.result
        if silent.problem is not None or result is None:
            self._count("reauthorization_required")
            detail = silent.problem or "the stored sign-in holds no usable refresh token"
            log.warning("tokens.reauthorization_required", account_id=account_id, error="no_token")
            raise ReauthorizationRequired(account_id, f"{detail}: the user must connect again")
        if "access_token" in result:
            return result
        error = str(result.get("error") or "unknown_error")
        suberror = str(result.get("suberror") or "")
        codes = result.get("error_codes") or []
        if error in _REAUTH_ERRORS or suberror in _REAUTH_ERRORS:
            self._count("reauthorization_required")
            log.warning(
                "tokens.reauthorization_required",
                account_id=account_id,
                error=error,
                suberror=suberror or None,
                error_codes=codes,
            )
            raise ReauthorizationRequired(account_id, _reauth_reason(error, suberror))
        self._count("transient_errors")
        log.warning("tokens.refresh.failed", account_id=account_id, error=error, error_codes=codes)
        raise TransientError(f"token refresh failed ({error}); will retry")


def _reauth_reason(error: str, suberror: str) -> str:
    if "consent_required" in (error, suberror):
        return (
            "the permissions the app needs are no longer consented (consent_required): "
            "the user or an administrator must connect again and grant them"
        )
    if error in {"interaction_required", "login_required"}:
        return (
            f"Microsoft requires the user to sign in again ({error}), for example after a "
            "password change or a new MFA policy: the user must connect again"
        )
    return (
        f"Microsoft rejected the stored sign-in ({error}"
        + (f"/{suberror}" if suberror else "")
        + "), for example because it was revoked or expired: the user must connect again"
    )


def initiate_flow(
    apps: MsalApps,
    *,
    redirect_uri: str,
    scopes: Sequence[str] = DEFAULT_SCOPES,
    login_hint: str | None = None,
    domain_hint: str | None = None,
    tenant: str = "organizations",
    response_mode: str = "query",
    prompt: str | None = None,
) -> dict[str, Any]:
    """Start an auth-code + PKCE flow; keep the whole dict server-side, send ``auth_uri``.

    The default ``"query"`` puts the code in the callback URL, because docs/contract.md §2 fixes
    ``GET /auth/callback``; ``"form_post"`` (RFC 9700's advice) would make it a POST.
    Blocking (MSAL fetches the discovery document): on the loop use :func:`initiate_flow_async`.
    """
    return _initiate(
        apps.build(tenant=tenant),
        redirect_uri=redirect_uri,
        scopes=scopes,
        login_hint=login_hint,
        domain_hint=domain_hint,
        response_mode=response_mode,
        prompt=prompt,
    )


async def initiate_flow_async(
    apps: MsalApps,
    *,
    redirect_uri: str,
    scopes: Sequence[str] = DEFAULT_SCOPES,
    login_hint: str | None = None,
    domain_hint: str | None = None,
    tenant: str = "organizations",
    response_mode: str = "query",
    prompt: str | None = None,
) -> dict[str, Any]:
    """:func:`initiate_flow` with the blocking discovery off the event loop."""
    app = await asyncio.to_thread(apps.build, tenant=tenant)
    return _initiate(
        app,
        redirect_uri=redirect_uri,
        scopes=scopes,
        login_hint=login_hint,
        domain_hint=domain_hint,
        response_mode=response_mode,
        prompt=prompt,
    )


def _initiate(
    app: msal.ConfidentialClientApplication,
    *,
    redirect_uri: str,
    scopes: Sequence[str],
    login_hint: str | None,
    domain_hint: str | None,
    response_mode: str,
    prompt: str | None = None,
) -> dict[str, Any]:
    if response_mode not in ("form_post", "query"):
        raise ValueError(f"response_mode must be 'form_post' or 'query', not {response_mode!r}")
    with warnings.catch_warnings():
        # "query" is a deliberate choice here (e.g. an IdP without form_post): MSAL's advice
        # to use form_post is known and need not fail a run with warnings as errors.
        warnings.filterwarnings("ignore", message="response_mode='form_post'", category=UserWarning)
        flow: dict[str, Any] = app.initiate_auth_code_flow(
            list(scopes),
            redirect_uri=redirect_uri,
            login_hint=login_hint,
            domain_hint=domain_hint,
            response_mode=response_mode,
            prompt=prompt,
        )
    return flow


async def redeem_auth_code(
    apps: MsalApps,
    flow: dict[str, Any],
    auth_response: dict[str, Any],
    scopes: Sequence[str] = DEFAULT_SCOPES,
) -> tuple[dict[str, Any], str]:
    """Redeem the callback's code: (MSAL result with ``id_token_claims``, serialized cache).

    The result may be ``{"error": ...}`` (the caller shows it); MSAL raises ``ValueError``
    on a state mismatch (CSRF). Network failures raise :class:`TransientError`.
    """

    def redeem() -> tuple[dict[str, Any], str]:
        cache = msal.SerializableTokenCache()
        tenant = _flow_tenant(flow)
        app = apps.build(tenant=tenant, token_cache=cache)
        result: dict[str, Any] = app.acquire_token_by_auth_code_flow(
            flow, auth_response, scopes=list(scopes)
        )
        return result, cache.serialize()

    try:
        return await asyncio.to_thread(redeem)
    except requests.RequestException as exc:
        raise TransientError(f"identity platform unreachable: {type(exc).__name__}") from exc


def _flow_tenant(flow: Mapping[str, Any]) -> str:
    """The tenant segment the flow's authorize URL used (the code must go to the same one)."""
    path = urlsplit(str(flow.get("auth_uri") or "")).path.strip("/").split("/")
    return (
        path[-4]
        if len(path) >= 4 and path[-3:] == ["oauth2", "v2.0", "authorize"]
        else ("organizations")
    )


class MsalSignIn:
    """The sign-in port of :mod:`subscriptions.ports` over :class:`MsalApps`, with the
    service's delegated scopes."""

    def __init__(self, *, apps: MsalApps) -> None:
        self._apps = apps

    async def initiate(
        self, *, redirect_uri: str, domain_hint: str | None, tenant: str, prompt: str | None
    ) -> dict[str, Any]:
        """:func:`initiate_flow_async` with ``response_mode=query``."""
        return await initiate_flow_async(
            self._apps,
            redirect_uri=redirect_uri,
            scopes=DEFAULT_SCOPES,
            domain_hint=domain_hint,
            tenant=tenant,
            response_mode="query",
            prompt=prompt,
        )

    async def redeem(
        self, flow: dict[str, Any], auth_response: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        """:func:`redeem_auth_code`."""
        return await redeem_auth_code(self._apps, flow, auth_response, DEFAULT_SCOPES)

    def build(self, *, tenant: str) -> msal.ConfidentialClientApplication:
        """:meth:`MsalApps.build`."""
        return self._apps.build(tenant=tenant)

"""The identity platform: OIDC discovery, JWKS, authorize, token and admin consent endpoints."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from .clock import SimClock
from .errors import AadError, GraphError
from .store import Store, Tenant, User

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_AUDIENCE = "https://graph.microsoft.com"
OIDC_SCOPES = {"openid", "profile", "offline_access", "email"}
CODE_LIFETIME_S = 600
REFRESH_LIFETIME_S = 90 * 86400


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class AuthCode:
    client_id: str
    redirect_uri: str
    scopes: list[str]
    user_id: str
    tenant_segment: str
    nonce: str | None
    code_challenge: str
    expires_s: float
    used: bool = False


@dataclass
class RefreshToken:
    user_id: str
    client_id: str
    scopes: list[str]
    tenant_segment: str
    expires_s: float
    revoked: bool = False


@dataclass
class IdentityState:
    """Mutable identity state; `reset()` on the simulator clears it."""

    signin_user_id: str | None = None
    admin_consent_accepts: bool = True
    #: The ``prompt`` of each authorize request, in order (None when absent).
    prompts: list[str | None] = field(default_factory=list)
    redirect_uris: list[str] = field(default_factory=list)
    codes: dict[str, AuthCode] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshToken] = field(default_factory=dict)
    access_tokens: dict[str, str] = field(default_factory=dict)  # uti -> user or app
    revoked_utis: set[str] = field(default_factory=set)


class Identity:
    """Issues and checks tokens for one registered app across the simulator's tenants."""

    def __init__(
        self,
        *,
        store: Store,
        clock: SimClock,
        client_id: str,
        client_secret: str,
        delegated_scopes: list[str],
        app_roles: list[str],
        access_token_lifetime_s: int,
    ) -> None:
        self.store = store
        self.clock = clock
        self.client_id = client_id
        self.client_secret = client_secret
        self.delegated_scopes = delegated_scopes
        self.app_roles = app_roles
        self.access_token_lifetime_s = access_token_lifetime_s
        self.service_principal_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{client_id}"))
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = _b64url(hashlib.sha256(str(uuid.uuid4()).encode()).digest()[:20])
        self.state = IdentityState()
        self.base_url = ""

    # ---- helpers ---------------------------------------------------------------------------

    def _tenant_for_segment(self, segment: str) -> Tenant | None:
        if segment.lower() in {"common", "organizations"}:
            return None
        tenant = self.store.find_tenant(segment)
        if tenant is None:
            raise AadError(
                400,
                "invalid_request",
                90002,
                f"Tenant '{segment}' not found. Check to make sure you have the "
                "correct tenant ID and are signing into the correct cloud.",
            )
        return tenant

    def issuer(self, segment: str) -> str:
        """The discovery issuer for a tenant path; id_tokens carry the same value."""
        if segment.lower() in {"common", "organizations"}:
            return f"{self.base_url}/{segment.lower()}/v2.0"
        tenant = self.store.find_tenant(segment)
        assert tenant is not None
        return f"{self.base_url}/{tenant.id}/v2.0"

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()

        def enc(n: int) -> str:
            return _b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "kid": self.kid,
                    "x5t": self.kid,
                    "n": enc(numbers.n),
                    "e": enc(numbers.e),
                    "alg": "RS256",
                }
            ]
        }

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims, self.key, algorithm="RS256", headers={"kid": self.kid, "typ": "JWT"}
        )

    def _check_client(self, form: dict[str, str], request: web.Request) -> None:
        client_id = form.get("client_id")
        secret = form.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                raw = base64.b64decode(auth[6:].strip()).decode()
                basic_id, _, basic_secret = raw.partition(":")
            except (ValueError, UnicodeDecodeError) as exc:
                raise AadError(
                    401, "invalid_client", 7000215, "Invalid client secret provided."
                ) from exc
            client_id = client_id or basic_id
            secret = secret or basic_secret
        if client_id != self.client_id:
            raise AadError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory.",
            )
        if not secret:
            raise AadError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: "
                "'client_assertion' or 'client_secret'.",
            )
        if not hmac.compare_digest(secret.encode(), self.client_secret.encode()):
            raise AadError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the "
                "request is the client secret value, not the client secret ID.",
            )

    def _split_scopes(self, scope: str) -> tuple[list[str], list[str]]:
        """(graph scopes as short names, oidc scopes) of a requested scope string."""
        graph: list[str] = []
        oidc: list[str] = []
        for item in scope.split():
            if item in OIDC_SCOPES:
                oidc.append(item)
                continue
            short = item
            for prefix in (GRAPH_AUDIENCE + "/", GRAPH_APP_ID + "/"):
                if item.lower().startswith(prefix):
                    short = item[len(prefix) :]
            if short == ".default":
                graph.extend(s for s in self.delegated_scopes if s not in graph)
            elif "/" in short or ":" in short:
                raise AadError(
                    400,
                    "invalid_scope",
                    70011,
                    f"The provided value for the input parameter 'scope' is not "
                    f"valid. The scope '{item}' is not valid.",
                )
            elif short not in graph:
                graph.append(short)
        return graph, oidc

    # ---- tokens ----------------------------------------------------------------------------

    def _access_token(self, *, tenant: Tenant, user: User | None, scopes: list[str]) -> str:
        now = int(self.clock.now_s())
        uti = _b64url(secrets.token_bytes(16))
        claims: dict[str, Any] = {
            "aud": GRAPH_AUDIENCE,
            "iss": f"https://sts.windows.net/{tenant.id}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.access_token_lifetime_s,
            "appid": self.client_id,
            "app_displayname": "m365sync",
            "tid": tenant.id,
            "uti": uti,
            "ver": "1.0",
        }
        if user is not None:
            claims.update(
                {
                    "oid": user.id,
                    "sub": user.id,
                    "scp": " ".join(scopes),
                    "upn": user.upn,
                    "unique_name": user.upn,
                    "name": user.display_name,
                    "idtyp": "user",
                }
            )
            self.state.access_tokens[uti] = user.id
        else:
            claims.update(
                {
                    "oid": self.service_principal_id,
                    "sub": self.service_principal_id,
                    "roles": list(self.app_roles),
                    "idtyp": "app",
                }
            )
            self.state.access_tokens[uti] = "app"
        return self._sign(claims)

    def _id_token(self, *, user: User, segment: str, nonce: str | None) -> str:
        now = int(self.clock.now_s())
        claims: dict[str, Any] = {
            "ver": "2.0",
            "iss": self.issuer(segment),
            "aud": self.client_id,
            "sub": _b64url(hashlib.sha256(f"{self.client_id}:{user.id}".encode()).digest()),
            "oid": user.id,
            "tid": user.tenant_id,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "preferred_username": user.upn,
            "name": user.display_name,
        }
        if nonce:
            claims["nonce"] = nonce
        return self._sign(claims)

    def _delegated_response(
        self,
        *,
        user: User,
        scopes: list[str],
        oidc: list[str],
        segment: str,
        nonce: str | None,
        client_info: bool,
    ) -> dict[str, Any]:
        tenant = self.store.tenants[user.tenant_id]
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(scopes + [s for s in oidc if s != "offline_access"]),
            "expires_in": self.access_token_lifetime_s,
            "ext_expires_in": self.access_token_lifetime_s,
            "access_token": self._access_token(tenant=tenant, user=user, scopes=scopes),
        }
        if "offline_access" in oidc:
            rt = _b64url(secrets.token_bytes(48))
            self.state.refresh_tokens[rt] = RefreshToken(
                user_id=user.id,
                client_id=self.client_id,
                scopes=scopes + oidc,
                tenant_segment=segment,
                expires_s=self.clock.now_s() + REFRESH_LIFETIME_S,
            )
            body["refresh_token"] = rt
        if "openid" in oidc:
            body["id_token"] = self._id_token(user=user, segment=segment, nonce=nonce)
        if client_info:
            body["client_info"] = _b64url(
                json.dumps({"uid": user.id, "utid": user.tenant_id}).encode()
            )
        return body

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """Claims of a Graph access token this simulator issued; GraphError 401 otherwise."""

        def fail(message: str) -> GraphError:
            return GraphError(401, "InvalidAuthenticationToken", message)

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key.public_key(),
                algorithms=["RS256"],
                audience=GRAPH_AUDIENCE,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as exc:
            raise fail("Access token validation failure. Invalid audience or signature.") from exc
        if claims["exp"] <= self.clock.now_s():
            raise fail("Lifetime validation failed, the token is expired.")
        if claims.get("uti") in self.state.revoked_utis:
            raise fail("Access token has been revoked.")
        return claims

    # ---- control ---------------------------------------------------------------------------

    def revoke_user(self, user_id: str, *, access_tokens: bool) -> dict[str, int]:
        """Revoke a user's refresh tokens (and, if asked, their live access tokens)."""
        rts = 0
        for rt in self.state.refresh_tokens.values():
            if rt.user_id == user_id and not rt.revoked:
                rt.revoked = True
                rts += 1
        ats = 0
        if access_tokens:
            for uti, owner in self.state.access_tokens.items():
                if owner == user_id and uti not in self.state.revoked_utis:
                    self.state.revoked_utis.add(uti)
                    ats += 1
        return {"refresh_tokens_revoked": rts, "access_tokens_revoked": ats}

    # ---- routes ----------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/{tenant}/v2.0/.well-known/openid-configuration", self.h_discovery),
            web.get("/{tenant}/discovery/v2.0/keys", self.h_keys),
            web.get("/{tenant}/oauth2/v2.0/authorize", self.h_authorize),
            web.post("/{tenant}/oauth2/v2.0/token", self.h_token),
            web.get("/{tenant}/v2.0/adminconsent", self.h_admin_consent),
            web.get("/{tenant}/oauth2/v2.0/logout", self.h_logout),
        ]

    async def h_discovery(self, request: web.Request) -> web.Response:
        segment = request.match_info["tenant"]
        try:
            self._tenant_for_segment(segment)
        except AadError as err:
            return err.response()
        base = f"{self.base_url}/{segment}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": self.issuer(segment),
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "aud",
                    "exp",
                    "iat",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "oid",
                ],
                "kerberos_endpoint": f"{base}/kerberos",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            }
        )

    async def h_keys(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks())

    async def h_logout(self, request: web.Request) -> web.Response:
        target = request.query.get("post_logout_redirect_uri")
        if target:
            raise web.HTTPFound(target)
        return web.Response(text="Signed out", content_type="text/plain")

    def _redirect_ok(self, uri: str) -> bool:
        if self.state.redirect_uris:
            return uri in self.state.redirect_uris
        parts = urlsplit(uri)
        return parts.scheme in {"http", "https"} and bool(parts.netloc) and not parts.fragment

    @staticmethod
    def _with_query(uri: str, params: dict[str, str]) -> str:
        parts = urlsplit(uri)
        query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
        return urlunsplit(parts._replace(query=urlencode(query)))

    @staticmethod
    def _error_page(status: int, aadsts: int, message: str) -> web.Response:
        return web.Response(
            status=status,
            content_type="text/html",
            text=f"<html><body><h1>Sign in</h1><p>AADSTS{aadsts}: {message}</p></body></html>",
        )

    async def h_authorize(self, request: web.Request) -> web.Response:
        q = request.query
        segment = request.match_info["tenant"]
        try:
            path_tenant = self._tenant_for_segment(segment)
        except AadError as err:
            return self._error_page(400, err.aadsts, err.description)
        if q.get("client_id") != self.client_id:
            return self._error_page(
                400,
                700016,
                f"Application with identifier "
                f"'{q.get('client_id')}' was not found in the directory.",
            )
        redirect_uri = q.get("redirect_uri", "")
        if not self._redirect_ok(redirect_uri):
            return self._error_page(
                400,
                50011,
                f"The redirect URI '{redirect_uri}' specified "
                "in the request does not match the redirect URIs "
                "configured for the application.",
            )
        state = q.get("state")
        if q.get("response_mode", "query") != "query":
            return self._error_page(400, 900144, "graphsim answers with response_mode=query only.")

        def fail(error: str, aadsts: int, message: str) -> web.Response:
            params = {"error": error, "error_description": f"AADSTS{aadsts}: {message}"}
            if state is not None:
                params["state"] = state
            raise web.HTTPFound(self._with_query(redirect_uri, params))

        # prompt: login, none, consent or select_account (Microsoft's documented values).
        # select_account shows the account picker even with a single sign-on session; here
        # the "picked" account is the sign-in user the test chose.
        prompt = q.get("prompt")
        if prompt is not None and prompt not in ("login", "none", "consent", "select_account"):
            return fail("invalid_request", 90023, f"Invalid value '{prompt}' for 'prompt'.")
        self.state.prompts.append(prompt)
        if q.get("response_type") != "code":
            return fail(
                "unsupported_response_type", 700054, "response_type 'code' is required by graphsim."
            )
        if not q.get("scope"):
            return fail(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            )
        try:
            graph_scopes, oidc = self._split_scopes(q["scope"])
        except AadError as err:
            return fail(err.error, err.aadsts, err.description)
        challenge = q.get("code_challenge")
        if not challenge:
            return fail("invalid_request", 501491, "Must have a code_challenge for PKCE.")
        if q.get("code_challenge_method", "plain") != "S256":
            return fail(
                "invalid_request", 501481, "The code_challenge_method must be S256 in graphsim."
            )
        user_id = self.state.signin_user_id or next(iter(self.store.mailboxes), None)
        user = self.store.find_user(user_id) if user_id else None
        if user is None:
            return fail("access_denied", 50034, "The user account does not exist.")
        if path_tenant is not None and path_tenant.id != user.tenant_id:
            return fail(
                "invalid_request",
                50020,
                "User account from identity provider does not exist in tenant.",
            )
        if not self.store.tenants[user.tenant_id].consented:
            return fail(
                "consent_required",
                65001,
                f"The user or administrator has not consented to use the application "
                f"with ID '{self.client_id}' named 'm365sync'. Send an interactive "
                "authorization request for this user and resource.",
            )
        code = _b64url(secrets.token_bytes(32))
        self.state.codes[code] = AuthCode(
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            scopes=graph_scopes + oidc,
            user_id=user.id,
            tenant_segment=segment,
            nonce=q.get("nonce"),
            code_challenge=challenge,
            expires_s=self.clock.now_s() + CODE_LIFETIME_S,
        )
        params = {"code": code}
        if state is not None:
            params["state"] = state
        params["session_state"] = str(uuid.uuid4())
        if q.get("client_info") == "1":
            params["client_info"] = _b64url(
                json.dumps({"uid": user.id, "utid": user.tenant_id}).encode()
            )
        raise web.HTTPFound(self._with_query(redirect_uri, params))

    async def h_admin_consent(self, request: web.Request) -> web.Response:
        q = request.query
        segment = request.match_info["tenant"]
        if segment.lower() == "common":
            return self._error_page(400, 50194, "Admin consent needs a tenant, not 'common'.")
        try:
            tenant = self._tenant_for_segment(segment)
        except AadError as err:
            return self._error_page(400, err.aadsts, err.description)
        if q.get("client_id") != self.client_id:
            return self._error_page(400, 700016, "Application not found in the directory.")
        redirect_uri = q.get("redirect_uri", "")
        if not self._redirect_ok(redirect_uri):
            return self._error_page(400, 50011, "The redirect URI does not match.")
        if not q.get("scope"):
            return self._error_page(400, 900144, "The request must contain 'scope'.")
        if tenant is None:
            user = self.store.find_user(self.state.signin_user_id or "") or next(
                (b.user for b in self.store.mailboxes.values()), None
            )
            if user is None:
                return self._error_page(400, 50034, "No user to sign in.")
            tenant = self.store.tenants[user.tenant_id]
        params: dict[str, str]
        if self.state.admin_consent_accepts:
            tenant.consented = True
            params = {"admin_consent": "True", "tenant": tenant.id, "scope": q["scope"]}
        else:
            params = {
                "admin_consent": "True",
                "error": "access_denied",
                "error_description": "AADSTS65004: User declined to consent to access the app.",
            }
        if "state" in q:
            params["state"] = q["state"]
        raise web.HTTPFound(self._with_query(redirect_uri, params))

    async def h_token(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self._token(request))
        except AadError as err:
            return err.response()

    async def _token(self, request: web.Request) -> dict[str, Any]:
        segment = request.match_info["tenant"]
        path_tenant = self._tenant_for_segment(segment)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self._check_client(form, request)
        grant = form.get("grant_type")
        want_info = form.get("client_info") == "1"
        if grant == "authorization_code":
            code = self.state.codes.get(form.get("code", ""))
            if code is None:
                raise AadError(
                    400,
                    "invalid_grant",
                    9002313,
                    "Invalid request. Request is malformed or invalid.",
                )
            if code.used:
                raise AadError(
                    400,
                    "invalid_grant",
                    54005,
                    "OAuth2 Authorization code was already redeemed, please retry "
                    "with a new valid code or use an existing refresh token.",
                )
            code.used = True
            if code.expires_s < self.clock.now_s():
                raise AadError(
                    400,
                    "invalid_grant",
                    70008,
                    "The provided authorization code or refresh token has expired "
                    "due to inactivity.",
                )
            if form.get("redirect_uri") != code.redirect_uri:
                raise AadError(
                    400,
                    "invalid_grant",
                    50148,
                    "The redirect_uri does not match the one used in the authorization request.",
                )
            verifier = form.get("code_verifier", "")
            digest = _b64url(hashlib.sha256(verifier.encode()).digest())
            if not verifier or not hmac.compare_digest(digest, code.code_challenge):
                raise AadError(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in "
                    "the authorization request.",
                )
            user = self.store.find_user(code.user_id)
            assert user is not None
            graph = [s for s in code.scopes if s not in OIDC_SCOPES]
            oidc = [s for s in code.scopes if s in OIDC_SCOPES]
            return self._delegated_response(
                user=user,
                scopes=graph,
                oidc=oidc,
                segment=segment,
                nonce=code.nonce,
                client_info=want_info,
            )
        if grant == "refresh_token":
            rt = self.state.refresh_tokens.get(form.get("refresh_token", ""))
            if rt is None or rt.revoked:
                raise AadError(
                    400,
                    "invalid_grant",
                    50173,
                    "The provided grant has expired due to it being revoked, a "
                    "fresh auth token is needed. The user might have changed or "
                    "reset their password.",
                )
            if rt.expires_s < self.clock.now_s():
                raise AadError(
                    400, "invalid_grant", 700082, "The refresh token has expired due to inactivity."
                )
            user = self.store.find_user(rt.user_id)
            assert user is not None
            if path_tenant is not None and path_tenant.id != user.tenant_id:
                raise AadError(400, "invalid_grant", 50020, "User does not exist in tenant.")
            if not self.store.tenants[user.tenant_id].consented:
                raise AadError(
                    400,
                    "invalid_grant",
                    65001,
                    "The user or administrator has not consented to use the "
                    f"application with ID '{self.client_id}'.",
                )
            granted = [s for s in rt.scopes if s not in OIDC_SCOPES]
            requested, oidc_req = self._split_scopes(form.get("scope", ""))
            if any(s not in granted for s in requested):
                raise AadError(
                    400,
                    "invalid_grant",
                    65001,
                    "The user or administrator has not consented to use the "
                    "application for the requested scopes.",
                )
            oidc = sorted({s for s in rt.scopes if s in OIDC_SCOPES} | set(oidc_req))
            return self._delegated_response(
                user=user,
                scopes=requested or granted,
                oidc=oidc,
                segment=rt.tenant_segment,
                nonce=None,
                client_info=want_info,
            )
        if grant == "client_credentials":
            if path_tenant is None:
                raise AadError(
                    400,
                    "invalid_request",
                    90002,
                    "Use a tenant-specific endpoint for client credentials.",
                )
            scope = form.get("scope", "")
            if not scope.endswith("/.default"):
                raise AadError(
                    400,
                    "invalid_scope",
                    1002012,
                    f"The provided value for scope {scope} is not valid. Client "
                    "credential flows must have a scope value with /.default "
                    "suffixed to the resource identifier (application ID URI).",
                )
            if not path_tenant.consented:
                raise AadError(
                    400,
                    "invalid_grant",
                    65001,
                    "The user or administrator has not consented to use the "
                    f"application with ID '{self.client_id}'.",
                )
            return {
                "token_type": "Bearer",
                "expires_in": self.access_token_lifetime_s,
                "ext_expires_in": self.access_token_lifetime_s,
                "access_token": self._access_token(tenant=path_tenant, user=None, scopes=[]),
            }
        raise AadError(
            400,
            "unsupported_grant_type",
            70003,
            f"The app requested an unsupported grant type '{grant}'.",
        )

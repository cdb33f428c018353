"""What the subscriptions package needs from the runtime: Protocols and typed records it owns.

``processor/`` implements them (the Protocols are structural) and wires everything;
nothing in ``subscriptions/`` imports ``processor/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from crypto import DataCipher, Hasher
from handlers.records import Account

#: A stored document: subscription records and the manager's per-account state.
Record = dict[str, Any]


@dataclass(frozen=True)
class AccountIdentity:
    """The Microsoft identity an account is bound to (decrypted)."""

    user_id: str
    tenant_id: str


class Keys(Protocol):
    """The accounts' and the service's data keys."""

    async def cipher_for(self, account_id: str) -> DataCipher: ...
    async def service_cipher(self, purpose: str) -> DataCipher: ...
    async def destroy(self, account_id: str) -> None: ...
    def forget(self, account_id: str) -> None: ...


class Accounts(Protocol):
    """Accounts, their status and the identity they are bound to."""

    async def create(self, account_id: str) -> DataCipher: ...
    async def get(self, account_id: str) -> Account | None: ...
    async def get_many(self, account_ids: list[str]) -> dict[str, Account]: ...
    async def bound_statuses(self) -> dict[str, str]: ...
    async def mailbox_bound_elsewhere(self, user_hash: str, account_id: str) -> bool: ...
    async def bind_identity(self, account_id: str, *, user_id: str, tenant_id: str) -> None: ...
    async def identity(self, account_id: str) -> AccountIdentity: ...
    async def decrypt_identity(self, account: Account) -> AccountIdentity: ...
    async def set_status(self, account_id: str, status: str, reason: str = "") -> bool: ...
    async def delete(self, account_id: str) -> int: ...
    async def delete_other_documents(self, account_id: str) -> int: ...


class Subscriptions(Protocol):
    """Our records of the Graph subscriptions we created (keyed by a keyed hash of the id)."""

    def hash_graph_id(self, subscription_id: str) -> str: ...
    async def save(
        self,
        account_id: str,
        *,
        subscription_id: str,
        client_state: str,
        user_id: str,
        tenant_id: str,
        expires_at: datetime,
        granted_at: datetime | None = None,
    ) -> str: ...
    async def get_for_account(self, account_id: str, subscription_hash: str) -> Record | None: ...
    async def exists(self, subscription_hash: str) -> bool: ...
    async def recorded_among(self, subscription_hashes: list[str]) -> set[str]: ...
    async def fetch_graph_id(self, account_id: str, subscription_hash: str) -> str | None: ...
    async def decrypt_graph_id(self, account_id: str, doc: Record) -> str | None: ...
    async def for_account(self, account_id: str) -> list[Record]: ...
    async def hashes_for_account(self, account_id: str) -> list[str]: ...
    async def has_live(self, account_id: str, now: datetime) -> bool: ...
    async def renewal_view(
        self, account_ids: list[str] | None = None
    ) -> dict[str, list[Record]]: ...
    async def set_expiry(
        self, subscription_hash: str, *, expires_at: datetime, granted_at: datetime
    ) -> None: ...
    async def delete(self, subscription_hash: str) -> None: ...


class RenewalStates(Protocol):
    """The subscription manager's own state per account."""

    async def get(self, account_id: str) -> Record: ...
    async def get_many(self, account_ids: list[str] | None = None) -> dict[str, Record]: ...
    async def update(self, account_id: str, **fields: Any) -> None: ...


class Leases(Protocol):
    """Named locks with an expiry, shared by every process."""

    async def try_take(self, name: str, owner: str, *, ttl_s: float) -> bool: ...
    async def take(
        self, name: str, owner: str, *, ttl_s: float, wait_s: float, poll_s: float = 0.1
    ) -> bool: ...
    async def release(self, name: str, owner: str) -> None: ...
    async def is_held(self, name: str) -> bool: ...


class ErasureResweeps(Protocol):
    """A second sweep of an erased account's documents, later."""

    async def schedule_resweep(self, account_id: str, *, after_s: float) -> None: ...


class TokenCaches(Protocol):
    """Each account's MSAL token cache, replaced by compare-and-swap."""

    async def load(self, account_id: str) -> tuple[str, int] | None: ...
    async def save(self, account_id: str, serialized: str, expected_version: int) -> bool: ...


class FlowRecords(Protocol):
    """One collection of sign-ins in progress (connect or admin consent), by keyed hash."""

    @property
    def name(self) -> str:
        """The collection's name (it is part of each record's hash and associated data)."""
        ...

    async def insert(self, record: Record) -> None:
        """Keep a new record (its ``_id`` is the keyed hash of the flow's state)."""
        ...

    async def get(self, key: str) -> Record | None:
        """The record kept under ``key``, or None."""
        ...

    async def remove(self, key: str) -> bool:
        """Remove the record; True only for the one caller that removed it."""
        ...


class TenantApprovals(Protocol):
    """Organisations whose administrator approved the app (by keyed hash of the tenant id)."""

    async def record_approval(self, tenant_hash: str, *, at: datetime) -> None:
        """Note an approval ``at`` (the first one's time is kept as well)."""
        ...


class Repositories(Protocol):
    """The repositories together."""

    @property
    def hasher(self) -> Hasher: ...
    @property
    def keys(self) -> Keys: ...
    @property
    def accounts(self) -> Accounts: ...
    @property
    def subscriptions(self) -> Subscriptions: ...
    @property
    def renewals(self) -> RenewalStates: ...
    @property
    def leases(self) -> Leases: ...
    @property
    def token_caches(self) -> TokenCaches: ...
    @property
    def erasures(self) -> ErasureResweeps: ...
    @property
    def connect_flows(self) -> FlowRecords: ...
    @property
    def consent_flows(self) -> FlowRecords: ...
    @property
    def tenants(self) -> TenantApprovals: ...


class GraphSubscriptionApi(Protocol):
    """Graph's ``/subscriptions`` for an account (delegated token)."""

    async def create_subscription(
        self, account_id: str, body: Mapping[str, Any]
    ) -> dict[str, Any]: ...
    async def renew_subscription(
        self, account_id: str, subscription_id: str, expiration: datetime
    ) -> dict[str, Any] | None: ...
    async def delete_subscription(self, account_id: str, subscription_id: str) -> bool: ...
    async def list_subscriptions(self, account_id: str) -> list[dict[str, Any]]: ...


class AccountStatusPublisher(Protocol):
    """Sets an account's status and tells 1Relation (``account.status``)."""

    async def set(self, account_id: str, status: str, reason: str | None = None) -> bool: ...
    async def publish(self, account_id: str) -> None: ...
    async def announce(self, document: dict[str, Any]) -> None: ...


class ResyncRequests(Protocol):
    """Asks the account's shard owner for a delta pass (raises ``PublishError``)."""

    async def request(self, account_id: str, *, full: bool, reason: str) -> None: ...


class AccessTokenCache(Protocol):
    """The process's cache of delegated access tokens."""

    def invalidate(self, account_id: str) -> None: ...


@dataclass(frozen=True)
class SignInSettings:
    """What the connect and consent routes need of the service's settings."""

    #: The service's public base URL (redirect URIs, the browser cookie's ``Secure``).
    public_url: str
    #: The app registration's client id and the identity platform's host.
    client_id: str
    authority_host: str


class SignIn(Protocol):
    """Microsoft's authorization-code flow with PKCE (MSAL), and app-only apps for consent."""

    async def initiate(
        self, *, redirect_uri: str, domain_hint: str | None, tenant: str, prompt: str | None
    ) -> dict[str, Any]:
        """Start a flow (its ``auth_uri`` is where the browser goes); ``ValueError`` when
        the tenant's authority cannot be discovered."""
        ...

    async def redeem(
        self, flow: dict[str, Any], auth_response: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        """Redeem the callback's code: (MSAL result, serialized token cache)."""
        ...

    def build(self, *, tenant: str) -> Any:
        """A confidential-client app for ``tenant`` (blocking)."""
        ...

"""The interfaces collaborators are given (and tests fake), in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from crypto import DataCipher
from handlers.errors import PublishError as PublishError  # noqa: PLC0414  re-export


@dataclass(frozen=True)
class SubscriptionRecord:
    """What the receiver needs to check a notification: all lookups are keyed hashes."""

    subscription_hash: str
    account_id: str
    client_state_hash: str
    tenant_hash: str
    user_hash: str
    expires_at: datetime


@dataclass(frozen=True)
class OutgoingMessage:
    """A message the service publishes: persistent, JSON, with a unique message id."""

    exchange: str
    routing_key: str
    body: Mapping[str, Any]
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    correlation_id: str | None = None
    #: Milliseconds until a retry-queue message dead-letters back (None: no expiry).
    expiration_ms: int | None = None


class Publisher(Protocol):
    """Publishes with broker confirms; returns only once every message is confirmed."""

    async def publish(self, message: OutgoingMessage, *, timeout_s: float) -> None:
        """Publish one message; raises :class:`PublishError` unless it was confirmed and routed."""

    async def publish_many(self, messages: list[OutgoingMessage], *, timeout_s: float) -> None:
        """Publish concurrently; raises :class:`PublishError` unless every one was confirmed."""


class SubscriptionLookup(Protocol):
    """Finds our subscription records by the keyed hash of Graph's subscription id."""

    async def find_subscription(self, subscription_hash: str) -> SubscriptionRecord | None:
        """The record, or None when the subscription is not one of ours."""


class CipherSource(Protocol):
    """Gives the data cipher of an account (unwrapped, cached)."""

    async def cipher_for(self, account_id: str) -> DataCipher:
        """Raise :class:`processor.errors.AccountUnavailable` when the account has no key."""


class AccessTokens(Protocol):
    """Delegated Graph access tokens for accounts, refreshed through MSAL."""

    async def access_token(self, account_id: str) -> str:
        """A valid token; raises ``ReauthorizationRequired`` when the refresh fails for good."""

    def invalidate(self, account_id: str) -> None:
        """Forget a cached access token (Graph answered 401 with it)."""

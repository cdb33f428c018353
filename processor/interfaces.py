"""The interfaces collaborators are given (and tests fake), in one place."""

from __future__ import annotations

from typing import Protocol

from crypto import DataCipher
from handlers.errors import PublishError as PublishError  # noqa: PLC0414  re-export
from handlers.ports import OutgoingMessage as OutgoingMessage  # noqa: PLC0414
from handlers.ports import Publisher as Publisher  # noqa: PLC0414
from handlers.ports import SubscriptionLookup as SubscriptionLookup  # noqa: PLC0414
from handlers.ports import SubscriptionRecord as SubscriptionRecord  # noqa: PLC0414


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

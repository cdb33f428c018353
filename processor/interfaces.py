"""The runtime's own interfaces (the domain's ports are in ``handlers/`` and ``subscriptions/``)."""

from __future__ import annotations

from typing import Protocol

from crypto import DataCipher, KeyCheck


class CipherSource(Protocol):
    """Gives the data cipher of an account (unwrapped, cached)."""

    async def cipher_for(self, account_id: str, *, check: KeyCheck | None = None) -> DataCipher:
        """Raise :class:`handlers.errors.AccountUnavailable` when the account has no key;
        a cached key that does not open ``check`` is replaced by the current one."""


class AccessTokens(Protocol):
    """Delegated Graph access tokens for accounts, refreshed through MSAL."""

    async def access_token(self, account_id: str) -> str:
        """A valid token; raises ``ReauthorizationRequired`` when the refresh fails for good."""

    def invalidate(self, account_id: str) -> None:
        """Forget a cached access token (Graph answered 401 with it)."""

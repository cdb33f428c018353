"""Typed records the sync domain works with."""

from __future__ import annotations

from dataclasses import dataclass

#: Account statuses in which the service makes no Graph calls for the account.
PAUSED_STATUSES = frozenset({"reauthorization_required", "admin_consent_required", "disconnected"})


@dataclass(frozen=True)
class Account:
    """What the handlers need to know of an account (no secrets, nothing decrypted)."""

    account_id: str
    status: str | None
    #: Whether a Microsoft 365 user is bound to the account (it finished connecting).
    bound: bool

    @property
    def paused(self) -> bool:
        """No Graph calls for this account now: paused by its status, or not bound yet."""
        return self.status in PAUSED_STATUSES or not self.bound

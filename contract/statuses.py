"""Account statuses: the closed list 1Relation sees in ``account.status`` (docs/contract.md §2).

Shared by the runtime and both domain packages, which is why it lives with the contract.
"""

from __future__ import annotations

from typing import Final

STATUSES: Final = frozenset(
    {
        "connected",
        "backfilling",
        "reauthorization_required",
        "admin_consent_required",
        "deletions_paused",
        "disconnected",
    }
)

#: Statuses in which the account's Graph calls stop (no sync, no subscription work).
PAUSED_STATUSES: Final = frozenset(
    {"reauthorization_required", "admin_consent_required", "disconnected"}
)

#: What a person can do about each status (the default ``status_reason``).
DEFAULT_REASONS: Final = {
    "connected": "",
    "backfilling": "The calendar is being copied for the first time; this takes a few minutes.",
    "reauthorization_required": (
        "Microsoft no longer accepts the stored sign-in: the user must click "
        "'Connect to Microsoft' again."
    ),
    "admin_consent_required": (
        "An administrator of the user's Microsoft 365 organisation must approve the app "
        "before the user can connect."
    ),
    "deletions_paused": (
        "Microsoft reported far more deletions than usual, so deleting was paused to protect "
        "the data; an operator or a resync releases it."
    ),
    "disconnected": "The account is not connected to Microsoft 365.",
}

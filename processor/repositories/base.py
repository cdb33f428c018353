"""What every repository shares: the schema version, the document type and associated data.

Nothing personal is stored in plaintext (docs/contract.md §4): Microsoft's identifiers are
kept as keyed hashes for lookup and as ciphertext where they are needed back; every
ciphertext's associated data names its collection, account, record and field.

FerretDB (the test database) updates documents by read-modify-write without re-checking
the filter, so no repository relies on an update being atomic against a concurrent writer:
compare-and-swap and locks are built on unique-key inserts, and one account's event writes
are serialized by the shard queues (see :mod:`processor.topology`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ACCOUNT_DATA_COLLECTIONS", "ERASURE_RESWEEPS", "EXPIRING_COLLECTIONS", "Document"]

#: Erased accounts waiting for their second sweep (``ErasureResweeps.resweep_due``).
ERASURE_RESWEEPS = "erasure_resweeps"

Document = dict[str, Any]

#: Collections whose documents of an account are written under its data key (found by
#: ``account_id`` or by ``_id``). An account without a data key cannot read any of them:
#: ``AccountRepository.create`` removes what an erased connection's late writer left there.
#: Not here: the account document, its key, leases and the sign-in flows in progress.
ACCOUNT_DATA_COLLECTIONS: tuple[str, ...] = (
    "events",
    "links",
    "link_index",
    "parked",
    "subscriptions",
    "subscription_state",
    "sync_state",
    "token_caches",
    "token_cache_heads",
)

#: Collections whose documents carry ``expires_at`` and are removed by the sweeper
#: (FerretDB has no TTL indexes). Modules that add such a collection list it here.
EXPIRING_COLLECTIONS: list[str] = [
    "leases",
    "lease_takeovers",
    "events",
    # Connect and consent (processor/repositories/sign_in.py).
    "used_links",
    "connect_flows",
    "consent_flows",
    # Worker heartbeats (processor/repositories/workers.py).
    "workers",
]

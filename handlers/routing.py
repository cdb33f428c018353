"""Where the domain's messages go: 1Relation's exchange, and an account's outbound shard."""

from __future__ import annotations

import hashlib

#: The exchange 1Relation reads the service's announcements and reports from.
ONERELATION_INBOUND = "onerelation.inbound"
#: Validated outbound messages, routed by account shard.
OUTBOUND_EXCHANGE = "m365sync.outbound"


def shard_of(account_id: str, shard_count: int) -> int:
    """The shard an account's messages go to: stable across processes and restarts."""
    digest = hashlib.blake2b(account_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count


def shard_routing_key(account_id: str, shard_count: int) -> str:
    """Routing key of an account's shard (``shard.N``)."""
    return f"shard.{shard_of(account_id, shard_count)}"

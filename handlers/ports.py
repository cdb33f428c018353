"""Ports the sync handlers read through (implemented in ``processor/``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from crypto import DataCipher


class LinkReader(Protocol):
    """What the inbound side reads of the links between 1Relation's events and Graph's."""

    async def indexed_keys(self, account_id: str) -> set[str]:
        """Every link-index key of the account (event keys and create transactions)."""
        ...

    def transaction_key(self, account_id: str, transaction_id: str) -> str:
        """The link-index key of a create's ``transactionId``."""
        ...

    async def doc_for(
        self, account_id: str, event_key: str, transaction_id: str | None = None
    ) -> Mapping[str, Any] | None:
        """The link of a synced event, by event key or by its create's ``transactionId``."""
        ...

    def deleted_by_us(self, doc: Mapping[str, Any] | None, event_key: str) -> bool:
        """Whether the service deleted (or is deleting) this event for 1Relation."""
        ...

    async def echo_of(
        self, account_id: str, event_key: str, event: Mapping[str, Any], cipher: DataCipher
    ) -> tuple[bool, str | None]:
        """Whether ``event`` is the service's own write, and the linked 1Relation id."""
        ...

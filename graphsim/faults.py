"""Switchable fault injection and limits, all reproducible from one seed."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Faults:
    """Every knob is off (or at Graph's documented limit) by default."""

    seed: int = 0
    duplicates: bool = False  # created+updated on create; 1-3 updated per edit
    notify_copies: int = 0  # >0: every change is notified exactly N times
    notify_delay_ms: int = 0  # every change notification leaves N ms after the change
    reorder_ms: int = 0  # random delay up to N ms per notification
    batch_max_items: int = 0  # >0: collect up to N items per POST ...
    batch_window_ms: int = 0  # ... waiting up to M ms for more
    deleted_ghosts: float = 0.0  # probability of a late `updated` after a delete
    throttle_retry_after: str = "1"  # Retry-After value on 429s
    random_503_rate: float = 0.0  # probability of a 503 serviceNotAvailable per request
    random_503_retry_after: str | None = "1"
    random_429_rate: float = 0.0  # probability of a 429 TooManyRequests per request ...
    random_429_retry_after_min_s: float = 1.0  # ... with Retry-After drawn from [min, max]
    random_429_retry_after_max_s: float = 1.0
    random_fault_kinds: str = ""  # comma-separated request kinds the random 429/503 hit
    #                                    ("events.get", ...); empty: every request
    retry_after_grace_ms: int = 50  # arrivals this soon after a throttled answer were sent
    #                                    before the client could have read it: not violations
    latency_ms: int = 0  # added to every Graph request
    write_answer_delay_ms: int = 0  # writes are applied at once, their answer comes late
    delta_replay: float = 0.0  # probability per unchanged item to be replayed in delta
    max_concurrent_per_mailbox: int = 4
    mailbox_budget: int = 10_000  # requests per app+mailbox per budget window
    mailbox_budget_window_s: float = 600.0
    subscription_write_limit: int = 1_000  # POST/PATCH/DELETE per app+tenant per 20 s
    delivery_timeout_s: float = 3.0
    delivery_retry_base_s: float = 1.0
    delivery_retry_cap_s: float = 60.0
    delivery_max_age_s: float = 4 * 3600.0  # sim time before queued items are dropped
    validation_timeout_s: float = 10.0
    foreign_link_origin: str = ""  # nextLink/deltaLink under this origin (e.g. an attacker's)
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rng.seed(self.seed)

    def random_faults_apply(self, kind: str) -> bool:
        """Whether the random 429/503 faults may hit a request of ``kind``."""
        kinds = {k.strip() for k in self.random_fault_kinds.split(",") if k.strip()}
        return not kinds or kind in kinds

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("rng")
        return data

    def update(self, changes: dict[str, Any]) -> None:
        """Set the given knobs (unknown names raise KeyError); reseeds the generator."""
        known = {f.name: f for f in fields(self) if f.name != "rng"}
        for name, value in changes.items():
            if name not in known:
                raise KeyError(name)
            current = getattr(self, name)
            coerced = value
            if isinstance(current, bool):
                coerced = bool(value)
            elif isinstance(current, int):
                coerced = int(value)
            elif isinstance(current, float):
                coerced = float(value)
            elif name.endswith("retry_after") and value is not None:
                coerced = str(value)
            setattr(self, name, coerced)
        self.rng.seed(self.seed)

"""The simulator's clock: real time scaled by a speed factor plus an offset."""

from __future__ import annotations

import datetime as dt
import time


class SimClock:
    """Sim time = anchor + (real elapsed since anchor) * speed + offset; rebased on every change."""

    def __init__(self, speed: float = 1.0) -> None:
        self._anchor_real = time.time()
        self._anchor_sim = self._anchor_real
        self._speed = speed

    @property
    def speed(self) -> float:
        return self._speed

    def now_s(self) -> float:
        """Sim time as POSIX seconds."""
        return self._anchor_sim + (time.time() - self._anchor_real) * self._speed

    def now(self) -> dt.datetime:
        """Sim time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.now_s(), dt.UTC)

    def _rebase(self) -> None:
        sim = self.now_s()
        self._anchor_real = time.time()
        self._anchor_sim = sim

    def advance(self, seconds: float) -> float:
        """Jump sim time forward (or back, if negative) by `seconds`; returns the new sim time."""
        self._rebase()
        self._anchor_sim += seconds
        return self._anchor_sim

    def set_speed(self, speed: float) -> None:
        """Let sim time run at `speed` times real time from now on."""
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self._rebase()
        self._speed = speed

    def sim_to_real_s(self, sim_seconds: float) -> float:
        """Real seconds for `sim_seconds` of sim time to pass (inf when the clock is stopped)."""
        if self._speed == 0:
            return float("inf")
        return sim_seconds / self._speed

    def reset(self) -> None:
        """Back to real time at speed 1."""
        self._anchor_real = time.time()
        self._anchor_sim = self._anchor_real
        self._speed = 1.0

    def snapshot(self) -> dict[str, object]:
        now = self.now()
        return {
            "now": now.isoformat().replace("+00:00", "Z"),
            "now_s": now.timestamp(),
            "speed": self._speed,
            "offset_s": self.now_s() - time.time(),
        }

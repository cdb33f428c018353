"""calendarView delta: snapshot-based rounds, skip/delta tokens, on-demand expiry, replays."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import GraphError
from .faults import Faults
from .store import InstanceKey, Store


@dataclass
class SyncState:
    id: str
    user_id: str
    ws: dt.datetime
    we: dt.datetime
    seq: int
    versions: dict[InstanceKey, str]
    expired: str | None = None


@dataclass
class PageSet:
    id: str
    user_id: str
    entries: list[tuple[str, InstanceKey]]  # ("item" | "removed", key)
    next_state: str
    expired: str | None = None


def _encode(data: dict[str, Any]) -> str:
    return (
        base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode())
        .decode()
        .rstrip("=")
    )


def _decode(token: str) -> dict[str, Any]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeError) as exc:
        raise GraphError(400, "syncStateNotFound", "The sync state is not valid.") from exc
    if not isinstance(data, dict):
        raise GraphError(400, "syncStateNotFound", "The sync state is not valid.")
    return data


class DeltaEngine:
    """Keeps per-round snapshots; a later round diffs the window against the last snapshot."""

    def __init__(self, store: Store, faults: Faults) -> None:
        self.store = store
        self.faults = faults
        self.states: dict[str, SyncState] = {}
        self.pages: dict[str, PageSet] = {}

    def reset(self) -> None:
        self.states.clear()
        self.pages.clear()

    def expire(self, user_id: str | None, mode: str) -> int:
        """Make existing tokens (of one user or all) fail: 'gone' (410) or 'syncStateNotFound'."""
        if mode not in {"gone", "syncStateNotFound"}:
            raise ValueError("mode must be 'gone' or 'syncStateNotFound'")
        count = 0
        for holder in [*self.states.values(), *self.pages.values()]:
            if user_id is None or holder.user_id == user_id:
                holder.expired = mode
                count += 1
        return count

    @staticmethod
    def _fail(mode: str, restart_url: str) -> GraphError:
        if mode == "gone":
            return GraphError(
                410,
                "resyncRequired",
                "The delta token is no longer valid; restart with a full sync.",
                headers={"Location": restart_url},
            )
        return GraphError(
            400,
            "syncStateNotFound",
            "The sync state generation is not found. The delta token expired.",
        )

    def _snapshot(self, user_id: str, ws: dt.datetime, we: dt.datetime) -> SyncState:
        current = self.store.calendar_view(user_id, ws, we)
        state = SyncState(
            id=uuid.uuid4().hex,
            user_id=user_id,
            ws=ws,
            we=we,
            seq=self.store.mailbox(user_id).seq,
            versions={i.ikey: i.version for i in current},
        )
        self.states[state.id] = state
        return state

    def initial(self, user_id: str, ws: dt.datetime, we: dt.datetime) -> PageSet:
        """First round: every instance in the window."""
        state = self._snapshot(user_id, ws, we)
        pages = PageSet(
            id=uuid.uuid4().hex,
            user_id=user_id,
            entries=[("item", k) for k in state.versions],
            next_state=state.id,
        )
        self.pages[pages.id] = pages
        return pages

    def window_of_delta(self, token: str) -> tuple[dt.datetime, dt.datetime]:
        data = _decode(token)
        return dt.datetime.fromisoformat(data["ws"]), dt.datetime.fromisoformat(data["we"])

    def next_round(self, user_id: str, token: str, restart_url: str) -> PageSet:
        """A later round: changed instances in the window plus @removed entries."""
        data = _decode(token)
        old = self.states.get(str(data.get("s")))
        if old is None or old.user_id != user_id:
            raise GraphError(400, "syncStateNotFound", "The sync state generation is not found.")
        if old.expired:
            raise self._fail(old.expired, restart_url)
        new = self._snapshot(user_id, old.ws, old.we)
        entries: list[tuple[str, InstanceKey]] = []
        seen: set[InstanceKey] = set()
        for key, version in new.versions.items():
            replay = bool(self.faults.delta_replay) and (
                self.faults.rng.random() < self.faults.delta_replay
            )
            if old.versions.get(key) != version or replay:
                entries.append(("item", key))
                seen.add(key)
        for key in old.versions:
            if key not in new.versions:
                entries.append(("removed", key))
                seen.add(key)
        box = self.store.mailbox(user_id)
        for seq, touched in box.changelog:
            if seq <= old.seq:
                continue
            for key in touched:
                if key not in seen and key not in new.versions:
                    # As documented: out-of-window changes also arrive as @removed.
                    entries.append(("removed", key))
                    seen.add(key)
        pages = PageSet(id=uuid.uuid4().hex, user_id=user_id, entries=entries, next_state=new.id)
        self.pages[pages.id] = pages
        return pages

    def page_of(self, user_id: str, skiptoken: str, restart_url: str) -> tuple[PageSet, int]:
        data = _decode(skiptoken)
        pages = self.pages.get(str(data.get("p")))
        if pages is None or pages.user_id != user_id:
            raise GraphError(400, "syncStateNotFound", "The sync state generation is not found.")
        if pages.expired:
            raise self._fail(pages.expired, restart_url)
        return pages, int(data.get("o", 0))

    def skiptoken(self, pages: PageSet, offset: int) -> str:
        return _encode({"p": pages.id, "o": offset})

    def deltatoken(self, pages: PageSet) -> str:
        state = self.states[pages.next_state]
        return _encode({"s": state.id, "ws": state.ws.isoformat(), "we": state.we.isoformat()})

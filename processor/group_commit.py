"""Group commit for the receiver: the items of concurrent POSTs share confirmed publishes.

A confirmed persistent publish costs the broker and the receiver far more than the few
hundred bytes of one notification. :class:`GroupCommitter` gathers the change messages that
concurrent requests submit for a short window (or until ``max_items``), publishes one
message per shard queue carrying all of them, and lets each submitter return only once every
message holding one of its items was confirmed. A submitter whose items went into a publish
that failed gets :class:`PublishError`, so its POST is answered 503 and Graph retries:
nothing acknowledged is lost (docs/design.md "What must always hold" 1).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from handlers.errors import PublishError
from handlers.ports import OutgoingMessage, Publisher
from processor.logs import get_logger
from processor.messages import changes_message
from processor.topology import INBOUND_EXCHANGE

__all__ = ["DEFAULT_MAX_ITEMS", "DEFAULT_WINDOW_S", "GroupCommitter"]

log = get_logger(__name__)

#: How long the first item of a group waits for company before the group is published.
DEFAULT_WINDOW_S: Final = 0.001
#: A group is published at once when it holds this many items; also the most items one
#: message carries (a larger group is split into several messages per shard).
DEFAULT_MAX_ITEMS: Final = 100

_Result = BaseException | None


@dataclass
class _Group:
    """Messages waiting for the next flush, by exchange and routing key."""

    by_key: dict[tuple[str, str], list[OutgoingMessage]] = field(default_factory=dict)
    alone: list[OutgoingMessage] = field(default_factory=list)
    items: int = 0
    timeout_s: float = 0.0
    #: One future per key (and per message sent alone), resolved with the publish's error.
    done: dict[object, asyncio.Future[_Result]] = field(default_factory=dict)


def _groupable(message: OutgoingMessage) -> bool:
    return message.exchange == INBOUND_EXCHANGE and message.body.get("kind") == "change"


class GroupCommitter:
    """A :class:`Publisher` that group-commits inbound change messages (one per shard).

    Messages that are not inbound changes (lifecycle, resync) are published as they are,
    in the same flush.
    """

    def __init__(
        self,
        *,
        publisher: Publisher,
        window_s: float = DEFAULT_WINDOW_S,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self._publisher = publisher
        self._window_s = window_s
        self._max_items = max(1, max_items)
        self._group: _Group | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def publish(self, message: OutgoingMessage, *, timeout_s: float) -> None:
        """Publish one message with the next group; raises :class:`PublishError` on failure."""
        await self.publish_many([message], timeout_s=timeout_s)

    async def publish_many(self, messages: list[OutgoingMessage], *, timeout_s: float) -> None:
        """Join the next group; return once every message of ours in it was confirmed."""
        if not messages:
            return
        loop = asyncio.get_running_loop()
        group = self._group
        if group is None:
            group = self._group = _Group(timeout_s=timeout_s)
            self._timer = loop.call_later(self._window_s, self._flush)
        group.timeout_s = max(group.timeout_s, timeout_s)
        waits: dict[object, asyncio.Future[_Result]] = {}
        for message in messages:
            if _groupable(message):
                key: object = (message.exchange, message.routing_key)
                group.by_key.setdefault((message.exchange, message.routing_key), []).append(message)
            else:
                key = ("alone", id(message))  # kept alive by group.alone until the flush
                group.alone.append(message)
            if key not in group.done:
                group.done[key] = loop.create_future()
            waits[key] = group.done[key]
        group.items += len(messages)
        if group.items >= self._max_items:
            self._flush()
        # asyncio.wait, not await: a cancelled POST must not cancel the futures others share.
        await asyncio.wait(waits.values())
        failures = [r for f in waits.values() if (r := f.result()) is not None]
        if failures:
            raise PublishError(f"{len(failures)} of {len(waits)} group publishes failed") from (
                failures[0]
            )

    def _flush(self) -> None:
        group, self._group = self._group, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if group is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish(group))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _publish(self, group: _Group) -> None:
        jobs: list[tuple[object, OutgoingMessage]] = []
        for key, messages in group.by_key.items():
            for start in range(0, len(messages), self._max_items):
                jobs.append((key, self._merge(messages[start : start + self._max_items])))
        jobs += [(("alone", id(message)), message) for message in group.alone]
        results = await asyncio.gather(
            *(self._publisher.publish(message, timeout_s=group.timeout_s) for _, message in jobs),
            return_exceptions=True,
        )
        for (job_key, _), result in zip(jobs, results, strict=True):
            future = group.done[job_key]
            if isinstance(result, BaseException) and not future.done():
                future.set_result(
                    result if isinstance(result, Exception) else PublishError(repr(result))
                )
        for future in group.done.values():
            if not future.done():
                future.set_result(None)

    @staticmethod
    def _merge(messages: Sequence[OutgoingMessage]) -> OutgoingMessage:
        if len(messages) == 1:
            return messages[0]
        first = messages[0]
        return OutgoingMessage(
            exchange=first.exchange,
            routing_key=first.routing_key,
            body=changes_message([m.body for m in messages]),
            message_id=uuid.uuid4().hex,
            correlation_id=first.correlation_id,
        )

    async def drain(self, *, timeout_s: float) -> None:
        """Publish what is waiting and wait up to ``timeout_s`` for the flushes (shutdown)."""
        self._flush()
        if self._flushes:
            await asyncio.wait(self._flushes, timeout=timeout_s)

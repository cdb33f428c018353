"""The e2e harness's teardown is bounded: a part that hangs is cancelled, the rest closes."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from tests.e2e import harness


async def test_a_hanging_part_is_cancelled_and_the_parts_after_it_still_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(harness, "TEARDOWN_S", 0.2)
    closed: list[str] = []
    stack = AsyncExitStack()

    async def first_entered() -> None:  # closes last
        closed.append("first")

    async def hangs() -> None:
        await asyncio.Event().wait()

    stack.push_async_callback(first_entered)
    stack.push_async_callback(hangs)
    with pytest.raises(AssertionError, match=r"did not stop within 0\.2 s"):
        await harness._bounded_close(stack)
    assert closed == ["first"]


async def test_a_stack_that_stops_in_time_closes_quietly() -> None:
    closed: list[str] = []
    stack = AsyncExitStack()

    async def part() -> None:
        closed.append("part")

    stack.push_async_callback(part)
    await harness._bounded_close(stack)
    assert closed == ["part"]

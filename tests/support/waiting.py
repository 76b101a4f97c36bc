"""Waiting on a condition that has no event of its own (state owned by code under test)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL = 0.01  # 10 ms: fine-grained enough for latency-sensitive tests, cheap on the CPU


async def eventually(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Return once ``predicate()`` is truthy; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await asyncio.sleep(POLL)

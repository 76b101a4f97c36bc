"""Waiting on a condition that has no event of its own (state owned by code under test)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from drivers.modbus.pdu import READ_DISCRETE_INPUTS

if TYPE_CHECKING:
    from simulators.alarm_box import AlarmBoxSimulator

POLL = 0.01  # 10 ms: fine-grained enough for latency-sensitive tests, cheap on the CPU


async def eventually(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Return once ``predicate()`` is truthy; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await asyncio.sleep(POLL)


async def press_held(box: AlarmBoxSimulator, zone: int, reads: int = 4, timeout: float = 10.0) -> None:
    """Press ``zone`` like a finger on the button: held until the gateway has read the inputs
    ``reads`` more times (debounce and confirmation), then released. Counting the box's
    requests, not sleeping, so a slow gateway on a loaded box still sees the press."""
    before = box.requests(function_code=READ_DISCRETE_INPUTS)
    await box.press(zone)
    try:
        await eventually(lambda: box.requests(function_code=READ_DISCRETE_INPUTS) >= before + reads, timeout)
    finally:
        await box.release(zone)

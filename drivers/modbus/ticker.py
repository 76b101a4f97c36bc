"""The poll grid of a device loop."""

from __future__ import annotations

import asyncio


class Ticker:
    """Poll deadlines on a monotonic grid: a poll's own duration never shifts the next one
    (no drift), and two polls never start closer than ``interval``.

    An overrun (a poll longer than the interval) starts the next poll at once and
    re-anchors the grid there, rather than bursting to catch up; a late wake-up
    moves the grid by that lateness.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._due: float | None = None
        self._last = 0.0

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._due is None:
            due = now
        else:
            due = max(self._due, self._last + self.interval)
            if now < due:
                await asyncio.sleep(due - now)
            else:
                due = now
        self._last = loop.time()
        self._due = due + self.interval

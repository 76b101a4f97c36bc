"""Small task helpers that keep cancellation honest."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any], timeout: float | None = None) -> None:
    """Cancel ``tasks`` and wait for them to finish, without swallowing our own cancellation.

    ``asyncio.wait`` never raises a child's CancelledError, so a CancelledError that
    escapes here is ours (the caller was cancelled) and propagates as it should.
    """
    live = [t for t in tasks if not t.done()]
    for t in live:
        t.cancel()
    if live:
        await asyncio.wait(live, timeout=timeout)


def consume_outcome(fut: asyncio.Future[Any]) -> None:
    """A done-callback for fire-and-forget futures (a QoS 0 publish, a background settle):
    reads the outcome so a failure is never reported as "exception was never retrieved"."""
    if not fut.cancelled():
        fut.exception()

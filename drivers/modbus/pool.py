"""Hubs shared across driver families: an alarm box and a bollard controller behind one
serial server (or on one RS-485 line) must go through one hub, or their frames collide.

``shared_hub`` hands every caller entering it for the same link the same hub; the
hub opens with the first and closes with the last. Per event loop, so tests that
run many loops never share.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

from drivers.modbus.hub import ModbusHub
from drivers.modbus.links import Link
from gateway.backoff import Backoff


@dataclass
class _Entry:
    hub: ModbusHub
    users: int = 0


_POOLS: dict[asyncio.AbstractEventLoop, dict[Hashable, _Entry]] = {}


@contextlib.asynccontextmanager
async def shared_hub(link: Link, *, timeout: float, reconnect_max: float) -> AsyncIterator[ModbusHub]:
    """The hub of ``link``. The shortest ``timeout`` and ``reconnect_max`` of its users win:
    each unit has its own per-request timeout anyway; the link's backoff serves its most
    demanding device."""
    loop = asyncio.get_running_loop()
    pool = _POOLS.setdefault(loop, {})
    entry = pool.get(link.key)
    if entry is None:
        hub = ModbusHub(link, timeout=timeout, backoff=Backoff(cap=reconnect_max))
        await hub.__aenter__()
        entry = pool[link.key] = _Entry(hub)
    else:
        entry.hub.timeout = min(entry.hub.timeout, timeout)
        entry.hub.limit_backoff(reconnect_max)
    entry.users += 1
    try:
        yield entry.hub
    finally:
        entry.users -= 1
        if entry.users == 0:
            del pool[link.key]
            if not pool:
                del _POOLS[loop]
            await entry.hub.__aexit__(None, None, None)

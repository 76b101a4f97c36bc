"""What the Modbus driver families share: one hub per link, taken from the shared pool
when the family is entered and given back when it exits."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType

from drivers.modbus.config import ModbusDeviceConfig
from drivers.modbus.hub import ModbusHub
from drivers.modbus.pool import shared_hub
from drivers.modbus.unit import UnitClient
from gateway.driver import DeviceConfig, DriverContext, DriverFamily


class FamilyHubs:
    """The hubs one family opens on ``stack``: one per link, on its first device there."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self.by_link: dict[Hashable, ModbusHub] = {}
        self._stack = stack

    async def unit(self, cfg: ModbusDeviceConfig, peers: Sequence[ModbusDeviceConfig] = ()) -> UnitClient:
        """``cfg``'s unit on the hub of its link. A hub this family has not opened yet takes
        the shortest timeout and reconnect_max of ``cfg`` and those ``peers`` on its link."""
        key = cfg.link.key
        hub = self.by_link.get(key)
        if hub is None:
            on_link = [cfg, *(c for c in peers if c.link.key == key)]
            hub = self.by_link[key] = await self._stack.enter_async_context(
                shared_hub(
                    cfg.link,
                    timeout=min(c.timeout for c in on_link),
                    reconnect_max=min(c.reconnect_max for c in on_link),
                )
            )
        return hub.unit(cfg.unit, device_id=cfg.id, timeout=cfg.timeout)


class ModbusFamily(DriverFamily):
    """A Modbus driver family: the hubs opened in :meth:`opening` stay open until it exits."""

    def __init__(self, devices: Sequence[DeviceConfig], ctx: DriverContext) -> None:
        super().__init__(devices, ctx)
        self.hubs: dict[Hashable, ModbusHub] = {}
        self._stack: AsyncExitStack | None = None

    @contextlib.asynccontextmanager
    async def opening(self) -> AsyncIterator[FamilyHubs]:
        """For ``__aenter__``: the hubs opened in the block are kept if it ends well, closed if it fails."""
        async with AsyncExitStack() as stack:
            hubs = FamilyHubs(stack)
            yield hubs
            self._stack = stack.pop_all()
        self.hubs = hubs.by_link

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None

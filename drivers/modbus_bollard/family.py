"""The modbus_bollard driver family: every bollard controller, on hubs shared per link."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import ClassVar, Self

from drivers.modbus.hub import ModbusHub
from drivers.modbus.pool import shared_hub
from drivers.modbus_bollard.config import BollardConfig
from drivers.modbus_bollard.driver import BollardDriver
from drivers.modbus_bollard.profile import load_profile
from gateway.driver import DeviceConfig, DriverContext, DriverFamily
from gateway.errors import ConfigError
from gateway.events import DeviceKind


class BollardFamily(DriverFamily):
    """All bollards of the gateway; grouped into gates by their ``gate`` field."""

    name: ClassVar[str] = "modbus_bollard"
    kind: ClassVar[DeviceKind] = DeviceKind.BOLLARD
    device_model: ClassVar[type[DeviceConfig]] = BollardConfig

    def __init__(self, devices: Sequence[DeviceConfig], ctx: DriverContext) -> None:
        super().__init__(devices, ctx)
        self.configs = [_own(d) for d in devices]
        self._drivers: list[BollardDriver] = []
        self._stack: AsyncExitStack | None = None

    @classmethod
    def check(cls, devices: Sequence[DeviceConfig], ctx: DriverContext) -> list[tuple[int, str, str]]:
        """Unknown or invalid profiles; two bollards with one unit id on one link."""
        issues: list[tuple[int, str, str]] = []
        units: dict[tuple[Hashable, int], int] = {}
        for i, dev in enumerate(devices):
            cfg = _own(dev)
            try:
                load_profile(cfg.profile, ctx.profile_dirs)
            except ConfigError as exc:
                issues.append((i, "profile", exc.render().replace("\n", "; ")))
            key = (cfg.link.key, cfg.unit)
            if key in units:
                issues.append(
                    (i, "unit", f"unit {cfg.unit} on {cfg.link.label} is also devices[{units[key]}]")
                )
            units.setdefault(key, i)
        return issues

    @property
    def drivers(self) -> Sequence[BollardDriver]:
        return self._drivers

    async def __aenter__(self) -> Self:
        drivers: list[BollardDriver] = []
        async with AsyncExitStack() as stack:
            hubs: dict[Hashable, ModbusHub] = {}
            for cfg in self.configs:
                profile = load_profile(cfg.profile, self.ctx.profile_dirs)
                hub = hubs.get(cfg.link.key)
                if hub is None:
                    hub = hubs[cfg.link.key] = await stack.enter_async_context(
                        shared_hub(cfg.link, timeout=cfg.timeout, reconnect_max=cfg.reconnect_max)
                    )
                unit = hub.unit(cfg.unit, device_id=cfg.id, timeout=cfg.timeout)
                drivers.append(BollardDriver(cfg, profile, unit))
            self._stack = stack.pop_all()
        self._drivers = drivers
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None


def _own(dev: DeviceConfig) -> BollardConfig:
    if not isinstance(dev, BollardConfig):
        raise TypeError(f"{dev.id}: not a BollardConfig but {type(dev).__name__}")
    return dev

"""The modbus_bollard driver family: every bollard controller, on hubs shared per link."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Self

from drivers.modbus.family import ModbusFamily
from drivers.modbus_bollard.config import BollardConfig
from drivers.modbus_bollard.driver import BollardDriver
from drivers.modbus_bollard.profile import load_profile
from gateway.driver import DeviceConfig, DriverContext
from gateway.errors import ConfigError
from gateway.events import DeviceKind


class BollardFamily(ModbusFamily):
    """All bollards of the gateway; grouped into gates by their ``gate`` field."""

    name: ClassVar[str] = "modbus_bollard"
    kind: ClassVar[DeviceKind] = DeviceKind.BOLLARD
    device_model: ClassVar[type[DeviceConfig]] = BollardConfig

    def __init__(self, devices: Sequence[DeviceConfig], ctx: DriverContext) -> None:
        super().__init__(devices, ctx)
        self.configs = self.own_configs(BollardConfig, devices)
        self._drivers: list[BollardDriver] = []

    @classmethod
    def check(cls, devices: Sequence[DeviceConfig], ctx: DriverContext) -> list[tuple[int, str, str]]:
        """Unknown or invalid profiles; two bollards with one unit id on one link."""
        issues: list[tuple[int, str, str]] = []
        configs = cls.own_configs(BollardConfig, devices)
        again = cls.repeats((cfg.link.key, cfg.unit) for cfg in configs)
        for i, cfg in enumerate(configs):
            try:
                load_profile(cfg.profile, ctx.profile_dirs)
            except ConfigError as exc:
                issues.append((i, "profile", exc.render().replace("\n", "; ")))
            if i in again:
                issues.append((i, "unit", f"unit {cfg.unit} on {cfg.link.label} is also devices[{again[i]}]"))
        return issues

    @property
    def drivers(self) -> Sequence[BollardDriver]:
        return self._drivers

    async def __aenter__(self) -> Self:
        drivers: list[BollardDriver] = []
        async with self.opening() as hubs:
            for cfg in self.configs:
                profile = load_profile(cfg.profile, self.ctx.profile_dirs)
                # No peers: a link's hub takes the timing of its first bollard (as it always has).
                unit = await hubs.unit(cfg, peers=self.configs)  # a hub serves its most demanding device
                drivers.append(BollardDriver(cfg, profile, unit))
        self._drivers = drivers
        return self

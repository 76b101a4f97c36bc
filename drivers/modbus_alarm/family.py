"""The modbus_alarm driver family: every configured alarm box, one hub per physical link."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import ClassVar, Self

from drivers.modbus.family import ModbusFamily
from drivers.modbus_alarm.config import AlarmBoxConfig
from drivers.modbus_alarm.driver import AlarmBoxDriver
from drivers.modbus_alarm.latches import LatchStore
from drivers.modbus_alarm.profile import load_profile
from gateway.driver import DeviceConfig, DriverContext
from gateway.errors import ConfigError
from gateway.events import DeviceKind


class AlarmBoxFamily(ModbusFamily):
    """All alarm boxes of the gateway. Devices on one link share its hub; links are independent."""

    name: ClassVar[str] = "modbus_alarm"
    kind: ClassVar[DeviceKind] = DeviceKind.ALARM_BOX
    device_model: ClassVar[type[DeviceConfig]] = AlarmBoxConfig

    def __init__(self, devices: Sequence[DeviceConfig], ctx: DriverContext) -> None:
        super().__init__(devices, ctx)
        self.configs = self.own_configs(AlarmBoxConfig, devices)
        self._drivers: list[AlarmBoxDriver] = []

    @classmethod
    def check(cls, devices: Sequence[DeviceConfig], ctx: DriverContext) -> list[tuple[int, str, str]]:
        """Unknown or invalid profiles, zone overrides naming inputs the profile lacks,
        two boxes with the same unit id on one link, one serial port with two settings."""
        issues: list[tuple[int, str, str]] = []
        serial: dict[Hashable, tuple[int, AlarmBoxConfig]] = {}
        configs = cls.own_configs(AlarmBoxConfig, devices)
        again = cls.repeats((cfg.link.key, cfg.unit) for cfg in configs)
        for i, cfg in enumerate(configs):
            issues += _profile_issues(i, cfg, ctx)
            if i in again:
                j = again[i]
                issues.append(
                    (i, "unit", f"unit {cfg.unit} on {cfg.link.label} is also devices[{j}] of this family")
                )
            if cfg.transport == "rtu":
                first = serial.setdefault(cfg.link.key, (i, cfg))
                if first[1].link != cfg.link:
                    issues.append(
                        (
                            i,
                            "serial_port",
                            f"{cfg.serial_port} has other line settings in devices[{first[0]}]",
                        )
                    )
        return issues

    @property
    def drivers(self) -> Sequence[AlarmBoxDriver]:
        return self._drivers

    async def __aenter__(self) -> Self:
        """Load profiles, open one hub per link and build one driver per box."""
        drivers: list[AlarmBoxDriver] = []
        async with self.opening() as hubs:
            for cfg in self.configs:
                profile = load_profile(cfg.profile, self.ctx.profile_dirs)
                unit = await hubs.unit(cfg, peers=self.configs)  # a hub serves its most demanding box
                latches = LatchStore(self.ctx.state_dir, cfg.id)
                drivers.append(AlarmBoxDriver(cfg, profile, unit, latches))
        self._drivers = drivers
        return self

    def driver(self, device_id: str) -> AlarmBoxDriver:
        """The driver of one box, for command handling (reset, set_output)."""
        for d in self._drivers:
            if d.device.id == device_id:
                return d
        raise KeyError(device_id)


def _profile_issues(i: int, cfg: AlarmBoxConfig, ctx: DriverContext) -> list[tuple[int, str, str]]:
    try:
        profile = load_profile(cfg.profile, ctx.profile_dirs)
    except ConfigError as exc:
        return [(i, "profile", exc.render().replace("\n", "; "))]
    zoned = {z.input for z in profile.zones}
    issues = []
    for n, override in cfg.zones.items():
        if n >= profile.inputs.count:
            issues.append(
                (i, f"zones.{n}", f"profile {cfg.profile!r} has inputs 0..{profile.inputs.count - 1}")
            )
        elif n not in zoned and override.type is None:
            issues.append((i, f"zones.{n}", f"input {n} is not a zone in {cfg.profile!r}; give it a 'type'"))
    return issues

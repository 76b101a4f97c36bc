"""The modbus_alarm driver family: every configured alarm box, one hub per physical link."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import ClassVar, Self

from drivers.modbus.hub import ModbusHub
from drivers.modbus.pool import shared_hub
from drivers.modbus_alarm.config import AlarmBoxConfig
from drivers.modbus_alarm.driver import AlarmBoxDriver
from drivers.modbus_alarm.latches import LatchStore
from drivers.modbus_alarm.profile import load_profile
from gateway.driver import DeviceConfig, DriverContext, DriverFamily
from gateway.errors import ConfigError
from gateway.events import DeviceKind


class AlarmBoxFamily(DriverFamily):
    """All alarm boxes of the gateway. Devices on one link share its hub; links are independent."""

    name: ClassVar[str] = "modbus_alarm"
    kind: ClassVar[DeviceKind] = DeviceKind.ALARM_BOX
    device_model: ClassVar[type[DeviceConfig]] = AlarmBoxConfig

    def __init__(self, devices: Sequence[DeviceConfig], ctx: DriverContext) -> None:
        super().__init__(devices, ctx)
        self.configs = [_own(d) for d in devices]
        self.hubs: dict[Hashable, ModbusHub] = {}
        self._drivers: list[AlarmBoxDriver] = []
        self._stack: AsyncExitStack | None = None

    @classmethod
    def check(cls, devices: Sequence[DeviceConfig], ctx: DriverContext) -> list[tuple[int, str, str]]:
        """Unknown or invalid profiles, zone overrides naming inputs the profile lacks,
        two boxes with the same unit id on one link, one serial port with two settings."""
        issues: list[tuple[int, str, str]] = []
        units: dict[tuple[Hashable, int], int] = {}
        serial: dict[Hashable, tuple[int, AlarmBoxConfig]] = {}
        for i, dev in enumerate(devices):
            cfg = _own(dev)
            issues += _profile_issues(i, cfg, ctx)
            key = (cfg.link.key, cfg.unit)
            if key in units:
                j = units[key]
                issues.append(
                    (i, "unit", f"unit {cfg.unit} on {cfg.link.label} is also devices[{j}] of this family")
                )
            units.setdefault(key, i)
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
        hubs: dict[Hashable, ModbusHub] = {}
        drivers: list[AlarmBoxDriver] = []
        async with AsyncExitStack() as stack:
            for cfg in self.configs:
                profile = load_profile(cfg.profile, self.ctx.profile_dirs)
                hub = hubs.get(cfg.link.key)
                if hub is None:
                    on_link = [c for c in self.configs if c.link.key == cfg.link.key]
                    hub = hubs[cfg.link.key] = await stack.enter_async_context(
                        shared_hub(
                            cfg.link,
                            timeout=min(c.timeout for c in on_link),
                            reconnect_max=min(c.reconnect_max for c in on_link),
                        )
                    )
                unit = hub.unit(cfg.unit, device_id=cfg.id, timeout=cfg.timeout)
                latches = LatchStore(self.ctx.state_dir, cfg.id)
                drivers.append(AlarmBoxDriver(cfg, profile, unit, latches))
            self._stack = stack.pop_all()
        self.hubs, self._drivers = hubs, drivers
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

    def driver(self, device_id: str) -> AlarmBoxDriver:
        """The driver of one box, for command handling (reset, set_output)."""
        for d in self._drivers:
            if d.device.id == device_id:
                return d
        raise KeyError(device_id)


def _own(dev: DeviceConfig) -> AlarmBoxConfig:
    if not isinstance(dev, AlarmBoxConfig):
        raise TypeError(f"{dev.id}: not an AlarmBoxConfig but {type(dev).__name__}")
    return dev


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

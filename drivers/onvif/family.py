"""The onvif_camera driver family: every configured camera, each on sessions of its own."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import ClassVar

from drivers.onvif.config import CameraConfig
from drivers.onvif.driver import CameraDriver
from drivers.onvif.video import VideoChecker
from gateway.driver import DeviceConfig, DriverContext, DriverFamily
from gateway.events import DeviceKind


class CameraFamily(DriverFamily):
    name: ClassVar[str] = "onvif_camera"
    kind: ClassVar[DeviceKind] = DeviceKind.CAMERA
    device_model: ClassVar[type[DeviceConfig]] = CameraConfig

    def __init__(self, devices: Sequence[DeviceConfig], ctx: DriverContext) -> None:
        super().__init__(devices, ctx)
        self.configs = self.own_configs(CameraConfig, devices)
        self._drivers: list[CameraDriver] = []
        self._checker: VideoChecker | None = None

    @classmethod
    def check(cls, devices: Sequence[DeviceConfig], ctx: DriverContext) -> list[tuple[int, str, str]]:
        """Password files that do not exist; two cameras at one address."""
        issues: list[tuple[int, str, str]] = []
        configs = cls.own_configs(CameraConfig, devices)
        again = cls.repeats((cfg.host.lower(), cfg.port) for cfg in configs)
        for i, cfg in enumerate(configs):
            if cfg.password_file is not None and not cfg.password_file.is_file():
                issues.append((i, "password_file", f"no such file: {cfg.password_file}"))
            if i in again:
                issues.append(
                    (i, "host", f"{cfg.host}:{cfg.port} is also devices[{again[i]}] of this family")
                )
        return issues

    @property
    def drivers(self) -> Sequence[CameraDriver]:
        return self._drivers

    async def __aenter__(self) -> CameraFamily:
        """One shared video checker (a small thread pool) if any camera has video checks."""
        if any(c.video for c in self.configs):
            checker = VideoChecker()
            await checker.__aenter__()  # loads OpenCV: a clear error if the extra is missing
            self._checker = checker
        drivers = []
        for cfg in self.configs:
            password = cfg.read_password()
            secret = password.get_secret_value() if password else None
            drivers.append(CameraDriver(cfg, secret, self._checker if cfg.video else None))
        self._drivers = drivers
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._checker is not None:
            await self._checker.__aexit__(exc_type, exc, tb)
            self._checker = None

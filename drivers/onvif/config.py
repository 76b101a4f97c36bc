"""Configuration of one ONVIF camera (``devices:`` entry with ``driver: onvif_camera``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from drivers.onvif.video import VideoCheckConfig
from gateway.driver import ID_PATTERN, DeviceConfig

_EVIDENCE = re.compile(ID_PATTERN.removesuffix("$") + r"(:\d{1,4})?$")


class CameraConfig(DeviceConfig):
    """One ONVIF camera. Unknown keys are rejected; the password is read from a file."""

    driver: Literal["onvif_camera"] = Field(description="driver family name")
    host: str = Field(min_length=1, description="the camera's address")
    port: int = Field(default=80, ge=1, le=65535, description="its ONVIF (HTTP) port")
    username: str = Field(default="admin", min_length=1)
    password_file: Path | None = Field(
        default=None, description="file holding the password (never the config)"
    )
    profile: str | None = Field(default=None, description="media profile token; default: the camera's first")
    events: bool = Field(default=True, description="subscribe to the camera's events (pull-point)")
    # 600 s subscriptions (PT600S), renewed at half their life: a camera that reboots loses
    # them, and one that is never renewed cleans up after 10 minutes on its own. Down to
    # 10 s for tests and demos (a renew every 5 s).
    subscription_seconds: int = Field(default=600, ge=10, le=86400)
    # 5 s long poll: an event arrives as soon as the camera has it; a silent camera costs
    # one request every 5 s, and a dead connection is noticed within seconds.
    pull_timeout: float = Field(default=5.0, ge=1, le=60)
    # 30 s health check (GetSystemDateAndTime, no auth): the camera's clock offset and its
    # presence; with 'offline_after' 2, a dead camera is reported within about a minute.
    health_interval: float = Field(default=30.0, ge=5, le=3600)
    offline_after: int = Field(default=2, ge=1, le=100)
    # 5 s per request: a LAN camera answers in milliseconds, a busy cheap one in a second.
    timeout: float = Field(default=5.0, gt=0, le=60)
    # Reconnects back off up to 60 s: cheap cameras crash when hammered after a reboot.
    reconnect_max: float = Field(default=60.0, ge=1, le=3600)
    video: VideoCheckConfig | None = Field(
        default=None,
        description="video checks on snapshots (black / frozen / blocked / defocused, optional motion); "
        "needs the 'video' extra (OpenCV)",
    )
    evidence_for: tuple[str, ...] = Field(
        default=(),
        description="alarms whose snapshot this camera takes: a device id, or DEVICE:ZONE",
    )

    @field_validator("evidence_for")
    @classmethod
    def _evidence(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if not _EVIDENCE.match(item):
                raise ValueError(f"{item!r}: a device id, or a device id and a zone number as DEVICE:ZONE")
        return v

    def read_password(self) -> SecretStr | None:
        if self.password_file is None:
            return None
        return SecretStr(self.password_file.read_text(encoding="utf-8").strip())

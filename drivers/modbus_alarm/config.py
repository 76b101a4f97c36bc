"""Configuration of one alarm box (one entry under ``devices:`` with ``driver: modbus_alarm``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.modbus.config import ModbusDeviceConfig
from drivers.modbus.profiles import NAME_PATTERN
from drivers.modbus_alarm.zones import ZoneType


class ZoneOverride(BaseModel):
    """Site-specific facts about one input, over what the profile says."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(default=None, description="e.g. 'Gate guard room button'")
    location: str | None = Field(default=None, description="where the input's device is, e.g. 'north gate'")
    type: ZoneType | None = Field(
        default=None, description="zone type for this input, replacing the profile's"
    )


class AlarmBoxConfig(ModbusDeviceConfig):
    """One Modbus alarm box or I/O module. Unknown keys are rejected."""

    driver: Literal["modbus_alarm"] = Field(description="driver family name")
    profile: str = Field(
        pattern=NAME_PATTERN, description="profile name, e.g. generic-8di (file generic-8di.yaml)"
    )
    debounce_samples: int | None = Field(
        default=None, ge=1, le=50, description="override the profile: consecutive equal samples to accept"
    )
    debounce_ms: int | None = Field(
        default=None, ge=0, le=10000, description="override the profile: accept a value unchanged this long"
    )
    zones: dict[int, ZoneOverride] = Field(
        default_factory=dict, description="per-input overrides, keyed by input index"
    )

    # 30 s: the box's ack LED tells the person who pressed that the center has the alarm;
    # long enough to be seen on the way back to the button, short of looking stuck.
    ack_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="how long alarm.ack lights the ack_led output"
    )

    @model_validator(mode="after")
    def _debounce(self) -> Self:
        if self.debounce_samples is not None and self.debounce_ms is not None:
            raise ValueError("give debounce_samples or debounce_ms, not both")
        return self

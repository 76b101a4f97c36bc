"""Configuration of one bollard controller (``devices:`` entry with ``driver: modbus_bollard``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drivers.modbus.config import ModbusDeviceConfig
from drivers.modbus.profiles import NAME_PATTERN
from gateway.driver import ID_PATTERN


class BollardConfig(ModbusDeviceConfig):
    """One bollard (one controller unit id). Unknown keys are rejected."""

    driver: Literal["modbus_bollard"] = Field(description="driver family name")
    profile: str = Field(
        default="generic-bollard-plc", pattern=NAME_PATTERN, description="profile name (file NAME.yaml)"
    )
    gate: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="the gate this bollard guards: a command to target 'gate:NAME' moves all of them",
    )

"""Bollard-controller profiles: where a PLC keeps its command, status and presence, what its
codes mean and how long its travel takes. A second vendor is a second YAML file."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.modbus.profiles import issues, load
from gateway.errors import ConfigError


class BollardState(enum.StrEnum):
    LOWERED = "lowered"
    RAISING = "raising"
    RAISED = "raised"
    LOWERING = "lowering"
    STOPPED = "stopped"  # between the ends, not moving
    FAULT = "fault"
    MANUAL = "manual"  # the controller reports local/manual operation as its state
    EMERGENCY = "emergency"  # emergency fast rise in progress
    UNKNOWN = "unknown"  # a code the profile does not list


class Mode(enum.StrEnum):
    REMOTE = "remote"
    LOCAL = "local"


class Action(enum.StrEnum):
    LOWER = "lower"
    RAISE = "raise"
    EMERGENCY_RAISE = "emergency_raise"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CommandRegister(_Model):
    table: Literal["holding_registers"] = "holding_registers"
    address: int = Field(ge=0, le=65535)
    values: dict[Action, int] = Field(description="the value written for each action")

    @model_validator(mode="after")
    def _all_actions(self) -> CommandRegister:
        missing = [a.value for a in Action if a not in self.values]
        if missing:
            raise ValueError(f"values for {missing} missing")
        if len(set(self.values.values())) != len(self.values):
            raise ValueError("two actions share a value")
        return self


class StatusBlock(_Model):
    """One contiguous register range read per poll; the fields are indices into it."""

    table: Literal["input_registers", "holding_registers"] = "input_registers"
    address: int = Field(ge=0, le=65535)
    count: int = Field(ge=1, le=125)
    state: int = Field(ge=0)
    fault: int | None = Field(default=None, ge=0)
    pressure: int | None = Field(default=None, ge=0)
    position: int | None = Field(default=None, ge=0)
    mode: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _inside(self) -> StatusBlock:
        for name in ("state", "fault", "pressure", "position", "mode"):
            index = getattr(self, name)
            if index is not None and index >= self.count:
                raise ValueError(f"{name}: register {index} outside the block (count {self.count})")
        return self


class PresenceBlock(_Model):
    table: Literal["discrete_inputs", "coils"] = "discrete_inputs"
    address: int = Field(ge=0, le=65535)
    count: int = Field(ge=1, le=2000)
    loop: int | None = Field(default=None, ge=0, description="vehicle-presence loop input")
    photocell: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _inside(self) -> PresenceBlock:
        if self.loop is None and self.photocell is None:
            raise ValueError("name the loop or the photocell input (or both): the interlock needs one")
        for name in ("loop", "photocell"):
            index = getattr(self, name)
            if index is not None and index >= self.count:
                raise ValueError(f"{name}: input {index} outside the block (count {self.count})")
        return self


class Travel(_Model):
    """Seconds a full travel takes; a command is confirmed within a bound derived from these."""

    raise_: float = Field(alias="raise", gt=0, le=120)
    lower: float = Field(gt=0, le=120)
    emergency_raise: float = Field(gt=0, le=120)

    def seconds(self, action: Action) -> float:
        if action is Action.RAISE:
            return self.raise_
        return self.lower if action is Action.LOWER else self.emergency_raise


class BollardProfile(_Model):
    description: str = ""
    kind: Literal["bollard"] = Field(description="'bollard': this file describes a bollard controller")
    command: CommandRegister
    status: StatusBlock
    states: dict[int, BollardState] = Field(min_length=1)
    modes: dict[int, Mode] = Field(default_factory=lambda: {0: Mode.REMOTE, 1: Mode.LOCAL})
    faults: dict[int, str] = Field(default_factory=dict, description="fault code -> text; 0 is no fault")
    pressure_scale: float = Field(default=1.0, gt=0, description="bar per count")
    position_scale: float = Field(default=1.0, gt=0, description="percent per count")
    presence: PresenceBlock
    travel: Travel

    def state_of(self, code: int) -> BollardState:
        return self.states.get(code, BollardState.UNKNOWN)

    def fault_text(self, code: int) -> str:
        return self.faults.get(code, f"fault code {code}")


def parse_profile(data: Any, source: str) -> BollardProfile:
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "a profile is a mapping")])
    try:
        return BollardProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, issues(exc)) from exc


def load_profile(name: str, dirs: Sequence[Path] = ()) -> BollardProfile:
    """Find and validate a bollard profile; ConfigError if unknown or invalid."""
    return load(name, dirs, parse_profile)

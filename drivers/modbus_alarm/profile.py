"""Alarm-box profiles: a box's register map and zone layout as YAML data, one file per model.

Found by name like every profile (:mod:`drivers.modbus.profiles`).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drivers.modbus.profiles import issues, load, read_yaml
from drivers.modbus_alarm.zones import DEFAULT_DEBOUNCE_SAMPLES, LineBand, ZoneType
from gateway.errors import ConfigError

OUTPUT_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"


class Table(enum.StrEnum):
    COILS = "coils"
    DISCRETE_INPUTS = "discrete_inputs"
    HOLDING_REGISTERS = "holding_registers"
    INPUT_REGISTERS = "input_registers"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputBlock(_Model):
    """Where the digital inputs are: one contiguous range, read in one request."""

    table: Table = Field(
        default=Table.DISCRETE_INPUTS,
        description="discrete_inputs or coils (one bit each), or holding_registers / input_registers "
        "(16 inputs per register, lowest bit first)",
    )
    address: int = Field(
        default=0, ge=0, le=65535, description="address of input 0 (0-based, as on the wire)"
    )
    count: int = Field(ge=1, le=2000, description="number of inputs")

    @property
    def is_packed(self) -> bool:
        return self.table in (Table.HOLDING_REGISTERS, Table.INPUT_REGISTERS)

    @property
    def request_count(self) -> int:
        """Bits or registers asked for in the one request."""
        return math.ceil(self.count / 16) if self.is_packed else self.count


class BandModel(_Model):
    band: LineBand
    below: float | None = Field(
        default=None, gt=0, description="upper bound in ohms (exclusive); none on the last"
    )


# Double end-of-line resistors of 4.7 kOhm (a common Chinese alarm-panel convention):
# about 4.7 k is normal, about 9.4 k is the zone in alarm, near 0 a short, very high a cut.
DEFAULT_BANDS: tuple[BandModel, ...] = (
    BandModel(band=LineBand.SHORT, below=1000),
    BandModel(band=LineBand.NORMAL, below=7000),
    BandModel(band=LineBand.ALARM, below=14000),
    BandModel(band=LineBand.OPEN),
)


class AnalogBlock(_Model):
    """Loop-resistance registers for end-of-line supervision: one range, one request."""

    table: Literal[Table.INPUT_REGISTERS, Table.HOLDING_REGISTERS] = Field(
        default=Table.INPUT_REGISTERS, description="input_registers or holding_registers"
    )
    address: int = Field(default=0, ge=0, le=65535, description="address of register 0")
    count: int = Field(ge=1, le=125, description="number of registers")
    scale: float = Field(
        default=1.0, gt=0, description="ohms per raw count (1.0 when the module reports ohms)"
    )
    bands: tuple[BandModel, ...] = Field(
        default=DEFAULT_BANDS, min_length=1, description="ascending bands; the last has no upper bound"
    )

    @field_validator("bands")
    @classmethod
    def _ascending(cls, bands: tuple[BandModel, ...]) -> tuple[BandModel, ...]:
        bounds = [b.below for b in bands[:-1]]
        if any(b is None for b in bounds) or bands[-1].below is not None:
            raise ValueError("every band but the last needs 'below'; the last must not have it")
        values = [b for b in bounds if b is not None]
        if values != sorted(set(values)):
            raise ValueError("'below' bounds must strictly ascend")
        if not any(b.band is LineBand.NORMAL for b in bands):
            raise ValueError("no 'normal' band")
        return bands


class OutputModel(_Model):
    """A named output (ack_led, siren): a coil, or a holding register written 1 / 0."""

    table: Literal[Table.COILS, Table.HOLDING_REGISTERS] = Table.COILS
    address: int = Field(ge=0, le=65535)


class DebounceModel(_Model):
    samples: int = Field(
        default=DEFAULT_DEBOUNCE_SAMPLES,
        ge=1,
        le=50,
        description="consecutive equal samples to accept a change",
    )
    ms: int | None = Field(
        default=None, ge=0, le=10000, description="instead of samples: accept a value unchanged this long"
    )


class ZoneModel(_Model):
    input: int = Field(ge=0, description="index in the inputs block; also the zone number in events")
    type: ZoneType
    name: str = ""
    normally_closed: bool = Field(
        default=False, description="true: the input is active when the contact opens"
    )
    eol_register: int | None = Field(
        default=None, ge=0, description="index in the analog block of this zone's loop resistance"
    )


class Profile(_Model):
    description: str = ""
    inputs: InputBlock
    analog: AnalogBlock | None = None
    outputs: dict[str, OutputModel] = Field(default_factory=dict)
    debounce: DebounceModel = DebounceModel()
    zones: tuple[ZoneModel, ...] = Field(min_length=1)

    @field_validator("outputs")
    @classmethod
    def _output_names(cls, v: dict[str, OutputModel]) -> dict[str, OutputModel]:
        for name in v:
            if not re.match(OUTPUT_NAME_PATTERN, name):
                raise ValueError(f"{name!r}: output names are lower-case words, e.g. ack_led, siren")
        return v


def semantic_issues(p: Profile) -> list[tuple[str, str]]:
    """Cross-field checks, each located at the offending field."""
    issues: list[tuple[str, str]] = []
    seen: dict[int, int] = {}
    for i, z in enumerate(p.zones):
        if z.input >= p.inputs.count:
            issues.append(
                (f"zones[{i}].input", f"input {z.input} outside the inputs block (count {p.inputs.count})")
            )
        if z.input in seen:
            issues.append((f"zones[{i}].input", f"input {z.input} already used by zones[{seen[z.input]}]"))
        seen.setdefault(z.input, i)
        if z.eol_register is not None:
            if p.analog is None:
                issues.append((f"zones[{i}].eol_register", "needs an 'analog' block"))
            elif z.eol_register >= p.analog.count:
                issues.append(
                    (f"zones[{i}].eol_register", f"register {z.eol_register} outside the analog block")
                )
    if p.inputs.address + p.inputs.request_count > 65536:
        issues.append(("inputs", "range runs past address 65535"))
    if p.inputs.is_packed and p.inputs.request_count > 125:
        issues.append(("inputs.count", "more than 125 registers (2000 packed inputs) in one request"))
    return issues


def parse_profile(data: Any, source: str) -> Profile:
    """Validate a decoded YAML document; errors are located ``source: path: message``."""
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "a profile is a mapping")])
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, issues(exc)) from exc
    problems = semantic_issues(profile)
    if problems:
        raise ConfigError(source, problems)
    return profile


def read_profile_text(text: str, source: str) -> Profile:
    return parse_profile(read_yaml(text, source), source)


def load_profile(name: str, dirs: Sequence[Path] = ()) -> Profile:
    """Find and validate a profile; ConfigError if unknown or invalid."""
    return load(name, dirs, parse_profile)

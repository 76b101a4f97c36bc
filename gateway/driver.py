"""The driver contract: the only part of the core (with events and errors) that drivers import.

A hardware family is a :class:`DriverFamily`, registered as an entry point in the
``campus_gateway.drivers`` group under the name that device configs give in
``driver:``. The core validates each device's config with the family's
``device_model``, builds one family instance with all of that family's devices,
enters it (which opens shared links such as one Modbus hub per serial line), and
runs each of its :class:`Driver` objects in its own task until cancelled.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import DeviceRejected
from gateway.events import DeviceKind, DeviceRef, EventSink

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

_Config = TypeVar("_Config", bound="DeviceConfig")


class DeviceConfig(BaseModel):
    """Fields every device has; each family subclasses this with its own (extra keys rejected)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=ID_PATTERN, description="unique device id, also used in events and topics")
    driver: str = Field(description="driver family name, e.g. modbus_alarm")
    name: str = ""
    location: str = ""


class LinkState(enum.StrEnum):
    """Connection state of a device, as the local API and heartbeat report it."""

    STARTING = "starting"
    ONLINE = "online"
    OFFLINE = "offline"


# Poll latency buckets (seconds): a LAN device answers in 1-20 ms, a busy RS-485 line in
# tens, a camera in hundreds; the last buckets are the timeouts.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    """Cumulative-ready bucket counts of observed durations (for /metrics)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        i = 0
        for bound in self.bounds:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.n += 1


@dataclass
class DeviceStatus:
    """Live status of one device; drivers update it, the core reads it."""

    state: LinkState = LinkState.STARTING
    since: float = field(default_factory=time.time)
    last_poll_ok: float | None = None
    last_error: str | None = None
    polls: int = 0
    poll_errors: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    poll_latency: Histogram = field(default_factory=Histogram)

    def set_state(self, state: LinkState) -> bool:
        """Set the state; True if it changed."""
        if state is self.state:
            return False
        self.state = state
        self.since = time.time()
        return True


@dataclass(frozen=True)
class DriverContext:
    """What the core hands a family: where profiles live, where device state persists.

    ``state_dir`` (None: nothing is persisted) holds small per-device state that must
    survive a restart, such as latched panic zones. No MQTT, no outbox.
    """

    profile_dirs: tuple[Path, ...] = ()
    state_dir: Path | None = None


class Verdict(enum.StrEnum):
    """How a device ended a command."""

    DONE = "done"
    FAILED = "failed"  # tried, and the device did not do it (or did not confirm it in time)
    REFUSED = "refused"  # not tried: the device's state forbids it (interlock, local mode, fault)


@dataclass(frozen=True)
class Outcome:
    """The end of one command on one device. ``reason`` is a stable code (``interlock``,
    ``local_mode``, ``fault``, ``unavailable``, ``not_confirmed``, ``bad_args``...);
    ``detail`` is for people; ``data`` holds what the device reported (final state)."""

    verdict: Verdict
    reason: str | None = None
    detail: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


class Driver(abc.ABC):
    """One device. ``run`` loops until cancelled and handles its own transient errors.

    A driver that takes commands names them in ``commands`` and implements
    :meth:`command`; ``groups`` are the targets besides its id that address it
    (``gate:main`` for every bollard of the main gate).
    """

    device: DeviceRef
    status: DeviceStatus
    commands: ClassVar[frozenset[str]] = frozenset()
    groups: tuple[str, ...] = ()
    evidence_for: tuple[str, ...] = ()  # a camera: the alarms ("box", "box:3") it takes snapshots for

    @abc.abstractmethod
    async def run(self, sink: EventSink) -> None:
        """Watch the device and publish observations until cancelled. Only bugs propagate."""

    async def command(self, name: str, args: Mapping[str, Any]) -> Outcome:
        """Carry out one verified command, bounded in time; device errors become an Outcome."""
        return Outcome(Verdict.REFUSED, "unsupported", f"{self.device.id} does not take {name}")

    def describe(self) -> Mapping[str, Any]:
        """Driver-specific state for patrol reports and the local API (e.g. a camera's subscription)."""
        return {}

    async def snapshot(self) -> bytes:
        """A picture (JPEG) now, bounded in time; raises a DriverError when there is none."""
        raise DeviceRejected(self.device.id, "this device takes no snapshots")


class DriverFamily(abc.ABC):
    """All devices of one driver family, entered as one async context manager."""

    name: ClassVar[str]
    kind: ClassVar[DeviceKind]
    device_model: ClassVar[type[DeviceConfig]]

    def __init__(self, devices: Sequence[DeviceConfig], ctx: DriverContext) -> None:
        self.devices = tuple(devices)
        self.ctx = ctx

    @classmethod
    def check(cls, devices: Sequence[DeviceConfig], ctx: DriverContext) -> list[tuple[int, str, str]]:
        """Semantic checks across this family's devices (profiles exist, addresses unique).

        Returns (index into ``devices``, field path, message) triples; empty if all is well.
        """
        return []

    @staticmethod
    def own_configs(model: type[_Config], devices: Sequence[DeviceConfig]) -> list[_Config]:
        """``devices`` as instances of ``model`` (the family's ``device_model``); any other
        config is a bug of the caller, a TypeError."""
        for dev in devices:
            if not isinstance(dev, model):
                name = model.__name__
                article = "an" if name[:1] in "AEIOU" else "a"
                raise TypeError(f"{dev.id}: not {article} {name} but {type(dev).__name__}")
        return [dev for dev in devices if isinstance(dev, model)]

    @staticmethod
    def repeats(keys: Iterable[Hashable]) -> dict[int, int]:
        """For check(): the index of each key equal to an earlier one -> the index of the first."""
        first: dict[Hashable, int] = {}
        found: dict[int, int] = {}
        for i, key in enumerate(keys):
            j = first.setdefault(key, i)
            if j != i:
                found[i] = j
        return found

    @property
    @abc.abstractmethod
    def drivers(self) -> Sequence[Driver]:
        """One driver per configured device, in config order."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

"""Zone logic of an alarm box: pure, no I/O, driven by samples and a clock value.

Each poll hands :meth:`ZoneSet.update` the raw digital inputs (and, where the
profile has them, the loop-resistance registers); it returns the events that
the samples caused. :meth:`ZoneSet.reset` clears latched panic zones.

Semantics (docs/drivers/modbus-alarm.md says the same for operators):

- A sample counts only once it is stable (debounce: N consecutive equal samples,
  or unchanged for a time).
- Panic zones latch: active on the first stable press, and stay latched when the
  button is released. Only a reset (a command, or the box's key switch) clears
  them, and only once released: a reset while the button is still held is
  ignored (the emergency may be ongoing) and must be repeated after release.
- Intrusion, fire, tamper and generic zones follow their input. There is no
  arming: every zone, tamper included, is always reported.
- End-of-line supervision classifies the loop resistance into bands: ``alarm``
  drives the zone like an active input; ``open`` and ``short`` are line faults,
  reported as ``alarm.line_fault``. While the line is faulted the zone keeps
  the state it had (a cut line cannot tell whether the button is pressed).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gateway.events import ContactId, EventState, Severity, restore_code

# Two consecutive equal samples: at the default 0.2 s poll a press is accepted 0.2 s
# after it is first seen, well inside the 2 s budget, while a single-sample glitch
# (induced on long cable runs beside mains wiring) is ignored.
DEFAULT_DEBOUNCE_SAMPLES = 2


class ZoneType(enum.StrEnum):
    PANIC = "panic"
    INTRUSION = "intrusion"
    TAMPER = "tamper"
    FIRE = "fire"
    GENERIC = "generic"
    RESET = "reset"  # a local key switch: its press clears the box's released panic zones


class LineBand(enum.StrEnum):
    NORMAL = "normal"
    ALARM = "alarm"
    OPEN = "open"
    SHORT = "short"


class ZoneState(enum.StrEnum):
    UNKNOWN = "unknown"  # no stable sample yet
    NORMAL = "normal"
    ACTIVE = "active"  # input active (a panic zone is latched as well)
    LATCHED = "latched"  # panic only: released, waiting for a reset


@dataclass(frozen=True, slots=True)
class ZoneKind:
    """How a zone type is reported."""

    event_type: str
    severity: Severity
    contact_id: int  # the new-event code; the restore code is derived
    latches: bool = False


ZONE_KINDS: Mapping[ZoneType, ZoneKind] = {
    ZoneType.PANIC: ZoneKind("alarm.panic", Severity.CRITICAL, ContactId.PANIC, latches=True),
    ZoneType.INTRUSION: ZoneKind("alarm.intrusion", Severity.MAJOR, ContactId.BURGLARY),
    ZoneType.FIRE: ZoneKind("alarm.fire", Severity.CRITICAL, ContactId.FIRE),
    ZoneType.TAMPER: ZoneKind("alarm.tamper", Severity.MAJOR, ContactId.TAMPER),
    ZoneType.GENERIC: ZoneKind("alarm.generic", Severity.MINOR, ContactId.GENERIC),
}

LINE_FAULT_CODES: Mapping[LineBand, int] = {
    LineBand.OPEN: ContactId.LINE_OPEN,
    LineBand.SHORT: ContactId.LINE_SHORT,
}
LINE_FAULT_TYPE = "alarm.line_fault"


@dataclass(frozen=True, slots=True)
class Band:
    """Values below ``below`` (ohms; None: no upper bound) fall in ``band``."""

    band: LineBand
    below: float | None = None


def classify(ohms: float, bands: Sequence[Band]) -> LineBand:
    """The band of a loop resistance; ``bands`` ascend and the last one is unbounded."""
    for b in bands:
        if b.below is None or ohms < b.below:
            return b.band
    return bands[-1].band


@dataclass(frozen=True, slots=True)
class Eol:
    """End-of-line supervision of one zone: its register in the analog block, and the bands."""

    register: int
    bands: tuple[Band, ...]
    scale: float = 1.0  # ohms per raw count


@dataclass(frozen=True, slots=True)
class ZoneSpec:
    index: int  # the input index: also the zone number in events
    type: ZoneType
    name: str = ""
    location: str = ""
    normally_closed: bool = False
    eol: Eol | None = None


@dataclass(frozen=True, slots=True)
class Debounce:
    """Accept a new value after ``samples`` consecutive equal samples, or, when ``seconds``
    is set, once it has been seen unchanged for that long."""

    samples: int = DEFAULT_DEBOUNCE_SAMPLES
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ZoneEvent:
    """What a zone reports; the driver wraps it into an Observation."""

    type: str
    severity: Severity
    state: EventState
    data: Mapping[str, Any]

    @property
    def contact_id(self) -> int:
        return int(self.data["contact_id"])


T = TypeVar("T")


class Debouncer(Generic[T]):
    """The stable value of a sampled signal."""

    def __init__(self, rule: Debounce) -> None:
        self._rule = rule
        self.stable: T | None = None
        self._candidate: T | None = None
        self._count = 0
        self._since = 0.0

    def feed(self, value: T, now: float) -> bool:
        """Add a sample; True if it made ``stable`` change."""
        if value == self.stable:
            self._candidate = None
            return False
        if value != self._candidate:
            self._candidate, self._count, self._since = value, 0, now
        self._count += 1
        seconds = self._rule.seconds
        if self._count >= self._rule.samples if seconds is None else now - self._since >= seconds:
            self.stable, self._candidate = value, None
            return True
        return False

    @property
    def settled(self) -> bool:
        """A stable value and nothing pending: feeding that value again changes nothing."""
        return self._candidate is None and self.stable is not None


@dataclass
class _Line:
    """End-of-line state of one zone."""

    band: Debouncer[LineBand]
    alarm: bool = False  # the analog side's contribution to the zone, held through faults
    ohms: float = 0.0


class Zone:
    """One input of the box and its state machine."""

    def __init__(self, spec: ZoneSpec, debounce: Debounce) -> None:
        self.spec = spec
        self.state = ZoneState.UNKNOWN
        self._input: Debouncer[bool] = Debouncer(debounce)
        self._line = _Line(Debouncer(debounce)) if spec.eol is not None else None

    @property
    def fault(self) -> LineBand | None:
        """OPEN or SHORT while the line is faulted, else None."""
        band = self._line.band.stable if self._line else None
        return band if band in LINE_FAULT_CODES else None

    @property
    def input_active(self) -> bool | None:
        """The debounced digital input (after NC inversion); None before it is stable."""
        return self._input.stable

    @property
    def latched(self) -> bool:
        return self.state in (ZoneState.ACTIVE, ZoneState.LATCHED) and self.spec.type is ZoneType.PANIC

    @property
    def settled(self) -> bool:
        return self._input.settled and (self._line is None or self._line.band.settled)

    def update(self, raw: bool, analog: int | None, now: float) -> tuple[list[ZoneEvent], bool]:
        """Feed one sample; returns the events and whether the zone became active just now."""
        events: list[ZoneEvent] = []
        self._input.feed(raw != self.spec.normally_closed, now)
        if self._line is not None and self.spec.eol is not None and analog is not None:
            events += self._update_line(self._line, self.spec.eol, analog, now)
        digital = self._input.stable
        if digital is None or (self._line is not None and self._line.band.stable is None):
            return events, False
        active = digital or (self._line is not None and self._line.alarm)
        before = self.state
        events += self._transition(active)
        return events, self.state is ZoneState.ACTIVE and before is ZoneState.NORMAL

    def reset(self, cleared_by: str) -> list[ZoneEvent]:
        """Clear a released latched panic zone; a held one stays latched."""
        if self.spec.type is not ZoneType.PANIC or self.state is not ZoneState.LATCHED:
            return []
        self.state = ZoneState.NORMAL
        return [self._event(EventState.CLEARED, cleared_by=cleared_by)]

    def _update_line(self, line: _Line, eol: Eol, analog: int, now: float) -> list[ZoneEvent]:
        line.ohms = analog * eol.scale
        old_fault = self.fault
        if not line.band.feed(classify(line.ohms, eol.bands), now):
            return []
        if line.band.stable in (LineBand.NORMAL, LineBand.ALARM):
            line.alarm = line.band.stable is LineBand.ALARM
        new_fault = self.fault
        events = []
        if old_fault is not None and old_fault != new_fault:
            events.append(self._line_event(old_fault, EventState.CLEARED, line.ohms))
        if new_fault is not None and new_fault != old_fault:
            events.append(self._line_event(new_fault, EventState.ACTIVE, line.ohms))
        return events

    def _transition(self, active: bool) -> list[ZoneEvent]:
        kind = ZONE_KINDS.get(self.spec.type)
        old = self.state
        if active:
            self.state = ZoneState.ACTIVE
        elif old is ZoneState.UNKNOWN or (old is ZoneState.ACTIVE and not (kind and kind.latches)):
            self.state = ZoneState.NORMAL
        elif old is ZoneState.ACTIVE:
            self.state = ZoneState.LATCHED
        if kind is None or self.state is old:
            return []
        if self.state is ZoneState.ACTIVE and old in (ZoneState.UNKNOWN, ZoneState.NORMAL):
            return [self._event(EventState.ACTIVE)]
        if self.state is ZoneState.NORMAL and old is ZoneState.ACTIVE:
            return [self._event(EventState.CLEARED)]
        return []  # ACTIVE <-> LATCHED, UNKNOWN -> NORMAL: nothing to report

    def _base_data(self, contact_id: int) -> dict[str, Any]:
        data: dict[str, Any] = {
            "contact_id": int(contact_id),
            "zone": self.spec.index,
            "zone_name": self.spec.name,
            "zone_type": self.spec.type.value,
        }
        if self.spec.location:
            data["zone_location"] = self.spec.location
        return data

    def _event(self, state: EventState, **extra: Any) -> ZoneEvent:
        kind = ZONE_KINDS[self.spec.type]
        code = kind.contact_id if state is EventState.ACTIVE else restore_code(kind.contact_id)
        data = self._base_data(code)
        if kind.latches:
            data["latched"] = True
        data.update(extra)
        return ZoneEvent(kind.event_type, kind.severity, state, data)

    def _line_event(self, fault: LineBand, state: EventState, ohms: float) -> ZoneEvent:
        code = LINE_FAULT_CODES[fault]
        data = self._base_data(code if state is EventState.ACTIVE else restore_code(code))
        data["fault"] = fault.value
        data["ohms"] = round(ohms, 1)
        return ZoneEvent(LINE_FAULT_TYPE, Severity.MAJOR, state, data)


@dataclass
class ZoneSet:
    """All zones of one box."""

    specs: Sequence[ZoneSpec]
    debounce: Debounce = field(default_factory=Debounce)

    def __post_init__(self) -> None:
        self.zones: dict[int, Zone] = {s.index: Zone(s, self.debounce) for s in self.specs}
        self._last: tuple[tuple[bool, ...], tuple[int, ...] | None] | None = None
        self._settled = False

    def unchanged(self, inputs: Sequence[bool], analog: Sequence[int] | None) -> bool:
        """The same samples as last time, every zone settled: an update would change nothing."""
        last = self._last
        if not self._settled or last is None:
            return False
        return tuple(inputs) == last[0] and (None if analog is None else tuple(analog)) == last[1]

    @property
    def pending(self) -> bool:
        """Some input changed and its debounce has not yet decided."""
        return not self._settled

    @property
    def latched(self) -> list[int]:
        """Indices of latched panic zones (held or released)."""
        return [i for i, z in self.zones.items() if z.latched]

    def update(self, inputs: Sequence[bool], analog: Sequence[int] | None, now: float) -> list[ZoneEvent]:
        """Feed one poll's samples; ``inputs`` and ``analog`` are the profile's blocks.

        The samples of most polls equal the previous ones with every zone settled:
        such a poll changes nothing and is not run through the zones.
        """
        if self.unchanged(inputs, analog):
            return []
        self._last = (tuple(inputs), None if analog is None else tuple(analog))  # a copy: callers reuse lists
        events: list[ZoneEvent] = []
        key_turned = False
        for zone in self.zones.values():
            eol = zone.spec.eol
            value = analog[eol.register] if eol is not None and analog is not None else None
            zone_events, rose = zone.update(inputs[zone.spec.index], value, now)
            events += zone_events
            key_turned |= rose and zone.spec.type is ZoneType.RESET
        if key_turned:
            events += self.reset(cleared_by="key_switch")[1]
        self._settled = all(z.settled for z in self.zones.values())
        return events

    def restore_latched(self, indices: Sequence[int]) -> list[int]:
        """Latch panic zones that were latched before a restart (no event: it was sent then).

        Returns the indices restored; indices that are no longer panic zones are ignored.
        """
        restored = []
        for i in indices:
            zone = self.zones.get(i)
            if zone is not None and zone.spec.type is ZoneType.PANIC:
                zone.state = ZoneState.LATCHED
                restored.append(i)
        return restored

    def reset(
        self, zone: int | None = None, *, cleared_by: str = "command"
    ) -> tuple[list[int], list[ZoneEvent]]:
        """Clear released latched panic zones (all, or one); returns (cleared indices, events)."""
        if zone is not None and zone not in self.zones:
            raise ValueError(f"no zone {zone}; zones: {sorted(self.zones)}")
        targets = [self.zones[zone]] if zone is not None else list(self.zones.values())
        cleared: list[int] = []
        events: list[ZoneEvent] = []
        for z in targets:
            zone_events = z.reset(cleared_by)
            if zone_events:
                cleared.append(z.spec.index)
                events += zone_events
        return cleared, events

"""Zone logic, pure: every zone type, debounce, latching, reset, NC inputs, end-of-line bands."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus_alarm.zones import (
    Band,
    Debounce,
    Debouncer,
    Eol,
    LineBand,
    ZoneEvent,
    ZoneSet,
    ZoneSpec,
    ZoneState,
    ZoneType,
    classify,
)
from gateway.events import EventState, Severity

BANDS = (
    Band(LineBand.SHORT, 1000),
    Band(LineBand.NORMAL, 7000),
    Band(LineBand.ALARM, 14000),
    Band(LineBand.OPEN),
)
NORMAL_OHMS, ALARM_OHMS, OPEN_OHMS, SHORT_OHMS = 4700, 9400, 65535, 50


class Box:
    """A ZoneSet driven sample by sample, with a fake clock."""

    def __init__(self, specs: Sequence[ZoneSpec], debounce: Debounce | None = None, inputs: int = 8) -> None:
        self.zones = ZoneSet(specs, debounce or Debounce())
        self.raw = [False] * inputs
        self.analog = [NORMAL_OHMS] * inputs
        self.now = 0.0

    def sample(self, n: int = 1) -> list[ZoneEvent]:
        events = []
        for _ in range(n):
            self.now += 0.2
            events += self.zones.update(self.raw, self.analog, self.now)
        return events

    def set(self, i: int, value: bool, n: int = 2) -> list[ZoneEvent]:
        self.raw[i] = value
        return self.sample(n)

    def line(self, i: int, ohms: int, n: int = 2) -> list[ZoneEvent]:
        self.analog[i] = ohms
        return self.sample(n)


def one(events: list[ZoneEvent]) -> ZoneEvent:
    assert len(events) == 1, events
    return events[0]


def box_of(*specs: ZoneSpec, **kw: object) -> Box:
    b = Box(specs, **kw)  # type: ignore[arg-type]
    assert b.sample(2) == []  # settle: all inputs idle
    return b


@pytest.mark.parametrize(
    ("zone_type", "event_type", "severity", "new", "restore"),
    [
        (ZoneType.INTRUSION, "alarm.intrusion", Severity.MAJOR, 1130, 3130),
        (ZoneType.FIRE, "alarm.fire", Severity.CRITICAL, 1110, 3110),
        (ZoneType.TAMPER, "alarm.tamper", Severity.MAJOR, 1137, 3137),
        (ZoneType.GENERIC, "alarm.generic", Severity.MINOR, 1140, 3140),
    ],
)
def test_following_zones_report_and_restore(
    zone_type: ZoneType, event_type: str, severity: Severity, new: int, restore: int
) -> None:
    box = box_of(ZoneSpec(2, zone_type, "Zone two", location="north gate"))
    active = one(box.set(2, True))
    assert (active.type, active.severity, active.state) == (event_type, severity, EventState.ACTIVE)
    assert active.data == {
        "contact_id": new,
        "zone": 2,
        "zone_name": "Zone two",
        "zone_type": zone_type.value,
        "zone_location": "north gate",
    }
    assert box.sample(5) == []  # held: nothing more
    cleared = one(box.set(2, False))
    assert (cleared.state, cleared.contact_id) == (EventState.CLEARED, restore)
    assert box.zones.zones[2].state is ZoneState.NORMAL


def test_panic_latches_until_reset() -> None:
    box = box_of(ZoneSpec(0, ZoneType.PANIC, "Gate"))
    active = one(box.set(0, True))
    assert (active.type, active.severity, active.contact_id) == ("alarm.panic", Severity.CRITICAL, 1120)
    assert active.data["latched"] is True
    assert box.set(0, False, n=10) == []  # release: still latched, nothing reported
    assert box.zones.zones[0].state is ZoneState.LATCHED
    assert box.zones.latched == [0]
    cleared, events = box.zones.reset()
    assert cleared == [0]
    event = one(events)
    assert (event.type, event.state, event.contact_id) == ("alarm.panic", EventState.CLEARED, 3120)
    assert event.data["cleared_by"] == "command"
    assert event.data["latched"] is True
    assert box.zones.reset() == ([], [])  # nothing left to clear
    assert one(box.set(0, True)).state is EventState.ACTIVE  # a new press is a new alarm


def test_reset_while_held_keeps_the_latch() -> None:
    box = box_of(ZoneSpec(0, ZoneType.PANIC))
    box.set(0, True)
    assert box.zones.reset() == ([], [])
    assert box.set(0, False) == []  # the ignored reset is not remembered
    assert box.zones.zones[0].state is ZoneState.LATCHED
    cleared, events = box.zones.reset(0)
    assert cleared == [0]
    assert one(events).contact_id == 3120


def test_press_again_while_latched_is_not_a_new_alarm() -> None:
    box = box_of(ZoneSpec(0, ZoneType.PANIC))
    box.set(0, True)
    box.set(0, False)
    assert box.set(0, True) == []
    assert box.zones.zones[0].state is ZoneState.ACTIVE


def test_reset_key_switch_clears_released_panic_zones_only() -> None:
    box = box_of(
        ZoneSpec(0, ZoneType.PANIC),
        ZoneSpec(1, ZoneType.PANIC),
        ZoneSpec(2, ZoneType.INTRUSION),
        ZoneSpec(7, ZoneType.RESET, "Key"),
    )
    box.set(0, True)
    box.set(1, True)
    box.set(2, True)
    box.set(0, False)
    events = box.set(7, True)
    assert [(e.data["zone"], e.contact_id, e.data["cleared_by"]) for e in events] == [(0, 3120, "key_switch")]
    assert box.zones.latched == [1]  # still held
    assert box.set(7, False) == []  # turning the key back does nothing
    assert box.zones.zones[2].state is ZoneState.ACTIVE  # intrusion is not the key's business


def test_reset_key_held_at_start_is_not_a_reset() -> None:
    box = Box([ZoneSpec(0, ZoneType.PANIC), ZoneSpec(7, ZoneType.RESET)])
    box.raw[0] = box.raw[7] = True
    events = box.sample(2)
    assert [e.contact_id for e in events] == [1120]


def test_reset_of_unknown_zone_is_an_error() -> None:
    box = box_of(ZoneSpec(0, ZoneType.PANIC))
    with pytest.raises(ValueError, match="no zone 5"):
        box.zones.reset(5)


def test_active_at_start_is_reported_idle_is_not() -> None:
    box = Box([ZoneSpec(0, ZoneType.PANIC), ZoneSpec(1, ZoneType.INTRUSION)])
    box.raw[0] = True
    assert [e.contact_id for e in box.sample(2)] == [1120]
    assert box.zones.zones[1].state is ZoneState.NORMAL


def test_normally_closed_input_is_inverted() -> None:
    box = Box([ZoneSpec(6, ZoneType.TAMPER, normally_closed=True)])
    box.raw[6] = True  # contact closed: lid shut
    assert box.sample(3) == []
    assert one(box.set(6, False)).contact_id == 1137  # contact opens: tamper
    assert one(box.set(6, True)).contact_id == 3137


def test_single_sample_glitch_is_ignored() -> None:
    box = box_of(ZoneSpec(0, ZoneType.PANIC))
    assert box.set(0, True, n=1) == []
    assert box.set(0, False, n=3) == []
    assert box.zones.zones[0].state is ZoneState.NORMAL
    assert one(box.set(0, True, n=2)).contact_id == 1120  # two samples: accepted


def test_debounce_by_samples() -> None:
    box = box_of(ZoneSpec(0, ZoneType.INTRUSION), debounce=Debounce(samples=4))
    assert box.set(0, True, n=3) == []
    assert one(box.sample(1)).contact_id == 1130


def test_debounce_by_time() -> None:
    box = box_of(ZoneSpec(0, ZoneType.INTRUSION), debounce=Debounce(seconds=0.5))
    assert box.set(0, True, n=3) == []  # seen at 0.2, 0.4 and 0.6 s after the first sample: 0.4 s
    assert one(box.sample(1)).contact_id == 1130  # 0.6 s unchanged


def test_eol_bands_report_line_faults() -> None:
    box = box_of(ZoneSpec(4, ZoneType.INTRUSION, "Fence", eol=Eol(4, BANDS)))
    cut = one(box.line(4, OPEN_OHMS))
    assert (cut.type, cut.severity, cut.state) == ("alarm.line_fault", Severity.MAJOR, EventState.ACTIVE)
    assert cut.data["fault"] == "open"
    assert cut.contact_id == 1371
    assert cut.data["zone"] == 4
    assert cut.data["zone_name"] == "Fence"
    events = box.line(4, SHORT_OHMS)  # open -> short: restore one, report the other
    assert [(e.contact_id, e.state) for e in events] == [
        (3371, EventState.CLEARED),
        (1372, EventState.ACTIVE),
    ]
    assert box.zones.zones[4].fault is LineBand.SHORT
    assert one(box.line(4, NORMAL_OHMS)).contact_id == 3372
    assert box.zones.zones[4].fault is None


def test_eol_alarm_band_drives_the_zone() -> None:
    box = box_of(ZoneSpec(4, ZoneType.PANIC, eol=Eol(4, BANDS)))
    assert one(box.line(4, ALARM_OHMS)).contact_id == 1120
    box.line(4, NORMAL_OHMS)
    assert box.zones.zones[4].state is ZoneState.LATCHED


def test_zone_keeps_its_state_through_a_line_fault() -> None:
    box = box_of(ZoneSpec(4, ZoneType.INTRUSION, eol=Eol(4, BANDS)))
    assert one(box.line(4, ALARM_OHMS)).contact_id == 1130
    assert [e.contact_id for e in box.line(4, OPEN_OHMS)] == [1371]  # not also "intrusion restored"
    assert box.zones.zones[4].state is ZoneState.ACTIVE
    assert [e.contact_id for e in box.line(4, NORMAL_OHMS)] == [3371, 3130]


def test_eol_scale_converts_raw_counts() -> None:
    box = Box([ZoneSpec(0, ZoneType.INTRUSION, eol=Eol(0, BANDS, scale=10.0))])
    box.analog[0] = 470  # 4700 ohms
    assert box.sample(3) == []
    assert one(box.line(0, 6000)).data["ohms"] == 60000.0


def test_digital_input_still_works_on_a_supervised_zone() -> None:
    box = box_of(ZoneSpec(0, ZoneType.PANIC, eol=Eol(0, BANDS)))
    assert one(box.set(0, True)).contact_id == 1120


def test_classify_edges() -> None:
    assert classify(0, BANDS) is LineBand.SHORT
    assert classify(999.9, BANDS) is LineBand.SHORT
    assert classify(1000, BANDS) is LineBand.NORMAL
    assert classify(13999, BANDS) is LineBand.ALARM
    assert classify(14000, BANDS) is LineBand.OPEN


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_classify_agrees_with_thresholds(ohms: float) -> None:
    band = classify(ohms, BANDS)
    expected = next(b.band for b in BANDS if b.below is None or ohms < b.below)
    assert band is expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60))
def test_panic_invariants(steps: list[tuple[bool, bool]]) -> None:
    """Random presses, releases and resets: alarms and clears alternate, a held button is
    never cleared, and a zone is latched exactly when an alarm is outstanding."""
    box = Box([ZoneSpec(0, ZoneType.PANIC)])
    outstanding = 0
    for pressed, reset in steps:
        box.raw[0] = pressed
        events = box.sample()
        if reset:
            events += box.zones.reset()[1]
        for e in events:
            outstanding += 1 if e.state is EventState.ACTIVE else -1
            assert outstanding in (0, 1)
            if e.state is EventState.CLEARED:
                assert box.zones.zones[0].state is ZoneState.NORMAL
                assert box.zones.zones[0].input_active is False  # never while held
        assert (outstanding == 1) == (box.zones.latched == [0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=60), st.integers(min_value=1, max_value=4))
def test_following_zone_tracks_the_debounced_input(samples: list[bool], n: int) -> None:
    """An intrusion zone takes a value once the last n samples all had it; shorter runs
    change nothing; it reports every change except the first settling to idle."""
    box = Box([ZoneSpec(0, ZoneType.INTRUSION)], Debounce(samples=n))
    stable: bool | None = None
    history: list[bool] = []
    for value in samples:
        box.raw[0] = value
        history.append(value)
        events = box.sample()
        new = value if len(history) >= n and all(v == value for v in history[-n:]) else stable
        changed = new != stable and not (stable is None and new is False)
        assert len(events) == (1 if changed else 0)
        if changed:
            assert events[0].state is (EventState.ACTIVE if new else EventState.CLEARED)
        stable = new
        expected = {None: ZoneState.UNKNOWN, True: ZoneState.ACTIVE, False: ZoneState.NORMAL}[stable]
        assert box.zones.zones[0].state is expected


def test_debouncer_returns_to_stable_value_forgets_candidate() -> None:
    d: Debouncer[int] = Debouncer(Debounce(samples=2))
    assert d.feed(1, 0) is False
    assert d.feed(1, 1) is True
    assert d.feed(2, 2) is False
    assert d.feed(1, 3) is False  # back to stable: the candidate 2 is forgotten
    assert d.feed(2, 4) is False
    assert d.feed(2, 5) is True
    assert d.stable == 2


class _NoShortcut(ZoneSet):
    """The zones run on every sample, as before the unchanged-sample shortcut."""

    def update(self, inputs: Sequence[bool], analog: Sequence[int] | None, now: float) -> list[ZoneEvent]:
        self._settled = False
        return super().update(inputs, analog, now)


@given(
    samples=st.lists(
        st.tuples(st.lists(st.booleans(), min_size=4, max_size=4), st.sampled_from([50, 4700, 9400, 65535])),
        max_size=40,
    ),
    debounce=st.sampled_from([Debounce(samples=1), Debounce(samples=2), Debounce(samples=3)]),
    resets=st.sets(st.integers(0, 39)),
)
def test_skipping_unchanged_samples_changes_no_event(
    samples: list[tuple[list[bool], int]], debounce: Debounce, resets: set[int]
) -> None:
    eol = Eol(0, BANDS)
    specs = [
        ZoneSpec(0, ZoneType.PANIC, eol=eol),
        ZoneSpec(1, ZoneType.INTRUSION),
        ZoneSpec(2, ZoneType.TAMPER, normally_closed=True),
        ZoneSpec(3, ZoneType.RESET),
    ]
    fast, slow = ZoneSet(specs, debounce), _NoShortcut(specs, debounce)
    for i, (inputs, ohms) in enumerate(samples):
        for _ in range(2):  # each sample twice: the second is the one the shortcut may skip
            assert fast.update(inputs, [ohms], i) == slow.update(inputs, [ohms], i)
        if i in resets:
            assert fast.reset() == slow.reset()
        assert fast.latched == slow.latched

"""The bollard driver against the real simulator over loopback, and a second vendor's
register layout served by a small pymodbus server: added by a profile file alone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus.profiles import shipped_dir
from drivers.modbus_bollard import BollardConfig, BollardDriver, BollardFamily, BollardState, load_profile
from drivers.modbus_bollard.driver import START_WITHIN
from gateway.driver import DriverContext, LinkState, Outcome, Verdict
from gateway.errors import ConfigError
from gateway.events import DeviceKind, EventState, Observation, Severity
from simulators.bollard import BollardSimulator

# Simulator travel times (s), and the test profile's: a full command takes well under 2 s.
# The emergency rise is a third of a normal one, so "faster" holds with room on a slow box.
RAISE_S, LOWER_S, EMERGENCY_S = 0.6, 0.5, 0.2
POLL = 0.05
# A bollard's read timeout where a test silences it on purpose; every other test gets
# PATIENT, so a loaded CI box cannot turn a slow answer into a failure it did not ask for.
TIMEOUT = 0.2
PATIENT = 2.0
WAIT = 3.0  # upper bound for anything to show up; latency assertions are tighter
SLACK = 0.6  # for timed assertions: a loaded 2-core CI box
PROFILE = "test-bollard"


class Sink:
    """Collects observations; tests wait on its condition, never on a fixed sleep."""

    def __init__(self) -> None:
        self.events: list[Observation] = []
        self._changed = asyncio.Condition()

    async def publish(self, obs: Observation) -> None:
        async with self._changed:
            self.events.append(obs)
            self._changed.notify_all()

    async def wait(
        self, pred: Callable[[Observation], bool], within: float = WAIT, n: int = 1
    ) -> Observation:
        """The ``n``-th collected observation matching ``pred``, waiting for it if need be."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: sum(1 for e in self.events if pred(e)) >= n)
        return [e for e in self.events if pred(e)][n - 1]

    def of(self, type_: str, device: str | None = None) -> list[Observation]:
        return [e for e in self.events if e.type == type_ and (device is None or e.device.id == device)]

    def states(self) -> list[str]:
        """The bollard.state values published so far, in order."""
        return [e.data["state"] for e in self.of("bollard.state")]


def is_(type_: str, state: EventState | None = None, /, **data: Any) -> Callable[[Observation], bool]:
    def pred(e: Observation) -> bool:
        return (
            e.type == type_
            and (state is None or e.state is state)
            and all(e.data.get(k) == v for k, v in data.items())
        )

    return pred


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    """The shipped generic profile with the simulator's fast travel times, as ``test-bollard``."""
    data = yaml.safe_load(shipped_dir().joinpath("generic-bollard-plc.yaml").read_text(encoding="utf-8"))
    data["travel"] = {"raise": RAISE_S, "lower": LOWER_S, "emergency_raise": EMERGENCY_S}
    d = tmp_path / "profiles"
    d.mkdir()
    (d / f"{PROFILE}.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return d


@pytest.fixture
async def sim() -> AsyncIterator[BollardSimulator]:
    async with BollardSimulator(
        raise_seconds=RAISE_S, lower_seconds=LOWER_S, emergency_seconds=EMERGENCY_S
    ) as s:
        yield s


def bollard(port: int, id_: str = "b1", **kw: Any) -> BollardConfig:
    fields: dict[str, Any] = {
        "id": id_,
        "driver": "modbus_bollard",
        "name": "North bollard",
        "location": "main gate",
        "host": "127.0.0.1",
        "port": port,
        "profile": PROFILE,
        "poll_interval": POLL,
        "timeout": PATIENT,
        "reconnect_max": 0.3,
        **kw,
    }
    return BollardConfig.model_validate(fields)


@contextlib.asynccontextmanager
async def running(
    configs: Sequence[BollardConfig], dirs: Sequence[Path] = ()
) -> AsyncIterator[tuple[BollardFamily, Sink]]:
    sink = Sink()
    async with (
        BollardFamily(configs, DriverContext(profile_dirs=tuple(dirs))) as family,
        asyncio.TaskGroup() as tg,
    ):
        tasks = [tg.create_task(d.run(sink), name=f"driver {d.device.id}") for d in family.drivers]
        try:
            yield family, sink
        finally:
            for t in tasks:
                t.cancel()


@contextlib.asynccontextmanager
async def one(sim: BollardSimulator, profiles: Path, **kw: Any) -> AsyncIterator[tuple[BollardDriver, Sink]]:
    """One running bollard on ``sim``, its first state already published."""
    async with running([bollard(sim.port, **kw)], [profiles]) as (family, sink):
        (driver,) = family.drivers
        await sink.wait(is_("bollard.state"))
        yield driver, sink


async def polls(driver: BollardDriver, n: int) -> None:
    """Let ``n`` more polls happen (bounded)."""
    target = driver.status.polls + n
    for _ in range(int(WAIT / POLL) * 2):
        if driver.status.polls >= target:
            return
        await asyncio.sleep(POLL / 2)
    raise AssertionError(f"{driver.device.id}: {n} polls did not happen within {WAIT} s")


async def timed_command(
    driver: BollardDriver, name: str, args: dict[str, Any] | None = None
) -> tuple[Outcome, float]:
    start = time.monotonic()
    async with asyncio.timeout(10):  # longer than any bound the driver has with these profiles
        outcome = await driver.command(name, args or {})
    return outcome, time.monotonic() - start


async def sim_until(
    sim: BollardSimulator, pred: Callable[[dict[str, Any]], bool], within: float = WAIT
) -> dict[str, Any]:
    """The simulator's first snapshot matching ``pred`` (sampled every 5 ms, bounded)."""
    last: dict[str, Any] = {}
    for _ in range(int(within / 0.005)):
        last = await sim.state()
        if pred(last):
            return last
        await asyncio.sleep(0.005)
    raise AssertionError(f"simulator never matched within {within} s; last {last}")


async def did_not_move(sim: BollardSimulator, driver: BollardDriver) -> None:
    """The bollard stays down for a few polls (and the simulator agrees)."""
    await polls(driver, 4)
    s = await sim.state()
    assert (s["state_name"], s["position"]) == ("lowered", 0)
    assert driver.last is not None
    assert driver.last.state is BollardState.LOWERED


def chain_ok(events: list[Observation]) -> bool:
    """Each bollard.state names the state before it as ``previous``."""
    return all(b.data["previous"] == a.data["state"] for a, b in itertools.pairwise(events))


# ---- polling and the normal commands ------------------------------------------------------


async def test_first_poll_publishes_the_state_once_with_the_shipped_profile(sim: BollardSimulator) -> None:
    async with running([bollard(sim.port, profile="generic-bollard-plc", gate="main")]) as (family, sink):
        (driver,) = family.drivers
        first = await sink.wait(is_("bollard.state"))
        await polls(driver, 5)
        assert sink.events == [first]  # nothing changes at rest: nothing more to say
        assert first.severity is Severity.INFO
        assert first.device.kind is DeviceKind.BOLLARD
        assert (first.device.id, first.device.name, first.device.location) == (
            "b1",
            "North bollard",
            "main gate",
        )
        assert dict(first.data) == {
            "state": "lowered",
            "previous": None,
            "mode": "remote",
            "position_pct": 0.0,
            "pressure_bar": 12.0,
            "loop": False,
            "photocell": False,
            "fault_code": 0,
        }
        assert driver.groups == ("gate:main",)
        assert driver.status.state is LinkState.ONLINE
        assert driver.status.detail["state"] == "lowered"
        assert driver.profile.travel.raise_ == 4.0  # the shipped one, not the test copy


async def test_raise_and_lower_are_confirmed_and_every_transition_published(
    sim: BollardSimulator, profiles: Path
) -> None:
    async with one(sim, profiles) as (driver, sink):
        outcome, took = await timed_command(driver, "bollard.raise")
        assert outcome.verdict is Verdict.DONE, outcome
        assert outcome.reason is None
        assert outcome.data["state"] == "raised"
        assert outcome.data["position_pct"] == 100.0
        assert RAISE_S * 0.8 <= took < RAISE_S + SLACK
        assert sim.command_writes() == 1
        snap = await sim.state()
        assert (snap["state_name"], snap["command"], snap["position"]) == ("raised", 1, 1000)
        # The final state event is out before the command's answer.
        assert sink.states() == ["lowered", "raising", "raised"]
        assert chain_ok(sink.of("bollard.state"))

        again, took = await timed_command(driver, "bollard.raise")
        assert (again.verdict, again.reason) == (Verdict.DONE, None)
        assert "already" in again.detail
        assert again.data["state"] == "raised"
        assert took < 0.5
        assert sim.command_writes() == 1  # nothing written

        outcome, took = await timed_command(driver, "bollard.lower")
        assert outcome.verdict is Verdict.DONE, outcome
        assert outcome.data["state"] == "lowered"
        assert outcome.data["position_pct"] == 0.0
        assert LOWER_S * 0.8 <= took < LOWER_S + SLACK
        assert sim.command_writes() == 2
        assert sink.states() == ["lowered", "raising", "raised", "lowering", "lowered"]
        assert chain_ok(sink.of("bollard.state"))
        assert all(e.severity is Severity.INFO for e in sink.of("bollard.state"))
        assert [e.type for e in sink.events] == ["bollard.state"] * 5

        already = await driver.command("bollard.lower", {})
        assert already.verdict is Verdict.DONE
        assert already.detail == "already lowered"
        assert sim.command_writes() == 2


async def test_emergency_raise_is_faster_and_passes_through_emergency(
    sim: BollardSimulator, profiles: Path
) -> None:
    async with one(sim, profiles) as (driver, sink):
        outcome, took = await timed_command(driver, "bollard.emergency_raise")
        assert outcome.verdict is Verdict.DONE, outcome
        assert outcome.data["state"] == "raised"
        assert EMERGENCY_S * 0.8 <= took < RAISE_S  # a normal rise could not be done by now
        assert (await sim.state())["command"] == 2
        assert sink.states() == ["lowered", "emergency", "raised"]
        emergency = sink.of("bollard.state")[1]
        assert emergency.severity is Severity.MAJOR
        assert emergency.data["previous"] == "lowered"
        assert sim.command_writes() == 1


# ---- refusals: nothing written, nothing moves ---------------------------------------------


@pytest.mark.parametrize("action", ["bollard.raise", "bollard.emergency_raise"])
@pytest.mark.parametrize("what", ["loop", "photocell"])
async def test_presence_refuses_a_rise_and_the_interlock_clears_with_it(
    sim: BollardSimulator, profiles: Path, action: str, what: str
) -> None:
    async with one(sim, profiles) as (driver, sink):
        await (sim.set_loop(True) if what == "loop" else sim.set_photocell(True))
        await polls(driver, 2)
        assert driver.last is not None
        assert getattr(driver.last, what) is True
        assert not sink.of("bollard.interlock")  # presence alone is no interlock: a blocked rise is
        outcome = await driver.command(action, {})
        assert (outcome.verdict, outcome.reason) == (Verdict.REFUSED, "interlock"), outcome
        assert ("vehicle loop" if what == "loop" else "photocell") in outcome.detail
        assert outcome.data[what] is True
        assert sim.command_writes() == 0
        active = await sink.wait(is_("bollard.interlock", EventState.ACTIVE))
        assert active.severity is Severity.MAJOR
        assert active.data["how"] == "refused"
        assert active.data["action"] == action.removeprefix("bollard.")
        assert active.data[what] is True
        assert active.data["state_of_bollard"] == "lowered"
        await did_not_move(sim, driver)
        assert not sink.of("bollard.interlock")[1:]  # no CLEARED while still occupied

        await (sim.set_loop(False) if what == "loop" else sim.set_photocell(False))
        cleared = await sink.wait(is_("bollard.interlock", EventState.CLEARED))
        assert cleared.severity is Severity.INFO
        assert (cleared.data["loop"], cleared.data["photocell"]) == (False, False)
        await polls(driver, 3)
        assert len(sink.of("bollard.interlock")) == 2
        assert sim.command_writes() == 0
        assert (await sim.state())["position"] == 0  # the PLC does not rise by itself either


async def test_lowering_is_never_blocked_by_presence(sim: BollardSimulator, profiles: Path) -> None:
    async with one(sim, profiles) as (driver, sink):
        assert (await driver.command("bollard.raise", {})).verdict is Verdict.DONE
        await sim.set_loop(True)  # a vehicle waits at the raised bollard
        await polls(driver, 2)
        assert (await driver.command("bollard.raise", {})).detail == "already raised"
        outcome = await driver.command("bollard.lower", {})
        assert outcome.verdict is Verdict.DONE, outcome
        assert not sink.of("bollard.interlock")


async def test_local_mode_refuses_without_writing(sim: BollardSimulator, profiles: Path) -> None:
    async with one(sim, profiles) as (driver, sink):
        await sim.set_mode("local")
        mode = await sink.wait(is_("bollard.state", mode="local"))
        assert (mode.data["state"], mode.data["previous"]) == ("lowered", "lowered")
        for action in ("bollard.raise", "bollard.emergency_raise"):
            outcome = await driver.command(action, {})
            assert (outcome.verdict, outcome.reason) == (Verdict.REFUSED, "local_mode"), outcome
            assert outcome.data["mode"] == "local"
        assert sim.command_writes() == 0
        await did_not_move(sim, driver)
        await sim.set_mode("remote")
        await sink.wait(is_("bollard.state", mode="remote"))
        assert (await driver.command("bollard.raise", {})).verdict is Verdict.DONE
        assert sim.command_writes() == 1


FAULTS = [
    ("low_pressure", 1, "Low hydraulic pressure"),
    ("motor_overtemp", 2, "Motor over-temperature"),
    ("position_sensor", 3, "Position sensor failure"),
]


@pytest.mark.parametrize(("fault", "code", "text"), FAULTS)
async def test_a_fault_is_reported_with_its_text_refuses_and_clears(
    sim: BollardSimulator, profiles: Path, fault: str, code: int, text: str
) -> None:
    async with one(sim, profiles) as (driver, sink):
        await sim.fault(fault, True)
        active = await sink.wait(is_("bollard.fault", EventState.ACTIVE))
        assert active.severity is Severity.MAJOR
        assert dict(active.data) == {"code": code, "text": text, "state_of_bollard": "fault"}
        state = await sink.wait(is_("bollard.state", state="fault"))
        assert state.severity is Severity.MAJOR
        assert state.data["fault_code"] == code
        if fault == "low_pressure":
            assert state.data["pressure_bar"] == 4.0

        outcome = await driver.command("bollard.raise", {})
        assert (outcome.verdict, outcome.reason) == (Verdict.REFUSED, "fault"), outcome
        assert outcome.detail == f"fault {code}: {text}"
        assert sim.command_writes() == 0

        await sim.fault(fault, False)
        cleared = await sink.wait(is_("bollard.fault", EventState.CLEARED))
        assert cleared.severity is Severity.INFO
        assert (cleared.data["code"], cleared.data["text"]) == (code, text)
        await sink.wait(is_("bollard.state", state="lowered", previous="fault"))
        await polls(driver, 3)
        assert len(sink.of("bollard.fault")) == 2
        assert (await sim.state())["position"] == 0  # nothing was stored to carry out later


async def test_two_faults_at_once_report_the_lowest_code_then_the_next(
    sim: BollardSimulator, profiles: Path
) -> None:
    async with one(sim, profiles) as (_, sink):
        await sim.fault("motor_overtemp", True)
        await sink.wait(is_("bollard.fault", EventState.ACTIVE, code=2))
        await sim.fault("low_pressure", True)
        await sink.wait(is_("bollard.fault", EventState.ACTIVE, code=1))
        await sim.fault("low_pressure", False)
        await sink.wait(is_("bollard.fault", EventState.ACTIVE, code=2, text="Motor over-temperature"), n=2)
        await sim.fault("motor_overtemp", False)
        await sink.wait(is_("bollard.fault", EventState.CLEARED, code=2), n=2)
        faults = [(e.state, e.data["code"]) for e in sink.of("bollard.fault")]
        active, cleared = EventState.ACTIVE, EventState.CLEARED
        assert faults == [(active, 2), (cleared, 2), (active, 1), (cleared, 1), (active, 2), (cleared, 2)]


async def test_bad_args_and_unknown_commands_are_refused(sim: BollardSimulator, profiles: Path) -> None:
    async with one(sim, profiles) as (driver, _):
        for name in ("bollard.raise", "bollard.lower", "bollard.emergency_raise"):
            outcome = await driver.command(name, {"speed": "fast"})
            assert (outcome.verdict, outcome.reason) == (Verdict.REFUSED, "bad_args"), outcome
            assert name in outcome.detail
        unknown = await driver.command("bollard.wiggle", {})
        assert (unknown.verdict, unknown.reason) == (Verdict.REFUSED, "unsupported")
        assert sim.command_writes() == 0
        await did_not_move(sim, driver)
        assert driver.commands == {"bollard.raise", "bollard.lower", "bollard.emergency_raise"}


async def test_a_command_needs_a_running_driver(sim: BollardSimulator, profiles: Path) -> None:
    ctx = DriverContext(profile_dirs=(profiles,))
    async with BollardFamily([bollard(sim.port)], ctx) as family:
        outcome = await family.drivers[0].command("bollard.raise", {})
        assert (outcome.verdict, outcome.reason) == (Verdict.FAILED, "not_running")
    assert sim.command_writes() == 0


# ---- commands that fail ------------------------------------------------------------------


async def test_a_jammed_bollard_fails_not_confirmed_within_the_start_bound(
    sim: BollardSimulator, profiles: Path
) -> None:
    async with one(sim, profiles) as (driver, sink):
        await sim.jam(True)
        outcome, took = await timed_command(driver, "bollard.raise")
        assert (outcome.verdict, outcome.reason) == (Verdict.FAILED, "not_confirmed"), outcome
        assert "state lowered" in outcome.detail
        assert "position 0 %" in outcome.detail
        assert outcome.data["state"] == "lowered"
        assert START_WITHIN * 0.95 <= took < START_WITHIN + SLACK
        assert sim.command_writes() == 1  # written and stored, never acted on
        assert (await sim.state())["command"] == 1
        assert sink.states() == ["lowered"]


async def test_a_bollard_jammed_half_way_fails_with_where_it_stopped(
    sim: BollardSimulator, profiles: Path
) -> None:
    async with one(sim, profiles) as (driver, sink):
        task = asyncio.create_task(driver.command("bollard.raise", {}))
        await sim_until(sim, lambda s: s["position"] >= 300)
        await sim.jam(True)
        async with asyncio.timeout(10):
            outcome = await task
        assert (outcome.verdict, outcome.reason) == (Verdict.FAILED, "not_confirmed"), outcome
        assert "not raised within" in outcome.detail
        assert "state raising" in outcome.detail
        assert 30 <= outcome.data["position_pct"] < 100
        assert sink.states() == ["lowered", "raising"]


@pytest.mark.parametrize("what", ["loop", "photocell"])
async def test_presence_mid_rise_reverses_it_and_fails_the_command(
    sim: BollardSimulator, profiles: Path, what: str
) -> None:
    async with one(sim, profiles) as (driver, sink):
        task = asyncio.create_task(driver.command("bollard.raise", {}))
        await sink.wait(is_("bollard.state", state="raising"))
        await sim_until(sim, lambda s: s["position"] >= 300)
        await (sim.set_loop(True) if what == "loop" else sim.set_photocell(True))
        async with asyncio.timeout(WAIT):
            outcome = await task
        assert (outcome.verdict, outcome.reason) == (Verdict.FAILED, "interlock"), outcome
        assert outcome.data[what] is True
        reversed_ = await sink.wait(is_("bollard.interlock", EventState.ACTIVE))
        assert reversed_.data["how"] == "reversed"
        assert reversed_.data[what] is True
        assert reversed_.data["state_of_bollard"] == "lowering"
        assert sim.command_writes() == 1
        await sink.wait(is_("bollard.state", state="lowered"), n=2)  # the PLC takes it back down
        assert sink.states() == ["lowered", "raising", "lowering", "lowered"]
        await (sim.set_loop(False) if what == "loop" else sim.set_photocell(False))
        await sink.wait(is_("bollard.interlock", EventState.CLEARED))
        assert len(sink.of("bollard.interlock")) == 2


async def test_presence_at_the_very_start_of_a_rise_is_an_interlock_too(
    sim: BollardSimulator, profiles: Path
) -> None:
    """A vehicle arriving just after the command: the reversal is over before any read shows
    the bollard lowering. Still an interlock, at once, not a time-out at the end of the bound."""
    async with one(sim, profiles) as (driver, sink):
        start = time.monotonic()
        task = asyncio.create_task(driver.command("bollard.raise", {}))
        await sim_until(sim, lambda s: s["command_writes"] == 1, within=2.0)
        await sim.set_loop(True)
        async with asyncio.timeout(10):
            outcome = await task
        took = time.monotonic() - start
        assert (outcome.verdict, outcome.reason) == (Verdict.FAILED, "interlock"), outcome
        assert took < START_WITHIN + SLACK  # not the travel bound (1.9 s here)
        event = await sink.wait(is_("bollard.interlock", EventState.ACTIVE))
        assert event.data["how"] == "reversed"
        assert event.data["loop"] is True
        await sim.set_loop(False)
        await sink.wait(is_("bollard.interlock", EventState.CLEARED))


async def test_a_lower_supersedes_a_raise_in_progress(sim: BollardSimulator, profiles: Path) -> None:
    async with one(sim, profiles) as (driver, sink):
        raise_ = asyncio.create_task(driver.command("bollard.raise", {}))
        await sink.wait(is_("bollard.state", state="raising"))
        await sim_until(sim, lambda s: s["position"] >= 300)
        lower, took = await timed_command(driver, "bollard.lower")
        async with asyncio.timeout(WAIT):
            raised = await raise_
        assert (raised.verdict, raised.reason) == (Verdict.FAILED, "superseded"), raised
        assert lower.verdict is Verdict.DONE, lower
        assert lower.data["state"] == "lowered"
        assert took < LOWER_S + SLACK
        assert sim.command_writes() == 2
        assert sink.states() == ["lowered", "raising", "lowering", "lowered"]
        assert not sink.of("bollard.interlock")  # a reversal we asked for is no interlock


# ---- the link ------------------------------------------------------------------------------


async def test_offline_device_fails_commands_as_unavailable_and_comes_back(
    sim: BollardSimulator, profiles: Path
) -> None:
    async with one(sim, profiles, timeout=TIMEOUT) as (driver, sink):
        await sim.silent()
        offline = await sink.wait(is_("device.offline"))
        assert offline.severity is Severity.MAJOR
        assert offline.data["reason"]
        assert driver.status.state is LinkState.OFFLINE
        outcome, took = await timed_command(driver, "bollard.raise")
        assert (outcome.verdict, outcome.reason) == (Verdict.FAILED, "unavailable"), outcome
        assert outcome.detail
        assert took < 2 * TIMEOUT + SLACK  # the poll in flight, then one timed-out read
        await polls(driver, 4)
        assert len(sink.of("device.offline")) == 1
        assert sim.command_writes() == 0
        await sim.normal()
        online = await sink.wait(is_("device.online"))
        assert online.severity is Severity.INFO
        assert [e.type for e in sink.events] == ["bollard.state", "device.offline", "device.online"]
        assert (await driver.command("bollard.raise", {})).verdict is Verdict.DONE
        assert sim.command_writes() == 1


async def test_two_bollards_on_one_link_move_independently(profiles: Path) -> None:
    async with (
        BollardSimulator(
            units=(1, 2), raise_seconds=RAISE_S, lower_seconds=LOWER_S, emergency_seconds=EMERGENCY_S
        ) as sim,
        running(
            [bollard(sim.port, "b1", unit=1, gate="main"), bollard(sim.port, "b2", unit=2, gate="main")],
            [profiles],
        ) as (family, sink),
    ):
        b1, b2 = family.drivers
        await sink.wait(lambda e: e.type == "bollard.state" and e.device.id == "b2")
        await sim.set_loop(True, unit=1)
        await polls(b1, 2)
        refused, done = await asyncio.gather(b1.command("bollard.raise", {}), b2.command("bollard.raise", {}))
        assert refused.reason == "interlock"
        assert done.verdict is Verdict.DONE, done
        assert (sim.command_writes(1), sim.command_writes(2)) == (0, 1)
        assert (await sim.state(1))["position"] == 0
        assert [e.device.id for e in sink.of("bollard.interlock")] == ["b1"]
        assert b1.groups == b2.groups == ("gate:main",)


# ---- a second vendor, added by a profile file alone ---------------------------------------

VENDOR = {
    "description": "Fictional Acme road blocker: HR10 command, HR20-24 status, coils 0-3 presence",
    "kind": "bollard",
    "command": {
        "table": "holding_registers",
        "address": 10,
        "values": {"lower": 6, "raise": 5, "emergency_raise": 7},
    },
    "status": {
        "table": "holding_registers",
        "address": 20,
        "count": 5,
        "mode": 0,
        "position": 1,
        "fault": 2,
        "state": 3,
        "pressure": 4,
    },
    "states": {
        16: "lowered",
        17: "lowering",
        18: "raised",
        19: "raising",
        32: "fault",
        48: "emergency",
        64: "stopped",
    },
    "modes": {3: "remote", 7: "local"},
    "faults": {4: "Accumulator empty", 9: "Door of the cabinet open"},
    "pressure_scale": 0.01,
    "position_scale": 2.0,
    "presence": {"table": "coils", "address": 0, "count": 4, "photocell": 0, "loop": 3},
    "travel": {"raise": 0.5, "lower": 0.5, "emergency_raise": 0.3},
}
HR_COMMAND = 10
HR_STATUS = 20  # mode, position, fault, state, pressure


@contextlib.asynccontextmanager
async def vendor_server(status: list[int], coils: list[bool]) -> AsyncIterator[ModbusTcpServer]:
    """The fictional vendor's controller as unit 1 with static values; tests change them."""
    device = SimDevice(
        1,
        simdata=(
            [SimData(0, values=coils + [False] * (16 - len(coils)), datatype=DataType.BITS)],
            [SimData(0xFFF0, values=[False] * 16, datatype=DataType.BITS)],  # no discrete inputs
            [
                SimData(
                    HR_COMMAND, values=[0] * (HR_STATUS - HR_COMMAND) + status, datatype=DataType.REGISTERS
                )
            ],
            [SimData(0xFFF0, values=[0], datatype=DataType.REGISTERS)],  # no input registers
        ),
    )
    server = ModbusTcpServer([device], address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        yield server
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


def server_port(server: ModbusTcpServer) -> int:
    return int(server.transport.sockets[0].getsockname()[1])  # type: ignore[attr-defined]


async def test_a_second_vendor_is_a_profile_file_alone(tmp_path: Path) -> None:
    (tmp_path / "acme-blocker.yaml").write_text(yaml.safe_dump(VENDOR), encoding="utf-8")
    # raised (18), fault 4, 8.73 bar, 50 counts = 100 %, remote (3); photocell blocked, loop free
    status = [3, 50, 4, 18, 873]
    async with vendor_server(status, [True, False, False, False]) as server:
        cfg = bollard(server_port(server), "acme", profile="acme-blocker")
        async with running([cfg], [tmp_path]) as (family, sink):
            (driver,) = family.drivers
            first = await sink.wait(is_("bollard.state"))
            assert dict(first.data) == {
                "state": "raised",
                "previous": None,
                "mode": "remote",
                "position_pct": 100.0,
                "pressure_bar": 8.73,
                "loop": False,
                "photocell": True,
                "fault_code": 4,
            }
            fault = await sink.wait(is_("bollard.fault", EventState.ACTIVE))
            assert (fault.data["code"], fault.data["text"]) == (4, "Accumulator empty")
            refused = await driver.command("bollard.lower", {})
            assert (refused.reason, refused.detail) == ("fault", "fault 4: Accumulator empty")

            # Fault cleared, cabinet key on local (7), loop occupied, photocell free.
            await server.async_setValues(1, 3, HR_STATUS, [7, 25, 0, 64, 100])
            await server.async_setValues(1, 1, 0, [False, False, False, True])
            changed = await sink.wait(is_("bollard.state", state="stopped"))
            assert changed.data["mode"] == "local"
            assert (changed.data["position_pct"], changed.data["pressure_bar"]) == (50.0, 1.0)
            assert (changed.data["loop"], changed.data["photocell"]) == (True, False)
            assert changed.data["previous"] == "raised"
            await sink.wait(is_("bollard.fault", EventState.CLEARED, code=4))
            local = await driver.command("bollard.lower", {})
            assert local.reason == "local_mode"
            assert (await server.async_getValues(1, 3, HR_COMMAND, 1)) == [0]  # nothing written

            # An unknown state code is "unknown", an unknown fault code still says which.
            await server.async_setValues(1, 3, HR_STATUS, [3, 25, 77, 99, 100])
            odd = await sink.wait(is_("bollard.state", state="unknown"))
            assert odd.data["mode"] == "remote"
            await sink.wait(is_("bollard.fault", EventState.ACTIVE, code=77, text="fault code 77"))

            # Back to normal, lowered; a raise writes the vendor's 5 to HR10 and is followed.
            await server.async_setValues(1, 3, HR_STATUS, [3, 0, 0, 16, 873])
            await server.async_setValues(1, 1, 0, [False, False, False, False])
            await sink.wait(is_("bollard.state", state="lowered"))
            task = asyncio.create_task(driver.command("bollard.raise", {}))
            for _ in range(200):  # bounded: 2 s
                if (await server.async_getValues(1, 3, HR_COMMAND, 1)) == [5]:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the raise (5) never reached HR10")
            await server.async_setValues(1, 3, HR_STATUS, [3, 20, 0, 19, 873])  # raising
            await sink.wait(is_("bollard.state", state="raising"))
            await server.async_setValues(1, 3, HR_STATUS, [3, 50, 0, 18, 873])  # raised
            async with asyncio.timeout(WAIT):
                outcome = await task
            assert outcome.verdict is Verdict.DONE, outcome
            assert outcome.data["position_pct"] == 100.0
            assert driver.profile.command.address == HR_COMMAND


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (lambda p: p["status"].update(fault=7), "status", "fault: register 7 outside the block"),
        (lambda p: p["command"]["values"].pop("emergency_raise"), "command", "['emergency_raise'] missing"),
        (lambda p: p["command"]["values"].update({"raise": 6}), "command", "two actions share a value"),
        (lambda p: p["command"]["values"].update(raise_=5), "command.values.raise_", "Input should be"),
        (
            lambda p: p["presence"].update(loop=None, photocell=None),
            "presence",
            "name the loop or the photocell",
        ),
        (lambda p: p["states"].update({5: "flying"}), "states[5]", "Input should be"),
        (lambda p: p.update(colour="red"), "colour", "unknown key"),
        (lambda p: p["travel"].pop("lower"), "travel.lower", "required"),
        (lambda p: p["status"].update(table="coils"), "status.table", "'input_registers' or"),
    ],
)
def test_a_bad_profile_is_a_located_config_error(
    tmp_path: Path, change: Callable[[dict[str, Any]], Any], where: str, message: str
) -> None:
    data = yaml.safe_load(yaml.safe_dump(VENDOR))
    change(data)
    path = tmp_path / "acme-blocker.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_profile("acme-blocker", [tmp_path])
    assert err.value.source == str(path)
    assert any(p.startswith(where) and message in m for p, m in err.value.issues), err.value.issues
    # Found through the family's check as well, located on the device's profile field.
    issues = BollardFamily.check(
        [bollard(502, profile="acme-blocker")], DriverContext(profile_dirs=(tmp_path,))
    )
    assert [(i, f) for i, f, _ in issues] == [(0, "profile")]
    assert str(path) in issues[0][2]


def test_the_shipped_profile_loads() -> None:
    shipped = load_profile("generic-bollard-plc")
    assert shipped.command.address == 0
    assert shipped.states[5] is BollardState.EMERGENCY
    assert shipped.faults[2] == "Motor over-temperature"


def test_bad_yaml_is_located_by_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("kind: bollard\ncommand: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line"):
        load_profile("broken", [tmp_path])


# ---- family.check --------------------------------------------------------------------------


def test_check_finds_unknown_profiles_and_duplicate_units(profiles: Path) -> None:
    ctx = DriverContext(profile_dirs=(profiles,))
    good = [
        bollard(5020, "a", unit=1),
        bollard(5020, "b", unit=2),
        bollard(5021, "c", unit=1),  # another link: unit 1 again is fine
        bollard(5020, "d", unit=1, host="127.0.0.2"),
        bollard(5020, "e", unit=3, profile="generic-bollard-plc"),
    ]
    assert BollardFamily.check(good, ctx) == []
    bad = [
        bollard(5020, "a", unit=1),
        bollard(5020, "b", unit=1),
        bollard(5020, "c", unit=2, profile="no-such-bollard"),
        bollard(5020, "d", unit=1),
    ]
    issues = BollardFamily.check(bad, ctx)
    assert [(i, f) for i, f, _ in issues] == [(1, "unit"), (2, "profile"), (3, "unit")]
    assert "devices[0]" in issues[0][2]
    assert "unit 1" in issues[0][2]
    assert "not found" in issues[1][2]
    assert "generic-bollard-plc" in issues[1][2]  # the known ones are listed
    assert "devices[0]" in issues[2][2]
    # Without the test directory the test profile is unknown too.
    assert [f for _, f, _ in BollardFamily.check(good[:1], DriverContext())] == ["profile"]

"""The alarm-box driver against the real simulator over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from drivers.modbus.hub import HubState
from drivers.modbus_alarm import AlarmBoxConfig, AlarmBoxDriver, AlarmBoxFamily, Presence
from drivers.modbus_alarm.driver import Ticker
from gateway.driver import DriverContext, LinkState, Verdict
from gateway.errors import DeviceRejected
from gateway.events import DeviceKind, EventState, Observation, Severity
from simulators.alarm_box import AlarmBoxSimulator

POLL = 0.05
# A box's read timeout where a test makes reads fail on purpose (faults), so that it goes
# offline quickly; every other test gets PATIENT, so a loaded CI box cannot turn a slow
# answer into a failure the test did not ask for.
TIMEOUT = 0.1
PATIENT = 2.0
WAIT = 3.0  # upper bound for anything to show up; the assertions on latency are tighter
ROOT = Path(__file__).resolve().parents[1]


class Sink:
    """Collects observations; tests wait on its condition, never on a fixed sleep."""

    def __init__(self) -> None:
        self.events: list[Observation] = []
        self._changed = asyncio.Condition()

    async def publish(self, obs: Observation) -> None:
        async with self._changed:
            self.events.append(obs)
            self._changed.notify_all()

    async def wait(self, pred: Callable[[Observation], bool], within: float = WAIT) -> Observation:
        """The first collected observation matching ``pred``, waiting for it if need be."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: any(pred(e) for e in self.events))
        return next(e for e in self.events if pred(e))

    def of(self, type_: str, device: str | None = None) -> list[Observation]:
        return [e for e in self.events if e.type == type_ and (device is None or e.device.id == device)]


def is_(type_: str, state: EventState | None = None, device: str | None = None, **data: Any) -> Any:
    def pred(e: Observation) -> bool:
        return (
            e.type == type_
            and (state is None or e.state is state)
            and (device is None or e.device.id == device)
            and all(e.data.get(k) == v for k, v in data.items())
        )

    return pred


def box(sim: AlarmBoxSimulator, id_: str = "box", **kw: Any) -> AlarmBoxConfig:
    fields: dict[str, Any] = {
        "id": id_,
        "driver": "modbus_alarm",
        "name": "Gate box",
        "location": "main gate",
        "host": "127.0.0.1",
        "port": sim.port,
        "profile": "generic-8di",
        "poll_interval": POLL,
        "timeout": PATIENT,
        "reconnect_max": 0.3,
        **kw,
    }
    return AlarmBoxConfig.model_validate(fields)


@contextlib.asynccontextmanager
async def running(
    configs: Sequence[AlarmBoxConfig], dirs: Sequence[Path] = ()
) -> AsyncIterator[tuple[AlarmBoxFamily, Sink]]:
    sink = Sink()
    async with (
        AlarmBoxFamily(configs, DriverContext(profile_dirs=tuple(dirs))) as family,
        asyncio.TaskGroup() as tg,
    ):
        tasks = [tg.create_task(d.run(sink), name=f"driver {d.device.id}") for d in family.drivers]
        try:
            yield family, sink
        finally:
            for t in tasks:
                t.cancel()


async def polls(driver: AlarmBoxDriver, n: int) -> None:
    """Let ``n`` more polls happen (bounded)."""
    target = driver.status.polls + n
    for _ in range(int(WAIT / POLL) * 2):
        if driver.status.polls >= target:
            return
        await asyncio.sleep(POLL / 2)
    raise AssertionError(f"{driver.device.id}: {n} polls did not happen within {WAIT} s")


@pytest.fixture
async def sim() -> AsyncIterator[AlarmBoxSimulator]:
    async with AlarmBoxSimulator(inputs=8) as s:
        yield s


async def test_press_is_a_latched_panic_release_is_nothing(sim: AlarmBoxSimulator) -> None:
    async with running([box(sim)]) as (family, sink):
        (driver,) = family.drivers
        await polls(driver, 3)
        assert sink.events == []  # all idle: nothing to say
        assert driver.status.state is LinkState.ONLINE
        start = time.monotonic()
        await sim.press(0)
        panic = await sink.wait(is_("alarm.panic", EventState.ACTIVE))
        assert time.monotonic() - start < 1.0  # 2 polls' debounce (0.1 s) and a loaded box's slack
        assert panic.severity is Severity.CRITICAL
        assert panic.device.id == "box"
        assert panic.device.kind is DeviceKind.ALARM_BOX
        assert (panic.device.name, panic.device.location) == ("Gate box", "main gate")
        assert dict(panic.data) == {
            "contact_id": 1120,
            "zone": 0,
            "zone_name": "Panic button 1",
            "zone_type": "panic",
            "latched": True,
        }
        await sim.release(0)
        await polls(driver, 5)
        assert len(sink.events) == 1
        assert driver.status.detail["latched"] == [0]


async def test_reset_clears_only_released_panics(sim: AlarmBoxSimulator) -> None:
    async with running([box(sim)]) as (family, sink):
        (driver,) = family.drivers
        await sim.press(0)
        await sim.press(1)
        await sink.wait(is_("alarm.panic", EventState.ACTIVE, zone=1))
        await sim.release(0)
        await polls(driver, 3)
        assert await driver.reset(1) == []  # still held
        assert await driver.reset() == [0]
        cleared = await sink.wait(is_("alarm.panic", EventState.CLEARED))
        assert (cleared.data["contact_id"], cleared.data["zone"]) == (3120, 0)
        assert cleared.data["cleared_by"] == "command"
        with pytest.raises(ValueError, match="no zone 42"):
            await driver.reset(42)
        await sim.release(1)
        await polls(driver, 3)
        await sim.press(7)  # the box's key switch
        key = await sink.wait(is_("alarm.panic", EventState.CLEARED, zone=1))
        assert key.data["cleared_by"] == "key_switch"
        assert [e.data["contact_id"] for e in sink.of("alarm.panic")] == [1120, 1120, 3120, 3120]


async def test_tamper_is_reported_and_restored(sim: AlarmBoxSimulator) -> None:
    async with running([box(sim)]) as (_, sink):
        await sim.tamper(True)
        tamper = await sink.wait(is_("alarm.tamper", EventState.ACTIVE))
        assert (tamper.severity, tamper.data["contact_id"], tamper.data["zone"]) == (Severity.MAJOR, 1137, 6)
        await sim.tamper(False)
        restored = await sink.wait(is_("alarm.tamper", EventState.CLEARED))
        assert restored.data["contact_id"] == 3137


async def test_line_cut_and_short_are_line_faults(sim: AlarmBoxSimulator) -> None:
    async with running([box(sim, profile="generic-8di-eol")]) as (family, sink):
        (driver,) = family.drivers
        await polls(driver, 6)
        # one request for the inputs block and one for the analog block per poll (one may be in flight)
        n = driver.status.polls
        assert n - 1 <= sim.requests(function_code=2) <= n
        assert n - 1 <= sim.requests(function_code=4) <= n
        assert sim.requests() == sim.requests(function_code=2) + sim.requests(function_code=4)
        await sim.cut_line(4)
        cut = await sink.wait(is_("alarm.line_fault", EventState.ACTIVE))
        assert (cut.severity, cut.data["fault"], cut.data["contact_id"], cut.data["zone"]) == (
            Severity.MAJOR,
            "open",
            1371,
            4,
        )
        await sim.short_line(4)
        await sink.wait(is_("alarm.line_fault", EventState.ACTIVE, fault="short", contact_id=1372))
        await sim.normal_line(4)
        await sink.wait(is_("alarm.line_fault", EventState.CLEARED, contact_id=3372))
        await sim.set_line(4, "alarm")
        intrusion = await sink.wait(is_("alarm.intrusion", EventState.ACTIVE))
        assert intrusion.data["contact_id"] == 1130
        assert [e.data["contact_id"] for e in sink.of("alarm.line_fault")] == [1371, 3371, 1372, 3372]


@pytest.mark.parametrize("fault", ["silent", "garbage", "drop", "close_port"])
async def test_fault_gives_one_offline_then_online(sim: AlarmBoxSimulator, fault: str) -> None:
    async with running([box(sim, timeout=TIMEOUT)]) as (family, sink):
        (driver,) = family.drivers
        await polls(driver, 2)
        with structlog.testing.capture_logs() as logs:
            await getattr(sim, fault)()
            offline = await sink.wait(is_("device.offline"))
            await polls(driver, 8)
        assert offline.severity is Severity.MAJOR
        assert offline.data["contact_id"] == 1350
        assert offline.data["reason"]
        assert len(sink.of("device.offline")) == 1
        assert driver.status.state is LinkState.OFFLINE
        assert driver.presence is Presence.OFFLINE
        assert driver.status.poll_errors >= 3
        assert driver.status.last_error
        poll_warnings = [e for e in logs if e["event"] == "poll failed"]
        assert 1 <= len(poll_warnings) <= 2  # once, again only if the kind of failure changes
        await sim.press(0)  # pressed while the box was unreachable
        await sim.normal()
        online = await sink.wait(is_("device.online"))
        assert online.data["contact_id"] == 3350
        assert online.severity is Severity.INFO
        await sink.wait(is_("alarm.panic", EventState.ACTIVE))
        types = [e.type for e in sink.events]
        assert types == ["device.offline", "device.online", "alarm.panic"]
        assert driver.status.state is LinkState.ONLINE


async def test_box_down_at_start_goes_offline_once() -> None:
    async with AlarmBoxSimulator(inputs=8) as sim:
        await sim.close_port()
        async with running([box(sim, offline_after=2)]) as (family, sink):
            (driver,) = family.drivers
            await sink.wait(is_("device.offline"))
            await polls(driver, 5)
            assert len(sink.events) == 1
            await sim.open_port()
            await sink.wait(is_("device.online"))


async def test_faulty_boxes_do_not_delay_a_healthy_one() -> None:
    poll = 0.1
    async with contextlib.AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(AlarmBoxSimulator(inputs=8)) for _ in range(4)]
        silent, garbage, closed, healthy = sims
        await silent.silent()
        await garbage.garbage()
        await closed.close_port()
        configs = [
            box(s, id_=name, poll_interval=poll, timeout=0.3, reconnect_max=5.0)
            for s, name in zip(sims, ["silent", "garbage", "closed", "healthy"], strict=True)
        ]
        family, sink = await stack.enter_async_context(running(configs))
        await sink.wait(is_("device.offline", device="silent"))
        await sink.wait(is_("device.offline", device="garbage"))
        await sink.wait(is_("device.offline", device="closed"))
        latencies = []
        for zone in range(3):
            start = time.monotonic()
            await healthy.press(zone)
            await sink.wait(is_("alarm.panic", EventState.ACTIVE, device="healthy", zone=zone))
            latencies.append(time.monotonic() - start)
        assert max(latencies) < 1.0, latencies  # debounce: 2 polls at 0.1 s, plus slack
        assert not sink.of("device.offline", device="healthy")
        assert len(family.hubs) == 4


async def test_two_boxes_on_one_link_share_its_hub() -> None:
    async with AlarmBoxSimulator(inputs=8, units=(1, 2)) as sim:
        configs = [box(sim, id_="one", unit=1), box(sim, id_="two", unit=2)]
        async with running(configs) as (family, sink):
            assert len(family.hubs) == 1
            await sim.press(2, unit=2)
            panic = await sink.wait(is_("alarm.panic", EventState.ACTIVE))
            assert (panic.device.id, panic.data["zone"]) == ("two", 2)
            await sim.press(3, unit=1)
            await sink.wait(is_("alarm.panic", EventState.ACTIVE, device="one", zone=3))
            assert len(sink.events) == 2
            (hub,) = family.hubs.values()
            assert hub.state is HubState.CONNECTED
            assert hub.stats.connects == 1


async def test_outputs_are_written_and_verified() -> None:
    async with AlarmBoxSimulator(inputs=12) as sim, running([box(sim, profile="adam-6050")]) as (family, _):
        (driver,) = family.drivers
        await driver.set_output("ack_led", True)
        assert await sim.coil(16) is True
        await driver.set_output("siren", True)
        assert await sim.coil(17) is True
        await driver.set_output("siren", False)
        assert await sim.coil(17) is False
        with pytest.raises(ValueError, match="no output 'strobe'"):
            await driver.set_output("strobe", True)
        sim.force_output(17, False)
        with pytest.raises(DeviceRejected, match="read back False"):
            await driver.set_output("siren", True)


async def test_reset_needs_a_running_driver(sim: AlarmBoxSimulator) -> None:
    async with AlarmBoxFamily([box(sim)], DriverContext()) as family:
        with pytest.raises(RuntimeError, match="not running"):
            await family.driver("box").reset()


async def test_ticker_keeps_its_grid_and_never_hurries() -> None:
    interval = 0.05
    ticker = Ticker(interval)
    starts = []
    for i in range(8):
        await ticker.wait()
        starts.append(time.monotonic())
        if i == 3:
            await asyncio.sleep(interval * 1.5)  # an overrun
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= interval - 0.001
    # no drift: away from the overrun, starts sit on the grid (not interval + poll time)
    assert starts[3] - starts[0] == pytest.approx(3 * interval, abs=0.02)


async def test_simulator_process_driven_over_http() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.cli",
        "sim",
        "alarm-box",
        "--port",
        "0",
        "--control-port",
        "0",
        "--inputs",
        "8",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            ready = json.loads(await proc.stdout.readline())
        cfg = AlarmBoxConfig.model_validate(
            {
                "id": "proc",
                "driver": "modbus_alarm",
                "host": "127.0.0.1",
                "port": ready["port"],
                "profile": "generic-8di",
                "poll_interval": POLL,
                "timeout": TIMEOUT,
            }
        )
        base = f"http://127.0.0.1:{ready['control_port']}"
        async with aiohttp.ClientSession() as http, running([cfg]) as (_, sink):
            async with http.post(f"{base}/inputs/2", json={"active": True}) as rsp:
                assert rsp.status == 200
            await sink.wait(is_("alarm.panic", EventState.ACTIVE, zone=2))
            async with http.post(f"{base}/fault", json={"mode": "silent"}) as rsp:
                assert rsp.status == 200
            await sink.wait(is_("device.offline"))
            async with http.post(f"{base}/fault", json={"mode": "bogus"}) as rsp:
                assert rsp.status == 400
            async with http.get(f"{base}/state") as rsp:
                state = await rsp.json()
            assert state["fault"] == "silent"
            assert state["units"]["1"]["inputs"][2] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0


async def test_latch_survives_a_restart_and_a_reset_after_it_clears(
    sim: AlarmBoxSimulator, tmp_path: Path
) -> None:
    ctx = DriverContext(state_dir=tmp_path / "devices")

    async def run_once() -> tuple[AlarmBoxFamily, Sink, list[asyncio.Task[None]]]:
        sink = Sink()
        family = AlarmBoxFamily([box(sim)], ctx)
        await family.__aenter__()
        tasks = [asyncio.create_task(d.run(sink)) for d in family.drivers]
        return family, sink, tasks

    async def stop(family: AlarmBoxFamily, tasks: list[asyncio.Task[None]]) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        await family.__aexit__(None, None, None)

    family, sink, tasks = await run_once()
    await sim.press(0)
    await sink.wait(is_("alarm.panic", EventState.ACTIVE))
    await sim.release(0)
    await polls(family.drivers[0], 3)
    await stop(family, tasks)

    # The gateway restarts with the button released: the latch is still there, and no new alarm.
    family, sink, tasks = await run_once()
    try:
        (driver,) = family.drivers
        await polls(driver, 4)
        assert driver.status.detail["latched"] == [0]
        assert sink.events == []
        # A person turns the reset key: the alarm the platform holds is cleared at last.
        await sim.press(7)
        cleared = await sink.wait(is_("alarm.panic", EventState.CLEARED))
        assert cleared.data["contact_id"] == 3120
        await sim.release(7)
        await polls(driver, 2)
        assert driver.status.detail["latched"] == []
    finally:
        await stop(family, tasks)
    assert '"latched": []' in (tmp_path / "devices" / "box.latched.json").read_text()


async def test_a_change_is_confirmed_at_once_not_a_poll_later(sim: AlarmBoxSimulator) -> None:
    """With a 2-sample debounce the second sample is a confirming read a few ms after the
    first, not the next regular poll: a press right after a poll is reported about one
    interval later (the next poll plus the confirmation), not two."""
    interval = 1.0
    async with running([box(sim, poll_interval=interval, debounce_samples=2)]) as (family, sink):
        (driver,) = family.drivers
        await polls(driver, 1)
        seen = driver.status.last_poll_ok
        for _ in range(400):  # bounded: a poll is due within one interval
            if driver.status.last_poll_ok != seen:  # set once a poll's read has returned
                break
            await asyncio.sleep(0.005)
        start = time.monotonic()  # just after a regular poll
        await sim.press(1)
        await sink.wait(is_("alarm.panic", EventState.ACTIVE, zone=1), within=3 * interval)
        took = time.monotonic() - start
        assert 0.8 * interval < took < 1.8 * interval  # without the confirming read: about 2 intervals
        reads = sim.requests(function_code=2)
        await asyncio.sleep(0.3)
        # settled: back on the 1 s grid. A late box may see one regular poll in 0.3 s; a driver
        # still confirming would read every few ms (MAX_CONFIRMS reads in a row).
        assert sim.requests(function_code=2) - reads <= 1


async def test_reset_and_ack_commands(sim: AlarmBoxSimulator) -> None:
    async with running([box(sim, ack_seconds=0.3)]) as (family, sink):
        (driver,) = family.drivers
        assert driver.commands == {"alarm.reset", "alarm.ack"}
        await sim.press(0)
        await sink.wait(is_("alarm.panic", EventState.ACTIVE, zone=0))
        held = await driver.command("alarm.reset", {"zone": 0})
        assert (held.verdict, held.reason) == (Verdict.REFUSED, "held")
        assert held.data["latched"] == [0]
        await sim.release(0)
        await polls(driver, 3)
        done = await driver.command("alarm.reset", {})
        assert (done.verdict, done.data["cleared"]) == (Verdict.DONE, [0])
        await sink.wait(is_("alarm.panic", EventState.CLEARED, zone=0))
        again = await driver.command("alarm.reset", {})
        assert (again.verdict, again.detail) == (Verdict.DONE, "nothing latched")
        for bad in ({"zone": 42}, {"zone": "0"}, {"zones": [0]}):
            assert (await driver.command("alarm.reset", bad)).reason == "bad_args"

        ack = await driver.command("alarm.ack", {})
        assert ack.verdict is Verdict.DONE
        assert await sim.coil(0) is True  # the ack LED, read back by the driver
        start = time.monotonic()
        for _ in range(100):  # bounded: off after ack_seconds, at the next poll
            if not await sim.coil(0):
                break
            await asyncio.sleep(0.02)
        assert await sim.coil(0) is False
        assert time.monotonic() - start < 1.0 + 0.3  # generous: 0.3 s plus a poll on a busy box
        assert (await driver.command("alarm.ack", {"x": 1})).reason == "bad_args"
        assert (await driver.command("bollard.raise", {})).reason == "unsupported"
        sim.force_output(0, False)  # a dead LED: the write is not confirmed
        failed = await driver.command("alarm.ack", {})
        assert (failed.verdict, failed.reason) == (Verdict.FAILED, "device_error")

"""The bollard controller simulator, through a real Modbus TCP client and its HTTP API."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from simulators.bollard import BollardSimulator
from simulators.cli import add_sim_parser

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[1]
RAISE, LOWER, EMERGENCY = 1.0, 0.6, 0.2  # seconds for a full travel, as the fixture sets them
SAMPLE = 0.01  # s between reads while waiting
WAIT = 4.0  # s: the longest any wait here may take
PATIENT = 3.0  # s: a client's timeout for reads meant to succeed, even on a loaded CI box

LOWERED, RAISING, RAISED, LOWERING, FAULT, EMERGENCY_RISE = range(6)


@dataclass(frozen=True)
class Reading:
    command: int
    state: int
    fault: int
    pressure: int
    position: int
    mode: int
    loop: bool
    photocell: bool


@pytest.fixture
async def sim() -> AsyncIterator[BollardSimulator]:
    async with BollardSimulator(
        units=(1, 2),
        raise_seconds=RAISE,
        lower_seconds=LOWER,
        emergency_seconds=EMERGENCY,
        control_port=0,
    ) as s:
        yield s


@pytest.fixture
async def client(sim: BollardSimulator) -> AsyncIterator[AsyncModbusTcpClient]:
    c = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=PATIENT, retries=0)
    assert await c.connect()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
async def http(sim: BollardSimulator) -> AsyncIterator[Callable[..., Any]]:
    """``await http("POST", "/loop", {"occupied": True}, unit=2)`` -> (status, JSON body)."""
    base = f"http://127.0.0.1:{sim.control_port}"
    async with aiohttp.ClientSession() as session:

        async def call(method: str, path: str, body: Any = None, **query: Any) -> tuple[int, Any]:
            kw: dict[str, Any] = {"params": query} if query else {}
            if isinstance(body, str):
                kw["data"] = body
            elif body is not None:
                kw["json"] = body
            async with asyncio.timeout(5), session.request(method, base + path, **kw) as rsp:
                return rsp.status, await rsp.json()

        yield call


async def read(client: AsyncModbusTcpClient, unit: int = 1) -> Reading:
    hr = await client.read_holding_registers(0, count=1, device_id=unit)
    ir = await client.read_input_registers(0, count=5, device_id=unit)
    di = await client.read_discrete_inputs(0, count=2, device_id=unit)
    assert not hr.isError(), hr
    assert not ir.isError(), ir
    assert not di.isError(), di
    return Reading(hr.registers[0], *ir.registers, *di.bits[:2])


async def command(client: AsyncModbusTcpClient, value: int, unit: int = 1) -> None:
    """Write the command register; the answer is a normal one, echoing the request."""
    rsp = await client.write_register(0, value, device_id=unit)
    assert not rsp.isError(), rsp
    assert rsp.registers == [value]


async def until(
    client: AsyncModbusTcpClient,
    pred: Callable[[Reading], bool],
    unit: int = 1,
    within: float = WAIT,
) -> tuple[Reading, float, list[Reading]]:
    """The first reading matching ``pred``, the seconds it took and every reading before it."""
    seen: list[Reading] = []
    start = time.monotonic()
    async with asyncio.timeout(within):
        for _ in range(int(within / SAMPLE) + 1):
            r = await read(client, unit)
            if pred(r):
                return r, time.monotonic() - start, seen
            seen.append(r)
            await asyncio.sleep(SAMPLE)
    raise AssertionError(f"unit {unit}: no match within {within} s; last {seen[-1:]}")


async def steady(client: AsyncModbusTcpClient, seconds: float, unit: int = 1) -> list[Reading]:
    """Readings over ``seconds`` (bounded), for asserting that nothing moves."""
    out = []
    for _ in range(max(1, int(seconds / 0.05))):
        out.append(await read(client, unit))
        await asyncio.sleep(0.05)
    return out


async def raised(client: AsyncModbusTcpClient, unit: int = 1) -> None:
    await command(client, 1, unit)
    await until(client, lambda r: r.state == RAISED, unit)


# ---- register map -----------------------------------------------------------------------


async def test_register_map_at_rest(client: AsyncModbusTcpClient) -> None:
    for unit in (1, 2):
        assert await read(client, unit) == Reading(0, LOWERED, 0, 120, 0, 0, False, False)
    assert (await client.read_coils(0, count=1, device_id=1)).exception_code == 2
    assert (await client.read_holding_registers(1, count=1, device_id=1)).exception_code == 2
    assert (await client.read_input_registers(0, count=6, device_id=1)).exception_code == 2
    assert (await client.write_register(1, 1, device_id=1)).exception_code == 2
    assert (await client.read_input_registers(0, count=5, device_id=3)).exception_code == 0x0B


async def test_invalid_command_is_refused_with_illegal_value(
    sim: BollardSimulator, client: AsyncModbusTcpClient
) -> None:
    rsp = await client.write_register(0, 3, device_id=1)
    assert rsp.exception_code == 3
    assert (await read(client)).command == 0
    assert sim.command_writes(1) == 1


async def test_fc16_writes_the_command_too(client: AsyncModbusTcpClient) -> None:
    assert not (await client.write_registers(0, [1], device_id=1)).isError()
    assert (await read(client)).command == 1
    await until(client, lambda r: r.state == RAISING)


# ---- physics -------------------------------------------------------------------------


async def test_raise_and_lower_take_their_time(client: AsyncModbusTcpClient) -> None:
    await command(client, 1)
    assert (await read(client)).command == 1  # the read-back confirms at once
    r, took, seen = await until(client, lambda r: r.state == RAISED)
    assert r == Reading(1, RAISED, 0, 120, 1000, 0, False, False)
    assert RAISE * 0.9 <= took <= RAISE + 1.0
    rising = [s for s in seen if s.state == RAISING]
    assert len(rising) >= 5
    assert any(200 <= s.position <= 800 for s in rising)
    positions = [s.position for s in seen]
    assert positions == sorted(positions)  # linear, never backwards

    await command(client, 0)
    r, took, seen = await until(client, lambda r: r.state == LOWERED)
    assert r.position == 0
    assert LOWER * 0.9 <= took <= LOWER + 1.0
    lowering = [s for s in seen if s.state == LOWERING]
    assert any(200 <= s.position <= 800 for s in lowering)
    assert [s.position for s in seen] == sorted((s.position for s in seen), reverse=True)


async def test_emergency_raise_is_faster_and_says_so(client: AsyncModbusTcpClient) -> None:
    await command(client, 2)
    r, took, seen = await until(client, lambda r: r.state == RAISED)
    assert r.command == 2
    assert r.position == 1000
    assert EMERGENCY * 0.9 <= took < RAISE * 0.8
    assert {s.state for s in seen} <= {LOWERED, EMERGENCY_RISE}
    assert EMERGENCY_RISE in {s.state for s in seen}


async def test_emergency_during_a_rise_speeds_it_up(client: AsyncModbusTcpClient) -> None:
    await command(client, 1)
    r, _, _ = await until(client, lambda r: r.state == RAISING and r.position >= 100)
    assert r.position <= 500
    await command(client, 2)
    r = await read(client)
    assert (r.command, r.state) == (2, EMERGENCY_RISE)
    _, took, _ = await until(client, lambda r: r.state == RAISED)
    assert took < RAISE * 0.4  # at most 90 % of the way left: 0.18 s at emergency speed, 0.9 s not


# ---- presence --------------------------------------------------------------------------


@pytest.mark.parametrize("presence", ["loop", "photocell"])
@pytest.mark.parametrize("value", [1, 2])
async def test_raise_refused_while_occupied_and_never_starts_later(
    sim: BollardSimulator, client: AsyncModbusTcpClient, presence: str, value: int
) -> None:
    setter = sim.set_loop if presence == "loop" else sim.set_photocell
    await setter(True)
    r = await read(client)
    assert (r.loop, r.photocell) == (presence == "loop", presence == "photocell")
    await command(client, value)  # answered normally ...
    r = await read(client)
    assert r.command == 0  # ... and refused: the read-back says lower
    assert r.state == LOWERED
    assert all(s.position == 0 and s.state == LOWERED for s in await steady(client, 0.3))
    await setter(False)
    later = await steady(client, 0.3)
    assert all(s == Reading(0, LOWERED, 0, 120, 0, 0, False, False) for s in later)
    await command(client, value)  # presence gone: accepted
    await until(client, lambda r: r.state == RAISED)


async def test_presence_during_a_rise_reverses_it(
    client: AsyncModbusTcpClient, http: Callable[..., Any]
) -> None:
    await command(client, 1)
    before, _, _ = await until(client, lambda r: r.position >= 300)
    status, body = await http("POST", "/photocell", {"blocked": True})
    assert status == 200
    assert body["photocell"] is True
    assert body["command"] == 0
    assert body["state"] == LOWERING
    r = await read(client)
    assert (r.command, r.state, r.photocell) == (0, LOWERING, True)
    r, _, seen = await until(client, lambda r: r.state == LOWERED)
    assert max(s.position for s in seen) <= before.position + 100  # it did not go on rising
    assert r.position == 0
    await http("POST", "/photocell", {"blocked": False})
    assert all(s.state == LOWERED and s.command == 0 for s in await steady(client, 0.3))


async def test_emergency_rise_reverses_on_the_loop_too() -> None:
    slow = BollardSimulator(emergency_seconds=1.0)  # slow enough to catch it half way
    async with slow:
        c = AsyncModbusTcpClient("127.0.0.1", port=slow.port, timeout=PATIENT, retries=0)
        assert await c.connect()
        try:
            await command(c, 2)
            await until(c, lambda r: r.state == EMERGENCY_RISE and r.position >= 100)
            await slow.set_loop(True)
            r = await read(c)
            assert (r.command, r.state, r.loop) == (0, LOWERING, True)
            await until(c, lambda r: r.state == LOWERED)
        finally:
            c.close()


async def test_presence_never_blocks_lowering_nor_drops_a_raised_bollard(
    sim: BollardSimulator, client: AsyncModbusTcpClient
) -> None:
    await raised(client)
    await sim.set_loop(True)
    assert all(s.state == RAISED and s.command == 1 for s in await steady(client, 0.3))
    await command(client, 0)
    r, _, _ = await until(client, lambda r: r.state == LOWERED)
    assert r.loop is True


# ---- controller faults ------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",  # (fault, its code, the pressure register while it lasts)
    [("low_pressure", 1, 40), ("motor_overtemp", 2, 120), ("position_sensor", 3, 120)],
    ids=lambda case: case[0],
)
async def test_fault_stops_motion_and_clearing_it_resumes(
    sim: BollardSimulator, client: AsyncModbusTcpClient, http: Callable[..., Any], case: tuple[str, int, int]
) -> None:
    name, code, pressure = case
    await command(client, 1)
    await until(client, lambda r: r.position >= 200)
    status, body = await http("POST", f"/faults/{name}", {"on": True})
    assert status == 200
    assert (body["state"], body["fault_code"], body["faults"]) == (FAULT, code, [name])
    held = await read(client)
    assert (held.state, held.fault, held.pressure, held.command) == (FAULT, code, pressure, 1)
    assert held.position < 1000
    assert all(s == held for s in await steady(client, 0.3))  # nothing moves, nothing changes
    await command(client, 0)  # a write is still taken, but moves nothing while the fault lasts
    assert all(s.position == held.position and s.command == 0 for s in await steady(client, 0.2))
    await command(client, 1)
    await sim.fault(name, False)
    r, _, _ = await until(client, lambda r: r.state == RAISED)
    assert (r.fault, r.pressure, r.position) == (0, 120, 1000)


async def test_position_sensor_freezes_the_position_register_and_faults_add_up(
    sim: BollardSimulator, client: AsyncModbusTcpClient
) -> None:
    await command(client, 1)
    await until(client, lambda r: r.position >= 200)
    await sim.fault("position_sensor", True)
    frozen = (await read(client)).position
    await sim.fault("motor_overtemp", True)
    r = await read(client)
    assert (r.state, r.fault, r.position) == (FAULT, 2, frozen)  # the lowest code shows
    await sim.fault("motor_overtemp", False)
    r = await read(client)
    assert (r.state, r.fault, r.position) == (FAULT, 3, frozen)
    assert (await sim.state())["faults"] == ["position_sensor"]
    with pytest.raises(ValueError, match="one of low_pressure"):
        await sim.fault("hydraulics", True)


# ---- local mode, jam ---------------------------------------------------------------------


async def test_local_mode_ignores_remote_writes(
    sim: BollardSimulator, client: AsyncModbusTcpClient, http: Callable[..., Any]
) -> None:
    status, body = await http("POST", "/mode", {"mode": "local"})
    assert (status, body["mode"]) == (200, "local")
    assert (await read(client)).mode == 1
    await command(client, 1)  # answered normally, the echo is the request ...
    r = await read(client)
    assert (r.command, r.state) == (0, LOWERED)  # ... but the register kept its value
    assert all(s.position == 0 for s in await steady(client, 0.3))
    assert sim.command_writes() == 1  # the write reached the PLC; it chose to ignore it

    status, body = await http("POST", "/command", {"command": 1})  # the local panel works
    assert (status, body["command"]) == (200, 1)
    await until(client, lambda r: r.state == RAISED)
    await command(client, 0)
    assert (await read(client)).command == 1
    assert all(s.state == RAISED for s in await steady(client, 0.2))

    await sim.set_mode("remote")
    assert (await read(client)).mode == 0
    await command(client, 0)
    await until(client, lambda r: r.state == LOWERED)
    assert sim.command_writes() == 3


async def test_jam_accepts_commands_and_moves_nothing(
    sim: BollardSimulator, client: AsyncModbusTcpClient, http: Callable[..., Any]
) -> None:
    status, body = await http("POST", "/jam", {"on": True})
    assert (status, body["jam"]) == (200, True)
    await command(client, 1)
    assert all(
        (s.command, s.state, s.fault, s.position) == (1, LOWERED, 0, 0) for s in await steady(client, 0.4)
    )
    await sim.jam(False)
    await until(client, lambda r: r.state == RAISED)

    await command(client, 0)
    await until(client, lambda r: r.state == LOWERING and r.position <= 700)
    await sim.jam(True)
    stuck = await read(client)
    later = await steady(client, 0.4)
    assert all(s == stuck for s in later)  # "lowering" forever, the read-back never confirms
    assert stuck.state == LOWERING
    assert 0 < stuck.position < 1000


async def test_jam_skips_the_presence_refusal(sim: BollardSimulator, client: AsyncModbusTcpClient) -> None:
    await sim.set_loop(True)
    await sim.jam(True)
    await command(client, 1)
    assert (await read(client)).command == 1
    await sim.jam(False)  # freed with a vehicle on the loop: the PLC refuses the pending rise
    r = await read(client)
    assert (r.command, r.state, r.position) == (0, LOWERED, 0)


# ---- units, counters -------------------------------------------------------------------


async def test_units_are_independent_bollards(sim: BollardSimulator, client: AsyncModbusTcpClient) -> None:
    await sim.set_loop(True, unit=2)
    await command(client, 1, unit=1)
    await command(client, 1, unit=2)
    await until(client, lambda r: r.state == RAISED, unit=1)
    r2 = await read(client, 2)
    assert (r2.command, r2.state, r2.position, r2.loop) == (0, LOWERED, 0, True)
    assert (await read(client, 1)).loop is False
    assert (sim.command_writes(1), sim.command_writes(2)) == (1, 1)
    with pytest.raises(ValueError, match="unit 3 not simulated"):
        sim.command_writes(3)


async def test_command_writes_count_only_writes_that_reach_the_plc(
    sim: BollardSimulator, client: AsyncModbusTcpClient
) -> None:
    for _ in range(3):
        await read(client)
    assert sim.command_writes() == 0
    assert sim.requests(1, 3) == 3
    await command(client, 0)
    assert sim.command_writes() == 1
    await sim.silent()
    with pytest.raises(ModbusIOException):
        await client.write_register(0, 1, device_id=1)
    assert sim.command_writes() == 1  # swallowed by the link, never reached the PLC
    assert sim.requests(1, 6) == 2


# ---- transport faults ----------------------------------------------------------------


async def test_transport_faults(sim: BollardSimulator) -> None:
    async def fresh(timeout: float = PATIENT) -> AsyncModbusTcpClient:
        c = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=timeout, retries=0)
        assert await c.connect()
        return c

    async def fails(c: AsyncModbusTcpClient) -> None:
        try:
            with pytest.raises(ModbusIOException):
                await c.read_input_registers(0, count=5, device_id=1)
        finally:
            c.close()

    for fault in (sim.silent, sim.garbage, sim.drop):
        await fault()
        await fails(await fresh(timeout=0.3))  # short: this read is meant to time out
        await sim.normal()
        c = await fresh()
        assert (await read(c)).state == LOWERED
        c.close()

    await sim.slow(0.2)
    c = await fresh()
    start = time.monotonic()
    assert (await read(c)).state == LOWERED
    assert time.monotonic() - start >= 3 * 0.2 * 0.9  # three requests, each delayed
    c.close()

    await sim.close_port()
    c = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=0.3, retries=0)
    assert not await c.connect()
    c.close()
    await sim.open_port()
    c = await fresh()
    assert (await read(c)).state == LOWERED
    c.close()


async def test_transport_fault_over_http(sim: BollardSimulator, http: Callable[..., Any]) -> None:
    status, body = await http("POST", "/fault", {"mode": "slow", "delay": 0.5})
    assert (status, body["fault"]) == (200, "slow")
    assert sim.proxy.delay == 0.5
    status, body = await http("POST", "/fault", {"mode": "normal"})
    assert (status, body["fault"]) == (200, "normal")


# ---- HTTP API --------------------------------------------------------------------------


async def test_http_state_and_unit_selection(
    sim: BollardSimulator, client: AsyncModbusTcpClient, http: Callable[..., Any]
) -> None:
    status, body = await http("POST", "/loop", {"occupied": True}, unit=2)
    assert (status, body["unit"], body["loop"]) == (200, 2, True)
    await command(client, 1, unit=1)
    status, full = await http("GET", "/state")
    assert status == 200
    assert full["port"] == sim.port
    assert full["fault"] == "normal"
    assert set(full["units"]) == {"1", "2"}
    assert full["units"]["2"]["loop"] is True
    assert full["units"]["1"]["loop"] is False
    assert full["units"]["1"]["command"] == 1
    assert full["units"]["1"]["command_writes"] == 1
    status, one = await http("GET", "/state", unit=1)
    assert status == 200
    assert one["unit"] == 1
    assert one["command"] == 1
    assert one["mode"] == "remote"
    assert one["pressure"] == 120
    assert one["state_name"] in ("raising", "raised")


@pytest.mark.parametrize(
    "case",  # (method, path, body, query, a part of the error message)
    [
        ("POST", "/loop", "{not json", {}, "not JSON"),
        ("POST", "/loop", [True], {}, "JSON object"),
        ("POST", "/loop", {}, {}, "'occupied' must be true or false"),
        ("POST", "/photocell", {"blocked": "yes"}, {}, "'blocked' must be true or false"),
        ("POST", "/mode", {"mode": "manual"}, {}, "'local' or 'remote'"),
        ("POST", "/faults/hydraulics", {"on": True}, {}, "one of low_pressure"),
        ("POST", "/faults/low_pressure", {"on": 1}, {}, "'on' must be true or false"),
        ("POST", "/jam", {"on": None}, {}, "'on' must be true or false"),
        ("POST", "/command", {"command": 7}, {}, "0 (lower), 1 (raise) or 2"),
        ("POST", "/command", {"command": True}, {}, "'command' must be 0, 1 or 2"),
        ("POST", "/fault", {"mode": "bogus"}, {}, "'mode' must be one of"),
        ("POST", "/fault", {"mode": ["silent"]}, {}, "'mode' must be one of"),
        ("POST", "/fault", {"mode": "slow", "delay": 600}, {}, "'delay' must be"),
        ("POST", "/loop", {"occupied": True}, {"unit": 9}, "unit 9 not simulated"),
        ("GET", "/state", None, {"unit": "one"}, "is not an integer"),
    ],
    ids=lambda case: f"{case[1]} {case[4]}",
)
async def test_http_bad_requests_get_400_and_change_nothing(
    sim: BollardSimulator, http: Callable[..., Any], case: tuple[str, str, Any, dict[str, Any], str]
) -> None:
    method, path, body, query, message = case
    _, before = await http("GET", "/state")
    status, answer = await http(method, path, body, **query)
    assert status == 400
    assert message in answer["error"]
    _, after = await http("GET", "/state")
    assert after == before
    assert sim.proxy.mode.value == "normal"


# ---- construction, lifecycle, CLI -------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"host": "0.0.0.0"}, "loopback only"),
        ({"units": ()}, "at least one unit"),
        ({"units": (1, 1)}, "no duplicates"),
        ({"units": (0,)}, "1..247"),
        ({"raise_seconds": 0}, "raise_seconds"),
        ({"emergency_seconds": -1.0}, "emergency_seconds"),
        ({"tick": 2.0}, "tick"),
    ],
)
def test_bad_construction(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BollardSimulator(**kw)


async def test_exit_cancels_the_physics_and_frees_the_port() -> None:
    async with BollardSimulator() as sim:
        port = sim.port
        assert any(t.get_name() == "bollard physics" for t in asyncio.all_tasks())
    assert not any(t.get_name() == "bollard physics" for t in asyncio.all_tasks())
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.3, retries=0)
    assert not await c.connect()
    c.close()
    with pytest.raises(RuntimeError, match="not running"):
        await sim.state()


def test_cli_parses_the_bollard_subcommand() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_sim_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["sim", "bollard", "--port", "0", "--units", "1,2,3", "--raise-seconds", ".5", "--lower-seconds", "2"]
    )
    assert args.units == [1, 2, 3]
    assert (args.raise_seconds, args.lower_seconds, args.emergency_seconds) == (0.5, 2.0, 1.5)
    assert (args.port, args.control_port) == (0, 8503)
    assert args.func.__name__ == "run_bollard"
    for bad in ("1,x", "0", "1,1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["sim", "bollard", "--units", bad])


async def test_simulator_process_driven_over_modbus_and_http() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "sim",
        "bollard",
        "--port",
        "0",
        "--control-port",
        "0",
        "--units",
        "1,2",
        "--raise-seconds",
        "0.3",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            ready = json.loads(await proc.stdout.readline())
        assert ready["sim"] == "bollard"
        assert ready["units"] == [1, 2]
        base = f"http://127.0.0.1:{ready['control_port']}"
        c = AsyncModbusTcpClient("127.0.0.1", port=ready["port"], timeout=PATIENT, retries=0)
        assert await c.connect()
        try:
            await command(c, 1, unit=2)
            _, took, _ = await until(c, lambda r: r.state == RAISED, unit=2)
            assert took < 2.0
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{base}/faults/low_pressure?unit=2", json={"on": True}) as rsp:
                    assert rsp.status == 200
                async with session.get(f"{base}/state") as rsp:
                    state = await rsp.json()
            assert state["units"]["2"]["state"] == FAULT
            assert state["units"]["2"]["pressure"] == 40
            assert state["units"]["1"]["state"] == LOWERED
        finally:
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0

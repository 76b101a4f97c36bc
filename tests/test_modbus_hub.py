"""The Modbus hub against real servers on loopback: bounds, recovery, sharing, RTU, writes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus import HubState, ModbusHub, SerialLink, TcpLink
from gateway.backoff import Backoff
from gateway.errors import DeviceProtocolError, DeviceRejected, DeviceUnavailable
from simulators.alarm_box import AlarmBoxSimulator

TIMEOUT = 0.15
# The hub fixture's default: reads that are meant to succeed get this much time, so a
# loaded 2-core CI box cannot turn a slow answer into a failure. Tests that time out on
# purpose use a unit with TIMEOUT.
PATIENT = 3.0
# Bounds below are generous (a loaded CI box) but far under pymodbus' 12 s default.
SLACK = 0.6


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, cap=0.2)


@pytest.fixture
async def sim() -> AsyncIterator[AlarmBoxSimulator]:
    async with AlarmBoxSimulator(inputs=8, units=(1, 2)) as s:
        yield s


@pytest.fixture
async def hub(sim: AlarmBoxSimulator) -> AsyncIterator[ModbusHub]:
    async with ModbusHub(TcpLink("127.0.0.1", sim.port), timeout=PATIENT, backoff=fast_backoff()) as h:
        yield h


async def timed(aw: object) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        await aw  # type: ignore[misc]
    except (DeviceUnavailable, DeviceProtocolError, DeviceRejected) as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


async def test_reads_one_range_in_one_request(sim: AlarmBoxSimulator, hub: ModbusHub) -> None:
    box = hub.unit(1, device_id="box")
    await sim.press(3)
    before = sim.requests()
    bits = await box.read_discrete_inputs(0, 8)
    regs = await box.read_input_registers(0, 8)
    assert bits == [False, False, False, True, False, False, True, False]  # input 6: NC tamper, closed
    assert regs == [4700] * 8
    assert sim.requests() - before == 2


async def test_silent_device_costs_only_the_timeout(sim: AlarmBoxSimulator, hub: ModbusHub) -> None:
    box, impatient = hub.unit(1, device_id="box"), hub.unit(1, device_id="box", timeout=TIMEOUT)
    await box.read_coils(0, 2)
    await sim.silent()
    for _ in range(3):
        took, exc = await timed(impatient.read_discrete_inputs(0, 8))
        assert isinstance(exc, DeviceUnavailable)
        assert isinstance(exc.__cause__, TimeoutError)
        assert exc.device_id == "box"
        assert TIMEOUT * 0.9 <= took < TIMEOUT + SLACK
    assert hub.stats.timeouts == 3
    assert hub.state is HubState.IDLE  # a timeout is not a link failure: no backoff
    await sim.normal()
    assert len(await box.read_discrete_inputs(0, 8)) == 8
    assert hub.state is HubState.CONNECTED


async def test_late_answer_is_never_taken_for_the_next_request(
    sim: AlarmBoxSimulator, hub: ModbusHub
) -> None:
    box, impatient = hub.unit(1, device_id="box"), hub.unit(1, device_id="box", timeout=TIMEOUT)
    await sim.slow(TIMEOUT * 2)
    _, exc = await timed(impatient.read_input_registers(0, 2))
    assert isinstance(exc, DeviceUnavailable)
    await sim.normal()
    await sim.set_line(0, "open")
    # The late answer (4700) is still on its way; the hub reconnected after the timeout.
    # Patient reads: if that answer were taken for one of these, it would be returned.
    for _ in range(5):
        assert await box.read_input_registers(0, 2) == [65535, 4700]
        await asyncio.sleep(TIMEOUT / 2)


async def test_garbage_is_a_protocol_error_at_once(sim: AlarmBoxSimulator, hub: ModbusHub) -> None:
    box = hub.unit(1, device_id="box")
    await sim.garbage()
    took, exc = await timed(box.read_discrete_inputs(0, 8))
    assert isinstance(exc, DeviceProtocolError)
    assert "invalid reply" in str(exc)
    assert took < PATIENT / 3  # recognised from the bytes, not by waiting
    await sim.normal()
    assert len(await box.read_discrete_inputs(0, 8)) == 8


async def test_dropped_connection_fails_fast_then_backs_off(sim: AlarmBoxSimulator, hub: ModbusHub) -> None:
    box = hub.unit(1, device_id="box")
    await sim.drop()
    took, exc = await timed(box.read_discrete_inputs(0, 8))
    assert isinstance(exc, DeviceUnavailable)
    assert took < PATIENT / 3  # the closed stream is noticed, not waited out
    assert hub.state is HubState.BACKING_OFF
    connects = hub.stats.connects
    _, exc = await timed(box.read_discrete_inputs(0, 8))  # inside the backoff window: no connect
    assert isinstance(exc, DeviceUnavailable)
    assert "next connect" in str(exc)
    assert hub.stats.connects == connects
    await sim.normal()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        _, exc = await timed(box.read_discrete_inputs(0, 8))
        if exc is None:
            break
        await asyncio.sleep(0.02)
    assert exc is None
    assert hub.state is HubState.CONNECTED


async def test_closed_port_backoff_is_capped(sim: AlarmBoxSimulator) -> None:
    await sim.close_port()
    cap = 0.2
    async with ModbusHub(TcpLink("127.0.0.1", sim.port), timeout=PATIENT, backoff=Backoff(0.05, cap)) as hub:
        box = hub.unit(1, device_id="box")
        waits = []
        deadline = time.monotonic() + 10.0  # a bound for the loop; 8 failures take about 1.6 s
        while hub.stats.connect_failures < 8 and time.monotonic() < deadline:
            _, exc = await timed(box.read_discrete_inputs(0, 8))
            assert isinstance(exc, DeviceUnavailable)
            waits.append(hub.retry_in)
            await asyncio.sleep(hub.retry_in)
        assert hub.stats.connect_failures >= 8
        assert max(waits) <= cap
        await sim.open_port()
        await asyncio.sleep(hub.retry_in)
        assert len(await box.read_discrete_inputs(0, 8)) == 8


async def test_two_units_on_one_link_are_serialised(sim: AlarmBoxSimulator, hub: ModbusHub) -> None:
    one, two = hub.unit(1, device_id="one"), hub.unit(2, device_id="two")
    await sim.press(1, unit=1)
    await sim.press(2, unit=2)
    delay = 0.03
    await sim.slow(delay)
    start = time.monotonic()
    results = await asyncio.gather(*(u.read_discrete_inputs(0, 4) for _ in range(3) for u in (one, two)))
    took = time.monotonic() - start
    assert took >= 6 * delay * 0.9  # one transaction at a time on the link
    assert results[0::2] == [[False, True, False, False]] * 3
    assert results[1::2] == [[False, False, True, False]] * 3
    assert hub.stats.connects == 1


async def test_links_do_not_wait_on_each_other() -> None:
    async with (
        AlarmBoxSimulator(inputs=8) as hung,
        AlarmBoxSimulator(inputs=8) as fine,
        ModbusHub(TcpLink("127.0.0.1", hung.port), timeout=2.0) as hung_hub,
        ModbusHub(TcpLink("127.0.0.1", fine.port), timeout=PATIENT) as fine_hub,
    ):
        await hung.silent()
        stuck = asyncio.create_task(hung_hub.unit(1, device_id="hung").read_discrete_inputs(0, 8))
        await asyncio.sleep(0.05)
        took, exc = await timed(fine_hub.unit(1, device_id="fine").read_discrete_inputs(0, 8))
        assert exc is None
        assert took < 1.0  # far less than the hung link's 2 s timeout
        assert not stuck.done()
        with pytest.raises(DeviceUnavailable):
            await stuck


async def test_exception_response_is_rejected_with_its_code(hub: ModbusHub) -> None:
    with pytest.raises(DeviceRejected) as info:
        await hub.unit(1, device_id="box").read_input_registers(100, 2)
    assert info.value.code == 2
    with pytest.raises(DeviceRejected) as info:
        await hub.unit(9, device_id="ghost").read_coils(0, 1)  # a unit the link does not have
    assert info.value.code == 0x0B


async def test_write_coil_reads_back(sim: AlarmBoxSimulator, hub: ModbusHub) -> None:
    box = hub.unit(1, device_id="box")
    await box.write_coil(1, True)
    assert await sim.coil(1) is True
    await box.write_coil(1, False)
    assert await sim.coil(1) is False
    sim.force_output(1, False)  # a stuck relay
    with pytest.raises(DeviceRejected, match="read back False"):
        await box.write_coil(1, True)


async def test_write_register_reads_back(hub: ModbusHub) -> None:
    box = hub.unit(1, device_id="box")
    await box.write_register(3, 1234)
    assert await box.read_holding_registers(3, 1) == [1234]
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        await box.write_register(3, 70000)


async def test_cancelled_transaction_leaves_the_hub_usable(sim: AlarmBoxSimulator, hub: ModbusHub) -> None:
    box = hub.unit(1, device_id="box")
    await sim.silent()
    task = asyncio.create_task(box.read_discrete_inputs(0, 8))
    await asyncio.sleep(TIMEOUT / 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sim.normal()
    assert len(await box.read_discrete_inputs(0, 8)) == 8


async def test_cancellation_is_never_swallowed(sim: AlarmBoxSimulator) -> None:
    """Cancel a reading loop at many phases of connect / request / timeout: it must end.

    (pymodbus connects with asyncio.wait_for, which on Python 3.11 can swallow a
    cancellation that lands as the connection completes.)
    """
    async with ModbusHub(TcpLink("127.0.0.1", sim.port), timeout=0.005, backoff=fast_backoff()) as hub:
        box = hub.unit(1, device_id="box")

        async def reads() -> None:
            for _ in range(100_000):  # bounded; always cancelled long before
                with contextlib.suppress(DeviceUnavailable, DeviceProtocolError):
                    await box.read_discrete_inputs(0, 8)
                await asyncio.sleep(0)

        for fault in (sim.silent, sim.normal):
            await fault()
            for i in range(20):
                task = asyncio.create_task(reads())
                await asyncio.sleep(0.001 * i)
                task.cancel()
                async with asyncio.timeout(5.0):  # a bound for a hang, not a speed claim
                    with pytest.raises(asyncio.CancelledError):
                        await task
        await sim.normal()
        patient = hub.unit(1, device_id="box", timeout=PATIENT)  # 5 ms was for the faults
        assert len(await patient.read_discrete_inputs(0, 8)) == 8


async def test_cancel_while_connecting_propagates_even_if_pymodbus_swallows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RTU lines run on pymodbus' serial client, which connects with asyncio.wait_for."""
    real_connect = AsyncModbusSerialClient.connect

    async def swallowing_connect(self: AsyncModbusSerialClient) -> bool:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:  # as Python 3.11's wait_for does when the connect completes meanwhile
            return await real_connect(self)
        return await real_connect(self)

    monkeypatch.setattr(AsyncModbusSerialClient, "connect", swallowing_connect)
    async with (
        rtu_over_tcp() as port,
        ModbusHub(SerialLink(f"socket://127.0.0.1:{port}"), timeout=0.5) as hub,
    ):
        task = asyncio.create_task(hub.unit(1, device_id="box").read_coils(0, 1))
        await asyncio.sleep(0.05)
        task.cancel()
        async with asyncio.timeout(5.0):  # a bound for a hang, not a speed claim
            with pytest.raises(asyncio.CancelledError):
                await task
        assert hub.state is not HubState.CONNECTED


async def test_hub_must_be_entered() -> None:
    hub = ModbusHub(TcpLink("127.0.0.1", 1))
    with pytest.raises(RuntimeError, match="not open"):
        await hub.unit(1, device_id="x").read_coils(0, 1)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: further SYNs are dropped, connects hang."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.settimeout(0.2)
                try:
                    s.connect(("127.0.0.1", port))
                except TimeoutError:
                    s.close()
                    break
                fillers.append(s)
            yield port
        finally:
            for s in fillers:
                s.close()


async def test_connect_timeout_is_bounded() -> None:
    with unanswered_port() as port:
        async with ModbusHub(TcpLink("127.0.0.1", port), timeout=TIMEOUT, connect_timeout=0.2) as hub:
            took, exc = await timed(hub.unit(1, device_id="far").read_coils(0, 1))
            assert isinstance(exc, DeviceUnavailable)
            assert "cannot connect" in str(exc)
            assert 0.2 * 0.9 <= took < 0.2 + SLACK
            assert hub.state is HubState.BACKING_OFF


def rtu_device(unit: int, first_input: bool) -> SimDevice:
    return SimDevice(
        unit,
        simdata=(
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=[first_input] + [False] * 15, datatype=DataType.BITS)],
            [SimData(0, values=[0] * 4, datatype=DataType.REGISTERS)],
            [SimData(0, values=[unit * 100] * 4, datatype=DataType.REGISTERS)],
        ),
    )


@contextlib.asynccontextmanager
async def rtu_over_tcp() -> AsyncIterator[int]:
    server = ModbusTcpServer(
        [rtu_device(1, True), rtu_device(2, False)], address=("127.0.0.1", 0), framer=FramerType.RTU
    )
    await server.serve_forever(background=True)
    try:
        yield server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    finally:
        await server.shutdown()


async def test_rtu_framing_two_units_and_frame_gap() -> None:
    async with rtu_over_tcp() as port:
        link = SerialLink(f"socket://127.0.0.1:{port}", baudrate=9600)
        assert link.frame_gap == pytest.approx(3.5 * 11 / 9600)
        async with ModbusHub(link, timeout=PATIENT) as hub:
            one, two = hub.unit(1, device_id="one"), hub.unit(2, device_id="two")
            assert (await one.read_discrete_inputs(0, 2), await two.read_discrete_inputs(0, 2)) == (
                [True, False],
                [False, False],
            )
            n = 20
            start = time.monotonic()
            values = await asyncio.gather(
                *(u.read_input_registers(0, 2) for _ in range(n // 2) for u in (one, two))
            )
            assert time.monotonic() - start >= (n - 1) * link.frame_gap
            assert values == [[100, 100], [200, 200]] * (n // 2)
            await one.write_coil(3, True)
            assert await one.read_coils(3, 1) == [True]


async def pty_pair() -> tuple[asyncio.subprocess.Process, str, str]:
    """socat joining two ptys; their names are read from its -d -d notices."""
    socat = await asyncio.create_subprocess_exec(
        "socat", "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0", stderr=asyncio.subprocess.PIPE
    )
    assert socat.stderr is not None
    names: list[str] = []
    async with asyncio.timeout(5.0):
        for _ in range(20):  # a handful of notice lines precede the two names
            line = (await socat.stderr.readline()).decode()
            if "PTY is " in line:
                names.append(line.rsplit("PTY is ", 1)[1].strip())
            if len(names) == 2:
                return socat, names[0], names[1]
    raise AssertionError(f"socat gave no pty pair: {names}")


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
async def test_rtu_over_a_pty_pair() -> None:
    socat, a, b = await pty_pair()
    try:
        server = ModbusSerialServer([rtu_device(5, True)], port=b, framer=FramerType.RTU, baudrate=19200)
        await server.serve_forever(background=True)
        try:
            async with ModbusHub(SerialLink(a, baudrate=19200), timeout=PATIENT) as hub:
                box = hub.unit(5, device_id="rtu")
                assert await box.read_discrete_inputs(0, 3) == [True, False, False]
                assert await box.read_input_registers(0, 2) == [500, 500]
                _, exc = await timed(hub.unit(6, device_id="absent", timeout=0.5).read_coils(0, 1))
                assert isinstance(exc, DeviceUnavailable | DeviceRejected)
                assert await box.read_input_registers(0, 1) == [500]
        finally:
            await server.shutdown()
    finally:
        socat.terminate()
        await socat.wait()

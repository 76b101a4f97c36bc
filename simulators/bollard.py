"""A simulated anti-ram bollard controller PLC on Modbus TCP, with physics and faults.

    async with BollardSimulator(units=(1, 2), raise_seconds=0.5) as sim:   # 127.0.0.1:sim.port
        await sim.set_loop(True, unit=2)          # a vehicle over bollard 2's loop
        await sim.fault("low_pressure", True)     # unit 1 (the first unit) by default
        await sim.jam(True, unit=2)               # accepts commands, never moves
        await sim.silent()                        # transport faults, as the alarm box has
        snapshot = await sim.state(1)

"The generic bollard PLC": one Modbus unit id is one bollard controller; a link (one
simulator) may serve several, e.g. units (1, 2, 3) for the three bollards of one gate.
Addresses are 0-based, as on the wire. docs/drivers/bollard-plc.md is the long version.

Holding register 0 (FC3 read, FC6 / FC16 write) - command
    0 lower, 1 raise, 2 emergency raise; any other value: exception 3 (illegal data value).
    The PLC keeps the value written (a read-back returns it) and moves toward it.
    A write is answered normally (FC6 echoes the request) in every case below; the PLC's
    logic then runs before the next request is served, so a read-back right after the
    answer already shows its outcome:
    - local/manual mode: the write is ignored, the register keeps its previous value;
    - a raise or emergency raise while the vehicle loop or the photocell is occupied (and
      the bollard not fully raised) is refused: the register is reset to 0 (lower). The
      PLC never starts a rise by itself later, when the presence clears;
    - jammed (mechanically stuck, see below): the register keeps the written value,
      nothing moves.
Input registers (FC4)
    0 state: 0 lowered, 1 raising, 2 raised, 3 lowering, 4 fault (not moving, fault
      active), 5 emergency (emergency fast rise in progress)
    1 fault code: 0 none, 1 low hydraulic pressure, 2 motor over-temperature,
      3 position sensor failure (several at once: the lowest code)
    2 hydraulic pressure in 0.1 bar: 120 (12.0 bar) normal, 40 with the low-pressure fault
    3 position in 0.1 %: 0 fully lowered, 1000 fully raised
    4 controller mode: 0 remote, 1 local/manual
Discrete inputs (FC2)
    0 vehicle loop occupied, 1 photocell blocked
Anything else (coils, holding registers above 0, input registers above 4, discrete
inputs above 15) answers exception 2 (illegal address).

Physics: every ``tick`` (20 ms) the bollard moves linearly toward its command: a full
rise takes ``raise_seconds``, a full emergency rise ``emergency_seconds``, a full
lowering ``lower_seconds``. Presence (loop or photocell) appearing during a rise reverses
it (safety reverse: command register reset to 0, state lowering); lowering is never
blocked by presence. While a fault is active nothing moves and the state is 4; when the
last fault clears the bollard carries on toward its command (presence still refuses a
rise). The position sensor fault also freezes the position register. A jam stops all
motion without a fault: the state and position stay as they were and commands are
stored without being acted on (no presence refusal either) until the jam is released.

A pymodbus server holds the registers on an internal loopback port; a
:class:`~simulators.modbus_faults.FaultProxy` on the public port injects transport
faults. With ``control_port`` set, an HTTP API (loopback only) drives the same controls
from another process (``?unit=N`` picks the unit, default the first): ``GET /state``,
``POST /loop`` ``{"occupied": true}``, ``POST /photocell`` ``{"blocked": true}``,
``POST /mode`` ``{"mode": "local"}``, ``POST /faults/{name}`` ``{"on": true}``,
``POST /jam`` ``{"on": true}``, ``POST /command`` ``{"command": 1}`` (the local panel),
``POST /fault`` ``{"mode": "silent"}`` (transport faults, with ``"delay"`` for slow).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.control import bad_request, body_bool, json_body
from simulators.modbus_faults import FaultMode, FaultProxy, ProxiedSimulator

FC_DISCRETE_INPUTS = 2
FC_HOLDING_REGISTERS = 3
FC_INPUT_REGISTERS = 4
# Client requests that write holding registers: single, multiple, mask write, read/write multiple.
FC_WRITES = frozenset({6, 16, 22, 23})

HR_COMMAND = 0
IR_STATE, IR_FAULT, IR_PRESSURE, IR_POSITION, IR_MODE = range(5)
DI_LOOP, DI_PHOTOCELL = range(2)

FULL = 1000  # position register when fully raised (0.1 %)
PRESSURE_NORMAL = 120  # 0.1 bar
PRESSURE_LOW = 40
MAX_STEP = 0.2  # s: the most simulated time one tick covers (a stalled event loop does not teleport)


class Command(enum.IntEnum):
    LOWER = 0
    RAISE = 1
    EMERGENCY = 2


class State(enum.IntEnum):
    LOWERED = 0
    RAISING = 1
    RAISED = 2
    LOWERING = 3
    FAULT = 4
    EMERGENCY = 5


class Mode(enum.IntEnum):
    REMOTE = 0
    LOCAL = 1


COMMANDS = frozenset(c.value for c in Command)
FAULTS = {"low_pressure": 1, "motor_overtemp": 2, "position_sensor": 3}


@dataclass
class _Bollard:
    """One controller's truth; the registers are its image."""

    command: Command = Command.LOWER
    state: State = State.LOWERED
    position: float = 0.0  # 0..FULL
    frozen_position: int = 0  # the position register while the position sensor has failed
    mode: Mode = Mode.REMOTE
    loop: bool = False
    photocell: bool = False
    jam: bool = False
    faults: set[str] = field(default_factory=set)
    writes: int = 0  # command writes received (FC6/16/22/23 covering holding register 0)

    @property
    def presence(self) -> bool:
        return self.loop or self.photocell

    @property
    def fault_code(self) -> int:
        return min((FAULTS[f] for f in self.faults), default=0)

    def registers(self) -> tuple[list[int], list[bool]]:
        position = self.frozen_position if "position_sensor" in self.faults else round(self.position)
        pressure = PRESSURE_LOW if "low_pressure" in self.faults else PRESSURE_NORMAL
        ir = [int(self.state), self.fault_code, pressure, position, int(self.mode)]
        return ir, [self.loop, self.photocell]


class BollardSimulator(ProxiedSimulator):
    """One or more bollard controllers (unit ids) on one simulated link."""

    def __init__(
        self,
        *,
        port: int = 0,
        units: Sequence[int] = (1,),
        raise_seconds: float = 4.0,
        lower_seconds: float = 3.0,
        emergency_seconds: float = 1.5,
        control_port: int | None = None,
        host: str = "127.0.0.1",
        tick: float = 0.02,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host}: the simulator listens on loopback only")
        if not units or len(set(units)) != len(units) or not all(1 <= u <= 247 for u in units):
            raise ValueError("need at least one unit, each 1..247, no duplicates")
        for name, seconds in (
            ("raise_seconds", raise_seconds),
            ("lower_seconds", lower_seconds),
            ("emergency_seconds", emergency_seconds),
        ):
            if not 0.05 <= seconds <= 600:
                raise ValueError(f"{name} must be 0.05..600 seconds, not {seconds}")
        if not 0.001 <= tick <= 0.5:
            raise ValueError("tick must be 0.001..0.5 seconds")
        self.host = host
        self.units = tuple(units)
        self.raise_seconds = raise_seconds
        self.lower_seconds = lower_seconds
        self.emergency_seconds = emergency_seconds
        self.tick = tick
        self._port = port
        self._control_port = control_port
        self._bollards = {u: _Bollard() for u in self.units}
        self._server: ModbusTcpServer | None = None
        self._proxy: FaultProxy | None = None
        self._runner: web.AppRunner | None = None
        self._physics: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _start(self) -> None:
        devices = [self._device(u) for u in self.units]
        self._server = ModbusTcpServer(devices, address=(self.host, 0))
        await self._server.serve_forever(background=True)
        internal = self._server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        for u in self.units:
            await self._publish(u)
        self._physics = asyncio.create_task(self._run_physics(), name="bollard physics")
        self._proxy = FaultProxy((self.host, internal), host=self.host, port=self._port, units=self.units)
        await self._proxy.start()
        if self._control_port is not None:
            self._runner = web.AppRunner(self._control_app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self._control_port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._proxy is not None:
            await self._proxy.stop()
            self._proxy = None
        physics, self._physics = self._physics, None
        tasks = [*self._tasks, *([physics] if physics else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it untyped
            self._server = None
        if physics is not None and not physics.cancelled() and physics.exception() is not None:
            raise RuntimeError("the bollard physics task failed") from physics.exception()

    def _device(self, unit: int) -> SimDevice:
        return SimDevice(
            unit,
            simdata=(
                # No coils: one dummy block at the top of the address space (pymodbus wants
                # a block per table), so coil requests get "illegal address" like the rest.
                [SimData(0xFFF0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(HR_COMMAND, values=[0], datatype=DataType.REGISTERS)],
                [SimData(0, values=[0, 0, PRESSURE_NORMAL, 0, 0], datatype=DataType.REGISTERS)],
            ),
            action=functools.partial(self._on_access, unit),
        )

    async def _on_access(
        self,
        unit: int,
        function_code: int,
        _start: int,
        address: int,
        count: int,
        _registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """A client's write of the command register: the PLC's logic decides what it holds.

        Our own ``async_setValues`` calls come through here too, with the read function
        codes (2, 3, 4); only client writes (6, 16, 22, 23) are acted on. The written value
        lands in the register (so FC6 echoes the request); ``_publish``, run before the next
        request is served, then writes the register from the PLC's decision.
        """
        if values is None or function_code not in FC_WRITES or not address <= HR_COMMAND < address + count:
            return None
        b = self._bollards[unit]
        b.writes += 1
        value = int(values[HR_COMMAND - address])
        if value not in COMMANDS:
            return ExcCodes.ILLEGAL_VALUE
        if b.mode is Mode.REMOTE:
            b.command = Command(value)
            self._move(b, 0.0)  # the scan's logic at once: refusal, the new state (no motion yet)
        self._spawn(self._publish(unit))
        return None

    # ---- where things are (port, control_port, requests: ProxiedSimulator) ------------

    def command_writes(self, unit: int | None = None) -> int:
        """Writes of the command register that reached the PLC (accepted, ignored or refused)."""
        return self._bollards[self._unit(unit)].writes

    # ---- the site --------------------------------------------------------------------

    async def set_loop(self, occupied: bool, *, unit: int | None = None) -> None:
        """A vehicle on (True) or off the bollard's induction loop."""
        await self._change(unit, loop=occupied)

    async def set_photocell(self, blocked: bool, *, unit: int | None = None) -> None:
        """Something in (True) or out of the photocell beam."""
        await self._change(unit, photocell=blocked)

    async def set_mode(self, mode: str, *, unit: int | None = None) -> None:
        """``"local"`` (the key switch on manual: remote writes are ignored) or ``"remote"``."""
        if mode not in ("local", "remote"):
            raise ValueError(f"mode {mode!r}: 'local' or 'remote'")
        await self._change(unit, mode=Mode.LOCAL if mode == "local" else Mode.REMOTE)

    async def operate(self, command: int, *, unit: int | None = None) -> None:
        """A command from the controller's local panel: acted on in either mode, with the same
        safety logic (a rise is refused while presence is detected)."""
        if command not in COMMANDS:
            raise ValueError(f"command {command!r}: 0 (lower), 1 (raise) or 2 (emergency raise)")
        await self._change(unit, command=Command(command))

    async def fault(self, name: str, on: bool, *, unit: int | None = None) -> None:
        """Inject (on) or clear a controller fault: low_pressure, motor_overtemp, position_sensor."""
        if name not in FAULTS:
            raise ValueError(f"fault {name!r}: one of {', '.join(FAULTS)}")
        u = self._unit(unit)
        b = self._bollards[u]
        if on and name == "position_sensor" and name not in b.faults:
            b.frozen_position = round(b.position)
        (b.faults.add if on else b.faults.discard)(name)
        await self._change(u)

    async def jam(self, on: bool, *, unit: int | None = None) -> None:
        """Jam (on) or free the mechanism: commands are stored, nothing moves, no fault shows."""
        await self._change(unit, jam=on)

    # ---- transport faults --------------------------------------------------------------

    # ---- snapshots -------------------------------------------------------------------

    async def state(self, unit: int | None = None) -> dict[str, Any]:
        """One controller as its registers show it, plus what the simulator knows besides."""
        u = self._unit(unit)
        b = self._bollards[u]
        ir = [int(v) for v in await self._get(u, FC_INPUT_REGISTERS, 0, 5)]
        di = [bool(v) for v in await self._get(u, FC_DISCRETE_INPUTS, 0, 2)]
        (command,) = await self._get(u, FC_HOLDING_REGISTERS, HR_COMMAND, 1)
        return {
            "unit": u,
            "command": int(command),
            "state": ir[IR_STATE],
            "state_name": State(ir[IR_STATE]).name.lower(),
            "fault_code": ir[IR_FAULT],
            "faults": sorted(b.faults, key=FAULTS.__getitem__),
            "pressure": ir[IR_PRESSURE],
            "position": ir[IR_POSITION],
            "mode": Mode(ir[IR_MODE]).name.lower(),
            "loop": di[DI_LOOP],
            "photocell": di[DI_PHOTOCELL],
            "jam": b.jam,
            "command_writes": b.writes,
        }

    async def link_state(self) -> dict[str, Any]:
        """Every controller on the link, and the link's transport fault."""
        return {
            "port": self.port,
            "fault": self.proxy.mode.value,
            "requests": self.requests(),
            "units": {str(u): await self.state(u) for u in self.units},
        }

    # ---- the PLC ---------------------------------------------------------------------

    async def _run_physics(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.tick)
            now = loop.time()
            dt, last = min(now - last, MAX_STEP), now
            for u, b in self._bollards.items():
                self._move(b, dt)
                await self._publish(u)

    def _move(self, b: _Bollard, dt: float) -> None:
        """One scan: the logic, then ``dt`` seconds of motion toward the command."""
        if not b.jam:
            self._logic(b)
        if b.faults:
            b.state = State.FAULT
            return
        if b.jam:
            if b.state is State.FAULT:  # the fault cleared while jammed: "moving", going nowhere
                b.state = _direction(b)
            return
        if b.command is Command.LOWER:
            b.position = max(0.0, b.position - FULL * dt / self.lower_seconds)
        else:
            seconds = self.emergency_seconds if b.command is Command.EMERGENCY else self.raise_seconds
            b.position = min(float(FULL), b.position + FULL * dt / seconds)
        b.state = _direction(b)

    @staticmethod
    def _logic(b: _Bollard) -> None:
        """Presence refuses a rise (not yet started, or under way): the command becomes lower."""
        if b.command is not Command.LOWER and b.position < FULL and b.presence:
            b.command = Command.LOWER

    async def _change(self, unit: int | None, **changes: Any) -> None:
        """Apply a control change and let the PLC scan once (no motion) before anyone reads."""
        u = self._unit(unit)
        b = self._bollards[u]
        for name, value in changes.items():
            setattr(b, name, value)
        self._move(b, 0.0)
        await self._publish(u)

    async def _publish(self, unit: int) -> None:
        """Write the controller's registers from its truth."""
        b = self._bollards[unit]
        ir, di = b.registers()
        await self._set(unit, FC_INPUT_REGISTERS, 0, ir)
        await self._set(unit, FC_DISCRETE_INPUTS, 0, di)
        await self._set(unit, FC_HOLDING_REGISTERS, HR_COMMAND, [int(b.command)])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- internals -------------------------------------------------------------------

    def _unit(self, unit: int | None) -> int:
        if unit is None:
            return self.units[0]
        if unit not in self.units:
            raise ValueError(f"unit {unit} not simulated; units: {list(self.units)}")
        return unit

    async def _set(self, unit: int, fc: int, address: int, values: list[int] | list[bool]) -> None:
        if self._server is None:
            raise RuntimeError("simulator not running")
        await self._server.async_setValues(unit, fc, address, values)

    async def _get(self, unit: int, fc: int, address: int, count: int) -> list[int] | list[bool]:
        if self._server is None:
            raise RuntimeError("simulator not running")
        return await self._server.async_getValues(unit, fc, address, count)

    # ---- HTTP control API ------------------------------------------------------------

    def _control_app(self) -> web.Application:
        app = web.Application(middlewares=[bad_request])
        app.router.add_get("/state", self._http_state)
        app.router.add_post("/loop", self._http_loop)
        app.router.add_post("/photocell", self._http_photocell)
        app.router.add_post("/mode", self._http_mode)
        app.router.add_post("/faults/{name}", self._http_controller_fault)
        app.router.add_post("/jam", self._http_jam)
        app.router.add_post("/command", self._http_command)
        app.router.add_post("/fault", self._http_fault)
        return app

    def _query_unit(self, request: web.Request) -> int | None:
        text = request.query.get("unit")
        if text is None:
            return None
        try:
            unit = int(text)
        except ValueError:
            raise ValueError(f"?unit={text!r} is not an integer") from None
        return self._unit(unit)

    async def _http_state(self, request: web.Request) -> web.Response:
        if "unit" in request.query:
            return web.json_response(await self.state(self._query_unit(request)))
        return web.json_response(await self.link_state())

    async def _http_loop(self, request: web.Request) -> web.Response:
        unit = self._query_unit(request)
        await self.set_loop(body_bool(await json_body(request), "occupied"), unit=unit)
        return web.json_response(await self.state(unit))

    async def _http_photocell(self, request: web.Request) -> web.Response:
        unit = self._query_unit(request)
        await self.set_photocell(body_bool(await json_body(request), "blocked"), unit=unit)
        return web.json_response(await self.state(unit))

    async def _http_mode(self, request: web.Request) -> web.Response:
        unit = self._query_unit(request)
        mode = (await json_body(request)).get("mode")
        if mode not in ("local", "remote"):
            raise ValueError(f"'mode' must be 'local' or 'remote', not {mode!r}")
        await self.set_mode(mode, unit=unit)
        return web.json_response(await self.state(unit))

    async def _http_controller_fault(self, request: web.Request) -> web.Response:
        unit = self._query_unit(request)
        on = body_bool(await json_body(request), "on")
        await self.fault(request.match_info["name"], on, unit=unit)
        return web.json_response(await self.state(unit))

    async def _http_jam(self, request: web.Request) -> web.Response:
        unit = self._query_unit(request)
        await self.jam(body_bool(await json_body(request), "on"), unit=unit)
        return web.json_response(await self.state(unit))

    async def _http_command(self, request: web.Request) -> web.Response:
        unit = self._query_unit(request)
        command = (await json_body(request)).get("command")
        if isinstance(command, bool) or not isinstance(command, int):
            raise ValueError("'command' must be 0, 1 or 2")  # noqa: TRY004 - answered as 400
        await self.operate(command, unit=unit)
        return web.json_response(await self.state(unit))

    async def _http_fault(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        mode = body.get("mode")
        if mode not in [m.value for m in FaultMode]:  # a list: the value may be unhashable
            raise ValueError(f"'mode' must be one of {', '.join(FaultMode)}, not {mode!r}")
        delay = body.get("delay", 0.0)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 60:
            raise ValueError("'delay' must be 0..60 seconds")
        await self.proxy.set_mode(FaultMode(mode), float(delay))
        return web.json_response(await self.link_state())


def _direction(b: _Bollard) -> State:
    """The state of a controller driving toward its command (without regard to faults)."""
    if b.command is Command.LOWER:
        return State.LOWERING if b.position > 0 else State.LOWERED
    if b.position >= FULL:
        return State.RAISED
    return State.EMERGENCY if b.command is Command.EMERGENCY else State.RAISING

"""A simulated Modbus alarm box: discrete inputs, coils, loop-resistance registers, faults.

    async with AlarmBoxSimulator(inputs=8) as sim:        # Modbus TCP on 127.0.0.1:sim.port
        await sim.press(0)
        await sim.silent()                                 # accepts, never answers
        await sim.normal()
        assert await sim.coil(0) is False                  # the ack LED

A pymodbus server holds the data on an internal loopback port; a
:class:`~simulators.modbus_faults.FaultProxy` on the public port injects the faults.
With ``control_port`` set, an HTTP API (loopback only) drives the same controls
from another process: ``POST /inputs/{i}`` ``{"active": true}``, ``POST /tamper``
``{"on": true}``, ``POST /lines/{zone}`` ``{"state": "open"}``, ``POST /fault``
``{"mode": "silent"}``, ``POST /outputs/{address}/force`` ``{"value": true}``, ``GET /state``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.control import bad_request, body_bool, body_opt_int, json_body
from simulators.modbus_faults import FaultMode, FaultProxy, ProxiedSimulator

FC_COILS = 1
FC_DISCRETE_INPUTS = 2
FC_INPUT_REGISTERS = 4
FC_WRITE_COIL = 5
FC_WRITE_COILS = 15

# Loop resistances (ohms) for double 4.7 kOhm end-of-line wiring, as the shipped bands read them.
LINE_OHMS = {"normal": 4700, "alarm": 9400, "short": 50, "open": 65535}


class AlarmBoxSimulator(ProxiedSimulator):
    """One or more unit ids on one simulated link."""

    def __init__(
        self,
        *,
        port: int = 0,
        units: Sequence[int] = (1,),
        inputs: int = 16,
        coils: int = 32,
        tamper_input: int | None = None,
        tamper_normally_closed: bool = True,
        control_port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host}: the simulator listens on loopback only")
        if not units or not 1 <= inputs <= 2000 or not 1 <= coils <= 2000:
            raise ValueError("need at least one unit, 1..2000 inputs and 1..2000 coils")
        self.host = host
        self.units = tuple(units)
        self.inputs = inputs
        self.coils = coils
        if tamper_input is None and inputs >= 2:
            tamper_input = inputs - 2  # the shipped generic profiles' tamper input
        if tamper_input is not None:
            self._check(tamper_input, inputs)
        self.tamper_input = tamper_input
        self.tamper_normally_closed = tamper_normally_closed
        self._port = port
        self._control_port = control_port
        self._forced: dict[int, dict[int, bool]] = {u: {} for u in self.units}
        self._server: ModbusTcpServer | None = None
        self._proxy: FaultProxy | None = None
        self._runner: web.AppRunner | None = None

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
            if self.tamper_input is not None:
                await self.set_input(self.tamper_input, self.tamper_normally_closed, unit=u)
            await self._set(u, FC_INPUT_REGISTERS, 0, [LINE_OHMS["normal"]] * self.inputs)
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
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it untyped
            self._server = None

    def _device(self, unit: int) -> SimDevice:
        regs = max(self.inputs, 1)
        return SimDevice(
            unit,
            simdata=(
                [SimData(0, values=[False] * _round16(self.coils), datatype=DataType.BITS)],
                [SimData(0, values=[False] * _round16(self.inputs), datatype=DataType.BITS)],
                [SimData(0, values=[0] * 8, datatype=DataType.REGISTERS)],
                [SimData(0, values=[0] * regs, datatype=DataType.REGISTERS)],
            ),
            action=functools.partial(self._on_access, unit),
        )

    async def _on_access(
        self,
        unit: int,
        function_code: int,
        _start: int,
        address: int,
        _count: int,
        _registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Forced outputs keep their value whatever a client writes (a stuck relay)."""
        forced = self._forced[unit]
        if values and forced and function_code in (FC_WRITE_COIL, FC_WRITE_COILS):
            for i in range(len(values)):
                if address + i in forced:
                    values[i] = forced[address + i]
        return None

    # ---- inputs ----------------------------------------------------------------------

    async def set_input(self, i: int, value: bool, *, unit: int | None = None) -> None:
        """Set the raw state of discrete input ``i`` (True: contact closed / input on)."""
        self._check(i, self.inputs)
        await self._set(self._unit(unit), FC_DISCRETE_INPUTS, i, [value])

    async def press(self, i: int, *, unit: int | None = None) -> None:
        await self.set_input(i, True, unit=unit)

    async def release(self, i: int, *, unit: int | None = None) -> None:
        await self.set_input(i, False, unit=unit)

    async def tamper(self, on: bool, *, unit: int | None = None) -> None:
        """Open (on) or close the enclosure; a normally-closed switch reads False when open."""
        if self.tamper_input is None:
            raise ValueError("this simulator has no tamper input")
        await self.set_input(self.tamper_input, on != self.tamper_normally_closed, unit=unit)

    async def set_line(self, zone: int, state: str, *, unit: int | None = None) -> None:
        """Set zone's loop resistance register: normal, alarm, open or short."""
        if state not in LINE_OHMS:
            raise ValueError(f"line state {state!r}: one of {', '.join(LINE_OHMS)}")
        self._check(zone, self.inputs)
        await self._set(self._unit(unit), FC_INPUT_REGISTERS, zone, [LINE_OHMS[state]])

    async def cut_line(self, zone: int, *, unit: int | None = None) -> None:
        await self.set_line(zone, "open", unit=unit)

    async def short_line(self, zone: int, *, unit: int | None = None) -> None:
        await self.set_line(zone, "short", unit=unit)

    async def normal_line(self, zone: int, *, unit: int | None = None) -> None:
        await self.set_line(zone, "normal", unit=unit)

    # ---- outputs ---------------------------------------------------------------------

    async def coil(self, address: int, *, unit: int | None = None) -> bool:
        """The state of an output (ack LED, siren) as the box holds it."""
        self._check(address, self.coils)
        (value,) = await self._get(self._unit(unit), FC_COILS, address, 1)
        return bool(value)

    def force_output(self, address: int, value: bool | None, *, unit: int | None = None) -> None:
        """Make coil ``address`` ignore writes and keep ``value`` (None: release it)."""
        self._check(address, self.coils)
        forced = self._forced[self._unit(unit)]
        if value is None:
            forced.pop(address, None)
        else:
            forced[address] = value

    # ---- faults: silent(), garbage(), drop(), slow(), close_port(), normal() (ProxiedSimulator)

    async def state(self) -> dict[str, Any]:
        units: dict[str, Any] = {}
        for u in self.units:
            units[str(u)] = {
                "inputs": [bool(v) for v in await self._get(u, FC_DISCRETE_INPUTS, 0, self.inputs)],
                "coils": [bool(v) for v in await self._get(u, FC_COILS, 0, self.coils)],
                "analog": [int(v) for v in await self._get(u, FC_INPUT_REGISTERS, 0, self.inputs)],
            }
        return {
            "port": self.port,
            "fault": self.proxy.mode.value,
            "requests": self.requests(),
            "units": units,
        }

    # ---- internals -------------------------------------------------------------------

    def _unit(self, unit: int | None) -> int:
        if unit is None:
            return self.units[0]
        if unit not in self.units:
            raise ValueError(f"unit {unit} not simulated; units: {list(self.units)}")
        return unit

    @staticmethod
    def _check(i: int, count: int) -> None:
        if not 0 <= i < count:
            raise ValueError(f"index {i} outside 0..{count - 1}")

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
        app.router.add_post("/inputs/{i}", self._http_input)
        app.router.add_post("/tamper", self._http_tamper)
        app.router.add_post("/lines/{zone}", self._http_line)
        app.router.add_post("/fault", self._http_fault)
        app.router.add_post("/outputs/{address}/force", self._http_force)
        return app

    async def _http_state(self, _request: web.Request) -> web.Response:
        return web.json_response(await self.state())

    async def _http_input(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        await self.set_input(
            int(request.match_info["i"]), body_bool(body, "active"), unit=body_opt_int(body, "unit")
        )
        return web.json_response(await self.state())

    async def _http_tamper(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        await self.tamper(body_bool(body, "on"), unit=body_opt_int(body, "unit"))
        return web.json_response(await self.state())

    async def _http_line(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        state = str(body.get("state"))  # set_line names the allowed states if this is none of them
        await self.set_line(int(request.match_info["zone"]), state, unit=body_opt_int(body, "unit"))
        return web.json_response(await self.state())

    async def _http_fault(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        mode = FaultMode(str(body.get("mode")))
        delay = body.get("delay", 0.0)
        if not isinstance(delay, int | float) or not 0 <= delay <= 60:
            raise ValueError("'delay' must be 0..60 seconds")
        await self.proxy.set_mode(mode, float(delay))
        return web.json_response(await self.state())

    async def _http_force(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        value = body.get("value")
        if value is not None and not isinstance(value, bool):
            raise ValueError("'value' must be true, false or null")
        self.force_output(int(request.match_info["address"]), value, unit=body_opt_int(body, "unit"))
        return web.json_response(await self.state())


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16

"""Modbus RTU on a serial line (or a pyserial URL), through pymodbus' serial client.

pymodbus does the RTU framing (CRC, silent intervals, a stray byte at line
turnaround); its own timeouts, retries and reconnects are off or set above the
hub's bounds, which the hub enforces itself. pymodbus connects and waits with
asyncio.wait_for, which on Python 3.11 can swallow a cancellation that lands as
the operation completes: every pymodbus coroutine therefore runs in a task of its
own, so the caller's cancellation is never lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from drivers.modbus.conn import Broken, Connection
from drivers.modbus.links import SerialLink
from drivers.modbus.pdu import (
    BIT_READS,
    COIL_ON,
    READ_COILS,
    READ_DISCRETE_INPUTS,
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    REGISTER_READS,
    WRITE_SINGLE_COIL,
    PduError,
    Reply,
    Request,
)

# pymodbus' own timeout (connect and request): above every bound the hub enforces itself,
# so pymodbus never times out first; its default (3 s x 4 tries) is what a hung device must not cost.
_PYMODBUS_TIMEOUT = 30.0


class RtuConnection(Connection):
    """One pymodbus serial client."""

    def __init__(self, link: SerialLink) -> None:
        self._done: asyncio.Future[Broken] = asyncio.get_running_loop().create_future()
        self.client = AsyncModbusSerialClient(
            link.port,
            framer=FramerType.RTU,
            baudrate=link.baudrate,
            bytesize=link.bytesize,
            parity=link.parity,
            stopbits=link.stopbits,
            timeout=_PYMODBUS_TIMEOUT,
            retries=0,
            reconnect_delay=0,  # 0 disables pymodbus' reconnect task: the hub reconnects
            trace_packet=self._trace_packet,
            trace_connect=self._trace_connect,
        )

    async def open(self, timeout: float) -> None:
        connecting = asyncio.ensure_future(self.client.connect())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait((connecting,))
        finally:
            if not connecting.done():
                connecting.cancel()
                await asyncio.wait((connecting,))
        if connecting.cancelled() or connecting.result() is not True:
            raise Broken("refused or unreachable", invalid=False)
        if self.broken is not None:
            raise self.broken

    async def exchange(self, unit: int, request: Request, limit: float) -> Reply:
        if self.broken is not None:
            raise self.broken
        self.received = 0
        call = asyncio.ensure_future(self._call(unit, request))
        try:
            async with asyncio.timeout(limit):
                await asyncio.wait((call, self._done), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            if not _finished(call):  # else the reply came in the very tick of the deadline
                raise
        finally:
            if not call.done():
                call.cancel()
                await asyncio.wait((call,))
        if not _finished(call):
            raise self._done.result()
        try:
            rsp = call.result()
        except ConnectionException as exc:
            raise Broken(str(exc), invalid=False) from exc
        except ModbusException as exc:
            raise PduError(str(exc)) from exc
        return _reply(request, rsp)

    def close(self) -> None:
        self._break("closed by the hub", invalid=False)
        self.client.close()

    def _call(self, unit: int, r: Request) -> Awaitable[ModbusPDU]:
        c = self.client
        fc = r.function_code
        if fc == READ_COILS:
            return c.read_coils(r.address, count=r.value, device_id=unit)
        if fc == READ_DISCRETE_INPUTS:
            return c.read_discrete_inputs(r.address, count=r.value, device_id=unit)
        if fc == READ_HOLDING_REGISTERS:
            return c.read_holding_registers(r.address, count=r.value, device_id=unit)
        if fc == READ_INPUT_REGISTERS:
            return c.read_input_registers(r.address, count=r.value, device_id=unit)
        if fc == WRITE_SINGLE_COIL:
            return c.write_coil(r.address, r.value == COIL_ON, device_id=unit)
        return c.write_register(r.address, r.value, device_id=unit)

    def _break(self, reason: str, *, invalid: bool) -> None:
        if self.broken is None:
            self.broken = Broken(reason, invalid=invalid)
            self._done.set_result(self.broken)

    def _trace_connect(self, connected: bool) -> None:
        if not connected:
            self._break("connection closed by the device", invalid=False)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self.received = len(data)
        return data


def _finished(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled()


def _reply(request: Request, rsp: ModbusPDU) -> Reply:
    fc = int(rsp.function_code)
    if fc == request.function_code | 0x80:
        return Reply(fc, exception_code=int(getattr(rsp, "exception_code", 0)))
    if fc != request.function_code:
        raise PduError(f"reply has function code {fc}, asked {request.function_code}")
    if fc in BIT_READS:
        bits = tuple(bool(b) for b in rsp.bits)
        if len(bits) < request.value:
            raise PduError(f"{len(bits)} bits, asked for {request.value}")
        return Reply(fc, bits=bits[: request.value])
    if fc in REGISTER_READS:
        regs = tuple(int(r) for r in rsp.registers)
        if len(regs) != request.value:
            raise PduError(f"{len(regs)} registers, asked for {request.value}")
        return Reply(fc, registers=regs)
    return Reply(fc)

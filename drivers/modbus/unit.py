"""One unit id on a hub: typed read and write helpers, responses checked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.modbus.pdu import (
    COIL_OFF,
    COIL_ON,
    READ_COILS,
    READ_DISCRETE_INPUTS,
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    WRITE_SINGLE_COIL,
    WRITE_SINGLE_REGISTER,
    Reply,
    Request,
)
from gateway.errors import DeviceRejected

if TYPE_CHECKING:
    from drivers.modbus.hub import ModbusHub

# Modbus application protocol 6.1-6.4: most bits / registers one read may ask for.
MAX_BITS = 2000
MAX_REGISTERS = 125

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class UnitClient:
    """Reads a contiguous range in one request; writes are verified by reading back."""

    def __init__(self, hub: ModbusHub, unit: int, *, device_id: str, timeout: float) -> None:
        self.hub = hub
        self.unit = unit
        self.device_id = device_id
        self.timeout = timeout

    @property
    def where(self) -> dict[str, str | int]:
        """How the unit is reached, for logs and presence events: its link and unit id."""
        return {"link": self.hub.link.label, "unit": self.unit}

    async def read_coils(self, address: int, count: int) -> list[bool]:
        _check_range(address, count, MAX_BITS)
        rsp = await self._run(Request(READ_COILS, address, count))
        return list(rsp.bits)

    async def read_discrete_inputs(self, address: int, count: int) -> list[bool]:
        _check_range(address, count, MAX_BITS)
        rsp = await self._run(Request(READ_DISCRETE_INPUTS, address, count))
        return list(rsp.bits)

    async def read_holding_registers(self, address: int, count: int) -> list[int]:
        _check_range(address, count, MAX_REGISTERS)
        rsp = await self._run(Request(READ_HOLDING_REGISTERS, address, count))
        return list(rsp.registers)

    async def read_input_registers(self, address: int, count: int) -> list[int]:
        _check_range(address, count, MAX_REGISTERS)
        rsp = await self._run(Request(READ_INPUT_REGISTERS, address, count))
        return list(rsp.registers)

    async def write_coil(self, address: int, value: bool) -> None:
        """Write one coil, then read it back; a different value raises DeviceRejected."""
        _check_range(address, 1, 1)
        await self._run(Request(WRITE_SINGLE_COIL, address, COIL_ON if value else COIL_OFF))
        (actual,) = await self.read_coils(address, 1)
        if actual != value:
            raise DeviceRejected(self.device_id, f"coil {address}: wrote {value}, read back {actual}")

    async def write_register(self, address: int, value: int) -> None:
        """Write one holding register, then read it back; a different value raises DeviceRejected."""
        _check_range(address, 1, 1)
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"register value {value} is not 0..65535")
        await self._run(Request(WRITE_SINGLE_REGISTER, address, value))
        (actual,) = await self.read_holding_registers(address, 1)
        if actual != value:
            raise DeviceRejected(self.device_id, f"register {address}: wrote {value}, read back {actual}")

    async def read(self, request: Request) -> Reply:
        """Run a read built once (the polling path: no range checks, no per-call objects)."""
        return await self._run(request)

    async def _run(self, request: Request) -> Reply:
        rsp = await self.hub.execute(self.device_id, self.unit, request, limit=self.timeout)
        code = rsp.exception_code
        if code is not None:
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            what = request.describe()
            raise DeviceRejected(
                self.device_id, f"unit {self.unit}: {what}: exception {code} ({name})", code=code
            )
        return rsp


def _check_range(address: int, count: int, most: int) -> None:
    if not 0 <= address <= 0xFFFF or not 1 <= count <= most or address + count > 0x10000:
        raise ValueError(f"address {address} count {count}: outside 0..65535 or more than {most}")

"""One unit id on a hub: typed read and write helpers, responses checked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymodbus.pdu import ModbusPDU

from gateway.errors import DeviceProtocolError, DeviceRejected

if TYPE_CHECKING:
    from drivers.modbus.hub import Call, ModbusHub

# Modbus application protocol 6.1-6.4: most bits / registers one read may ask for.
MAX_BITS = 2000
MAX_REGISTERS = 125

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6

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

    async def read_coils(self, address: int, count: int) -> list[bool]:
        _check_range(address, count, MAX_BITS)
        rsp = await self._run(
            f"read coils {address}+{count}",
            READ_COILS,
            lambda c: c.read_coils(address, count=count, device_id=self.unit),
        )
        return self._bits(rsp, count)

    async def read_discrete_inputs(self, address: int, count: int) -> list[bool]:
        _check_range(address, count, MAX_BITS)
        rsp = await self._run(
            f"read discrete inputs {address}+{count}",
            READ_DISCRETE_INPUTS,
            lambda c: c.read_discrete_inputs(address, count=count, device_id=self.unit),
        )
        return self._bits(rsp, count)

    async def read_holding_registers(self, address: int, count: int) -> list[int]:
        _check_range(address, count, MAX_REGISTERS)
        rsp = await self._run(
            f"read holding registers {address}+{count}",
            READ_HOLDING_REGISTERS,
            lambda c: c.read_holding_registers(address, count=count, device_id=self.unit),
        )
        return self._registers(rsp, count)

    async def read_input_registers(self, address: int, count: int) -> list[int]:
        _check_range(address, count, MAX_REGISTERS)
        rsp = await self._run(
            f"read input registers {address}+{count}",
            READ_INPUT_REGISTERS,
            lambda c: c.read_input_registers(address, count=count, device_id=self.unit),
        )
        return self._registers(rsp, count)

    async def write_coil(self, address: int, value: bool) -> None:
        """Write one coil, then read it back; a different value raises DeviceRejected."""
        _check_range(address, 1, 1)
        await self._run(
            f"write coil {address}",
            WRITE_SINGLE_COIL,
            lambda c: c.write_coil(address, value, device_id=self.unit),
        )
        (actual,) = await self.read_coils(address, 1)
        if actual != value:
            raise DeviceRejected(self.device_id, f"coil {address}: wrote {value}, read back {actual}")

    async def write_register(self, address: int, value: int) -> None:
        """Write one holding register, then read it back; a different value raises DeviceRejected."""
        _check_range(address, 1, 1)
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"register value {value} is not 0..65535")
        await self._run(
            f"write register {address}",
            WRITE_SINGLE_REGISTER,
            lambda c: c.write_register(address, value, device_id=self.unit),
        )
        (actual,) = await self.read_holding_registers(address, 1)
        if actual != value:
            raise DeviceRejected(self.device_id, f"register {address}: wrote {value}, read back {actual}")

    async def _run(self, what: str, function_code: int, call: Call) -> ModbusPDU:
        what = f"unit {self.unit}: {what}"
        rsp = await self.hub.execute(self.device_id, what, self.unit, function_code, call, limit=self.timeout)
        if rsp.function_code == function_code | 0x80:
            code = int(getattr(rsp, "exception_code", 0))
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise DeviceRejected(self.device_id, f"{what}: exception {code} ({name})", code=code)
        if rsp.function_code != function_code:
            raise DeviceProtocolError(self.device_id, f"{what}: reply has function code {rsp.function_code}")
        return rsp

    def _bits(self, rsp: ModbusPDU, count: int) -> list[bool]:
        bits = list(rsp.bits)
        if len(bits) < count:
            raise DeviceProtocolError(
                self.device_id, f"unit {self.unit}: {len(bits)} bits, asked for {count}"
            )
        return [bool(b) for b in bits[:count]]

    def _registers(self, rsp: ModbusPDU, count: int) -> list[int]:
        regs = list(rsp.registers)
        if len(regs) != count:
            raise DeviceProtocolError(
                self.device_id, f"unit {self.unit}: {len(regs)} registers, asked for {count}"
            )
        return [int(r) for r in regs]


def _check_range(address: int, count: int, most: int) -> None:
    if not 0 <= address <= 0xFFFF or not 1 <= count <= most or address + count > 0x10000:
        raise ValueError(f"address {address} count {count}: outside 0..65535 or more than {most}")

"""Modbus PDUs of the functions the drivers use: requests encoded, replies decoded and checked.

The Modbus application protocol (V1.1b3) defines each PDU in a few bytes; decoding
them here, rather than through a general-purpose library object per reply, keeps
the polling path cheap (200 boxes at 10 Hz are 2,000 replies a second). Every
reply is checked against its request: function code, byte count, echoed address
and value. A violation raises :class:`PduError`; the hub turns it into a
``DeviceProtocolError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6

BIT_READS = frozenset({READ_COILS, READ_DISCRETE_INPUTS})
REGISTER_READS = frozenset({READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS})
WRITES = frozenset({WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER})

_NAMES = {
    READ_COILS: "read coils",
    READ_DISCRETE_INPUTS: "read discrete inputs",
    READ_HOLDING_REGISTERS: "read holding registers",
    READ_INPUT_REGISTERS: "read input registers",
    WRITE_SINGLE_COIL: "write coil",
    WRITE_SINGLE_REGISTER: "write register",
}

COIL_ON = 0xFF00  # 6.5: the only two values a single-coil write may carry
COIL_OFF = 0x0000

# Each byte of a bit-read reply as its 8 inputs, lowest bit first (6.1, 6.2).
_BITS: tuple[tuple[bool, ...], ...] = tuple(tuple(bool(b >> i & 1) for i in range(8)) for b in range(256))
_HEADER = struct.Struct(">BHH")


class PduError(Exception):
    """A reply that does not answer its request."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request: ``value`` is the count for reads, the value written for writes."""

    function_code: int
    address: int
    value: int

    def encode(self) -> bytes:
        return _HEADER.pack(self.function_code, self.address, self.value)

    def describe(self) -> str:
        """For messages, e.g. ``read discrete inputs 0+8``; built only when something failed."""
        name = _NAMES.get(self.function_code, f"function {self.function_code}")
        if self.function_code in WRITES:
            return f"{name} {self.address}"
        return f"{name} {self.address}+{self.value}"

    @property
    def reply_size(self) -> int:
        """Bytes of a normal reply PDU."""
        if self.function_code in BIT_READS:
            return 2 + (self.value + 7) // 8
        if self.function_code in REGISTER_READS:
            return 2 + 2 * self.value
        return 5


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply: bits or registers for reads, or a Modbus exception code."""

    function_code: int
    bits: tuple[bool, ...] = ()
    registers: tuple[int, ...] = ()
    exception_code: int | None = None


def decode(request: Request, pdu: bytes) -> Reply:
    """Decode ``pdu`` as the reply to ``request``; raises PduError if it is not one."""
    if not pdu:
        raise PduError("empty reply")
    fc = pdu[0]
    if fc == request.function_code | 0x80:
        if len(pdu) != 2:
            raise PduError(f"exception reply of {len(pdu)} bytes")
        return Reply(fc, exception_code=pdu[1])
    if fc != request.function_code:
        raise PduError(f"reply has function code {fc}, asked {request.function_code}")
    if len(pdu) != request.reply_size:
        raise PduError(f"reply of {len(pdu)} bytes, expected {request.reply_size}")
    if fc in BIT_READS:
        _byte_count(pdu)
        table = _BITS
        bits = tuple(b for byte in pdu[2:] for b in table[byte])
        return Reply(fc, bits=bits[: request.value])
    if fc in REGISTER_READS:
        _byte_count(pdu)
        return Reply(fc, registers=struct.unpack_from(f">{request.value}H", pdu, 2))
    echoed = int.from_bytes(pdu[1:3], "big")
    if echoed != request.address:  # the value echoed is not checked: the read-back after a write is
        raise PduError(f"write reply names address {echoed}, written {request.address}")
    return Reply(fc)


def _byte_count(pdu: bytes) -> None:
    if pdu[1] != len(pdu) - 2:
        raise PduError(f"byte count {pdu[1]} in a reply carrying {len(pdu) - 2}")

"""Modbus PDUs: requests encoded per the specification, replies checked against their request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.pdu import (
    READ_COILS,
    READ_DISCRETE_INPUTS,
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    WRITE_SINGLE_COIL,
    WRITE_SINGLE_REGISTER,
    PduError,
    Request,
    decode,
)


def test_requests_encode_as_the_specification_shows() -> None:
    # Modbus application protocol V1.1b3, 6.2 and 6.5 examples
    assert Request(READ_DISCRETE_INPUTS, 196, 22).encode() == bytes.fromhex("0200c40016")
    assert Request(WRITE_SINGLE_COIL, 172, 0xFF00).encode() == bytes.fromhex("0500acff00")


def test_bit_reply_lowest_bit_first_and_trimmed_to_count() -> None:
    # 6.2's example reply: inputs 197-218 = ac db 35
    reply = decode(Request(READ_DISCRETE_INPUTS, 196, 22), bytes.fromhex("0203acdb35"))
    assert len(reply.bits) == 22
    assert reply.bits[:8] == (False, False, True, True, False, True, False, True)  # 0xac
    assert reply.bits[16:] == (True, False, True, False, True, True)  # 0x35, 6 of 8


def test_register_reply() -> None:
    reply = decode(Request(READ_HOLDING_REGISTERS, 107, 3), bytes.fromhex("0306022b00000064"))
    assert reply.registers == (555, 0, 100)


def test_exception_reply() -> None:
    reply = decode(Request(READ_INPUT_REGISTERS, 0, 1), bytes.fromhex("8402"))
    assert reply.exception_code == 2
    assert reply.registers == ()


@pytest.mark.parametrize(
    ("request_", "pdu", "problem"),
    [
        (Request(READ_COILS, 0, 8), b"", "empty"),
        (Request(READ_COILS, 0, 8), bytes.fromhex("0201ff"), "function code 2"),
        (Request(READ_COILS, 0, 8), bytes.fromhex("0102ff00"), "4 bytes, expected 3"),
        (Request(READ_COILS, 0, 8), bytes.fromhex("0102ff"), "byte count 2"),
        (Request(READ_HOLDING_REGISTERS, 0, 2), bytes.fromhex("03020001"), "4 bytes"),
        (Request(READ_INPUT_REGISTERS, 0, 1), bytes.fromhex("840203"), "exception reply of 3"),
        (Request(WRITE_SINGLE_REGISTER, 7, 1), bytes.fromhex("0600080001"), "address 8"),
    ],
)
def test_replies_that_do_not_answer_the_request(request_: Request, pdu: bytes, problem: str) -> None:
    with pytest.raises(PduError, match=problem):
        decode(request_, pdu)


def test_write_reply_value_is_left_to_the_read_back() -> None:
    assert decode(Request(WRITE_SINGLE_COIL, 3, 0xFF00), bytes.fromhex("0500030000")).exception_code is None


@given(
    fc=st.sampled_from([1, 2, 3, 4, 5, 6]),
    count=st.integers(1, 125),
    pdu=st.binary(max_size=300),
)
def test_any_bytes_decode_or_raise_pdu_error(fc: int, count: int, pdu: bytes) -> None:
    request = Request(fc, 0, count)
    try:
        reply = decode(request, pdu)
    except PduError:
        return
    if reply.exception_code is None:
        assert len(reply.bits) == (count if fc in (1, 2) else 0)
        assert len(reply.registers) == (count if fc in (3, 4) else 0)

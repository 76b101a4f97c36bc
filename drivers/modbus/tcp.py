"""Modbus TCP: MBAP framing on an asyncio protocol, one transaction in flight.

The MBAP header (Modbus messaging on TCP/IP, 3.1.3) is checked byte by byte as
the reply arrives: a wrong transaction id, protocol id, length, unit id or
function code breaks the connection at once instead of waiting for a timeout.
A late answer to a timed-out request can therefore never be taken for the
next request's reply: the hub drops the connection after any failure.
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

from drivers.modbus.conn import Broken, Connection
from drivers.modbus.links import TcpLink
from drivers.modbus.pdu import PduError, Reply, Request, decode

_MBAP = struct.Struct(">HHHB")
_MBAP_SIZE = 7  # transaction id, protocol id, length, unit id
# 3.1.3: length counts the unit id and the PDU; a PDU is at most 253 bytes.
_MAX_LENGTH = 254


def _expire(fut: asyncio.Future[Reply]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class MbapConnection(Connection, asyncio.Protocol):
    """One TCP connection to a Modbus TCP device or gateway."""

    def __init__(self, link: TcpLink) -> None:
        self.link = link
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._tid = 0
        self._buf = bytearray()
        self._pending: asyncio.Future[Reply] | None = None
        self._request: Request | None = None
        self._head = b""  # the MBAP header a reply must begin with (length aside)
        self._unit = 0

    async def open(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._loop.create_connection(lambda: self, self.link.host, self.link.port)

    async def exchange(self, unit: int, request: Request, limit: float) -> Reply:
        if self.broken is not None:
            raise self.broken
        if self._transport is None:
            raise Broken("not connected", invalid=False)
        self._tid = self._tid % 0xFFFF + 1
        pdu = request.encode()
        header = _MBAP.pack(self._tid, 0, len(pdu) + 1, unit)
        self._head = header[:4]
        self._unit = unit
        self._request = request
        self._buf.clear()
        self.received = 0
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._pending = fut
        self._transport.write(header + pdu)
        timer = self._loop.call_later(limit, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self._pending = None
            self._request = None

    def close(self) -> None:
        self._break("closed by the hub", invalid=False)
        if self._transport is not None:
            self._transport.abort()

    # ---- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport, so no isinstance).
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "connection closed by the device" if exc is None else f"connection lost: {exc}"
        self._break(reason, invalid=False)

    def data_received(self, data: bytes) -> None:
        fut = self._pending
        if fut is None or fut.done() or self._request is None:
            self._break(f"unsolicited bytes: {data[:16].hex(' ')}", invalid=True)
            return
        buf = self._buf
        buf += data
        self.received = len(buf)
        problem = self._screen(buf)
        if problem is not None:
            self._break(f"invalid reply ({problem}): {bytes(buf[:16]).hex(' ')}", invalid=True)
            return
        if len(buf) < _MBAP_SIZE:
            return
        total = 6 + int.from_bytes(buf[4:6], "big")
        if len(buf) < total:
            return
        if len(buf) > total:
            self._break(f"invalid reply (trailing bytes): {bytes(buf[:16]).hex(' ')}", invalid=True)
            return
        try:
            fut.set_result(decode(self._request, bytes(buf[_MBAP_SIZE:])))
        except PduError as exc:
            fut.set_exception(exc)

    def _screen(self, buf: bytearray) -> str | None:
        """Why ``buf`` cannot begin the awaited reply; None if it can."""
        n = len(buf)
        head = self._head
        if buf[: min(n, 2)] != head[: min(n, 2)]:
            return "transaction id"
        if n >= 4 and buf[2:4] != b"\x00\x00":
            return "protocol id"
        if n >= 6 and not 3 <= int.from_bytes(buf[4:6], "big") <= _MAX_LENGTH:
            return "length"
        if n >= 7 and buf[6] != self._unit:
            return "unit id"
        if n >= 8 and self._request is not None and buf[7] & 0x7F != self._request.function_code:
            return "function code"
        return None

    def _break(self, reason: str, *, invalid: bool) -> None:
        if self.broken is None:
            self.broken = Broken(reason, invalid=invalid)
        fut = self._pending
        if fut is not None and not fut.done():
            fut.set_exception(self.broken)
        if invalid and self._transport is not None:
            self._transport.abort()

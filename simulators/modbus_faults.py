"""A fault-injecting TCP front for a Modbus TCP server.

pymodbus' own simulator options for errors, junk and delays have no effect in
3.16, so faults are made here: a small asyncio server on the public port reads
whole MBAP frames and, depending on the mode, forwards them to the real server
on an internal loopback port, swallows them, answers junk, delays, or drops.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import Collection

from aiohttp import web

MBAP_HEADER = 7
# Junk that can never be taken for a reply: bytes 2-3 (the MBAP protocol id) are not 0.
JUNK = b"\x13\x37GARBAGE\xff\x00\x01"
EXC_GATEWAY_TARGET_FAILED = 0x0B


class FaultMode(enum.StrEnum):
    NORMAL = "normal"
    SILENT = "silent"  # accepts connections and requests, never answers
    GARBAGE = "garbage"  # answers every request with junk bytes
    DROP = "drop"  # closes every connection as it arrives
    CLOSED = "closed"  # nothing listens on the port
    SLOW = "slow"  # answers correctly, after `delay` seconds


class FaultProxy:
    """Listens on ``host:port`` (0: any free port, see :attr:`port`), forwards to ``upstream``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        units: Collection[int] = (),
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.units = set(units)  # unit ids served; others get exception 0x0B; empty: forward all
        self.mode = FaultMode.NORMAL
        self.delay = 0.0
        self.requests: Counter[tuple[int, int]] = Counter()  # (unit, function code) -> requests seen
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self._close_listener()
        if self._tasks:
            # 2 s: closed connections end their handlers within a loop iteration or two;
            # a handler still waiting on the upstream server after that is cancelled.
            _, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def set_mode(self, mode: FaultMode, delay: float = 0.0) -> None:
        """Switch fault mode; takes effect for connections already open too."""
        old, self.mode, self.delay = self.mode, mode, delay
        if mode is FaultMode.CLOSED:
            await self._close_listener()
        elif mode is FaultMode.DROP:
            self._close_connections()
        if old is FaultMode.CLOSED and mode is not FaultMode.CLOSED:
            await self.start()

    async def _close_listener(self) -> None:
        """Stop listening and close every connection (before waiting: from Python 3.12 on,
        wait_closed also waits for the connections)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._close_connections()
        if server is not None:
            await server.wait_closed()

    def _close_connections(self) -> None:
        for w in list(self._writers):
            w.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        session = _Session()
        try:
            if self.mode is not FaultMode.DROP:
                await self._serve(session, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to tell anyone
        finally:
            self._writers.discard(writer)
            writer.close()
            if session.upstream is not None:
                session.upstream[1].close()
            self._tasks.discard(task)

    async def _serve(
        self, session: _Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests until the client closes (or the mode says to drop it)."""
        while (frame := await read_frame(reader)) is not None:
            unit, fc = frame[6], frame[7]
            self.requests[(unit, fc)] += 1
            mode = self.mode
            if mode is FaultMode.DROP:
                return
            if mode is FaultMode.SILENT:
                continue
            if mode is FaultMode.GARBAGE:
                reply: bytes | None = JUNK
            else:
                if mode is FaultMode.SLOW:
                    await asyncio.sleep(self.delay)
                if self.units and unit not in self.units:
                    reply = exception_reply(frame, EXC_GATEWAY_TARGET_FAILED)
                else:
                    reply = await self._forward(session, frame)
            if reply is None:
                return
            writer.write(reply)
            await writer.drain()

    async def _forward(self, session: _Session, frame: bytes) -> bytes | None:
        if session.upstream is None:
            session.upstream = await asyncio.open_connection(*self.upstream)
        up_reader, up_writer = session.upstream
        up_writer.write(frame)
        await up_writer.drain()
        return await read_frame(up_reader)


class _Session:
    """One client connection's upstream connection, opened on its first forwarded request."""

    def __init__(self) -> None:
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """One MBAP frame, or None at end of stream or on a frame no server would accept."""
    try:
        header = await reader.readexactly(MBAP_HEADER)
    except asyncio.IncompleteReadError:
        return None
    length = int.from_bytes(header[4:6], "big")
    if header[2:4] != b"\x00\x00" or not 2 <= length <= 254:
        return None
    try:
        return header + await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError:
        return None


def exception_reply(request: bytes, code: int) -> bytes:
    """A Modbus exception response to an MBAP request."""
    return request[:4] + b"\x00\x03" + bytes([request[6], request[7] | 0x80, code])


class ProxiedSimulator:
    """What a Modbus simulator behind a :class:`FaultProxy` offers: where it listens, its
    request counts, and the transport faults. The simulator sets ``_port`` (the requested
    public port), ``_proxy`` (while running) and ``_runner`` (its HTTP control API)."""

    _port: int
    _proxy: FaultProxy | None
    _runner: web.AppRunner | None

    @property
    def port(self) -> int:
        """The public Modbus TCP port."""
        return self._proxy.port if self._proxy else self._port

    @property
    def control_port(self) -> int | None:
        if self._runner is None:
            return None
        return int(self._runner.addresses[0][1])

    @property
    def proxy(self) -> FaultProxy:
        if self._proxy is None:
            raise RuntimeError("simulator not running")
        return self._proxy

    def requests(self, unit: int | None = None, function_code: int | None = None) -> int:
        """Requests received (while the port was open), optionally of one unit / function code."""
        return sum(
            n
            for (u, fc), n in self.proxy.requests.items()
            if (unit is None or u == unit) and (function_code is None or fc == function_code)
        )

    async def silent(self) -> None:
        """Accept, never answer."""
        await self.proxy.set_mode(FaultMode.SILENT)

    async def garbage(self) -> None:
        await self.proxy.set_mode(FaultMode.GARBAGE)

    async def drop(self) -> None:
        await self.proxy.set_mode(FaultMode.DROP)

    async def slow(self, delay: float) -> None:
        await self.proxy.set_mode(FaultMode.SLOW, delay)

    async def close_port(self) -> None:
        await self.proxy.set_mode(FaultMode.CLOSED)

    async def open_port(self) -> None:
        await self.proxy.set_mode(FaultMode.NORMAL)

    async def normal(self) -> None:
        await self.proxy.set_mode(FaultMode.NORMAL)

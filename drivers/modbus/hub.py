"""One Modbus hub per physical link: one connection, one lock, reconnects with backoff.

Every device on a link (many unit ids behind one TCP gateway or one RS-485 line)
talks through the link's hub; transactions are serialised by its lock, with the
RTU inter-frame gap kept between them. Devices on different links have different
hubs and never wait on each other.

Failures are converted here, at the edge, into the gateway's exception tree:
``DeviceUnavailable`` (no answer, link down), ``DeviceProtocolError`` (an answer
that is not a valid reply) and ``DeviceRejected`` (a Modbus exception response).
pymodbus' own retries and reconnects are off: a request is sent once and bounded
by the hub's timeout; after any failed transaction the connection is dropped and
the next transaction opens a fresh one (pymodbus can pair a late answer with the
next request). Link-level failures (connect refused or timed out, connection
closed by the device) delay the next connect by :class:`gateway.backoff.Backoff`.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

import structlog
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from drivers.modbus.errorlog import RepeatedError
from drivers.modbus.links import Link, TcpLink
from drivers.modbus.unit import UnitClient
from gateway.backoff import Backoff
from gateway.errors import DeviceProtocolError, DeviceUnavailable, DriverError

# 0.3 s per request: a device on a school LAN answers in 1-20 ms (loopback: 0.3 ms), so
# this is a wide margin, and a hung device still costs its link well under the 2 s in
# which an alarm must reach the center.
DEFAULT_TIMEOUT = 0.3
# 1 s to connect: a LAN handshake takes milliseconds; 1 s is Linux' first SYN retransmit,
# so a connect that needs it is given up and retried under the backoff instead.
DEFAULT_CONNECT_TIMEOUT = 1.0
# pymodbus' own timeout (connect and request): set above every bound the hub enforces
# itself with asyncio.timeout, so pymodbus never times out first; its default (3 s x 4
# tries) is what a hung device must not cost.
_PYMODBUS_TIMEOUT = 30.0

Call = Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]


class HubState(enum.StrEnum):
    CLOSED = "closed"  # not entered, or exited
    IDLE = "idle"  # entered, no connection: the next transaction opens one
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"  # the link failed; no connect before retry_at


@dataclass
class HubStats:
    transactions: int = 0
    failures: int = 0
    timeouts: int = 0
    connects: int = 0
    connect_failures: int = 0


class _Broken(Exception):
    """The connection can no longer carry the transaction in flight."""

    def __init__(self, reason: str, *, invalid: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.invalid = invalid  # True: the device sent bytes that are not a reply


class _Connection:
    """One open connection: a pymodbus client, and what its byte stream has shown."""

    def __init__(self, link: Link) -> None:
        self.broken: asyncio.Future[_Broken] = asyncio.get_running_loop().create_future()
        self.received = 0  # bytes buffered towards the reply in flight
        self._mbap = isinstance(link, TcpLink)
        self._expect: tuple[int, int] = (0, 0)
        self._sent = b""
        self.client = _make_client(link, self._trace_packet, self._trace_connect)

    def expect(self, unit: int, function_code: int) -> None:
        self._expect = (unit, function_code)
        self.received = 0

    def close(self) -> None:
        self._break("closed by the hub", invalid=False)
        self.client.close()

    def _break(self, reason: str, *, invalid: bool) -> None:
        if not self.broken.done():
            self.broken.set_result(_Broken(reason, invalid=invalid))

    def _trace_connect(self, connected: bool) -> None:
        if not connected:
            self._break("connection closed by the device", invalid=False)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self._sent = data
            return data
        self.received = len(data)
        problem = self._screen(data) if self._mbap else None
        if problem is None:
            return data
        self._break(f"invalid reply ({problem}): {data[:16].hex(' ')}", invalid=True)
        return b""  # keep junk from pymodbus' decoder; the connection is dropped anyway

    def _screen(self, data: bytes) -> str | None:
        """Why ``data`` (the receive buffer) cannot begin the awaited MBAP reply; None if it can.

        Only for TCP: an RTU line may carry a stray byte at turnaround, which
        pymodbus' RTU framer skips by itself.
        """
        unit, fc = self._expect
        if len(data) >= 2 and data[:2] != self._sent[:2]:
            return "transaction id"
        if len(data) >= 4 and data[2:4] != b"\x00\x00":
            return "protocol id"
        if len(data) >= 6 and not 3 <= int.from_bytes(data[4:6], "big") <= 254:
            return "length"
        if len(data) >= 7 and data[6] != unit:
            return "unit id"
        if len(data) >= 8 and data[7] not in (fc, fc | 0x80):
            return "function code"
        return None


def _make_client(
    link: Link,
    trace_packet: Callable[[bool, bytes], bytes],
    trace_connect: Callable[[bool], None],
) -> ModbusBaseClient:
    if isinstance(link, TcpLink):
        return AsyncModbusTcpClient(
            link.host,
            port=link.port,
            framer=FramerType.SOCKET,
            timeout=_PYMODBUS_TIMEOUT,
            retries=0,
            reconnect_delay=0,  # 0 disables pymodbus' reconnect task: the hub reconnects
            trace_packet=trace_packet,
            trace_connect=trace_connect,
        )
    return AsyncModbusSerialClient(
        link.port,
        framer=FramerType.RTU,
        baudrate=link.baudrate,
        bytesize=link.bytesize,
        parity=link.parity,
        stopbits=link.stopbits,
        timeout=_PYMODBUS_TIMEOUT,
        retries=0,
        reconnect_delay=0,
        trace_packet=trace_packet,
        trace_connect=trace_connect,
    )


def _finished(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled()


class ModbusHub:
    """The one connection to a physical link, shared by every unit id on it.

    An async context manager. Entering opens nothing: the first transaction
    connects, so a device that is down at start-up is retried like any other.
    """

    def __init__(
        self,
        link: Link,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        backoff: Backoff | None = None,
    ) -> None:
        self.link = link
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.stats = HubStats()
        self._backoff = backoff if backoff is not None else Backoff()
        self._lock = asyncio.Lock()
        self._conn: _Connection | None = None
        self._state = HubState.CLOSED
        self._retry_at = 0.0
        self._last_io = 0.0
        self._down_reason = ""
        self._log = structlog.get_logger(__name__).bind(link=link.label)
        self._down = RepeatedError(self._log, "modbus link down")

    @property
    def state(self) -> HubState:
        return self._state

    @property
    def retry_in(self) -> float:
        """Seconds until the next connect may be tried (0 when not backing off)."""
        if self._state is not HubState.BACKING_OFF:
            return 0.0
        return max(0.0, self._retry_at - asyncio.get_running_loop().time())

    def snapshot(self) -> dict[str, Any]:
        """State and counters, for the local API and the heartbeat."""
        return {"link": self.link.label, "state": self._state.value, **asdict(self.stats)}

    async def __aenter__(self) -> Self:
        self._state = HubState.IDLE
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._drop()
        self._state = HubState.CLOSED

    def unit(self, unit: int, *, device_id: str, timeout: float | None = None) -> UnitClient:
        """A view of one unit id on this link; errors it raises carry ``device_id``."""
        return UnitClient(self, unit, device_id=device_id, timeout=timeout or self.timeout)

    async def execute(
        self,
        device_id: str,
        what: str,
        unit: int,
        function_code: int,
        call: Call,
        *,
        limit: float | None = None,
    ) -> ModbusPDU:
        """Run one request under the link lock; every foreign failure is converted.

        ``limit`` bounds the request (default: the hub's timeout). Returns the
        response PDU as received (it may be an exception response;
        :mod:`drivers.modbus.unit` checks it).
        """
        if self._state is HubState.CLOSED:
            raise RuntimeError(f"hub {self.link.label} is not open (use 'async with')")
        limit = limit or self.timeout
        async with self._lock:
            conn = await self._connection(device_id)
            await self._frame_gap()
            self.stats.transactions += 1
            try:
                rsp = await self._exchange(conn, unit, function_code, call, limit)
            except asyncio.CancelledError:
                self._drop()  # the request may still be answered: never reuse this stream
                raise
            except (TimeoutError, _Broken, ModbusException, OSError) as exc:
                raise self._failed(device_id, what, exc, limit, conn) from exc
            finally:
                self._last_io = asyncio.get_running_loop().time()
        self._backoff.reset()
        self._down.recovered()
        return rsp

    async def _exchange(
        self, conn: _Connection, unit: int, function_code: int, call: Call, limit: float
    ) -> ModbusPDU:
        conn.expect(unit, function_code)
        request = asyncio.ensure_future(call(conn.client))  # own task: see _connect
        try:
            async with asyncio.timeout(limit):
                await asyncio.wait((request, conn.broken), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            if not _finished(request):  # else the reply came in the very tick of the deadline
                raise
        finally:
            if not request.done():
                request.cancel()
                await asyncio.wait((request,))
        if _finished(request):
            return request.result()  # the reply, or pymodbus' exception (the caller converts it)
        raise conn.broken.result()

    def _failed(
        self, device_id: str, what: str, exc: BaseException, limit: float, conn: _Connection
    ) -> DriverError:
        self.stats.failures += 1
        self._drop()
        if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
            self.stats.timeouts += 1
            if conn.received:
                return DeviceProtocolError(
                    device_id,
                    f"{what}: no complete reply within {limit * 1000:.0f} ms ({conn.received} bytes)",
                )
            return DeviceUnavailable(device_id, f"{what}: no answer within {limit * 1000:.0f} ms")
        if isinstance(exc, _Broken):
            if exc.invalid:
                return DeviceProtocolError(device_id, f"{what}: {exc.reason}")
            self._link_failed("connection_closed", exc.reason)
            return DeviceUnavailable(device_id, f"{what}: {exc.reason}")
        if isinstance(exc, ConnectionException | OSError):
            self._link_failed("connection_error", str(exc))
            return DeviceUnavailable(device_id, f"{what}: {exc}")
        return DeviceProtocolError(device_id, f"{what}: {exc}")

    async def _connection(self, device_id: str) -> _Connection:
        if self._conn is not None and not self._conn.broken.done():
            return self._conn
        self._drop()
        wait = self._retry_at - asyncio.get_running_loop().time()
        if self._state is HubState.BACKING_OFF and wait > 0:
            raise DeviceUnavailable(
                device_id, f"{self.link.label}: link down ({self._down_reason}); next connect in {wait:.1f} s"
            )
        return await self._connect(device_id)

    async def _connect(self, device_id: str) -> _Connection:
        conn = _Connection(self.link)
        self.stats.connects += 1
        reason = "refused or unreachable"
        # In a task of its own: pymodbus connects with asyncio.wait_for, which on Python 3.11
        # swallows a cancellation that arrives as the connection completes; run in the
        # caller's task, that would make the device loop ignore its cancellation.
        connecting = asyncio.ensure_future(conn.client.connect())
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await asyncio.wait((connecting,))
            finally:
                if not connecting.done():
                    connecting.cancel()
                    await asyncio.wait((connecting,))
        except TimeoutError:
            reason = f"no connection within {self.connect_timeout:.1f} s"
        except asyncio.CancelledError:
            conn.close()  # connecting has finished: nothing can reopen it now
            raise
        ok = _finished(connecting) and connecting.result() is True
        if ok and not conn.broken.done():
            self._conn = conn
            self._state = HubState.CONNECTED
            self._log.debug("modbus link connected")
            return conn
        conn.close()
        self.stats.connect_failures += 1
        self._link_failed("connect_failed", reason)
        raise DeviceUnavailable(device_id, f"{self.link.label}: cannot connect ({reason})")

    def _link_failed(self, kind: str, reason: str) -> None:
        delay = self._backoff.next_delay()
        self._retry_at = asyncio.get_running_loop().time() + delay
        self._state = HubState.BACKING_OFF
        self._down_reason = reason
        self._down.failed(kind, reason=reason, retry_in=round(delay, 2))

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._state is HubState.CONNECTED:
            self._state = HubState.IDLE

    async def _frame_gap(self) -> None:
        gap = self.link.frame_gap
        if gap:
            wait = self._last_io + gap - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)

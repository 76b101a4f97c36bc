"""One Modbus hub per physical link: one connection, one lock, reconnects with backoff.

Every device on a link (many unit ids behind one TCP gateway or one RS-485 line)
talks through the link's hub; transactions are serialised by its lock, with the
RTU inter-frame gap kept between them. Devices on different links have different
hubs and never wait on each other.

Failures are converted here, at the edge, into the gateway's exception tree:
``DeviceUnavailable`` (no answer, link down), ``DeviceProtocolError`` (an answer
that is not a valid reply) and ``DeviceRejected`` (a Modbus exception response).
A request is sent once and bounded by the hub's timeout; after any failed
transaction the connection is dropped and the next transaction opens a fresh one
(a late answer must never be paired with the next request). Link-level failures
(connect refused or timed out, connection closed by the device) delay the next
connect by :class:`gateway.backoff.Backoff`.

Modbus TCP runs on the hub's own MBAP protocol (:mod:`drivers.modbus.tcp`: a
poll costs one write, one read and one timer); RTU lines run on pymodbus'
serial client (:mod:`drivers.modbus.rtu`).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

import structlog

from drivers.errorlog import RepeatedError
from drivers.modbus.conn import Broken, Connection
from drivers.modbus.links import Link, TcpLink
from drivers.modbus.pdu import PduError, Reply, Request
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


def _new_connection(link: Link) -> Connection:
    if isinstance(link, TcpLink):
        from drivers.modbus.tcp import MbapConnection

        return MbapConnection(link)
    from drivers.modbus.rtu import RtuConnection  # pymodbus' serial stack, only where a line is used

    return RtuConnection(link)


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
        self._conn: Connection | None = None
        self._failing = False  # a failure (or a new connection) since the last success
        self._state = HubState.CLOSED
        self._retry_at = 0.0
        self._last_io = 0.0
        self._down_reason = ""
        self._log = structlog.get_logger(__name__).bind(link=link.label)
        self._down = RepeatedError(self._log, "modbus link down")

    @property
    def state(self) -> HubState:
        return self._state

    def limit_backoff(self, cap: float) -> None:
        """Cap the reconnect backoff lower (a second user of the link wants it sooner)."""
        self._backoff.cap = min(self._backoff.cap, cap)

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
        self, device_id: str, unit: int, request: Request, *, limit: float | None = None
    ) -> Reply:
        """Run one request under the link lock; every failure is converted.

        ``limit`` bounds the request (default: the hub's timeout). Returns the
        reply as received (it may be an exception reply; :mod:`drivers.modbus.unit`
        checks it).
        """
        if self._state is HubState.CLOSED:
            raise RuntimeError(f"hub {self.link.label} is not open (use 'async with')")
        limit = limit or self.timeout
        async with self._lock:
            conn = await self._connection(device_id)
            gap = self.link.frame_gap
            if gap:
                await self._frame_gap(gap)
            self.stats.transactions += 1
            try:
                reply = await conn.exchange(unit, request, limit)
            except asyncio.CancelledError:
                self._drop()  # the request may still be answered: never reuse this stream
                raise
            except (TimeoutError, Broken, PduError, OSError) as exc:
                what = f"unit {unit}: {request.describe()}"
                raise self._failed(device_id, what, exc, limit, conn) from exc
            finally:
                if gap:
                    self._last_io = asyncio.get_running_loop().time()
        if self._failing:
            self._failing = False
            self._backoff.reset()
            self._down.recovered()
        return reply

    def _failed(
        self, device_id: str, what: str, exc: BaseException, limit: float, conn: Connection
    ) -> DriverError:
        self.stats.failures += 1
        self._failing = True
        self._drop()
        if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
            self.stats.timeouts += 1
            if conn.received:
                return DeviceProtocolError(
                    device_id,
                    f"{what}: no complete reply within {limit * 1000:.0f} ms ({conn.received} bytes)",
                )
            return DeviceUnavailable(device_id, f"{what}: no answer within {limit * 1000:.0f} ms")
        if isinstance(exc, Broken):
            if exc.invalid:
                return DeviceProtocolError(device_id, f"{what}: {exc.reason}")
            self._link_failed("connection_closed", exc.reason)
            return DeviceUnavailable(device_id, f"{what}: {exc.reason}")
        if isinstance(exc, OSError):
            self._link_failed("connection_error", str(exc))
            return DeviceUnavailable(device_id, f"{what}: {exc}")
        return DeviceProtocolError(device_id, f"{what}: {exc}")

    async def _connection(self, device_id: str) -> Connection:
        conn = self._conn
        if conn is not None and conn.broken is None:
            return conn
        self._drop()
        wait = self._retry_at - asyncio.get_running_loop().time()
        if self._state is HubState.BACKING_OFF and wait > 0:
            raise DeviceUnavailable(
                device_id, f"{self.link.label}: link down ({self._down_reason}); next connect in {wait:.1f} s"
            )
        return await self._connect(device_id)

    async def _connect(self, device_id: str) -> Connection:
        conn = _new_connection(self.link)
        self.stats.connects += 1
        self._failing = True  # until a transaction succeeds on this connection
        try:
            await conn.open(self.connect_timeout)
        except asyncio.CancelledError:
            conn.close()
            raise
        except TimeoutError:
            reason = f"no connection within {self.connect_timeout:.1f} s"
        except Broken as exc:
            reason = exc.reason
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
        else:
            if conn.broken is None:
                self._conn = conn
                self._state = HubState.CONNECTED
                self._log.debug("modbus link connected")
                return conn
            reason = conn.broken.reason
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

    async def _frame_gap(self, gap: float) -> None:
        wait = self._last_io + gap - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

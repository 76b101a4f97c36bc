"""One MQTT connection to one broker, paho-mqtt 2.x driven entirely from the asyncio loop.

:class:`MqttConnection` is an async context manager. Entering it opens the TCP connection
(and TLS) with the loop's own non-blocking calls, hands the connected socket to a fresh paho
``Client`` and waits for CONNACK, all within ``connect_timeout``; nothing blocks the loop and
no thread is started. From then on paho is driven through its socket callbacks: the loop
watches the socket (``add_reader`` / ``add_writer``) and calls ``loop_read`` / ``loop_write``;
a timer calls ``loop_misc`` (paho's pinger). paho never reconnects in this mode: a connection
is used once, and whoever owns it (the uplink) reconnects by building a new one.

Delivery contract, for a caller that resends from a durable outbox:

* :meth:`MqttConnection.publish` returns a future that resolves on PUBACK (QoS 1), and fails
  with :class:`~gateway.errors.UplinkError` if the connection ends first, for whatever reason
  (broker gone, keepalive expired, socket error, :meth:`abort`, clean exit). Every publish
  not acknowledged is failed: the paho client, and its in-memory resend queue, die with the
  connection, so the caller knows exactly what to send again.
* A frozen broker is declared lost after 1.5 x keepalive without a byte from it (checked
  every 0.1 x keepalive); a killed broker is noticed at once (EOF or reset on the socket).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import UplinkError

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

log = structlog.get_logger(__name__)

# paho runs its pinger only from loop_misc: it sends PINGREQ once the link has been quiet for
# one keepalive, so a coarse period delays the ping (and loss detection) by up to one period.
# Ten times per keepalive keeps that delay at 10 % for the cost of a no-op timer call.
MISC_PERIOD_FRACTION = 0.1
# The broker is declared gone after 1.5 x keepalive without a byte from it: the rule a broker
# applies to its clients (MQTT 3.1.1 s3.1.2.10). paho pings after 1 x keepalive of silence, so
# a live broker's PINGRESP has half a keepalive (2.5 s by default) to arrive.
SILENCE_FACTOR = 1.5
# A misc tick this late (a quarter keepalive) means the loop itself stalled: paho could not
# ping on time, so the silence is not held against the broker (see _on_misc_timer). Smaller
# delays are scheduling noise, already inside the half keepalive of margin.
STALL_FRACTION = 0.25
# Clean exit: DISCONNECT is two bytes. A socket that cannot take them within 1 s leads to a
# broker that is gone anyway, and shutdown must stay well under systemd's stop timeout.
DISCONNECT_TIMEOUT = 1.0
# A TLS 1.2/1.3 handshake needs a handful of read/write waits; this bound only catches a peer
# that trickles bytes forever (the connect timeout around it bounds the time as well).
TLS_MAX_STEPS = 64
# A repeated error (same uplink, same kind) is logged at once, then at most once a minute with
# the count of those suppressed in between: a flapping broker must not flood the journal.
LOG_REPEAT_PERIOD = 60.0

# Bytes asked of the socket per recv. paho reads a packet in pieces (1 byte of command, the
# length byte by byte, then the body): a PUBACK cost three recv syscalls. Reading ahead this
# much serves a whole burst of PUBACKs from one syscall; the same size as asyncio's own
# stream reads, and the buffer is dropped as soon as paho has consumed it.
READ_CHUNK = 64 * 1024

# paho's on_disconnect reason codes (MQTT 5 numbering, also used for 3.1.1 connections).
_DISCONNECT_SUCCESS = 0x00
_DISCONNECT_KEEPALIVE = 0x8D

if "_create_socket" not in vars(paho.Client):  # pragma: no cover - paho upgrade guard
    # We hand paho a socket connected without blocking by overriding this (paho 2.x) method;
    # without it paho would connect by itself, blocking the event loop.
    raise ImportError("paho-mqtt without Client._create_socket: gateway.mqtt needs paho-mqtt 2.x")
if not all(  # pragma: no cover - paho upgrade guard
    name in vars(paho.Client) for name in ("_handle_pubackcomp", "_do_on_publish", "_update_inflight")
):
    # The PUBACK fast path (_PahoClient) replaces these paho 2.x internals.
    raise ImportError("paho-mqtt without the PUBACK internals gateway.mqtt replaces: needs paho-mqtt 2.x")

# paho builds a ReasonCode and a Properties object for every PUBACK it decodes, and passes
# them to on_publish, which ignores them here. For MQTT 3.1.1 a PUBACK carries no reason code
# and no properties: these two stand for every one (read only, never changed).
_PUBACK_REASON = ReasonCode(PacketTypes.PUBACK)
_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us when the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        if not self.topic or any(c in self.topic for c in "#+"):
            raise ValueError(f"will topic {self.topic!r}: must be non-empty, without wildcards")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"will qos {self.qos}: must be 0, 1 or 2")


class _State(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class _RepeatLimiter:
    """Log a repeated condition once, then at most once per ``period``, counting the rest."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def check(self, key: tuple[str, str]) -> int | None:
        """None: stay quiet; otherwise log now, reporting this many suppressed since last time."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


_limiter = _RepeatLimiter(LOG_REPEAT_PERIOD)


class _TrackedSocket:
    """The connected socket as paho sees it, remembering why it failed (EOF or OSError).

    paho reports a lost connection only as "Unspecified error"; this keeps the real cause
    for :attr:`MqttConnection.close_reason`. Non-blocking "try again" errors pass untouched.

    Reads are buffered: one ``recv`` of up to :data:`READ_CHUNK` bytes, then paho's small
    reads are served from the buffer. Buffered bytes are invisible to the selector, so
    :meth:`pending` counts them (the connection keeps calling paho while it is non-zero).
    """

    __slots__ = ("_rbuf", "_rpos", "eof", "error", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.eof = False
        self.error: OSError | None = None
        self._rbuf = b""
        self._rpos = 0

    def recv(self, buffer_size: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            try:
                data = self.sock.recv(max(buffer_size, READ_CHUNK))
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except OSError as exc:
                self.error = exc
                raise
            if not data:
                self.eof = True
            if len(data) <= buffer_size:
                self._rbuf, self._rpos = b"", 0
                return data
            buf, pos = data, 0
        end = pos + buffer_size
        if end >= len(buf):
            self._rbuf, self._rpos = b"", 0
            return buf[pos:] if pos else buf
        self._rbuf, self._rpos = buf, end
        return buf[pos:end]

    def send(self, buffer: bytes | bytearray) -> int:
        try:
            return self.sock.send(buffer)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except OSError as exc:
            self.error = exc
            raise

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def pending(self) -> int:
        """Bytes read ahead (here, or decrypted inside the TLS layer), invisible to the selector."""
        buffered = len(self._rbuf) - self._rpos
        return buffered + (self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0)

    def describe(self) -> str | None:
        if self.error is not None:
            return f"socket error: {_os_error_text(self.error)}"
        if self.eof:
            return "the broker closed the connection"
        return None


class _PahoClient(paho.Client):
    """paho's Client, given a socket we connected ourselves instead of connecting by itself."""

    prepared: _TrackedSocket | None = None

    def _create_socket(self) -> SocketLike:
        # Called by Client.reconnect() (from connect()), once per connection; paho then makes it
        # non-blocking and reports it through on_socket_open. We never call reconnect() again.
        sock, self.prepared = self.prepared, None
        if sock is None:
            raise ConnectionError("no prepared socket: an MqttConnection connects only once")
        return sock

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        # The PUBACK fast path (MQTT 3.1.1): the message id is the whole packet. paho decodes
        # it into a ReasonCode and a Properties object first (measured: about a sixth of the
        # event loop's time when publishing at full speed). Anything else takes paho's path,
        # which also raises for a malformed packet.
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol != MQTTProtocolVersion.MQTTv311 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_REASON, _PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _update_inflight(self) -> MQTTErrorCode:
        # paho calls this on every PUBACK and walks all its messages to find queued ones.
        # Every QoS 1/2 message it holds is either in flight or queued (QoS 0 ones are not
        # held), so there is nothing to send when no more are held than are in flight.
        if len(self._out_messages) <= self._inflight_messages:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._update_inflight()


class MqttConnection:
    """One connection to one broker endpoint; see the module docstring for the contract.

    ``keepalive`` is rounded to whole seconds (the protocol field is an integer, at least 1).
    ``max_inflight`` is the QoS 1/2 window: publishes beyond it wait in paho's queue, in order.
    ``on_message(topic, payload, retain)`` is called on the loop (scheduled with call_soon, so
    an exception in it reaches the loop's exception handler, never paho's parser).
    """

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        client_id: str,
        keepalive: float,
        connect_timeout: float,
        max_inflight: int,
        clean_session: bool = True,
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        on_message: Callable[[str, bytes, bool], None] | None = None,
    ) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.name = name
        self.host = host
        self.port = port
        self.client_id = client_id
        self.keepalive = max(1, round(keepalive))
        self.connect_timeout = connect_timeout
        self.max_inflight = max_inflight
        self.clean_session = clean_session
        self.tls = tls
        self.username = username
        self._password = password
        self.will = will
        self._on_message_cb = on_message
        self.close_reason: str | None = None
        self.session_present = False
        self._state = _State.NEW
        self._phase = "connect"
        self._loop: asyncio.AbstractEventLoop | None = None
        # Built now, so that a bad will topic or client id fails here, before any I/O.
        self._client: _PahoClient | None = self._make_client()
        self._sock: _TrackedSocket | None = None
        self._fd = -1
        self._reading = False
        self._writing = False
        self._misc_timer: asyncio.TimerHandle | None = None
        self._misc_due = 0.0
        self._last_rx = 0.0
        self._connack: asyncio.Future[None] | None = None
        self._refused: str | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._suback: dict[int, asyncio.Future[None]] = {}
        self._closed = asyncio.Event()
        self._bug: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def inflight(self) -> int:
        """Publishes handed to this connection and not yet acknowledged (window + queued)."""
        return len(self._pending)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> MqttConnection:
        if self._state is not _State.NEW:
            raise RuntimeError("an MqttConnection is entered once; build a new one to reconnect")
        self._loop = asyncio.get_running_loop()
        self._state = _State.CONNECTING
        try:
            await self._connect()
        except BaseException as exc:
            self._finish(f"connect failed: {exc}")
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reason = "closed"
        try:
            if self._state is _State.CONNECTED and self._client is not None:
                # Queue DISCONNECT behind whatever is still being written; paho reports it
                # through on_disconnect once written, and the broker then drops the will.
                self._client.disconnect()
                async with asyncio.timeout(DISCONNECT_TIMEOUT):
                    await self._closed.wait()
        except TimeoutError:
            reason = f"closed (DISCONNECT not written within {DISCONNECT_TIMEOUT} s)"
        finally:
            self._finish(reason, expected=True)

    def abort(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the will."""
        self._finish("aborted (no DISCONNECT sent)", expected=True)

    async def wait_closed(self) -> None:
        """Return once the connection has ended (lost, aborted or closed).

        Raises the unexpected exception if the connection ended because of a bug (in paho
        or here) rather than a network or broker condition.
        """
        await self._closed.wait()
        if self._bug is not None:
            raise self._bug

    # -- operations -------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue one message; the future resolves on PUBACK (QoS 1), PUBCOMP (2) or write (0).

        Raises UplinkError at once when not connected; the future fails with UplinkError when
        the connection ends before the acknowledgement. An invalid topic raises ValueError.
        """
        client, loop = self._client, self._loop
        if self._state is not _State.CONNECTED or client is None or loop is None:
            raise UplinkError(
                self.name, f"not connected to {self.endpoint} ({self.close_reason or 'not open'})"
            )
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise UplinkError(
                self.name, f"publish to {topic!r} refused by paho: {paho.error_string(info.rc)}"
            )
        fut: asyncio.Future[None] = loop.create_future()
        self._pending[info.mid] = fut
        return fut

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for SUBACK (at most ``connect_timeout``, a round trip's budget)."""
        client, loop = self._client, self._loop
        if self._state is not _State.CONNECTED or client is None or loop is None:
            raise UplinkError(
                self.name, f"not connected to {self.endpoint} ({self.close_reason or 'not open'})"
            )
        rc, mid = client.subscribe(topic, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise UplinkError(self.name, f"subscribe to {topic!r} refused by paho: {paho.error_string(rc)}")
        fut: asyncio.Future[None] = loop.create_future()
        self._suback[mid] = fut
        try:
            async with asyncio.timeout(self.connect_timeout):
                await fut
        except TimeoutError as exc:
            raise UplinkError(self.name, f"no SUBACK for {topic!r} within {self.connect_timeout} s") from exc
        finally:
            self._suback.pop(mid, None)

    # -- connect ----------------------------------------------------------------------------

    async def _connect(self) -> None:
        assert self._loop is not None
        deadline = asyncio.timeout(self.connect_timeout)
        try:
            async with deadline:
                self._sock = await self._open_socket()
                client = self._client
                assert client is not None, "set in __init__, dropped only by _finish"
                client.prepared = self._sock
                self._phase = "MQTT CONNECT"
                self._connack = self._loop.create_future()
                rc = client.connect(self.host, self.port, keepalive=self.keepalive)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise UplinkError(
                        self.name, f"{self.endpoint}: CONNECT not sent: {paho.error_string(rc)}"
                    )
                self._phase = "waiting for CONNACK"
                await self._connack
        except TimeoutError as exc:
            if deadline.expired():
                raise UplinkError(
                    self.name, f"{self.endpoint}: {self._phase} timed out after {self.connect_timeout} s"
                ) from exc
            raise UplinkError(self.name, f"{self.endpoint}: {self._phase} failed: {exc}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise UplinkError(
                self.name, f"{self.endpoint}: TLS certificate rejected: {exc.verify_message or exc}"
            ) from exc
        except ssl.SSLError as exc:
            raise UplinkError(
                self.name, f"{self.endpoint}: TLS handshake failed: {exc.reason or exc}"
            ) from exc
        except OSError as exc:
            raise UplinkError(
                self.name, f"{self.endpoint}: {self._phase} failed: {_os_error_text(exc)}"
            ) from exc
        self._state = _State.CONNECTED
        self._last_rx = self._loop.time()
        self._schedule_misc()
        log.info(
            "mqtt.connected",
            uplink=self.name,
            endpoint=self.endpoint,
            client_id=self.client_id,
            session_present=self.session_present,
        )

    async def _open_socket(self) -> _TrackedSocket:
        """TCP connect (each resolved address in turn), then the TLS handshake, on the loop."""
        loop = self._loop
        assert loop is not None
        self._phase = "resolving host"
        addrs: list[tuple[socket.AddressFamily, Any]]
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            addrs = [(family, addr) for family, _t, _p, _c, addr in infos]
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            addrs = [(family, (self.host, self.port))]
        self._phase = "TCP connect"
        error: OSError | None = None
        for family, addr in addrs:
            raw = socket.socket(family, socket.SOCK_STREAM)
            try:
                raw.setblocking(False)
                # Events are small and latency matters more than packet count (an alarm
                # should reach the center within about 2 s); writes are batched per loop turn.
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(raw, addr)
                if self.tls is not None:
                    self._phase = "TLS handshake"
                    return _TrackedSocket(await self._tls_handshake(raw))
                return _TrackedSocket(raw)
            except OSError as exc:
                raw.close()
                error = exc
                if isinstance(exc, ssl.SSLError):
                    raise
            except BaseException:
                raw.close()
                raise
        assert error is not None, "getaddrinfo returns at least one address or raises"
        raise error

    async def _tls_handshake(self, raw: socket.socket) -> ssl.SSLSocket:
        assert self.tls is not None
        tls = self.tls.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
        try:
            await self._tls_steps(tls)
        except BaseException:
            tls.close()
            raise
        return tls

    async def _tls_steps(self, tls: ssl.SSLSocket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(TLS_MAX_STEPS):
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                await _wait_fd(loop, tls.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _wait_fd(loop, tls.fileno(), write=True)
            else:
                return
        raise ssl.SSLError(f"handshake not finished after {TLS_MAX_STEPS} steps")

    def _make_client(self) -> _PahoClient:
        client = _PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self.clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            # Never let paho reconnect on its own (it would on some CONNACK codes).
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(self.max_inflight)
        if self.username is not None:
            client.username_pw_set(self.username, self._password)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # -- loop <-> paho ----------------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        assert self._loop is not None
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._guard, self._on_readable)
        self._reading = True

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self._unwatch()

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        if self._loop is not None and self._fd >= 0 and not self._writing:
            self._loop.add_writer(self._fd, self._guard, self._on_writable)
            self._writing = True

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        if self._loop is not None and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _unwatch(self) -> None:
        """Stop watching the socket; always before it is closed (the fd number gets reused)."""
        if self._loop is not None and self._fd >= 0:
            if self._reading:
                self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._reading = self._writing = False

    def _guard(self, step: Callable[[], None]) -> None:
        """Run one loop callback; an unexpected exception (a bug) ends the connection loudly."""
        try:
            step()
        except Exception as exc:
            log.exception("mqtt.internal_error", uplink=self.name, endpoint=self.endpoint)
            self._bug = exc
            self._finish(f"internal error: {exc!r}")

    def _on_readable(self) -> None:
        client, sock, loop = self._client, self._sock, self._loop
        if client is None or sock is None or loop is None or self._state is _State.CLOSED:
            return
        self._last_rx = loop.time()
        client.loop_read()
        if self._sock is sock and sock.pending():
            # TLS decrypted more than paho consumed; the selector cannot see those bytes.
            loop.call_soon(self._guard, self._on_readable)

    def _on_writable(self) -> None:
        client = self._client
        if client is not None and self._state is not _State.CLOSED:
            client.loop_write()

    def _schedule_misc(self) -> None:
        assert self._loop is not None
        period = self.keepalive * MISC_PERIOD_FRACTION
        self._misc_due = self._loop.time() + period
        self._misc_timer = self._loop.call_later(period, self._guard, self._on_misc_timer)

    def _on_misc_timer(self) -> None:
        self._misc_timer = None
        client, loop = self._client, self._loop
        if client is None or loop is None or self._state is not _State.CONNECTED:
            return
        now = loop.time()
        if now - self._misc_due > self.keepalive * STALL_FRACTION:
            # The loop itself stalled (nobody read, nobody pinged): that silence is ours, not
            # the broker's. Count it from one keepalive ago, so paho pings now and the broker
            # gets the usual half keepalive to answer.
            self._last_rx = max(self._last_rx, now - self.keepalive)
        silence = now - self._last_rx
        if silence >= self.keepalive * SILENCE_FACTOR:
            limit = f"{SILENCE_FACTOR} x keepalive {self.keepalive} s"
            self._finish(f"no answer from the broker for {silence:.1f} s ({limit})")
            return
        client.loop_misc()  # paho's pinger; may end the connection through on_disconnect
        if self._state is _State.CONNECTED:
            self._schedule_misc()

    # -- paho callbacks (all run on the loop, inside loop_read / loop_write / loop_misc) ----

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if reason.is_failure:
            self._refused = f"{self.endpoint}: CONNACK refused: {reason}"
            fut.set_exception(UplinkError(self.name, self._refused))
        else:
            self.session_present = bool(flags.session_present)
            fut.set_result(None)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        detail = self._sock.describe() if self._sock is not None else None
        if self._refused is not None:
            why = self._refused
        elif self._state is not _State.CONNECTED and self._phase == "waiting for CONNACK":
            why = f"{self.endpoint}: connection ended before CONNACK: {detail or reason}"
        elif reason.value == _DISCONNECT_SUCCESS:
            why = "disconnected (DISCONNECT sent)"
        elif reason.value == _DISCONNECT_KEEPALIVE:
            why = f"no PINGRESP from the broker within keepalive ({self.keepalive} s)"
        else:
            why = detail or f"connection lost ({reason})"
        self._finish(why, expected=reason.value == _DISCONNECT_SUCCESS)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        fut = self._suback.get(mid)
        if fut is None or fut.done():
            return
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            fut.set_exception(
                UplinkError(self.name, f"subscription refused by the broker: {', '.join(failed)}")
            )
        else:
            fut.set_result(None)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        loop, handler = self._loop, self._on_message_cb
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._log_repeated("bad_topic", "mqtt.message_dropped", reason="topic is not UTF-8")
            return
        if handler is None or loop is None:
            self._log_repeated(
                "no_handler", "mqtt.message_dropped", reason="no on_message handler", topic=topic
            )
            return
        loop.call_soon(handler, topic, bytes(message.payload), bool(message.retain))

    # -- teardown ---------------------------------------------------------------------------

    def _finish(self, reason: str, *, expected: bool = False) -> None:
        """End the connection (idempotent): stop watching, close, fail everything pending.

        ``expected``: we ended it (exit, abort), so it is no loss worth a warning.
        """
        if self._state is _State.CLOSED:
            return
        was_connected = self._state is _State.CONNECTED
        self._state = _State.CLOSED
        self.close_reason = reason
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None
        self._unwatch()
        client, self._client = self._client, None
        if client is not None:
            # paho may still touch this client (it closes the socket again after on_disconnect,
            # and in __del__); nothing from it may reach this connection any more.
            client.on_socket_open = client.on_socket_close = None
            client.on_socket_register_write = client.on_socket_unregister_write = None
            client.on_connect = client.on_disconnect = client.on_publish = None
            client.on_subscribe = client.on_message = None
            client.prepared = None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._fd = -1
        cause = self._bug
        for waiters, what in ((self._pending, "PUBACK"), (self._suback, "SUBACK")):
            for fut in waiters.values():
                if not fut.done():
                    err = UplinkError(self.name, f"connection ended before {what}: {reason}")
                    err.__cause__ = cause
                    fut.set_exception(err)
            waiters.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(UplinkError(self.name, reason))
        self._closed.set()
        if was_connected:
            if expected:
                log.info("mqtt.closed", uplink=self.name, endpoint=self.endpoint, reason=reason)
            else:
                self._log_repeated("lost", "mqtt.connection_lost", reason=reason)

    def _log_repeated(self, kind: str, event: str, **fields: Any) -> None:
        suppressed = _limiter.check((self.name, kind))
        if suppressed is not None:
            log.warning(event, uplink=self.name, endpoint=self.endpoint, suppressed=suppressed, **fields)


def _os_error_text(exc: OSError) -> str:
    """The errno's text ("Connection refused"), not asyncio's "Connect call failed (addr)"."""
    if exc.errno is not None and exc.errno > 0:  # gaierror's codes are negative: use its text
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable); the watch is removed however this ends."""
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)

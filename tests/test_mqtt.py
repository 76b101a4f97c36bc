"""MqttConnection against a real mosquitto (one private broker per test, loopback only).

Every test is checked for leaks: no task left, no socket or fd left open, nothing still
watched by the loop, no timer still scheduled, no thread left running.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import UplinkError
from gateway.mqtt import MqttConnection, Will, _PahoClient, _TrackedSocket
from tests.support.broker import Mosquitto, free_port
from tests.support.subscriber import Received, Subscriber

# Loss-detection tests use the smallest keepalive the protocol allows (whole seconds), so a
# frozen broker is declared lost after 1.5 s.
FAST_KEEPALIVE = 1.0
# What "not blocked" means for the loop during a connect: measured 1.5 ms idle and 2.4 ms
# across ten TLS connects on an idle 2-core box, but a loaded CI box can deschedule the
# whole process for tens of ms. A connect that blocked on a frozen broker would show the
# whole connect_timeout (1 s), five times this bound.
MAX_LOOP_LAG = 0.2
# Bound on waits for something that should happen within milliseconds on loopback.
QUICK = 5.0

_ids = itertools.count()


def make(port: int, **kw: Any) -> MqttConnection:
    kw.setdefault("name", "test")
    kw.setdefault("client_id", f"gw-test-{os.getpid()}-{next(_ids)}")
    kw.setdefault("keepalive", 5.0)
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("max_inflight", 32)
    return MqttConnection(host="127.0.0.1", port=port, **kw)


async def eventually(predicate: Callable[[], Any], within: float = QUICK, what: str = "condition") -> Any:
    """Wait (bounded) for something another process or thread does; tests only."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} not met within {within} s")


def on_topic(sub: Subscriber, topic: str) -> list[Received]:
    return [m for m in list(sub.messages) if m.topic == topic]


# -- leak check ---------------------------------------------------------------------------


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory listing's own fd, already closed
    return out


def _watched(loop: asyncio.AbstractEventLoop) -> set[int]:
    selector = getattr(loop, "_selector", None)
    return set(selector.get_map()) if selector is not None else set()


def _timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    return [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    fds, watched, threads = _fds(), _watched(loop), set(threading.enumerate())
    yield
    await asyncio.sleep(0)  # let callbacks scheduled with call_soon run
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert _watched(loop) == watched, "a socket is still watched by the loop"
    assert _timers(loop) == [], "a timer is still scheduled"
    assert set(threading.enumerate()) <= threads, "a thread was left running"
    gc.collect()
    leaked = {fd: target for fd, target in _fds().items() if fds.get(fd) != target}
    assert leaked == {}, f"file descriptors left open: {leaked}"


# -- brokers ------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key.name, "-out", crt.name, "-subj", f"/CN={name}", "-days", "1",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    return key, crt


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 it signed, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    ca_key, ca_crt = make_ca(d, "test-ca")
    _, other_crt = make_ca(d, "other-ca")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=d,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", ca_crt.name, "-CAkey", ca_key.name,
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf",
        cwd=d,
    )  # fmt: skip
    return {"ca": ca_crt, "other_ca": other_crt, "cert": d / "server.crt", "key": d / "server.key"}


@pytest.fixture
def tls_broker(tmp_path: Path, tls_files: dict[str, Path]) -> Iterator[tuple[Mosquitto, int]]:
    tls_port = free_port()
    b = Mosquitto(
        tmp_path / "broker",
        extra_conf=[
            f"listener {tls_port} 127.0.0.1",
            f"cafile {tls_files['ca']}",
            f"certfile {tls_files['cert']}",
            f"keyfile {tls_files['key']}",
        ],
    ).start()
    yield b, tls_port
    b.stop()


class LoopLag:
    """Measures how late a 1 ms ticker wakes up: the longest the loop was blocked."""

    def __init__(self) -> None:
        self.max = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():  # bounded by the async with around it
            t = loop.time()
            await asyncio.sleep(0.001)
            self.max = max(self.max, loop.time() - t - 0.001)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick(), name="loop-lag-ticker")
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


# -- publishing ---------------------------------------------------------------------------


async def test_publish_resolves_on_puback(broker: Mosquitto) -> None:
    with Subscriber(broker.port, "t/#") as sub:
        async with make(broker.port) as conn:
            assert conn.connected
            broker.freeze()  # the broker cannot answer: the publish must stay pending
            fut = conn.publish("t/one", b"hello")
            await asyncio.sleep(0.3)
            assert not fut.done()
            assert conn.inflight == 1
            broker.thaw()
            await asyncio.wait_for(fut, QUICK)
            assert conn.inflight == 0
        await eventually(lambda: on_topic(sub, "t/one"), what="message at the subscriber")
    assert [(m.payload, m.retain) for m in on_topic(sub, "t/one")] == [(b"hello", False)]


async def test_thousand_publishes_window_32_arrive_in_order(broker: Mosquitto) -> None:
    n = 1000
    with Subscriber(broker.port, "seq/#") as sub:
        async with make(broker.port, max_inflight=32) as conn:
            acked: list[int] = []
            futs = []
            for i in range(n):
                fut = conn.publish("seq/x", str(i).encode())
                fut.add_done_callback(lambda f, i=i: acked.append(i))
                futs.append(fut)
            assert conn.inflight == n  # 32 on the wire, the rest queued in order
            await asyncio.wait_for(asyncio.gather(*futs), QUICK)
            assert acked == list(range(n)), "acknowledged out of order"
            assert conn.inflight == 0
        await eventually(lambda: len(sub.messages) >= n, what=f"{n} messages at the subscriber")
    assert [int(m.payload) for m in sub.messages] == list(range(n))


def test_socket_reads_ahead_and_counts_what_it_holds() -> None:
    """paho reads a packet in 1-byte and body-sized pieces; they come from one recv()."""
    import socket

    a, b = socket.socketpair()
    with a, b:
        tracked = _TrackedSocket(a)
        a.setblocking(False)
        pubacks = b"\x40\x02\x00\x01" + b"\x40\x02\x01\x02"
        b.sendall(pubacks)
        assert tracked.recv(1) == b"\x40"
        assert tracked.pending() == 7  # the rest is buffered, where the selector cannot see it
        assert tracked.recv(1) == b"\x02"
        assert tracked.recv(2) == b"\x00\x01"
        assert tracked.recv(100) == b"\x40\x02\x01\x02"  # never more than buffered
        assert tracked.pending() == 0
        with pytest.raises(BlockingIOError):
            tracked.recv(1)
        b.sendall(b"\xd0\x00")
        b.shutdown(socket.SHUT_WR)
        assert tracked.recv(1) == b"\xd0"
        assert not tracked.eof
        assert tracked.recv(1) == b"\x00"  # buffered bytes first, then the end
        assert tracked.recv(1) == b""
        assert tracked.eof
        assert tracked.describe() == "the broker closed the connection"


async def test_puback_fast_path_skips_paho_decoding(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    import paho.mqtt._packet as packet

    def refuse(*args: object) -> None:
        raise AssertionError("paho decoded a PUBACK")

    monkeypatch.setattr(packet, "decode_puback", refuse)
    async with make(broker.port, max_inflight=2) as conn:
        futs = [conn.publish("fast/x", b"%d" % i) for i in range(10)]  # 8 wait in paho's queue
        await asyncio.wait_for(asyncio.gather(*futs), QUICK)
        assert conn.inflight == 0


def test_malformed_puback_takes_paho_path() -> None:
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.exception import MalformedPacket

    client = _PahoClient(CallbackAPIVersion.VERSION2)
    client._in_packet["packet"] = b"\x00\x01\x00"  # 3 bytes: not a 3.1.1 PUBACK
    with pytest.raises(MalformedPacket):
        client._handle_pubackcomp("PUBACK")


async def test_publish_when_not_connected_raises(broker: Mosquitto) -> None:
    conn = make(broker.port)
    with pytest.raises(UplinkError, match="not connected"):
        conn.publish("t/x", b"x")
    async with conn:
        pass
    with pytest.raises(UplinkError, match="not connected"):
        conn.publish("t/x", b"x")
    with pytest.raises(UplinkError, match="not connected"):
        await conn.subscribe("t/#")
    with pytest.raises(RuntimeError, match="entered once"):
        await conn.__aenter__()


# -- connecting ---------------------------------------------------------------------------


async def test_connect_refused_fails_fast() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UplinkError, match="refused") as info:
        async with make(port, connect_timeout=5.0):
            pytest.fail("connected to nothing")
    assert time.monotonic() - started < 1.0
    assert info.value.uplink == "test"
    assert info.value.transient


async def test_connect_to_frozen_broker_times_out(broker: Mosquitto) -> None:
    broker.freeze()  # TCP still connects (the kernel accepts), CONNACK never comes
    started = time.monotonic()
    conn = make(broker.port, connect_timeout=1.0)
    with pytest.raises(UplinkError, match=r"CONNACK timed out after 1\.0 s"):
        async with conn:
            pytest.fail("connected to a frozen broker")
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5  # the timeout, plus slack for a loaded CI box
    assert not conn.connected
    assert conn.close_reason is not None


async def test_cancelled_connect_cleans_up(broker: Mosquitto) -> None:
    broker.freeze()
    conn = make(broker.port, connect_timeout=5.0)

    async def enter() -> None:
        async with conn:
            pytest.fail("connected to a frozen broker")

    task = asyncio.create_task(enter(), name="enter-then-cancel")
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not conn.connected
    await asyncio.wait_for(conn.wait_closed(), QUICK)  # the leak check does the rest


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that takes only user gw with password s3cret."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed: cannot make a password file")
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "gw", "s3cret"], check=True, timeout=30)
    b = Mosquitto(tmp_path / "broker", allow_anonymous=False, extra_conf=[f"password_file {pwfile}"])
    yield b.start()
    b.stop()


async def test_username_password(auth_broker: Mosquitto) -> None:
    async with make(auth_broker.port, username="gw", password="s3cret") as conn:
        await asyncio.wait_for(conn.publish("t/auth", b"ok"), QUICK)
    refused = r"CONNACK refused: (Not authorized|Bad user name or password)"
    for user, password in (("gw", "wrong"), (None, None)):
        started = time.monotonic()
        with pytest.raises(UplinkError, match=refused):
            async with make(auth_broker.port, username=user, password=password):
                pytest.fail("connected with bad credentials")
        assert time.monotonic() - started < 1.0


async def test_tls_trusted_ca_connects_without_blocking_the_loop(
    tls_broker: tuple[Mosquitto, int], tls_files: dict[str, Path]
) -> None:
    broker, tls_port = tls_broker
    ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with Subscriber(broker.port, "tls/#") as sub:
        async with LoopLag() as lag:
            conn = make(tls_port, tls=ctx)
            async with conn:
                assert conn.endpoint.startswith("mqtts://")
                futs = [conn.publish("tls/x", str(i).encode()) for i in range(100)]
                await asyncio.wait_for(asyncio.gather(*futs), QUICK)
        await eventually(lambda: len(sub.messages) >= 100, what="100 messages over TLS")
    assert [int(m.payload) for m in sub.messages] == list(range(100))
    assert lag.max < MAX_LOOP_LAG, f"loop blocked for {lag.max * 1000:.1f} ms"


async def test_tls_untrusted_ca_fails(tls_broker: tuple[Mosquitto, int], tls_files: dict[str, Path]) -> None:
    _, tls_port = tls_broker
    ctx = ssl.create_default_context(cafile=str(tls_files["other_ca"]))
    started = time.monotonic()
    with pytest.raises(UplinkError, match="TLS certificate rejected: "):
        async with make(tls_port, tls=ctx):
            pytest.fail("trusted a certificate from an unknown CA")
    assert time.monotonic() - started < 1.0


async def test_tls_to_frozen_broker_times_out_without_blocking(
    tls_broker: tuple[Mosquitto, int], tls_files: dict[str, Path]
) -> None:
    broker, tls_port = tls_broker
    ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
    broker.freeze()  # TCP connects, the handshake hangs: paho's own connect() would block here
    async with LoopLag() as lag:
        with pytest.raises(UplinkError, match=r"TLS handshake timed out after 1\.0 s"):
            async with make(tls_port, tls=ctx, connect_timeout=1.0):
                pytest.fail("connected to a frozen broker")
    assert lag.max < MAX_LOOP_LAG, f"loop blocked for {lag.max * 1000:.1f} ms"


async def test_connect_by_host_name(broker: Mosquitto) -> None:
    conn = make(broker.port)
    conn.host = "localhost"  # resolved with the loop's getaddrinfo (in its default executor)
    async with conn:
        await asyncio.wait_for(conn.publish("t/name", b"x"), QUICK)
    await asyncio.get_running_loop().shutdown_default_executor()  # its thread is not ours to leak


async def test_plain_connect_does_not_block_the_loop(broker: Mosquitto) -> None:
    async with LoopLag() as lag:
        for _ in range(5):
            async with make(broker.port) as conn:
                await asyncio.wait_for(conn.publish("t/lag", b"x"), QUICK)
    assert lag.max < MAX_LOOP_LAG, f"loop blocked for {lag.max * 1000:.1f} ms"


# -- losing the connection ----------------------------------------------------------------


async def test_frozen_broker_detected_and_pending_failed(broker: Mosquitto) -> None:
    async with make(broker.port, keepalive=FAST_KEEPALIVE) as conn:
        await asyncio.wait_for(conn.publish("t/before", b"x"), QUICK)
        broker.freeze()
        started = time.monotonic()
        futs = [conn.publish("t/during", str(i).encode()) for i in range(50)]
        await asyncio.wait_for(conn.wait_closed(), 4 * FAST_KEEPALIVE)
        elapsed = time.monotonic() - started
        # 1.5 x keepalive of silence (the last PUBACK came just before the freeze), checked
        # every 0.1 x keepalive; never paho's 2 x keepalive or later.
        assert 1.3 * FAST_KEEPALIVE <= elapsed <= 2.0 * FAST_KEEPALIVE
        assert not conn.connected
        assert conn.close_reason is not None
        assert "no answer from the broker" in conn.close_reason
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, UplinkError) for r in results), results
        assert conn.inflight == 0
        with pytest.raises(UplinkError, match="not connected"):
            conn.publish("t/after", b"x")


async def test_idle_connection_survives_keepalives(broker: Mosquitto) -> None:
    async with make(broker.port, keepalive=FAST_KEEPALIVE) as conn:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.wait_closed(), 3.5 * FAST_KEEPALIVE)  # pings keep it up
        assert conn.connected
        await asyncio.wait_for(conn.publish("t/still", b"x"), QUICK)


async def test_loop_stall_is_not_blamed_on_the_broker(broker: Mosquitto) -> None:
    keepalive = 2.0  # we declare loss after 3 s of silence from the broker; so does it of us
    async with make(broker.port, keepalive=keepalive) as conn:
        await asyncio.wait_for(conn.publish("t/x", b"acked"), QUICK)  # last byte from the broker
        await asyncio.sleep(1.5)
        await asyncio.wait_for(conn.publish("t/x", b"not acked", qos=0), QUICK)  # the broker hears us
        time.sleep(2.0)  # noqa: ASYNC251 - the loop stalls: 3.5 s of broker silence, not its fault
        stalled_until = asyncio.get_running_loop().time()
        # paho pings at once after the stall and the broker answers: the first bytes heard
        # after the stall, with the connection still up
        await eventually(lambda: conn._last_rx > stalled_until or not conn.connected, what="a PINGRESP")
        assert conn.connected, conn.close_reason
        await asyncio.wait_for(conn.publish("t/x", b"still up"), QUICK)


async def test_killed_broker_detected_at_once(broker: Mosquitto) -> None:
    async with make(broker.port, keepalive=5.0) as conn:
        await asyncio.wait_for(conn.publish("t/before", b"x"), QUICK)
        broker.freeze()  # so that these stay unacknowledged
        futs = [conn.publish("t/lost", str(i).encode()) for i in range(10)]
        await asyncio.sleep(0.05)
        broker.kill()
        started = time.monotonic()  # after the kill: reaping the broker is not ours to time
        await asyncio.wait_for(conn.wait_closed(), 3.0)
        assert time.monotonic() - started < 2.0  # at once, not after keepalive (5 s) silence
        closed = ("the broker closed the connection", "socket error: Connection reset by peer")
        assert conn.close_reason in closed
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, UplinkError) and "before PUBACK" in str(r) for r in results), results


# -- will ---------------------------------------------------------------------------------


async def test_will_published_retained_on_abort(broker: Mosquitto) -> None:
    will = Will("gw/status", b"offline")
    with Subscriber(broker.port, "gw/status") as live:
        conn = make(broker.port, will=will)
        async with conn:
            conn.abort()
            assert not conn.connected
            await asyncio.wait_for(conn.wait_closed(), QUICK)
            assert conn.close_reason is not None
            assert conn.close_reason.startswith("aborted")
        await eventually(lambda: on_topic(live, "gw/status"), what="the will at a live subscriber")
    assert [m.payload for m in on_topic(live, "gw/status")] == [b"offline"]
    with Subscriber(broker.port, "gw/status") as later:
        await eventually(lambda: on_topic(later, "gw/status"), what="the retained will")
    assert [(m.payload, m.retain) for m in on_topic(later, "gw/status")] == [(b"offline", True)]


async def test_no_will_on_clean_exit(broker: Mosquitto) -> None:
    will = Will("gw/status", b"offline")
    with Subscriber(broker.port, "gw/#") as live:
        conn = make(broker.port, will=will)
        async with conn:
            await asyncio.wait_for(conn.publish("gw/status", b"online", retain=True), QUICK)
        assert conn.close_reason == "disconnected (DISCONNECT sent)"
        await eventually(lambda: on_topic(live, "gw/status"), what="the online message")
        # A barrier: the broker handles our close before another client's connect and publish,
        # so a will would reach the subscriber before this marker.
        async with make(broker.port) as other:
            await asyncio.wait_for(other.publish("gw/marker", b"after"), QUICK)
        await eventually(lambda: on_topic(live, "gw/marker"), what="the marker")
    assert [m.payload for m in on_topic(live, "gw/status")] == [b"online"]
    with Subscriber(broker.port, "gw/status") as later:
        await eventually(lambda: on_topic(later, "gw/status"), what="the retained status")
    assert [(m.payload, m.retain) for m in on_topic(later, "gw/status")] == [(b"online", True)]


# -- receiving ----------------------------------------------------------------------------


async def test_on_message_receives_subscribed_topics(broker: Mosquitto) -> None:
    got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def on_message(topic: str, payload: bytes, retain: bool) -> None:
        assert asyncio.get_running_loop() is loop  # dispatched on the loop
        got.put_nowait((topic, payload, retain))

    async with make(broker.port, client_id="platform") as platform:
        await asyncio.wait_for(platform.publish("cmd/raise", b"R", retain=True), QUICK)
        async with make(broker.port, on_message=on_message) as conn:
            await conn.subscribe("cmd/#")
            assert await asyncio.wait_for(got.get(), QUICK) == ("cmd/raise", b"R", True)
            await asyncio.wait_for(platform.publish("cmd/lower", b"L"), QUICK)
            await asyncio.wait_for(platform.publish("other/x", b"not subscribed"), QUICK)
            await asyncio.wait_for(platform.publish("cmd/stop", b"S"), QUICK)
            assert await asyncio.wait_for(got.get(), QUICK) == ("cmd/lower", b"L", False)
            assert await asyncio.wait_for(got.get(), QUICK) == ("cmd/stop", b"S", False)
        await asyncio.wait_for(platform.publish("cmd/raise", b"", retain=True), QUICK)  # clear it
    assert got.empty()

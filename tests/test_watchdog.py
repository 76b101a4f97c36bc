"""The systemd watchdog: pings come from the event loop, only while the outbox writer lives.

In process: a loop blocked by synchronous work pings nothing while the outbox writer
thread keeps running (a ping from any other thread would show up), and a crashed writer
stops the pings for good. Out of process: the real daemon with WATCHDOG_USEC=1 s pings
every 0.5 s, pings nothing while it is frozen (SIGSTOP), and pings again after SIGCONT.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway import config
from gateway.app import Gateway, Pipeline
from gateway.errors import OutboxError
from gateway.events import DeviceKind, DeviceRef, Observation, Severity
from gateway.outbox import Outbox
from gateway.router import Router
from gateway.sdnotify import Notifier
from tests.support.broker import free_port
from tests.support.daemon import Daemon, base_config

PING = "WATCHDOG=1"
INTERVAL = 0.05  # in-process ping interval (WatchdogSec 0.1 s)


class RecordingNotifier(Notifier):
    """No socket: records (monotonic time, thread id, message) of every notification."""

    def __init__(self) -> None:
        super().__init__(address="")
        self.sent: list[tuple[float, int, str]] = []

    def notify(self, message: str) -> None:
        self.sent.append((time.monotonic(), threading.get_ident(), message))

    def watchdog_interval(self) -> float | None:
        return INTERVAL

    def pings(self, after: float = 0.0) -> list[float]:
        return [t for t, _, m in self.sent if m == PING and t > after]


def gateway_for(tmp_path: Path) -> Gateway:
    cfg = config.parse(
        {
            "identity": {"school": "s1", "gateway": "g1", "region": "530102"},
            "state_dir": str(tmp_path / "state"),
            "api": {"socket": None},
            "uplinks": [{"name": "police", "endpoints": ["mqtt://127.0.0.1:1883"]}],
        },
        "test",
    )
    return Gateway(cfg, notifier=RecordingNotifier())


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.01)


async def test_pings_come_from_the_loop_and_stop_while_it_is_blocked(tmp_path: Path) -> None:
    gw = gateway_for(tmp_path)
    notifier = gw.notifier
    assert isinstance(notifier, RecordingNotifier)
    async with Outbox(tmp_path / "outbox.db", gw.identity, {"police": 1000}) as outbox:
        gw.pipeline = Pipeline(outbox, Router.from_uplinks(gw.cfg.uplinks))
        task = asyncio.create_task(gw._watchdog())
        try:
            await eventually(lambda: len(notifier.pings()) >= 3)
            blocked_from = time.monotonic()
            time.sleep(1.0)  # noqa: ASYNC251 - the point: the loop is blocked, threads are not
            blocked_until = time.monotonic()
            assert outbox.healthy  # the writer thread lived through it
            await eventually(lambda: len(notifier.pings(after=blocked_until)) >= 3)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    loop_thread = {tid for _, tid, _ in notifier.sent}
    assert len(loop_thread) == 1  # every notification from one thread: the loop's
    during = [t for t in notifier.pings() if blocked_from < t < blocked_until]
    assert during == []
    before = notifier.pings()
    gaps = [b - a for a, b in itertools.pairwise(before)]
    # one gap spans the blocked second; the others are about one interval
    assert max(gaps) >= 0.9
    assert sorted(gaps)[len(gaps) // 2] < INTERVAL * 4


# The writer thread dies of an unhandled exception on purpose; pytest reports that as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_outbox_writer_stops_the_pings(tmp_path: Path) -> None:
    gw = gateway_for(tmp_path)
    notifier = gw.notifier
    assert isinstance(notifier, RecordingNotifier)
    ref = DeviceRef("g1", DeviceKind.GATEWAY, "gateway")
    async with Outbox(tmp_path / "outbox.db", gw.identity, {"police": 1000}) as outbox:
        gw.pipeline = Pipeline(outbox, Router.from_uplinks(gw.cfg.uplinks))
        task = asyncio.create_task(gw._watchdog())
        try:
            await eventually(lambda: len(notifier.pings()) >= 2)
            assert outbox.healthy

            def crash(_conn: sqlite3.Connection) -> None:
                # Not an sqlite3.Error: nothing in the writer handles it, the thread ends.
                raise RuntimeError("a bug in the writer (test)")

            outbox._on_begin = crash
            with pytest.raises(OutboxError):
                await outbox.append(Observation(ref, "gateway.test", Severity.INFO), ["police"])
            await eventually(lambda: not outbox.healthy)
            crashed_at = time.monotonic()
            await eventually(
                lambda: any(m.startswith("STATUS=outbox writer stopped") for _, _, m in notifier.sent)
            )
            await asyncio.sleep(INTERVAL * 10)
            assert not task.done()  # withholding, not crashing: systemd does the restart
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # At most one ping can have raced the crash (sent just before the writer ended).
    assert len(notifier.pings(after=crashed_at)) <= 1
    statuses = [m for _, _, m in notifier.sent if m.startswith("STATUS=")]
    assert len(statuses) == 1  # said once, not every interval
    assert not outbox.healthy  # closed


def test_watchdog_interval_follows_watchdog_usec_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier(address="").watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier(address="").watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert Notifier(address="").watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Notifier(address="").watchdog_interval() is None


# -- the real daemon ----------------------------------------------------------------------------


def receive(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """Every datagram that arrives within ``seconds``, with its arrival time."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(min(left, 0.1))
        with contextlib.suppress(TimeoutError):
            out.append((time.monotonic(), sock.recv(4096).decode()))
    return out


def drain(sock: socket.socket) -> list[str]:
    """Whatever is queued now, without waiting."""
    out = []
    sock.setblocking(False)
    try:
        for _ in range(10_000):
            try:
                out.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        sock.setblocking(True)
    return out


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until the kernel shows the process stopped (state T) after SIGSTOP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def count_pings(items: list[tuple[float, str]]) -> int:
    return sum(m.split("\n").count(PING) for _, m in items)


@pytest.mark.slow
def test_daemon_pings_every_half_watchdog_usec_and_not_while_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a ping every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    uplink = {"name": "police", "endpoints": [f"mqtt://127.0.0.1:{free_port()}"], "reconnect_max": 1.0}
    daemon = Daemon(tmp_path / "d", base_config(tmp_path / "state", [uplink], []))
    daemon.start()
    assert daemon.proc is not None
    assert daemon._notify is not None
    pid, sock = daemon.proc.pid, daemon._notify

    running = receive(sock, 2.5)
    pings = [t for t, m in running if PING in m]
    assert 3 <= len(pings) <= 8, running
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Every half interval; one late ping on a loaded box is fine as long as none comes as
    # late as the watchdog's 1 s, which would have killed the daemon.
    assert 0.35 < statistics.median(gaps) < 0.7, gaps
    assert max(gaps) < 1.0, gaps

    os.kill(pid, signal.SIGSTOP)
    try:
        wait_stopped(pid)
        drain(sock)  # sent before it stopped
        frozen = receive(sock, 2.0)  # twice WatchdogSec: systemd would have restarted it
    finally:
        os.kill(pid, signal.SIGCONT)
    assert count_pings(frozen) == 0, frozen

    resumed = receive(sock, 3.0)
    assert count_pings(resumed) >= 3, resumed
    assert daemon.proc.poll() is None
    code, _ = daemon.terminate()
    assert code == 0, daemon.log_tail()

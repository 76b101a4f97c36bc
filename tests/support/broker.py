"""A private mosquitto per test: start, stop, freeze (SIGSTOP), thaw and restart it by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT = 10.0  # a cold mosquitto start on a loaded 2-core box takes well under 1 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Mosquitto:
    """One mosquitto process on a loopback port of its own, with a config written for it.

    ``persistence`` keeps its queue across restarts (the default broker in the field
    keeps none). Queue limits are raised so a test subscriber is never the one losing.
    ``allow_anonymous`` False with a ``password_file`` line in ``extra_conf`` demands
    credentials; ``extra_conf`` lines (e.g. a second, TLS, listener) go at the end.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        allow_anonymous: bool = True,
        extra_conf: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistence = persistence
        self.allow_anonymous = allow_anonymous
        self.extra_conf = tuple(extra_conf)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "max_keepalive 65535",  # no limit below the protocol maximum (mosquitto 2.0.11 rejects 0)
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "log_type error",
            "log_type warning",
        ]
        if self.extra_conf and os.geteuid() == 0:
            # Started as root, mosquitto switches to user "mosquitto", which cannot read the
            # files extra_conf names in the test's private tmp dir (TLS keys, password file).
            lines.append("user root")
        lines.extend(self.extra_conf)
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        self._write_conf()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: a power cut of the broker host, no goodbye to anyone."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

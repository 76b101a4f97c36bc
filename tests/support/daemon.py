"""The real daemon in a subprocess, with its own config, state dir and an sd_notify socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# Every daemon a test starts, so a failing test cannot leave one running (conftest stops them).
STARTED: list[Daemon] = []

READY_TIMEOUT = 20.0  # a cold start imports pymodbus, pydantic and paho: ~1-2 s on a loaded box


class Daemon:
    """``campus-gateway run`` as a child process. READY is read from a NOTIFY_SOCKET of our own."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, loop: str = "auto") -> None:
        self.loop = loop  # campus-gateway run --loop: auto (uvloop if installed), uvloop, asyncio
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "daemon.log"
        self.notify_path = workdir / "notify.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._notify: socket.socket | None = None
        self.notifications: list[str] = []

    def start(self, *, wait_ready: bool = True) -> Daemon:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the daemon is still running; stop it first")
        self.notifications = []  # READY from an earlier run must not satisfy this one
        STARTED.append(self)
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "run",
                    "--config",
                    str(self.config_path),
                    "--log-format",
                    "json",
                    "--loop",
                    self.loop,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if wait_ready:
            self.wait_notify("READY=1")
        return self

    def wait_notify(self, word: str, timeout: float = READY_TIMEOUT) -> None:
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(word in n for n in self.notifications):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            self._notify.settimeout(0.1)
            with contextlib.suppress(TimeoutError):
                self.notifications.append(self._notify.recv(4096).decode())
        raise TimeoutError(f"no {word} from the daemon within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self._close_notify()

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took)."""
        proc, self.proc = self.proc, None
        assert proc is not None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise
        finally:
            self._close_notify()
        return code, time.monotonic() - t0

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate()
        self.kill9()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def base_config(
    state_dir: Path, uplinks: list[dict[str, Any]], devices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "identity": {"school": "sch-1", "gateway": "gw-1", "region": "530102"},
        "state_dir": str(state_dir),
        "heartbeat_interval": 5,
        "api": {"socket": None},
        "uplinks": uplinks,
        "devices": devices,
    }

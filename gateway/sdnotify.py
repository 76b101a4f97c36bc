"""systemd notification (sd_notify) without a dependency: READY, WATCHDOG, STOPPING, STATUS."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET when systemd set it; does nothing otherwise."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> None:
        if self._sock is None or self._addr is None:
            return
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError:
            # systemd gone (e.g. during shutdown): nothing useful to do, and never fatal.
            return

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC, as systemd recommends, or None when no watchdog is set."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

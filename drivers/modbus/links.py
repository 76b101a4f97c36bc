"""Physical Modbus links: what a hub connects to, and how links are told apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Parity = Literal["N", "E", "O"]


@dataclass(frozen=True, slots=True)
class TcpLink:
    """Modbus TCP (MBAP framing) to ``host:port``."""

    host: str
    port: int = 502

    @property
    def key(self) -> tuple[str, str, int]:
        """Devices whose links have equal keys share one hub (one connection, one lock)."""
        return ("tcp", self.host.lower(), self.port)

    @property
    def label(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def frame_gap(self) -> float:
        """No inter-frame gap on TCP: MBAP frames carry their own length."""
        return 0.0


@dataclass(frozen=True, slots=True)
class SerialLink:
    """Modbus RTU on a serial line.

    ``port`` is a device (``/dev/ttyUSB0``) or any pyserial URL, e.g.
    ``socket://10.0.0.9:4001`` for a serial server in transparent (raw TCP) mode.
    """

    port: str
    baudrate: int = 9600
    parity: Parity = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def key(self) -> tuple[str, str]:
        return ("rtu", self.port)

    @property
    def label(self) -> str:
        return f"rtu:{self.port}"

    @property
    def frame_gap(self) -> float:
        """Silence between frames: 3.5 character times (Modbus over serial line, 2.5.1.1).

        11 bits per character (start, 8 data, parity or second stop, stop); above
        19200 baud the specification fixes the gap at 1.75 ms.
        """
        if self.baudrate > 19200:
            return 0.00175
        return 3.5 * 11 / self.baudrate


Link = TcpLink | SerialLink

"""What a hub needs of one open connection, whatever carries it (MBAP over TCP, RTU on a line)."""

from __future__ import annotations

import abc

from drivers.modbus.pdu import Reply, Request


class Broken(Exception):
    """The connection can no longer carry the transaction in flight."""

    def __init__(self, reason: str, *, invalid: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.invalid = invalid  # True: the device sent bytes that are not a reply


class Connection(abc.ABC):
    """One open connection. Never reused after a failed transaction: the hub drops it.

    ``exchange`` raises TimeoutError (no complete reply within ``limit``),
    :class:`Broken`, :class:`~drivers.modbus.pdu.PduError` or OSError.
    """

    broken: Broken | None = None  # set once the stream is unusable
    received = 0  # bytes received towards the reply in flight

    @abc.abstractmethod
    async def open(self, timeout: float) -> None:
        """Connect within ``timeout`` seconds; raises TimeoutError, OSError or Broken."""

    @abc.abstractmethod
    async def exchange(self, unit: int, request: Request, limit: float) -> Reply:
        """Send one request and await its reply."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close at once; a transaction in flight fails with Broken."""

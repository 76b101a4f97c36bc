"""One exception tree for the whole gateway.

Every error the gateway raises on purpose is a :class:`GatewayError`. Errors that
a retry may cure set ``transient = True``; the device and uplink loops back off
and retry those, and let everything else propagate. Foreign exceptions (pymodbus,
paho, sqlite3, OSError) are converted at the edge with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    transient: ClassVar[bool] = False


class ConfigError(GatewayError):
    """The configuration (or a profile) is invalid. ``issues`` holds (path, message) pairs."""

    def __init__(self, source: str, issues: list[tuple[str, str]]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(
            f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"
            for path, message in self.issues
        )


class DriverError(GatewayError):
    """A device-level failure, carrying the device id."""

    def __init__(self, device_id: str, message: str) -> None:
        self.device_id = device_id
        super().__init__(f"{device_id}: {message}")


class DeviceUnavailable(DriverError):
    """The device (or its link) did not answer: timeout, refused, reset. Retry."""

    transient = True


class DeviceProtocolError(DriverError):
    """The device answered with something that is not a valid reply (garbage, wrong length)."""

    transient = True


class DeviceRejected(DriverError):
    """The device answered with a protocol-level refusal (e.g. a Modbus exception code)."""

    def __init__(self, device_id: str, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(device_id, message)


class UplinkError(GatewayError):
    """An MQTT uplink could not connect, publish or subscribe."""

    transient = True

    def __init__(self, uplink: str, message: str) -> None:
        self.uplink = uplink
        super().__init__(f"uplink {uplink}: {message}")


class OutboxError(GatewayError):
    """The durable outbox failed (disk full, corrupt file, unknown schema version)."""


class CommandError(GatewayError):
    """A platform command could not be built or signed, or the command replay cache failed
    (disk error, a foreign or newer file). Not a refusal: refusals are values (``Refusal``)."""


class ReplayCacheFull(CommandError):
    """The replay cache holds its maximum of unexpired command ids. New commands are refused
    until entries expire, rather than forget an id that could then be replayed."""

    transient = True

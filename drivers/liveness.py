"""Whether a polled device answers: one device.offline after a streak of failed polls, one
device.online when it answers again; the failures themselves are logged once, then counted."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from typing import Any

from drivers.errorlog import RepeatedError
from gateway.driver import DeviceStatus, LinkState
from gateway.errors import DriverError
from gateway.events import ContactId, DeviceRef, EventSink, Observation, Severity


class Presence(enum.StrEnum):
    """Whether the device answers, as reported by device.offline / device.online events."""

    UNKNOWN = "unknown"  # not yet answered, not yet declared offline
    ONLINE = "online"
    OFFLINE = "offline"  # device.offline published; device.online follows the first answer


class Liveness:
    """Tracks one device's polls; publishes presence changes through the sink it is given."""

    def __init__(
        self, device: DeviceRef, status: DeviceStatus, where: Mapping[str, Any], offline_after: int, log: Any
    ) -> None:
        """``where``: how the device is reached (link, unit, host), added to the presence events."""
        self.device = device
        self.status = status
        self.where = dict(where)
        self.offline_after = offline_after
        self.presence = Presence.UNKNOWN
        self._failures = 0
        self._log = log
        self._errors = RepeatedError(log, "poll failed")

    async def ok(self, sink: EventSink) -> None:
        """A poll was answered."""
        self.status.last_poll_ok = time.time()
        if not self._failures and self.presence is Presence.ONLINE:
            return  # the common case: nothing changes
        self._failures = 0
        self._errors.recovered()
        self.status.set_state(LinkState.ONLINE)
        was = self.presence
        self.presence = Presence.ONLINE
        if was is Presence.OFFLINE:
            await self._publish(sink, "device.online", Severity.INFO, ContactId.COMM_RESTORE, "answering")

    async def failed(self, exc: DriverError, sink: EventSink) -> None:
        """A poll failed with ``exc``."""
        self._failures += 1
        self.status.poll_errors += 1
        self.status.last_error = str(exc)
        self._errors.failed(type(exc).__name__, error=str(exc))
        if self._failures >= self.offline_after and self.presence is not Presence.OFFLINE:
            self.presence = Presence.OFFLINE
            self.status.set_state(LinkState.OFFLINE)
            await self._publish(sink, "device.offline", Severity.MAJOR, ContactId.COMM_TROUBLE, str(exc))

    async def _publish(self, sink: EventSink, kind: str, severity: Severity, code: int, reason: str) -> None:
        data = {"contact_id": int(code), "reason": reason, **self.where}
        self.status.detail["presence"] = self.presence.value
        if self.presence is Presence.OFFLINE:
            self._log.warning(kind, reason=reason)
        else:
            self._log.info(kind)
        await sink.publish(Observation(self.device, kind, severity, data=data))

"""Evidence: on an alarm, snapshots from the cameras linked to it, published after the alarm.

A camera names the alarms it covers (``evidence_for``: a device id, or ``DEVICE:ZONE``).
When such an alarm becomes active, each linked camera is asked for a snapshot in a task
of its own: the alarm has been committed and is on its way already, and nothing here can
delay it. The JPEG goes into the outbox as a :class:`~gateway.events.Blob` (published as
it is on ``snapshots/{id}``, QoS 1) together with a ``camera.snapshot`` event whose
attachment names that topic, the picture's sha256 and size; both go to the uplinks the
alarm went to, in one transaction, after the alarm.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import structlog

from gateway.driver import Driver
from gateway.errors import DriverError, OutboxError
from gateway.events import SNAPSHOT, Attachment, Blob, EventState, Observation, Severity, is_alarm_type, uuid7
from gateway.outbox import Outbox
from gateway.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

# At most this many snapshots being fetched at once: a storm of alarms must not open
# dozens of connections to the same few cameras (cheap ones crash); the rest are skipped
# and counted, the alarms themselves are unaffected.
MAX_PENDING = 16


class Evidence:
    def __init__(self, drivers: Sequence[Driver], outbox: Outbox) -> None:
        self.outbox = outbox
        self.links: dict[str, list[Driver]] = {}  # "box" or "box:3" -> cameras
        for d in drivers:
            for source in d.evidence_for:
                self.links.setdefault(source, []).append(d)
        self.taken = 0
        self.failed = 0
        self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await cancel_and_wait(*self._tasks)

    def cameras_for(self, obs: Observation) -> list[Driver]:
        """The cameras linked to an alarm that has just become active; empty for anything else."""
        if not self.links or not is_alarm_type(obs.type) or obs.state is EventState.CLEARED:
            return []
        found = list(self.links.get(obs.device.id, ()))
        zone = obs.data.get("zone")
        if zone is not None:
            found += [c for c in self.links.get(f"{obs.device.id}:{zone}", ()) if c not in found]
        return found

    def trigger(self, obs: Observation, event_id: str, uplinks: Sequence[str]) -> None:
        """Fetch and queue the linked cameras' snapshots for the alarm ``event_id``; never blocks."""
        for camera in self.cameras_for(obs):
            if len(self._tasks) >= MAX_PENDING:
                self.skipped += 1
                log.warning("snapshot skipped: too many pending", camera=camera.device.id, alarm=event_id)
                continue
            task = asyncio.get_running_loop().create_task(
                self._take(camera, obs, event_id, tuple(uplinks)),
                name=f"evidence:{camera.device.id}:{event_id}",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _take(
        self, camera: Driver, alarm: Observation, event_id: str, uplinks: tuple[str, ...]
    ) -> None:
        try:
            jpeg = await camera.snapshot()
        except DriverError as exc:
            self.failed += 1
            log.warning("snapshot failed", camera=camera.device.id, alarm=event_id, error=str(exc))
            return
        blob = Blob(uuid7(), SNAPSHOT, jpeg)
        attachment = Attachment(
            kind="snapshot",
            camera=camera.device.id,
            topic=f"snapshots/{blob.id}",
            content_type=blob.content_type,
            sha256=hashlib.sha256(jpeg).hexdigest(),
            bytes=len(jpeg),
        )
        data = {"for_event": event_id, "for_type": alarm.type, "for_device": alarm.device.id}
        if "zone" in alarm.data:
            data["for_zone"] = alarm.data["zone"]
        note = Observation(
            camera.device, "camera.snapshot", Severity.INFO, data=data, attachments=(attachment,)
        )
        try:
            await self.outbox.append_many([(blob, uplinks), (note, uplinks)])
        except OutboxError as exc:
            self.failed += 1
            log.exception("snapshot not queued", camera=camera.device.id, alarm=event_id, error=str(exc))
            return
        self.taken += 1
        log.info("snapshot queued", camera=camera.device.id, alarm=event_id, bytes=len(jpeg))

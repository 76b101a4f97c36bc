"""Online patrol (网上巡查): a periodic report that every camera and device works.

Every ``patrol_interval`` (and on gateway.self_test) the gateway takes a snapshot from
every camera and publishes one ``patrol.report`` event: for each camera whether it is
reachable, its clock offset, whether a snapshot came, its image checks and its event
subscription; for each other device whether it answers and when it last did.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import structlog

from gateway.driver import Driver, LinkState
from gateway.errors import DriverError
from gateway.events import DeviceKind, DeviceRef, EventSink, Observation, Severity

log = structlog.get_logger(__name__)

# A patrol snapshot that takes longer than this counts as failed: the camera is too slow to
# be of use as evidence either. Patrol snapshots of all cameras are taken at once.
SNAPSHOT_LIMIT = 10.0


class Patrol:
    def __init__(
        self, drivers: Sequence[Driver], sink: EventSink, gateway: DeviceRef, interval: float
    ) -> None:
        self.drivers = tuple(drivers)
        self.sink = sink
        self.gateway = gateway
        self.interval = interval
        self.reports = 0
        self.last: dict[str, Any] | None = None

    async def run(self) -> None:
        """A report every ``interval`` until cancelled (the first after one interval)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.report()

    async def report(self) -> dict[str, Any]:
        """Patrol now: publish a patrol.report event and return its data."""
        cameras = [d for d in self.drivers if d.device.kind is DeviceKind.CAMERA]
        others = [d for d in self.drivers if d.device.kind is not DeviceKind.CAMERA]
        camera_rows = await asyncio.gather(*(self._camera(c) for c in cameras))
        device_rows = [_device(d) for d in others]
        ok_cameras = sum(1 for r in camera_rows if r["ok"])
        ok_devices = sum(1 for r in device_rows if r["online"])
        data: dict[str, Any] = {
            "summary": {
                "cameras": len(camera_rows),
                "cameras_ok": ok_cameras,
                "devices": len(device_rows),
                "devices_online": ok_devices,
            },
            "cameras": camera_rows,
            "devices": device_rows,
        }
        healthy = ok_cameras == len(camera_rows) and ok_devices == len(device_rows)
        severity = Severity.INFO if healthy else Severity.MINOR
        await self.sink.publish(Observation(self.gateway, "patrol.report", severity, data=data))
        self.reports += 1
        self.last = data
        log.info("patrol report", **data["summary"])
        return data

    async def _camera(self, camera: Driver) -> dict[str, Any]:
        detail = camera.status.detail
        row: dict[str, Any] = {
            "id": camera.device.id,
            "name": camera.device.name,
            "location": camera.device.location,
            "reachable": camera.status.state is LinkState.ONLINE,
            "clock_offset": detail.get("clock_offset"),
            "subscription": camera.describe().get("subscription"),
            "image": detail.get("video"),
        }
        started = time.monotonic()
        try:
            async with asyncio.timeout(SNAPSHOT_LIMIT):
                jpeg = await camera.snapshot()
        except (DriverError, TimeoutError) as exc:
            row |= {"snapshot_ok": False, "snapshot_error": str(exc) or "timed out"}
        else:
            row |= {"snapshot_ok": True, "snapshot_bytes": len(jpeg), "snapshot_ms": _ms(started)}
        problems = (detail.get("video") or {}).get("active") or {}
        row["ok"] = bool(row["reachable"] and row["snapshot_ok"] and not problems)
        return row


def _device(d: Driver) -> dict[str, Any]:
    return {
        "id": d.device.id,
        "kind": d.device.kind.value,
        "name": d.device.name,
        "online": d.status.state is LinkState.ONLINE,
        "last_poll": d.status.last_poll_ok,
        "error": d.status.last_error if d.status.state is not LinkState.ONLINE else None,
    }


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)

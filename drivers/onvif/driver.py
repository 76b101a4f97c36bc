"""One ONVIF camera: a session with its clock offset, events over a pull-point subscription,
a health check, and snapshots on demand; everything restarts by itself after a failure."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Mapping
from typing import Any

import structlog

from drivers.liveness import Liveness, Presence
from drivers.onvif import topics
from drivers.onvif.config import CameraConfig
from drivers.onvif.pullpoint import PullPoint, PullPointState
from drivers.onvif.session import CameraSession, open_session
from drivers.onvif.video import FrameStats, UndecodableFrame, VideoChecker, VideoCheckError, VideoMonitor
from gateway.backoff import Backoff
from gateway.driver import DeviceStatus, Driver
from gateway.errors import DeviceProtocolError, DeviceUnavailable, DriverError
from gateway.events import DeviceKind, DeviceRef, EventSink, Observation

# The first reconnect after a failure comes after 1 s (a camera's web server restarting
# takes seconds); later ones back off to the config's reconnect_max.
RECONNECT_INITIAL = 1.0
# A snapshot for evidence must come quickly or not at all: the alarm has gone out already,
# and a picture 5 s later still shows the scene.
SNAPSHOT_TIMEOUT = 5.0
# Distinct (type, source, rule) states remembered per camera: a few dozen on a real camera.
MAX_SIGNALS = 1024


class CameraState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"  # session open; events flowing if configured
    BACKING_OFF = "backing_off"


class CameraDriver(Driver):
    """Watches one camera until cancelled."""

    def __init__(
        self, config: CameraConfig, password: str | None, checker: VideoChecker | None = None
    ) -> None:
        self.config = config
        self._checker = checker
        self._video = VideoMonitor(self.device_ref(config), config.video) if config.video else None
        self._frame: FrameStats | None = None
        self.device = self.device_ref(config)
        self.status = DeviceStatus()
        self.evidence_for = config.evidence_for
        self.state = CameraState.CONNECTING
        self.pullpoint: PullPoint | None = None
        self.subscriptions = 0  # subscriptions created over the driver's life
        self._password = password
        self._session: CameraSession | None = None
        self._states: dict[tuple[str, str | None, str | None], bool] = {}  # last state per signal
        self._log = structlog.get_logger(__name__).bind(device=config.id)
        where = {"host": config.host, "port": config.port}
        self._liveness = Liveness(self.device, self.status, where, config.offline_after, self._log)

    @staticmethod
    def device_ref(config: CameraConfig) -> DeviceRef:
        return DeviceRef(config.id, DeviceKind.CAMERA, config.name, config.location)

    @property
    def presence(self) -> Presence:
        return self._liveness.presence

    @property
    def subscription_state(self) -> PullPointState:
        return self.pullpoint.state if self.pullpoint is not None else PullPointState.IDLE

    async def run(self, sink: EventSink) -> None:
        backoff = Backoff(initial=RECONNECT_INITIAL, cap=self.config.reconnect_max)
        while True:
            self.state = CameraState.CONNECTING
            try:
                async with open_session(self.config, self._password) as session:
                    self._session = session
                    await self._connected(session, sink)
                    backoff.reset()
                    await self._serve(session, sink)
            except DriverError as exc:
                await self._liveness.failed(exc, sink)
            finally:
                self._session = None
                self.pullpoint = None
            self.state = CameraState.BACKING_OFF
            self.status.detail["subscription"] = PullPointState.IDLE.value
            await asyncio.sleep(backoff.next_delay())

    async def snapshot(self) -> bytes:
        """A JPEG now, for evidence or patrol; DeviceUnavailable if the camera is not connected."""
        session = self._session
        if session is None:
            raise DeviceUnavailable(self.device.id, "snapshot: camera not connected")
        return await session.snapshot(SNAPSHOT_TIMEOUT)

    async def _connected(self, session: CameraSession, sink: EventSink) -> None:
        self.state = CameraState.CONNECTED
        info = session.info
        assert info is not None  # open_session opened it
        self.status.detail.update(info.as_dict())
        self.status.detail["clock_offset"] = session.clock_offset
        self._log.info("camera connected", model=info.model, clock_offset=session.clock_offset)
        await self._liveness.ok(sink)

    async def _serve(self, session: CameraSession, sink: EventSink) -> None:
        """Health checks and, if configured, events, until one of them fails."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._health(session, sink), name=f"camera:{self.device.id}:health")
                if self.config.events:
                    tg.create_task(self._events(session, sink), name=f"camera:{self.device.id}:events")
                if self._video is not None and self._checker is not None:
                    tg.create_task(self._watch_video(session, sink), name=f"camera:{self.device.id}:video")
        except* DriverError as group:
            raise group.exceptions[0] from None

    async def _health(self, session: CameraSession, sink: EventSink) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            self.status.polls += 1
            started = time.perf_counter()
            offset = await session.measure_clock()
            self.status.poll_latency.observe(time.perf_counter() - started)
            self.status.detail["clock_offset"] = round(offset, 1)
            await self._liveness.ok(sink)

    async def _watch_video(self, session: CameraSession, sink: EventSink) -> None:
        """A snapshot every ``video.interval`` through the shared checker; transitions published."""
        cfg, monitor, checker = self.config.video, self._video, self._checker
        assert cfg is not None  # _serve starts this task only with all three
        assert monitor is not None
        assert checker is not None
        while True:
            await asyncio.sleep(cfg.interval)
            jpeg = await session.snapshot(SNAPSHOT_TIMEOUT)
            try:
                self._frame = await checker.check(jpeg, self._frame, cfg)
            except UndecodableFrame as exc:
                raise DeviceProtocolError(self.device.id, f"snapshot: {exc}") from exc
            except VideoCheckError as exc:  # timeout or busy: this frame is skipped, the next one tried
                self._log.warning("video check skipped", reason=str(exc))
                continue
            self.status.detail["video"] = {"active": monitor.active, **self._frame.summary()}
            for obs in monitor.update(self._frame):
                self._log.info(obs.type, state=obs.state, reason=obs.data.get("reason"))
                await sink.publish(obs)

    async def _events(self, session: CameraSession, sink: EventSink) -> None:
        pull = PullPoint(session, self.config.subscription_seconds, self.config.pull_timeout)
        self.pullpoint = pull
        self.subscriptions += 1
        self.status.detail["subscriptions"] = self.subscriptions

        async def on_message(message: Any) -> None:
            await self._on_message(message, sink)

        await pull.run(on_message)

    async def _on_message(self, message: Any, sink: EventSink) -> None:
        self.status.detail["subscription"] = self.subscription_state.value
        signal = topics.decode(message)
        if signal is None:
            return  # unknown or unparseable: counted and logged once by topics
        key = (signal.type, signal.source, signal.rule)
        if len(self._states) >= MAX_SIGNALS and key not in self._states:
            self._states.clear()  # a camera inventing sources: forget, at worst one repeated event each
        if signal.state is not None:
            before = self._states.get(key)
            self._states[key] = signal.state
            initial = signal.operation == "Initialized"
            if before == signal.state or (before is None and not signal.state and initial):
                return  # no change, or an idle state reported at subscription time
        data: dict[str, Any] = {**signal.data, "topic": signal.topic}
        if signal.source is not None:
            data["source"] = signal.source
        if signal.rule is not None:
            data["rule"] = signal.rule
        if signal.occurred_at is not None:
            data["camera_time"] = signal.occurred_at
        self._log.info(signal.type, state=signal.state, source=signal.source)
        obs = Observation(self.device, signal.type, signal.severity, signal.event_state, time.time(), data)
        await sink.publish(obs)

    def describe(self) -> Mapping[str, Any]:
        """For patrol reports and the local API."""
        return {
            "state": self.state.value,
            "presence": self.presence.value,
            "subscription": self.subscription_state.value,
            "subscriptions": self.subscriptions,
            "clock_offset": self.status.detail.get("clock_offset"),
            "last_ok": self.status.last_poll_ok,
            "error": self.status.last_error,
        }

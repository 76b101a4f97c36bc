"""The ONVIF camera driver against the camera simulator over loopback: normalized events,
recovery from reboot / refused renew / clock skew without leaked subscriptions, snapshots,
hostile XML refused and isolated."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from drivers.onvif.config import CameraConfig
from drivers.onvif.driver import CameraDriver, CameraState
from drivers.onvif.family import CameraFamily
from drivers.onvif.pullpoint import PullPointState
from gateway.driver import DriverContext
from gateway.events import EventState, Observation, Severity
from simulators.onvif_camera import OnvifCameraSimulator

WAIT = 10.0
PASSWORD = "s3cret-pass"


class Sink:
    def __init__(self) -> None:
        self.events: list[Observation] = []
        self._changed = asyncio.Condition()

    async def publish(self, obs: Observation) -> None:
        async with self._changed:
            self.events.append(obs)
            self._changed.notify_all()

    async def wait(self, pred: Callable[[Observation], bool], within: float = WAIT) -> Observation:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: any(pred(e) for e in self.events))
        return next(e for e in self.events if pred(e))

    def of(self, type_: str) -> list[Observation]:
        return [e for e in self.events if e.type == type_]


def is_(type_: str, state: EventState | None = None, device: str = "cam-1") -> Callable[[Observation], bool]:
    return lambda e: e.type == type_ and e.device.id == device and (state is None or e.state is state)


def camera(tmp: Path, sim: OnvifCameraSimulator, cam_id: str = "cam-1", **kw: Any) -> CameraConfig:
    secret = tmp / f"{cam_id}.pw"
    secret.write_text(PASSWORD + "\n")
    fields: dict[str, Any] = {
        "id": cam_id,
        "driver": "onvif_camera",
        "host": "127.0.0.1",
        "port": sim.port,
        "username": "admin",
        "password_file": str(secret),
        "subscription_seconds": 60,
        "pull_timeout": 1.0,
        "health_interval": 5,
        "timeout": 2.0,
        "reconnect_max": 1.0,
        **kw,
    }
    return CameraConfig.model_validate(fields)


@contextlib.asynccontextmanager
async def running(configs: Sequence[CameraConfig]) -> AsyncIterator[tuple[list[CameraDriver], Sink]]:
    sink = Sink()
    drivers = [CameraDriver(c, PASSWORD) for c in configs]
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(d.run(sink), name=f"camera {d.device.id}") for d in drivers]
        try:
            yield drivers, sink
        finally:
            for t in tasks:
                t.cancel()


async def until(check: Callable[[], bool], within: float = WAIT) -> None:
    for _ in range(int(within / 0.05)):  # bounded in count and time
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within} s")


async def subscribed(driver: CameraDriver, sim: OnvifCameraSimulator, count: int = 1) -> None:
    """Until the driver pulls on a live subscription (and the simulator has ``count`` of them)."""
    await until(
        lambda: driver.subscription_state is PullPointState.ACTIVE and len(sim.subscriptions()) == count
    )


@pytest.fixture
async def sim() -> AsyncIterator[OnvifCameraSimulator]:
    async with OnvifCameraSimulator(user="admin", password=PASSWORD) as s:
        yield s


async def test_motion_and_tamper_arrive_normalized(tmp_path: Path, sim: OnvifCameraSimulator) -> None:
    async with running([camera(tmp_path, sim)]) as ((driver,), sink):
        await subscribed(driver, sim)
        assert driver.state is CameraState.CONNECTED
        assert driver.status.detail["manufacturer"] == "CampusSim"
        await sim.emit("tns1:VideoSource/MotionAlarm", data={"State": True})
        motion = await sink.wait(is_("camera.motion", EventState.ACTIVE))
        assert motion.data["source"]
        await sim.emit("tns1:VideoSource/MotionAlarm", data={"State": False})
        await sink.wait(is_("camera.motion", EventState.CLEARED))
        await sim.emit("tns1:RuleEngine/TamperDetector/Tamper", data={"IsTamper": True}, state_style="1")
        tamper = await sink.wait(is_("camera.tamper", EventState.ACTIVE))
        assert tamper.severity is Severity.MAJOR
        await sim.emit("tns1:RuleEngine/TamperDetector/Tamper", data={"IsTamper": True}, state_style="1")
        await sim.emit(
            "tns1:Vendor/Unheard/Of",
            data={"State": True},
            namespaces={"tns1": "http://www.onvif.org/ver10/topics"},
        )
        await sim.emit(
            "tns1:RuleEngine/FieldDetector/ObjectsInside", data={"IsInside": True}, state_style="active"
        )
        await sink.wait(is_("camera.field_intrusion", EventState.ACTIVE))
        assert len(sink.of("camera.tamper")) == 1  # a repeated state is not a new event
        jpeg = await driver.snapshot()
        assert jpeg.startswith(b"\xff\xd8")


@pytest.mark.parametrize("fault", ["reboot", "renew_refused", "clock_skew"])
async def test_events_resume_without_leaked_subscriptions(
    tmp_path: Path, sim: OnvifCameraSimulator, fault: str
) -> None:
    # Short subscriptions so a renew falls inside the test (renewed at half-life: 5 s).
    async with running([camera(tmp_path, sim, subscription_seconds=10)]) as ((driver,), sink):
        await subscribed(driver, sim)
        if fault == "reboot":
            await sim.reboot(downtime=1.0)
        elif fault == "renew_refused":
            await sim.refuse_renew(True)
            await until(lambda: sim.counters()["subscriptions"]["created"] >= 2)  # a refused renew ends it
            await sim.refuse_renew(False)
        else:
            await sim.set_clock_skew(3600)  # an hour ahead: every request's Created is stale now
            await sim.reboot(downtime=0.5)  # the camera restarts with its new clock
        await subscribed(driver, sim)
        await sim.emit("tns1:VideoSource/MotionAlarm", data={"State": True})
        await sink.wait(is_("camera.motion", EventState.ACTIVE))
        counters = sim.counters()["subscriptions"]
        assert counters["active"] == 1, counters
        if fault == "clock_skew":
            assert abs(driver.status.detail["clock_offset"] - 3600) < 5
    await asyncio.sleep(0.2)
    assert sim.counters()["subscriptions"]["active"] == 0  # unsubscribed at shutdown


async def test_hostile_camera_is_refused_logged_once_and_isolated(tmp_path: Path) -> None:
    async with (
        OnvifCameraSimulator(user="admin", password=PASSWORD) as evil,
        OnvifCameraSimulator(user="admin", password=PASSWORD) as good,
    ):
        await evil.set_hostile("xxe")
        configs = [camera(tmp_path, evil, "cam-evil"), camera(tmp_path, good, "cam-good")]
        async with running(configs) as ((bad, fine), sink):
            await subscribed(fine, good)
            await good.emit("tns1:VideoSource/MotionAlarm", data={"State": True})
            await sink.wait(is_("camera.motion", EventState.ACTIVE, device="cam-good"))
            await until(lambda: bad.status.poll_errors >= 3)
            assert "unsafe XML" in (bad.status.last_error or "") or "bad XML" in (bad.status.last_error or "")
            assert "root:" not in (bad.status.last_error or "")  # no file content leaked
            offline = await sink.wait(is_("device.offline", device="cam-evil"))
            assert len(sink.of("device.offline")) == 1
            assert offline.data["host"] == "127.0.0.1"
            await evil.set_hostile("billion_laughs")
            # Two more refused attempts: the first may have been answered with the XXE document
            # already, so the second at least met the billion laughs (and refused it, unexpanded).
            errors, served = bad.status.poll_errors, sum(evil.counters()["requests"].values())
            await until(lambda: bad.status.poll_errors >= errors + 2)
            assert sum(evil.counters()["requests"].values()) > served
            assert "unsafe XML" in (bad.status.last_error or "") or "bad XML" in (bad.status.last_error or "")
            assert "lollol" not in (bad.status.last_error or "")  # no entity expanded
            assert len(sink.of("device.offline")) == 1  # still offline, not announced again
            assert not sink.of("device.online")
            await evil.set_hostile(None)
            await sink.wait(is_("device.online", device="cam-evil"), within=WAIT)


@pytest.mark.parametrize(
    ("picture", "event_type", "reason"),
    [
        ("black", "camera.video_loss", "black"),
        ("frozen", "camera.video_loss", "frozen"),
        ("blocked", "camera.tamper", "blocked"),
    ],
)
async def test_bad_pictures_raise_and_clear(
    tmp_path: Path, sim: OnvifCameraSimulator, picture: str, event_type: str, reason: str
) -> None:
    video = {"interval": 1.0, "timeout": 0.8, "debounce_frames": 2, "frozen_after": 1.0, "frozen_frames": 2}
    cfg = camera(tmp_path, sim, events=False, video=video)
    async with CameraFamily([cfg], DriverContext()) as family:
        sink = Sink()
        (driver,) = family.drivers
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(driver.run(sink))
            await until(lambda: "video" in driver.status.detail, within=WAIT)
            await sim.set_picture(picture)
            raised = await sink.wait(is_(event_type, EventState.ACTIVE), within=15)
            assert raised.data["reason"] == reason
            await sim.set_picture("normal")
            await sink.wait(is_(event_type, EventState.CLEARED), within=15)
            task.cancel()


class _NoClock(OnvifCameraSimulator):
    """After connecting, answers GetSystemDateAndTime without UTCDateTime (optional in the
    schema): the driver's own health check reads it, not the library."""

    calls = 0

    async def _get_system_date_and_time(self, el: Any, sid: Any) -> str:
        ok: str = await super()._get_system_date_and_time(el, sid)
        self.calls += 1
        if self.calls <= 2:  # the connect-time clock handshake
            return ok
        i, j = ok.index("<tt:UTCDateTime>"), ok.index("</tt:UTCDateTime>") + len("</tt:UTCDateTime>")
        return ok[:i] + ok[j:]


class _NoAddress(OnvifCameraSimulator):
    """Answers CreatePullPointSubscription without a subscription reference."""

    async def _create_pull_point(self, el: Any, sid: Any) -> str:
        ok: str = await super()._create_pull_point(el, sid)
        return re.sub(r"<tev:SubscriptionReference>.*?</tev:SubscriptionReference>", "", ok, flags=re.S)


@pytest.mark.parametrize("odd", [_NoClock, _NoAddress])
async def test_an_odd_camera_answer_is_a_device_error_not_a_crash(
    tmp_path: Path, odd: type[OnvifCameraSimulator]
) -> None:
    async with (
        odd(user="admin", password=PASSWORD) as sim,
        running([camera(tmp_path, sim, events=odd is _NoAddress)]) as ((driver,), _),
    ):
        await until(
            lambda: driver.status.poll_errors >= 1, within=3 * WAIT
        )  # the health check (5 s) or subscribe
        error = driver.status.last_error or ""
        # a DeviceProtocolError, converted at the driver edge
        assert "no usable UTC time" in error or "subscription address" in error, error
        # It keeps retrying, the task alive (a crash would end the TaskGroup, cancelling this wait):
        # two more attempts, each failing as a device error.
        errors = driver.status.poll_errors
        await until(lambda: driver.status.poll_errors >= errors + 2, within=3 * WAIT)
        assert driver.state in (CameraState.BACKING_OFF, CameraState.CONNECTING, CameraState.CONNECTED)
        again = driver.status.last_error or ""  # reconnecting says the same, not a library error
        assert "no usable UTC time" in again or "subscription address" in again, again

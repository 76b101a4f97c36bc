"""End to end with a camera: simulator -> real daemon -> mosquitto -> platform subscriber.

Camera motion and tamper arrive normalized and schema-valid; a panic alarm is followed by
the linked camera's snapshot, published on snapshots/{id}, whose sha256 and size match the
attachment of the camera.snapshot event; the alarm itself goes out first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.publish as mqtt_publish
import pytest

from gateway.commands.signing import build_command
from gateway.events import schema
from simulators.alarm_box import AlarmBoxSimulator
from simulators.onvif_camera import OnvifCameraSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config
from tests.support.subscriber import Received, Subscriber, await_event, await_for

VALIDATOR = jsonschema.Draft202012Validator(schema())
BASE = "campus/530102/sch-1/gw-1"
PASSWORD = "cam-pass-123"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
async def sims() -> AsyncIterator[tuple[OnvifCameraSimulator, AlarmBoxSimulator]]:
    async with (
        OnvifCameraSimulator(user="admin", password=PASSWORD) as cam,
        AlarmBoxSimulator(inputs=8) as box,
    ):
        yield cam, box


def config(tmp: Path, broker: Mosquitto, cam: OnvifCameraSimulator, box: AlarmBoxSimulator) -> dict[str, Any]:
    (tmp / "cam.pw").write_text(PASSWORD)
    uplink = {"name": "police", "endpoints": [broker.url], "keepalive": 2, "reconnect_max": 1.0}
    alarm_box = {"id": "box-gate", "driver": "modbus_alarm", "host": "127.0.0.1", "port": box.port}
    alarm_box |= {"profile": "generic-8di", "poll_interval": 0.1}
    camera = {"id": "cam-gate", "driver": "onvif_camera", "host": "127.0.0.1", "port": cam.port}
    camera |= {"username": "admin", "password_file": str(tmp / "cam.pw"), "pull_timeout": 1.0}
    camera |= {"evidence_for": ["box-gate:0"]}  # the gate's panic button 1
    devices = [alarm_box, camera]
    return base_config(tmp / "state", [uplink], devices)


def event_body(m: Received) -> dict[str, Any]:
    body: dict[str, Any] = m.json()
    VALIDATOR.validate(body)
    return body


async def test_camera_events_and_alarm_evidence(
    tmp_path: Path, broker: Mosquitto, sims: tuple[OnvifCameraSimulator, AlarmBoxSimulator]
) -> None:
    cam, box = sims
    with Subscriber(broker.port, f"{BASE}/#") as sub:
        daemon = Daemon(tmp_path / "d", config(tmp_path, broker, cam, box))
        await asyncio.to_thread(daemon.start)
        try:
            async with asyncio.timeout(15):  # the camera's subscription is live
                while not cam.subscriptions():  # noqa: ASYNC110 - polling another component's state
                    await asyncio.sleep(0.1)
            await cam.emit("tns1:RuleEngine/CellMotionDetector/Motion", data={"IsMotion": True})
            motion = await await_event(sub, "camera.motion", state="active")
            await cam.emit("tns1:RuleEngine/TamperDetector/Tamper", data={"IsTamper": True}, state_style="1")
            tamper = await await_event(sub, "camera.tamper", state="active")
            for body in (motion, tamper):
                VALIDATOR.validate(body)
                assert body["device"] == {"id": "cam-gate", "kind": "camera", "name": "", "location": ""}

            await box.press(0)
            note = await await_event(sub, "camera.snapshot", timeout=15)
            VALIDATOR.validate(note)
            (attachment,) = note["attachments"]
            topic = f"{BASE}/{attachment['topic']}"

            def picture(msgs: list[Received]) -> Received | None:
                return next((m for m in msgs if m.topic == topic), None)

            jpeg = await await_for(sub, picture, 10)
            assert jpeg.payload.startswith(b"\xff\xd8")
            assert hashlib.sha256(jpeg.payload).hexdigest() == attachment["sha256"]
            assert len(jpeg.payload) == attachment["bytes"]
            assert attachment["camera"] == "cam-gate"
            panic = next(event_body(m) for m in sub.messages if m.topic.endswith("/events/alarm/panic"))
            assert note["data"]["for_event"] == panic["id"]
            order = [m.topic for m in sub.messages]
            assert order.index(f"{BASE}/events/alarm/panic") < order.index(topic)  # the alarm went first
            assert panic["seq"] < note["seq"]
        finally:
            await asyncio.to_thread(daemon.stop)


async def test_patrol_report_and_self_test(
    tmp_path: Path, broker: Mosquitto, sims: tuple[OnvifCameraSimulator, AlarmBoxSimulator]
) -> None:
    cam, box = sims
    cfg = config(tmp_path, broker, cam, box)
    cfg["patrol_interval"] = 10
    key = tmp_path / "police.key"
    key.write_text("k" * 40)
    cfg["uplinks"][0]["commands"] = {"key_file": str(key), "allow": ["gateway.self_test"]}
    with Subscriber(broker.port, f"{BASE}/#") as sub:
        daemon = Daemon(tmp_path / "d", cfg)
        await asyncio.to_thread(daemon.start)
        try:
            report = await await_event(sub, "patrol.report", timeout=20)  # the periodic one
            VALIDATOR.validate(report)
            (camera,) = report["data"]["cameras"]
            assert camera["id"] == "cam-gate"
            assert camera["reachable"] is True
            assert camera["snapshot_ok"] is True
            assert camera["snapshot_bytes"] > 0
            assert camera["subscription"] == "active"
            assert abs(camera["clock_offset"]) < 5
            (device,) = report["data"]["devices"]
            assert (device["id"], device["online"]) == ("box-gate", True)
            assert report["data"]["summary"] == {
                "cameras": 1,
                "cameras_ok": 1,
                "devices": 1,
                "devices_online": 1,
            }

            await box.silent()
            await cam.reboot(downtime=30.0)  # down for the whole self-test, however slow the box
            sub.messages.clear()
            cmd = build_command(b"k" * 40, "gateway.self_test", "gateway")
            await asyncio.to_thread(
                mqtt_publish.single,
                f"{BASE}/cmd/gateway.self_test",
                json.dumps(cmd),
                1,
                hostname="127.0.0.1",
                port=broker.port,
            )
            again = await await_event(sub, "patrol.report", timeout=15)
            assert again["severity"] == "minor"
            assert again["data"]["cameras"][0]["snapshot_ok"] is False
        finally:
            await asyncio.to_thread(daemon.stop)

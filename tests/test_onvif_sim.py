"""The ONVIF camera simulator, through the real onvif-zeep-async client and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import cv2
import defusedxml.ElementTree
import numpy as np
import pytest
import zeep.exceptions
from defusedxml import EntitiesForbidden
from lxml import etree

from simulators.cli import add_sim_parser
from simulators.onvif_camera import OnvifCameraSimulator
from tests.support.waiting import eventually


def _import_quietly(name: str) -> ModuleType:
    """Import ``name`` but undo the logging.basicConfig(level=INFO) that `import onvif` runs."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        return importlib.import_module(name)
    finally:
        root.setLevel(level)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)


onvif = _import_quietly("onvif")
onvif_util = _import_quietly("onvif.util")
onvif_parsers = _import_quietly("onvif_parsers")

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "operator", "s3cret"
PULLPOINT = "http://www.onvif.org/ver10/events/wsdl/PullPointSubscription"
SOAP = {"Content-Type": "application/soap+xml; charset=utf-8"}


@pytest.fixture
async def sim() -> AsyncIterator[OnvifCameraSimulator]:
    async with OnvifCameraSimulator(user=USER, password=PASSWORD, control_port=0) as s:
        yield s


async def camera(sim: OnvifCameraSimulator, **kwargs: Any) -> Any:
    cam = onvif.ONVIFCamera(
        "127.0.0.1", sim.port, kwargs.pop("user", USER), kwargs.pop("pw", PASSWORD), **kwargs
    )
    return cam


@pytest.fixture
async def cam(sim: OnvifCameraSimulator) -> AsyncIterator[Any]:
    c = await camera(sim)
    try:
        await c.update_xaddrs()
        yield c
    finally:
        await c.close()


async def pullpoint(cam: Any, lifetime: str = "PT600S") -> tuple[Any, Any, str]:
    """(pull-point service, subscription manager service, address) of a new subscription."""
    events = await cam.create_events_service()
    result = await events.CreatePullPointSubscription({"InitialTerminationTime": lifetime})
    address = result.SubscriptionReference.Address._value_1
    cam.xaddrs[PULLPOINT] = address
    return (
        await cam.create_pullpoint_service(),
        await cam.create_subscription_service("PullPointSubscription"),
        address,
    )


async def pull(service: Any, timeout: float = 2.0, limit: int = 10) -> Any:
    return await service.PullMessages({"Timeout": dt.timedelta(seconds=timeout), "MessageLimit": limit})


def subcodes(fault: zeep.exceptions.Fault) -> list[str]:
    return [etree.QName(c).localname for c in fault.subcodes or []]


def envelope(body: str, header: str = "") -> bytes:
    return (
        '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        'xmlns:tds="http://www.onvif.org/ver10/device/wsdl">'
        f"<s:Header>{header}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def username_token(nonce: bytes, created: str, password: str = PASSWORD) -> str:
    digest = base64.b64encode(hashlib.sha1(nonce + created.encode() + password.encode()).digest()).decode()
    wsse = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
    wsu = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
    kind = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordDigest"
    return (
        f'<wsse:Security xmlns:wsse="{wsse}" xmlns:wsu="{wsu}"><wsse:UsernameToken>'
        f"<wsse:Username>{USER}</wsse:Username>"
        f'<wsse:Password Type="{kind}">{digest}</wsse:Password>'
        f"<wsse:Nonce>{base64.b64encode(nonce).decode()}</wsse:Nonce>"
        f"<wsu:Created>{created}</wsu:Created></wsse:UsernameToken></wsse:Security>"
    )


async def post(url: str, body: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=SOAP) as rsp:
        return rsp.status, await rsp.read()


def decode(jpeg: bytes) -> np.ndarray[Any, Any]:
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert frame is not None
    return frame


# ---- device and media -------------------------------------------------------------------


async def test_device_information_profiles_and_xaddrs(sim: OnvifCameraSimulator, cam: Any) -> None:
    assert cam.xaddrs["http://www.onvif.org/ver10/media/wsdl"] == f"{sim.base_url}/onvif/media_service"
    assert cam.xaddrs["http://www.onvif.org/ver10/events/wsdl"] == f"{sim.base_url}/onvif/events_service"
    device = await cam.create_devicemgmt_service()
    info = await device.GetDeviceInformation()
    assert (info.Manufacturer, info.Model, info.SerialNumber) == ("CampusSim", "SimCam 1", sim.serial)
    media = await cam.create_media_service()
    profiles = await media.GetProfiles()
    assert [p.token for p in profiles] == ["prof1", "prof2"]
    assert {p.VideoSourceConfiguration.SourceToken for p in profiles} == {"vs1"}
    assert profiles[1].VideoEncoderConfiguration.Resolution.Width == 320
    uri = await media.GetStreamUri(
        {"StreamSetup": {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}}, "ProfileToken": "prof2"}
    )
    assert uri.Uri == sim.mjpeg_url("prof2")
    assert await cam.get_snapshot_uri("prof1") == sim.snapshot_url("prof1")
    with pytest.raises(zeep.exceptions.Fault) as err:
        await media.GetSnapshotUri({"ProfileToken": "nope"})
    assert subcodes(err.value) == ["InvalidArgVal", "NoProfile"]
    assert sim.counters()["requests"]["GetSnapshotUri"] == 2


async def test_get_services_fault_falls_back_to_get_capabilities() -> None:
    async with OnvifCameraSimulator(user=USER, password=PASSWORD, get_services=False, profiles=1) as sim:
        cam = await camera(sim)
        try:
            await cam.update_xaddrs()
            assert (
                cam.xaddrs["http://www.onvif.org/ver10/events/wsdl"] == f"{sim.base_url}/onvif/events_service"
            )
            media = await cam.create_media_service()
            assert [p.token for p in await media.GetProfiles()] == ["prof1"]
        finally:
            await cam.close()
        requests = sim.counters()["requests"]
        assert requests["GetServices"] == 1
        assert requests["GetCapabilities"] == 1


# ---- authentication and the clock ---------------------------------------------------------


async def test_clock_skew_needs_the_clients_time_offset(sim: OnvifCameraSimulator) -> None:
    await sim.set_clock_skew(3600)
    naive = await camera(sim)
    try:
        device = await naive.create_devicemgmt_service()
        reported = (await device.authless_GetSystemDateAndTime()).UTCDateTime
        camera_time = dt.datetime(
            reported.Date.Year,
            reported.Date.Month,
            reported.Date.Day,
            reported.Time.Hour,
            reported.Time.Minute,
            reported.Time.Second,
            tzinfo=dt.UTC,
        )
        offset = (camera_time - dt.datetime.now(dt.UTC)).total_seconds()
        assert 3598 <= offset <= 3601
        with pytest.raises(zeep.exceptions.Fault) as err:
            await naive.update_xaddrs()  # GetServices, then GetCapabilities: both refused
        assert subcodes(err.value) == ["NotAuthorized"]
        assert onvif_util.is_auth_error(err.value)
    finally:
        await naive.close()
    assert sim.counters()["auth_failures"]["soap"] == 2

    adjusted = await camera(sim, adjust_time=True)
    try:
        await adjusted.update_xaddrs()
        assert 3598 <= adjusted.dt_diff.total_seconds() <= 3601
        device = await adjusted.create_devicemgmt_service()
        assert (await device.GetDeviceInformation()).Model == "SimCam 1"
    finally:
        await adjusted.close()
    assert sim.counters()["auth_failures"]["soap"] == 2


async def test_wrong_password_is_not_authorized(sim: OnvifCameraSimulator) -> None:
    cam = await camera(sim, pw="wrong")
    try:
        with pytest.raises(zeep.exceptions.Fault) as err:
            await cam.update_xaddrs()
        assert subcodes(err.value) == ["NotAuthorized"]
    finally:
        await cam.close()


async def test_replayed_nonce_and_stale_created_are_refused(sim: OnvifCameraSimulator) -> None:
    body = "<tds:GetDeviceInformation/>"
    now = sim.clock()
    created = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    token = username_token(b"0123456789abcdef", created)
    status, answer = await post(sim.device_url, envelope(body, token))
    assert status == 200, answer
    status, answer = await post(sim.device_url, envelope(body, token))
    assert status == 400
    assert b"NotAuthorized" in answer
    assert b"replayed" in answer
    old = (now - dt.timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, answer = await post(sim.device_url, envelope(body, username_token(b"another nonce", old)))
    assert status == 400
    assert b"NotAuthorized" in answer
    status, answer = await post(sim.device_url, envelope(body))  # no token at all
    assert status == 400
    assert b"NotAuthorized" in answer
    status, answer = await post(sim.device_url, envelope("<tds:GetSystemDateAndTime/>"))
    assert status == 200
    assert sim.counters()["auth_failures"]["soap"] == 3


# ---- snapshots and the stream ----------------------------------------------------------------


async def test_snapshot_with_digest_auth(sim: OnvifCameraSimulator, cam: Any) -> None:
    first = await cam.get_snapshot("prof1")
    second = await cam.get_snapshot("prof1")
    assert first is not None
    assert second is not None
    a, b = decode(first), decode(second)
    assert a.shape == (360, 640)
    assert 40 < a.mean() < 220
    assert a.std() > 15  # texture, not a flat picture
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5  # it moves
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.snapshot_url()) as rsp:
            assert rsp.status == 401
            assert rsp.headers["WWW-Authenticate"].startswith("Digest ")
            assert 'qop="auth"' in rsp.headers["WWW-Authenticate"]
        bad = aiohttp.DigestAuthMiddleware(USER, "wrong")
        async with session.get(sim.snapshot_url(), middlewares=(bad,)) as rsp:
            assert rsp.status == 401
        good = aiohttp.DigestAuthMiddleware(USER, PASSWORD)
        async with session.get(sim.snapshot_url("prof2"), middlewares=(good,)) as rsp:
            assert rsp.status == 200
            assert rsp.content_type == "image/jpeg"
            assert decode(await rsp.read()).shape == (180, 320)
    assert sim.counters()["auth_failures"]["http"] == 1
    assert sim.counters()["snapshots"] == 3


async def test_picture_modes(sim: OnvifCameraSimulator, cam: Any) -> None:
    await sim.set_picture("black")
    assert decode(await cam.get_snapshot("prof1")).max() < 10
    await sim.set_picture("blocked")
    blocked = decode(await cam.get_snapshot("prof1"))
    assert abs(blocked.mean() - 128) < 5
    assert blocked.std() < 4
    await sim.set_picture("frozen")
    assert await cam.get_snapshot("prof1") == await cam.get_snapshot("prof1")
    await sim.set_picture("still")
    s1, s2 = decode(await cam.get_snapshot("prof1")), decode(await cam.get_snapshot("prof1"))
    difference = np.abs(s1.astype(int) - s2.astype(int))
    assert 0.5 < difference.mean() < 5  # live sensor noise
    assert (difference > 25).mean() < 0.005  # but no motion
    sharp = cv2.Laplacian(s1, cv2.CV_64F).var()
    await sim.set_picture("defocused")
    blurred = decode(await cam.get_snapshot("prof1"))
    assert cv2.Laplacian(blurred, cv2.CV_64F).var() < 0.3 * sharp
    assert blurred.std() > 12  # not "blocked"
    await sim.set_picture("normal")
    assert await cam.get_snapshot("prof1") != await cam.get_snapshot("prof1")
    with pytest.raises(ValueError, match="picture mode"):
        await sim.set_picture("purple")  # type: ignore[arg-type]


async def test_mjpeg_stream(sim: OnvifCameraSimulator) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.mjpeg_url("prof2")) as rsp:
            assert rsp.status == 401
        auth = aiohttp.DigestAuthMiddleware(USER, PASSWORD)
        async with session.get(sim.mjpeg_url("prof2"), middlewares=(auth,)) as rsp:
            assert rsp.status == 200
            assert rsp.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            frames: list[np.ndarray[Any, Any]] = []
            buffer = b""
            async with asyncio.timeout(5):
                while len(frames) < 2:
                    buffer += await rsp.content.read(65536)
                    start, end = buffer.find(b"\xff\xd8"), buffer.find(b"\xff\xd9")
                    if 0 <= start < end:
                        frames.append(decode(buffer[start : end + 2]))
                        buffer = buffer[end + 2 :]
    assert frames[0].shape == (180, 320)
    assert not np.array_equal(frames[0], frames[1])


async def test_mjpeg_stream_opens_in_opencv() -> None:
    async with OnvifCameraSimulator(user=USER, password=PASSWORD, snapshot_auth="none") as sim:

        def grab() -> tuple[bool, Any]:
            capture = cv2.VideoCapture(sim.mjpeg_url("prof2"), cv2.CAP_FFMPEG)
            try:
                return capture.read()
            finally:
                capture.release()

        ok, frame = await asyncio.to_thread(grab)
    assert ok
    assert frame.shape == (180, 320, 3)


# ---- events ------------------------------------------------------------------------------


async def test_pull_point_create_pull_renew_unsubscribe(sim: OnvifCameraSimulator, cam: Any) -> None:
    events = await cam.create_events_service()
    result = await events.CreatePullPointSubscription({"InitialTerminationTime": "PT600S"})
    lifetime = result.TerminationTime - result.CurrentTime
    assert dt.timedelta(seconds=599) <= lifetime <= dt.timedelta(seconds=601)
    address = result.SubscriptionReference.Address._value_1
    other = await events.CreatePullPointSubscription({"InitialTerminationTime": "PT60S"})
    assert other.SubscriptionReference.Address._value_1 != address
    assert address.startswith(f"{sim.base_url}/onvif/subscription/")
    cam.xaddrs[PULLPOINT] = address
    service = await cam.create_pullpoint_service()
    manager = await cam.create_subscription_service("PullPointSubscription")

    await sim.emit("tns1:VideoSource/MotionAlarm", data={"State": True}, source={"Source": "vs1"})
    await sim.emit(
        "tns1:RuleEngine/CellMotionDetector/Motion",
        data={"IsMotion": True},
        source={
            "VideoSourceConfigurationToken": "vsc1",
            "VideoAnalyticsConfigurationToken": "va1",
            "Rule": "MyMotionDetectorRule",
        },
        state_style="1",
    )
    answer = await pull(service)
    messages = answer.NotificationMessage
    assert [m.Topic._value_1 for m in messages] == [
        "tns1:VideoSource/MotionAlarm",
        "tns1:RuleEngine/CellMotionDetector/Motion",
    ]
    first = messages[0].Message._value_1
    assert first.PropertyOperation == "Changed"
    assert (first.Source.SimpleItem[0].Name, first.Source.SimpleItem[0].Value) == ("Source", "vs1")
    assert (first.Data.SimpleItem[0].Name, first.Data.SimpleItem[0].Value) == ("State", "true")
    assert messages[1].Message._value_1.Data.SimpleItem[0].Value == "1"
    parsed = await onvif_parsers.parse(messages[0].Topic._value_1, "cam1", messages[0])
    assert parsed[0].value is True

    # A long poll: answers when a message comes, not at its timeout.
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(pull(service, timeout=10))
    await asyncio.sleep(0.2)
    await sim.emit("tns1:RuleEngine/TamperDetector/Tamper", data={"IsTamper": True})
    answer = await waiting
    assert loop.time() - started < 2
    assert answer.NotificationMessage[0].Topic._value_1 == "tns1:RuleEngine/TamperDetector/Tamper"

    # Empty at the timeout; MessageLimit honoured.
    started = loop.time()
    answer = await pull(service, timeout=0.3)
    assert 0.25 < loop.time() - started < 2
    assert answer.NotificationMessage == []
    for i in range(5):
        await sim.emit(
            "tns1:Device/Trigger/DigitalInput",
            data={"LogicalState": i % 2 == 0},
            source={"InputToken": "DI1"},
            state_style="active",
        )
    assert len((await pull(service, limit=3)).NotificationMessage) == 3
    rest = (await pull(service)).NotificationMessage
    assert [m.Message._value_1.Data.SimpleItem[0].Value for m in rest] == ["inactive", "active"]

    # SetSynchronizationPoint: the current state of every property, as Initialized.
    await service.SetSynchronizationPoint()
    initialized = (await pull(service)).NotificationMessage
    assert {m.Topic._value_1 for m in initialized} == {
        "tns1:VideoSource/MotionAlarm",
        "tns1:RuleEngine/CellMotionDetector/Motion",
        "tns1:RuleEngine/TamperDetector/Tamper",
        "tns1:Device/Trigger/DigitalInput",
    }
    assert {m.Message._value_1.PropertyOperation for m in initialized} == {"Initialized"}

    renewed = await manager.Renew(cam.get_next_termination_time(dt.timedelta(seconds=120)))
    assert (
        dt.timedelta(seconds=119)
        <= renewed.TerminationTime - renewed.CurrentTime
        <= dt.timedelta(seconds=121)
    )
    await manager.Unsubscribe()
    with pytest.raises(zeep.exceptions.Fault) as err:
        await pull(service)
    assert subcodes(err.value) == ["InvalidArgVal"]
    counters = sim.counters()["subscriptions"]
    assert counters["created"] == 2
    assert counters["unsubscribed"] == 1
    assert counters["renewed"] == 1
    assert counters["active"] == 1
    assert sim.counters()["requests"]["PullMessages"] >= 7


async def test_pull_point_manager_of_the_client(sim: OnvifCameraSimulator, cam: Any) -> None:
    lost: list[bool] = []
    manager = await cam.create_pullpoint_manager(dt.timedelta(seconds=60), lambda: lost.append(True))
    assert cam.xaddrs[PULLPOINT] == sim.subscription_url(sim.subscriptions()[0])
    await sim.emit(
        "tns1:VideoSource/ImageTooBlurry/AnalyticsService",
        data={"State": True},
        source={"VideoSourceConfigurationToken": "vsc1"},
    )
    answer = await pull(manager.get_service())
    assert answer.NotificationMessage[0].Topic._value_1 == "tns1:VideoSource/ImageTooBlurry/AnalyticsService"
    await manager.set_synchronization_point()
    await manager.shutdown()
    assert not lost
    counters = sim.counters()["subscriptions"]
    assert (counters["active"], counters["created"], counters["unsubscribed"]) == (0, 1, 1)


async def test_subscription_expires_at_its_termination_time(sim: OnvifCameraSimulator, cam: Any) -> None:
    started = time.monotonic()
    service, _, _ = await pullpoint(cam, "PT1S")
    assert sim.counters()["subscriptions"]["active"] == 1
    # Gone after PT1S (plus the simulator's expiry tick; 3 s bounds a loaded box), not before.
    await eventually(lambda: sim.counters()["subscriptions"]["expired"] == 1, timeout=3.0)
    assert time.monotonic() - started >= 0.9  # at its termination time, not early (0.1 s for clocks)
    assert sim.counters()["subscriptions"]["active"] == 0
    assert sim.counters()["subscriptions"]["expired"] == 1
    with pytest.raises(zeep.exceptions.Fault):
        await pull(service)


async def test_renew_refused_and_too_many_subscriptions(sim: OnvifCameraSimulator, cam: Any) -> None:
    _, manager, _ = await pullpoint(cam)
    await sim.refuse_renew()
    with pytest.raises(zeep.exceptions.Fault) as err:
        await manager.Renew("PT60S")
    assert subcodes(err.value) == ["Action"]
    await sim.refuse_renew(False)
    await manager.Renew("PT60S")

    await sim.set_max_subscriptions(2)
    await pullpoint(cam)
    with pytest.raises(zeep.exceptions.Fault) as err:
        await pullpoint(cam)
    assert subcodes(err.value) == ["Action", "TooManySubscriptions"]
    counters = sim.counters()["subscriptions"]
    assert (counters["active"], counters["refused"], counters["renew_refused"]) == (2, 1, 1)


async def test_reboot_drops_subscriptions_and_refuses_connections(
    sim: OnvifCameraSimulator, cam: Any
) -> None:
    service, _, _ = await pullpoint(cam)
    waiting = asyncio.create_task(pull(service, timeout=10))
    await asyncio.sleep(0.2)
    await sim.reboot(downtime=1.0)
    assert not sim.is_up
    with pytest.raises(aiohttp.ClientError):  # cut, then refused on the client's one retry
        await waiting
    with pytest.raises(aiohttp.ClientConnectorError):
        await _get(sim.device_url)
    await sim.wait_up(5)
    with pytest.raises(zeep.exceptions.Fault):  # the subscription died with the reboot
        await pull(service)
    counters = sim.counters()
    assert counters["subscriptions"]["dropped"] == 1
    assert counters["subscriptions"]["active"] == 0
    assert counters["reboots"] == 1
    device = await cam.create_devicemgmt_service()
    assert (await device.GetDeviceInformation()).Model == "SimCam 1"


async def _get(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(url):
        pass


# ---- hostile and malformed answers -----------------------------------------------------------


async def test_hostile_xml_answers(sim: OnvifCameraSimulator, cam: Any) -> None:
    device = await cam.create_devicemgmt_service()
    await sim.set_hostile("xxe")
    status, body = await post(sim.device_url, envelope("<tds:GetDeviceInformation/>"))
    assert status == 200
    assert b'<!ENTITY xxe SYSTEM "file:///etc/passwd">' in body
    assert b"&xxe;" in body
    with pytest.raises(EntitiesForbidden):
        defusedxml.ElementTree.fromstring(body)
    # zeep refuses entities by default; with the gateway's hardened settings loaded (another
    # test imported drivers.onvif first) it refuses the DTD before that.
    with pytest.raises((zeep.exceptions.EntitiesForbidden, zeep.exceptions.DTDForbidden)):
        await device.GetDeviceInformation()

    await sim.set_hostile("billion_laughs")
    status, body = await post(sim.device_url, envelope("<tds:GetSystemDateAndTime/>"))
    assert status == 200
    assert b'<!ENTITY lol9 "&lol8;&lol8;' in body
    assert b"&lol9;" in body
    assert len(body) < 4096
    with pytest.raises(EntitiesForbidden):
        defusedxml.ElementTree.fromstring(body)
    with pytest.raises((zeep.exceptions.EntitiesForbidden, zeep.exceptions.DTDForbidden)):
        await device.GetDeviceInformation()

    await sim.set_hostile(None)
    assert (await device.GetDeviceInformation()).Model == "SimCam 1"


async def test_malformed_fault_has_an_undeclared_prefix(sim: OnvifCameraSimulator, cam: Any) -> None:
    device = await cam.create_devicemgmt_service()
    await sim.fail_operation("GetDeviceInformation")
    with pytest.raises(zeep.exceptions.Fault) as err:
        await device.GetDeviceInformation()
    assert subcodes(err.value) == ["ActionNotSupported"]
    await sim.set_malformed_faults(True)
    with pytest.raises(zeep.exceptions.XMLParseError):  # not a Fault: zeep cannot resolve the subcode
        await device.GetDeviceInformation()
    status, body = await post(sim.device_url, envelope("<tds:GetDeviceInformation/>"))
    assert status == 400  # the missing token: a Sender fault
    value = etree.fromstring(body).find(".//{*}Subcode/{*}Value")
    assert value.text == "ter2:InvalidArgs"
    assert "ter2" not in value.nsmap


# ---- slow answers, the control API, the command line -------------------------------------------


async def test_slow_answers(sim: OnvifCameraSimulator, cam: Any) -> None:
    device = await cam.create_devicemgmt_service()
    await sim.set_delay(0.4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await device.GetDeviceInformation()
    assert loop.time() - started >= 0.4


async def test_control_api(sim: OnvifCameraSimulator, cam: Any) -> None:
    base = f"http://127.0.0.1:{sim.control_port}"
    service, _, _ = await pullpoint(cam)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/emit",
            json={
                "topic": "tns1:RuleEngine/FieldDetector/ObjectsInside",
                "data": {"IsInside": True},
                "source": {"Rule": "fence"},
                "state_style": "1",
            },
        ) as rsp:
            assert rsp.status == 200
            assert await rsp.json() == {"delivered": 1}
        for path, body in (
            ("/clock", {"skew": -120}),
            ("/delay", {"seconds": 0}),
            ("/picture", {"mode": "blocked"}),
            ("/renew", {"refuse": True}),
            ("/subscriptions/limit", {"limit": 3}),
            ("/malformed-faults", {"on": False}),
            ("/fail", {"operation": "GetProfiles", "on": True}),
            ("/hostile", {"mode": None}),
        ):
            async with session.post(base + path, json=body) as rsp:
                assert rsp.status == 200, (path, await rsp.text())
        async with session.get(f"{base}/state") as rsp:
            state = await rsp.json()
        assert (state["skew"], state["picture"], state["renew_refused"]) == (-120, "blocked", True)
        assert (state["max_subscriptions"], state["failing"]) == (3, ["GetProfiles"])
        assert state["counters"]["subscriptions"]["active"] == 1
        for path, body, words in (
            ("/emit", {"topic": "no topic"}, "topic"),
            ("/emit", {"topic": "tns1:A/B", "state_style": "yes"}, "state_style"),
            ("/emit", {"topic": "bogus:A/B"}, "prefix"),
            ("/clock", {"skew": "1h"}, "skew"),
            ("/delay", {"seconds": 1000}, "delay"),
            ("/picture", {"mode": "purple"}, "mode"),
            ("/renew", {"refuse": "yes"}, "refuse"),
            ("/subscriptions/limit", {"limit": 0}, "limit"),
            ("/hostile", {"mode": "zip_bomb"}, "mode"),
            ("/reboot", {"downtime": -1}, "downtime"),
            ("/fail", {"operation": 3}, "operation"),
            ("/clock", [1], "JSON object"),
        ):
            async with session.post(base + path, json=body) as rsp:
                assert rsp.status == 400, path
                assert words in (await rsp.json())["error"], path
        async with session.post(f"{base}/clock", data=b"{not json") as rsp:
            assert rsp.status == 400
        async with session.post(f"{base}/reboot", json={"downtime": 0.3}) as rsp:
            assert rsp.status == 200
            assert (await rsp.json())["up"] is False
    await sim.wait_up(5)
    assert sim.counters()["subscriptions"]["dropped"] == 1
    messages = []  # the subscription is gone with the reboot
    with pytest.raises(zeep.exceptions.Fault):
        messages = (await pull(service)).NotificationMessage
    assert messages == []


def test_cli_parses_the_camera_subcommand() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_sim_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sim", "camera", "--port", "0", "--user", "u", "--password", "w"])
    assert (args.port, args.control_port, args.user, args.password) == (0, 8504, "u", "w")
    assert args.func.__name__ == "run_camera"
    with pytest.raises(SystemExit):
        parser.parse_args(["sim", "camera", "--state-style", "yes"])


async def test_simulator_process_driven_over_onvif_and_http() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "sim",
        "camera",
        "--port",
        "0",
        "--control-port",
        "0",
        "--user",
        USER,
        "--password",
        PASSWORD,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            ready = json.loads(await proc.stdout.readline())
        assert ready["sim"] == "camera"
        cam = onvif.ONVIFCamera("127.0.0.1", ready["port"], USER, PASSWORD)
        try:
            await cam.update_xaddrs()
            await pullpoint(cam)
            state_url = f"http://127.0.0.1:{ready['control_port']}/state"
            async with aiohttp.ClientSession() as session, session.get(state_url) as rsp:
                state = await rsp.json()
            assert state["counters"]["subscriptions"]["active"] == 1
        finally:
            await cam.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0

"""One connection's life to an ONVIF camera, on onvif-zeep-async, with every failure converted.

A session measures the camera's clock offset first (GetSystemDateAndTime needs no
authentication) and signs every request with it: WS-Security digest carries a
creation time that many cameras check against their own, often wrong, clock. A
session that failed is closed and replaced as a whole (a camera that rebooted may have
a new clock, new subscription addresses, new service endpoints).

Library exceptions are converted here, at the driver edge: no answer / refused / reset
-> ``DeviceUnavailable``; authentication refused -> ``DeviceRejected``; an answer that
is not valid SOAP (or unsafe XML) -> ``DeviceProtocolError``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import zeep.exceptions
from lxml import etree

from drivers.onvif import xmlsafe
from drivers.onvif.config import CameraConfig
from gateway.errors import DeviceProtocolError, DeviceRejected, DeviceUnavailable, DriverError

T = TypeVar("T")

_onvif = xmlsafe.import_onvif()  # without its logging.basicConfig on the root logger
ONVIFCamera = _onvif.ONVIFCamera
ONVIFError = _onvif.exceptions.ONVIFError
ONVIFAuthError = _onvif.exceptions.ONVIFAuthError

_AUTH_WORDS = (
    "notauthorized",
    "not authorized",
    "unauthorized",
    "authority failure",
    "sender not authorized",
)


@dataclass(frozen=True, slots=True)
class CameraInfo:
    manufacturer: str
    model: str
    firmware: str
    serial: str
    profiles: tuple[str, ...]
    profile: str
    stream_uri: str | None
    snapshot_uri: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "manufacturer": self.manufacturer,
            "model": self.model,
            "firmware": self.firmware,
            "serial": self.serial,
            "profile": self.profile,
            "stream_uri": self.stream_uri,
            "snapshot_uri": self.snapshot_uri,
        }


def convert(device_id: str, what: str, exc: BaseException) -> DriverError:
    """A library exception as the gateway's error, naming the operation."""
    if isinstance(exc, DriverError):
        return exc
    unsafe = xmlsafe.as_unsafe_xml(exc)
    if unsafe is not None:  # a DTD, an entity, an external reference, an oversized answer
        return DeviceProtocolError(device_id, f"{what}: unsafe XML refused: {unsafe}")
    text = str(exc) or type(exc).__name__
    fault = isinstance(exc, zeep.exceptions.Fault)
    if isinstance(exc, ONVIFAuthError) or (fault and any(w in text.lower() for w in _AUTH_WORDS)):
        return DeviceRejected(device_id, f"{what}: authentication refused ({text})")
    for kinds, label in _PROTOCOL_ERRORS:
        if isinstance(exc, kinds):
            return DeviceProtocolError(device_id, f"{what}: {label}: {text}")
    if isinstance(exc, TimeoutError):
        return DeviceUnavailable(device_id, f"{what}: no answer in time")
    return DeviceUnavailable(device_id, f"{what}: {text}")


# Answers that are not what was asked for, most specific first; the rest is "no answer".
_PROTOCOL_ERRORS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (zeep.exceptions.Fault, "SOAP fault"),
    ((xmlsafe.UnsafeXml, zeep.exceptions.XMLSyntaxError, zeep.exceptions.XMLParseError), "bad XML"),
    ((etree.LxmlError, zeep.exceptions.Error, ValueError, AttributeError, KeyError), "unexpected answer"),
)


# What a camera call may raise besides our own errors; anything else is a bug and propagates.
CAMERA_ERRORS: tuple[type[BaseException], ...] = (
    ONVIFError,
    zeep.exceptions.Error,
    etree.LxmlError,
    aiohttp.ClientError,
    OSError,  # TimeoutError included
    xmlsafe.UnsafeXml,
    ValueError,
    AttributeError,
    KeyError,
)


class CameraSession:
    """An opened camera: services set up, clock offset known. Use :func:`open_session`."""

    def __init__(self, cfg: CameraConfig, password: str | None) -> None:
        self.device_id = cfg.id
        self.timeout = cfg.timeout
        self.camera = xmlsafe.harden_camera(
            ONVIFCamera(cfg.host, cfg.port, cfg.username, password, adjust_time=True, no_cache=True)
        )
        self.info: CameraInfo | None = None

    async def call(self, what: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await one camera operation, bounded; its failure comes out converted."""
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await aw
        except CAMERA_ERRORS as exc:
            raise convert(self.device_id, what, exc) from exc

    @property
    def clock_offset(self) -> float | None:
        """Seconds the camera's clock is ahead of ours (negative: behind), as measured at open."""
        diff: dt.timedelta | None = self.camera.dt_diff
        return None if diff is None else diff.total_seconds()

    async def open(self, profile: str | None) -> CameraInfo:
        # Our own clock check first: a camera without a usable UTC time is then reported the
        # same way at connect as in the health check, not by the library's AttributeError.
        await self.measure_clock()
        await self.call("connect (GetServices, clock)", self.camera.update_xaddrs())
        devicemgmt = await self.call("device service", self.camera.create_devicemgmt_service())
        info = await self.call("GetDeviceInformation", devicemgmt.GetDeviceInformation())
        media = await self.call("media service", self.camera.create_media_service())
        profiles = await self.call("GetProfiles", media.GetProfiles())
        tokens = tuple(str(p.token) for p in profiles or ())
        if not tokens:
            raise DeviceProtocolError(self.device_id, "GetProfiles: the camera has no media profile")
        if profile is not None and profile not in tokens:
            raise DeviceRejected(
                self.device_id, f"media profile {profile!r} not on the camera; it has {list(tokens)}"
            )
        chosen = profile or tokens[0]
        stream = await self._stream_uri(media, chosen)
        snapshot = await self.call("GetSnapshotUri", self.camera.get_snapshot_uri(chosen))
        self.info = CameraInfo(
            manufacturer=str(getattr(info, "Manufacturer", "") or ""),
            model=str(getattr(info, "Model", "") or ""),
            firmware=str(getattr(info, "FirmwareVersion", "") or ""),
            serial=str(getattr(info, "SerialNumber", "") or ""),
            profiles=tokens,
            profile=chosen,
            stream_uri=stream,
            snapshot_uri=snapshot,
        )
        return self.info

    async def _stream_uri(self, media: Any, profile: str) -> str | None:
        request = {
            "StreamSetup": {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}},
            "ProfileToken": profile,
        }
        try:
            result = await self.call("GetStreamUri", media.GetStreamUri(request))
        except DeviceProtocolError:
            return None  # some cameras only stream on request; the snapshot is what we need
        return str(getattr(result, "Uri", "") or "") or None

    async def measure_clock(self) -> float:
        """GetSystemDateAndTime without authentication: the camera's clock offset in seconds."""
        devicemgmt = await self.call("device service", self.camera.create_devicemgmt_service())
        answer = await self.call("GetSystemDateAndTime", devicemgmt.authless_GetSystemDateAndTime())
        try:
            d = answer.UTCDateTime  # optional in the schema: a camera may leave it out
            cam = dt.datetime(
                d.Date.Year,
                d.Date.Month,
                d.Date.Day,
                d.Time.Hour,
                d.Time.Minute,
                d.Time.Second,
                tzinfo=dt.UTC,
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise DeviceProtocolError(
                self.device_id, f"GetSystemDateAndTime: no usable UTC time ({exc})"
            ) from exc
        return (cam - dt.datetime.now(dt.UTC)).total_seconds()

    async def snapshot(self, timeout: float) -> bytes:
        """A JPEG from the profile's snapshot URI (HTTP digest)."""
        if self.info is None:
            raise DeviceUnavailable(self.device_id, "snapshot: not connected")
        data = await self.call(
            "snapshot", self.camera.get_snapshot(self.info.profile, timeout=timeout), timeout=timeout + 1
        )
        if not data:
            raise DeviceProtocolError(self.device_id, "snapshot: the camera returned no picture")
        return bytes(data)

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.camera.close()
        except CAMERA_ERRORS:
            pass  # closing local sessions; the camera's side is gone or will time out


@asynccontextmanager
async def open_session(cfg: CameraConfig, password: str | None) -> AsyncIterator[CameraSession]:
    """A connected session, closed on exit (also when opening failed half-way)."""
    session = CameraSession(cfg, password)
    try:
        await session.open(cfg.profile)
        yield session
    finally:
        await session.close()

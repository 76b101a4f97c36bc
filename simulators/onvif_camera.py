"""A simulated ONVIF camera (SOAP 1.2 over HTTP) with pull-point events, snapshots and faults.

    async with OnvifCameraSimulator(user="admin", password="secret") as sim:   # 127.0.0.1:sim.port
        cam = ONVIFCamera("127.0.0.1", sim.port, "admin", "secret", adjust_time=True)
        await sim.emit("tns1:VideoSource/MotionAlarm", data={"State": True})
        await sim.set_clock_skew(3600)            # the camera's clock is an hour ahead
        await sim.set_picture("frozen")           # black / frozen / blocked / normal
        await sim.reboot(downtime=1.0)            # drops subscriptions, port closed meanwhile
        assert sim.counters()["subscriptions"]["active"] == 0

What it serves (``http://127.0.0.1:{port}``; docs/drivers/onvif-camera.md is the long version):

``POST /onvif/device_service``
    GetServices, GetCapabilities, GetSystemDateAndTime (answered without authentication,
    with the camera's skewed clock), GetDeviceInformation.
``POST /onvif/media_service``
    GetProfiles (``profiles`` of them, 1 or 2, on one video source), GetStreamUri (the
    MJPEG URL below: no RTSP server here), GetSnapshotUri.
``POST /onvif/events_service``
    CreatePullPointSubscription (InitialTerminationTime relative like ``PT600S`` or
    absolute; default ``default_subscription_seconds``), GetEventProperties (empty
    topic set), GetServiceCapabilities.
``POST /onvif/subscription/{id}``
    The subscription reference address, unique per subscription: PullMessages (long
    poll: answers as soon as messages are queued, with at most MessageLimit of them, or
    empty at Timeout), Renew, Unsubscribe, SetSynchronizationPoint (re-queues the last
    message of every property as ``PropertyOperation="Initialized"``). An unknown or
    expired subscription answers a Sender fault (``ter:InvalidArgVal``).
``GET /snapshot/{profile}.jpg``, ``GET /mjpeg/{profile}``
    A generated JPEG, and an MJPEG stream (``multipart/x-mixed-replace``), both behind
    HTTP digest authentication (RFC 7616, MD5, qop=auth).

Every SOAP operation but GetSystemDateAndTime needs a WS-Security UsernameToken
(PasswordDigest, or PasswordText when ``allow_password_text``), whose Created time must lie
within ``auth_window`` seconds of the camera's clock and whose Nonce must not have been
seen before (within twice the window): otherwise a ``ter:NotAuthorized`` Sender fault.
A new subscription gets the last message of every property (``PropertyOperation=
"Initialized"``), as real cameras send. Filters in CreatePullPointSubscription are ignored.

Faults to inject: reboot, clock skew, slow answers, renew refused, a subscription limit,
any operation answering a fault, malformed faults (a subcode with an undeclared namespace
prefix, which zeep reports as XMLParseError rather than Fault), hostile XML answers (XXE,
billion laughs) and the picture (black, frozen, blocked).

With ``control_port`` set, an HTTP API (loopback only, JSON, 400 with a message on bad
input) drives the same controls from another process: ``GET /state``, ``POST /emit``
``{"topic": ..., "data": {"State": true}, "source": {...}, "state_style": "1"}``,
``POST /reboot`` ``{"downtime": 1.5}``, ``POST /clock`` ``{"skew": 3600}``,
``POST /delay`` ``{"seconds": 0.5}``, ``POST /picture`` ``{"mode": "black"}``,
``POST /renew`` ``{"refuse": true}``, ``POST /subscriptions/limit`` ``{"limit": 2}``,
``POST /hostile`` ``{"mode": "xxe"}`` (``"billion_laughs"``, ``null`` to stop),
``POST /malformed-faults`` ``{"on": true}``, ``POST /fail`` ``{"operation": "GetServices",
"on": true}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from xml.sax.saxutils import escape, quoteattr

import cv2
import numpy as np
from aiohttp import web
from lxml import etree  # type: ignore[import-untyped,unused-ignore]  # typed or not, by lxml version

from simulators.control import bad_request, body_bool, json_body

# ---- namespaces ----------------------------------------------------------------------

NS_ENV = "http://www.w3.org/2003/05/soap-envelope"
NS_WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
NS_WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
NS_DEVICE = "http://www.onvif.org/ver10/device/wsdl"
NS_MEDIA = "http://www.onvif.org/ver10/media/wsdl"
NS_EVENTS = "http://www.onvif.org/ver10/events/wsdl"
NS_WSNT = "http://docs.oasis-open.org/wsn/b-2"
_WSS_PROFILE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
PASSWORD_DIGEST = f"{_WSS_PROFILE}#PasswordDigest"
PASSWORD_TEXT = f"{_WSS_PROFILE}#PasswordText"
TOPIC_DIALECT = "http://www.onvif.org/ver10/tev/topicExpression/ConcreteSet"

# Prefixes declared on every answer; a topic's prefix must be one of these or be given to emit().
TOPIC_NAMESPACES = {
    "tns1": "http://www.onvif.org/ver10/topics",
    "tnsaxis": "http://www.axis.com/2009/event/topics",
    "tnshik": "http://www.hikvision.com/2011/event/topics",
}
NSMAP = {
    "env": NS_ENV,
    "tt": "http://www.onvif.org/ver10/schema",
    "tds": NS_DEVICE,
    "trt": NS_MEDIA,
    "tev": NS_EVENTS,
    "wsnt": NS_WSNT,
    "wsa": "http://www.w3.org/2005/08/addressing",
    "wstop": "http://docs.oasis-open.org/wsn/t-1",
    "ter": "http://www.onvif.org/ver10/error",
    **TOPIC_NAMESPACES,
}
_NSDECL = " ".join(f"xmlns:{p}={quoteattr(u)}" for p, u in NSMAP.items())
SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"

# ---- timing and sizes, each with its reason --------------------------------------------

AUTH_WINDOW = 300.0  # s: WS-Security Created must be this close to the camera clock (+-5 min, as cameras do)
NONCE_CACHE_MAX = 10_000  # nonces remembered for replay checks; the oldest are forgotten beyond this
DIGEST_NONCE_LIFETIME = 300.0  # s: an HTTP digest nonce is accepted this long, then "stale"
DIGEST_NONCES_MAX = 1_000  # issued HTTP digest nonces kept; the oldest are forgotten beyond this
DEFAULT_SUBSCRIPTION = 60.0  # s: lifetime when CreatePullPointSubscription names none
MAX_SUBSCRIPTION = 86_400.0  # s: a longer InitialTerminationTime / Renew is clamped to a day
MAX_PULL_TIMEOUT = 60.0  # s: a PullMessages Timeout above this is clamped (cameras advertise ~1 min)
MAX_MESSAGE_LIMIT = 1_000  # messages: the most one PullMessages answer carries
QUEUE_MAX = 1_000  # messages queued per subscription; the oldest are dropped beyond (and counted)
EXPIRY_TICK = 0.05  # s: how often expired subscriptions are removed (expiry is this late at most)
SHUTDOWN_GRACE = 0.5  # s: in-flight answers get this long when the camera reboots or stops
MAX_DOWNTIME = 120.0  # s: the longest reboot the controls accept
MAX_DELAY = 60.0  # s: the slowest answer the controls accept (longer only tests the client's patience)
MAX_SKEW = 10 * 365 * 86_400.0  # s: ten years either way covers any battery-less RTC
MJPEG_INTERVAL = 0.1  # s between MJPEG frames: 10 fps, enough for motion checks, cheap to encode
MJPEG_MAX_SECONDS = 600.0  # s: an MJPEG stream ends after this (no connection lives forever)
BLOCKED_GREY = 128  # the lens-covered picture's level (uniform grey, low variance)
SENSOR_NOISE = 2.0  # grey levels (std dev) of a still scene: live (never byte-identical), no motion
DEFOCUS_SIGMA = 6.0  # px: the blur of a defocused lens (Laplacian variance falls by >95 %)

PREAUTH = frozenset({"GetSystemDateAndTime"})
PICTURE_MODES = ("normal", "still", "black", "frozen", "blocked", "defocused")
HOSTILE_MODES = ("xxe", "billion_laughs")
STATE_STYLES = {"true": ("true", "false"), "1": ("1", "0"), "active": ("active", "inactive")}
PictureMode = Literal["normal", "still", "black", "frozen", "blocked", "defocused"]
HostileMode = Literal["xxe", "billion_laughs"]
StateStyle = Literal["true", "1", "active"]

# (profile token, name, encoder token, width, height)
PROFILES = (
    ("prof1", "MainStream", "vec1", 640, 360),
    ("prof2", "SubStream", "vec2", 320, 180),
)
VIDEO_SOURCE = "vs1"
VIDEO_SOURCE_CONFIG = "vsc1"
REALM = "campus-sim"

_DURATION = re.compile(
    r"^P(?:(?P<y>\d+)Y)?(?:(?P<mo>\d+)M)?(?:(?P<d>\d+)D)?"
    r"(?:T(?:(?P<h>\d+)H)?(?:(?P<mi>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_AUTH_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))')
_TOPIC = re.compile(r"^[A-Za-z_][\w.-]*:[\w.-]+(?:/[\w.-]+)*$")


class _SoapFault(Exception):
    """An answer as a SOAP 1.2 fault: code (Sender / Receiver), subcodes (ter:...), reason."""

    def __init__(self, code: str, subcodes: tuple[str, ...], reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.subcodes = subcodes
        self.reason = reason


class _Dropped(Exception):
    """The camera rebooted or stopped while a request was waiting: no answer, the connection dies."""


@dataclass
class _Subscription:
    sid: str
    termination: dt.datetime  # on the camera's clock
    lifetime: dt.timedelta  # as last asked for (what a pull extends by, with pull_extends)
    queue: deque[str] = field(default_factory=lambda: deque(maxlen=QUEUE_MAX))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped_messages: int = 0
    gone: bool = False


@dataclass
class _Counters:
    created: int = 0
    unsubscribed: int = 0
    expired: int = 0
    dropped: int = 0  # by a reboot
    refused: int = 0  # over the subscription limit
    renewed: int = 0
    renew_refused: int = 0
    emitted: int = 0
    soap_auth_failures: int = 0
    http_auth_failures: int = 0
    snapshots: int = 0
    reboots: int = 0
    requests: Counter[str] = field(default_factory=Counter)


class OnvifCameraSimulator:
    """One ONVIF camera: device, media and event services, snapshots, an MJPEG stream."""

    def __init__(  # noqa: PLR0915 - one flat keyword-only constructor, checked field by field
        self,
        *,
        port: int = 0,
        control_port: int | None = None,
        host: str = "127.0.0.1",
        user: str = "admin",
        password: str = "admin",  # noqa: S107 - a simulator's factory default, loopback only
        profiles: int = 2,
        get_services: bool = True,
        max_subscriptions: int = 10,
        default_subscription_seconds: float = DEFAULT_SUBSCRIPTION,
        auth_window: float = AUTH_WINDOW,
        allow_password_text: bool = True,
        snapshot_auth: Literal["digest", "none"] = "digest",
        state_style: StateStyle = "true",
        pull_extends: bool = False,
        manufacturer: str = "CampusSim",
        model: str = "SimCam 1",
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host}: the simulator listens on loopback only")
        if profiles not in (1, 2):
            raise ValueError("profiles must be 1 or 2")
        if not 1 <= max_subscriptions <= 1000:
            raise ValueError("max_subscriptions must be 1..1000")
        if not 1 <= default_subscription_seconds <= MAX_SUBSCRIPTION:
            raise ValueError(f"default_subscription_seconds must be 1..{MAX_SUBSCRIPTION:.0f}")
        if not 1 <= auth_window <= 86_400:
            raise ValueError("auth_window must be 1..86400 seconds")
        if snapshot_auth not in ("digest", "none"):
            raise ValueError("snapshot_auth must be 'digest' or 'none'")
        _check_state_style(state_style)
        if not user or not password:
            raise ValueError("user and password must not be empty")
        self.host = host
        self.user = user
        self.password = password
        self.profiles = PROFILES[:profiles]
        self.default_subscription_seconds = default_subscription_seconds
        self.auth_window = auth_window
        self.allow_password_text = allow_password_text
        self.snapshot_auth = snapshot_auth
        self.state_style: StateStyle = state_style
        self.pull_extends = pull_extends
        self.manufacturer = manufacturer
        self.model = model
        self.serial = f"SIM{secrets.token_hex(4).upper()}"
        self._port = port
        self._control_port = control_port
        self._max_subscriptions = max_subscriptions
        self._skew = 0.0
        self._delay = 0.0
        self._picture: PictureMode = "normal"
        self._hostile: HostileMode | None = None
        self._malformed_faults = False
        self._renew_refused = False
        self._failing: set[str] = set() if get_services else {"GetServices"}
        self._subs: dict[str, _Subscription] = {}
        # (topic, source) -> (topic, source, data, state style, namespace declarations)
        self._properties: dict[tuple[str, str], tuple[str, dict[str, Any], dict[str, Any], str, str]] = {}
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._digest_nonces: OrderedDict[str, float] = OrderedDict()
        self._counters = _Counters()
        self._inflight: set[asyncio.BaseTransport] = set()  # connections with a request being answered
        self._frames = _FrameSource()
        self._runner: web.AppRunner | None = None
        self._control_runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._boot: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._running = False
        self._ops: dict[tuple[str, str], Callable[[etree._Element, str | None], Awaitable[str]]] = {
            ("device", "GetServices"): self._get_services,
            ("device", "GetCapabilities"): self._get_capabilities,
            ("device", "GetSystemDateAndTime"): self._get_system_date_and_time,
            ("device", "GetDeviceInformation"): self._get_device_information,
            ("media", "GetProfiles"): self._get_profiles,
            ("media", "GetStreamUri"): self._get_stream_uri,
            ("media", "GetSnapshotUri"): self._get_snapshot_uri,
            ("events", "CreatePullPointSubscription"): self._create_pull_point,
            ("events", "GetEventProperties"): self._get_event_properties,
            ("events", "GetServiceCapabilities"): self._get_event_capabilities,
            ("subscription", "PullMessages"): self._pull_messages,
            ("subscription", "Renew"): self._renew,
            ("subscription", "Unsubscribe"): self._unsubscribe,
            ("subscription", "SetSynchronizationPoint"): self._set_synchronization_point,
        }

    # ---- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _start(self) -> None:
        self._running = True
        await self._listen()
        self._reaper = asyncio.create_task(self._run_reaper(), name="onvif subscription reaper")
        if self._control_port is not None:
            self._control_runner = web.AppRunner(self._control_app(), access_log=None)
            await self._control_runner.setup()
            await web.TCPSite(self._control_runner, self.host, self._control_port).start()

    async def _stop(self) -> None:
        self._running = False
        if self._control_runner is not None:
            await self._control_runner.cleanup()
            self._control_runner = None
        tasks = [t for t in (self._boot, self._reaper) if t is not None]
        self._boot = self._reaper = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._drop_subscriptions(count=False)
        await self._go_down()

    async def _listen(self) -> None:
        runner = web.AppRunner(self._onvif_app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])  # a reboot comes back on the same port
        self._up.set()

    async def _go_down(self) -> None:
        """Close the port and every connection; waiting requests die without an answer."""
        self._up.clear()
        for transport in list(self._inflight):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ---- where things are --------------------------------------------------------------

    @property
    def port(self) -> int:
        """The ONVIF / HTTP port (kept across reboots)."""
        return self._port

    @property
    def control_port(self) -> int | None:
        if self._control_runner is None:
            return None
        return int(self._control_runner.addresses[0][1])

    @property
    def is_up(self) -> bool:
        """False while rebooting."""
        return self._up.is_set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def device_url(self) -> str:
        return f"{self.base_url}/onvif/device_service"

    def snapshot_url(self, profile: str = "prof1") -> str:
        return f"{self.base_url}/snapshot/{profile}.jpg"

    def mjpeg_url(self, profile: str = "prof1") -> str:
        return f"{self.base_url}/mjpeg/{profile}"

    def subscription_url(self, sid: str) -> str:
        return f"{self.base_url}/onvif/subscription/{sid}"

    def clock(self) -> dt.datetime:
        """The camera's clock (UTC, aware): the host's plus the skew."""
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._skew)

    def subscriptions(self) -> list[str]:
        """Ids of the live subscriptions (the last segment of their addresses)."""
        return list(self._subs)

    def counters(self) -> dict[str, Any]:
        """What happened, for tests: subscriptions, requests per operation, auth failures."""
        c = self._counters
        return {
            "subscriptions": {
                "active": len(self._subs),
                "created": c.created,
                "unsubscribed": c.unsubscribed,
                "expired": c.expired,
                "dropped": c.dropped,
                "refused": c.refused,
                "renewed": c.renewed,
                "renew_refused": c.renew_refused,
                "messages_dropped": sum(s.dropped_messages for s in self._subs.values()),
            },
            "requests": dict(c.requests),
            "auth_failures": {"soap": c.soap_auth_failures, "http": c.http_auth_failures},
            "emitted": c.emitted,
            "snapshots": c.snapshots,
            "reboots": c.reboots,
        }

    def state(self) -> dict[str, Any]:
        """The settings in force and the counters."""
        return {
            "port": self._port,
            "up": self.is_up,
            "clock": _xml_time(self.clock()),
            "skew": self._skew,
            "delay": self._delay,
            "picture": self._picture,
            "hostile": self._hostile,
            "malformed_faults": self._malformed_faults,
            "renew_refused": self._renew_refused,
            "max_subscriptions": self._max_subscriptions,
            "failing": sorted(self._failing),
            "state_style": self.state_style,
            "counters": self.counters(),
        }

    # ---- the scene and the faults ------------------------------------------------------

    async def emit(
        self,
        topic: str,
        data: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        *,
        state_style: StateStyle | None = None,
        property_operation: Literal["Changed", "Initialized", "Deleted"] | None = "Changed",
        namespaces: Mapping[str, str] | None = None,
    ) -> int:
        """Queue one notification on every live subscription; returns how many got it.

        ``data`` / ``source`` become ``tt:SimpleItem`` elements in that order (booleans in
        ``state_style``: "true"/"false", "1"/"0" or "active"/"inactive"); ``source``
        defaults to ``{"VideoSourceConfigurationToken": "vsc1"}``. A ``property_operation``
        (None: no attribute, an event rather than a property) makes the message the
        property's current state, re-sent as Initialized to new subscriptions and on
        SetSynchronizationPoint. ``namespaces`` declares a topic prefix not in
        TOPIC_NAMESPACES.
        """
        if not _TOPIC.match(topic):
            raise ValueError(f"topic {topic!r}: like 'tns1:VideoSource/MotionAlarm'")
        prefix = topic.split(":", 1)[0]
        extra = dict(namespaces or {})
        if prefix not in TOPIC_NAMESPACES and prefix not in extra:
            known = ", ".join(TOPIC_NAMESPACES)
            raise ValueError(f"topic prefix {prefix!r}: one of {known} or declared in namespaces")
        style = self.state_style if state_style is None else state_style
        _check_state_style(style)
        if property_operation not in (None, "Changed", "Initialized", "Deleted"):
            raise ValueError("property_operation: 'Changed', 'Initialized', 'Deleted' or None")
        data = dict({"State": True} if data is None else data)
        source = dict({"VideoSourceConfigurationToken": VIDEO_SOURCE_CONFIG} if source is None else source)
        for what, items in (("data", data), ("source", source)):
            for name in items:
                if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
                    raise ValueError(f"{what} item name {name!r} is not an XML name")
        ns_decl = "".join(f" xmlns:{p}={quoteattr(u)}" for p, u in extra.items())
        if property_operation is not None:
            key = (topic, repr(sorted((k, str(v)) for k, v in source.items())))
            self._properties[key] = (topic, source, data, style, ns_decl)
        message = self._message(
            topic, source=source, data=data, style=style, operation=property_operation, ns_decl=ns_decl
        )
        self._counters.emitted += 1
        for sub in self._subs.values():
            _enqueue(sub, message)
        return len(self._subs)

    async def reboot(self, downtime: float = 1.5, *, wait: bool = False) -> None:
        """Drop every subscription and go away for ``downtime`` seconds (connections refused,
        open connections cut). Returns once the camera is down (``wait``: once it is back)."""
        if not 0 <= downtime <= MAX_DOWNTIME:
            raise ValueError(f"downtime must be 0..{MAX_DOWNTIME:.0f} seconds")
        if not self._running:
            raise RuntimeError("simulator not running")
        if self._boot is not None and not self._boot.done():
            raise ValueError("already rebooting")
        self._counters.reboots += 1
        self._drop_subscriptions(count=True)
        self._properties.clear()
        self._nonces.clear()
        self._digest_nonces.clear()
        await self._go_down()
        self._boot = asyncio.create_task(self._come_back(downtime), name="onvif camera boot")
        if wait:
            await asyncio.shield(self._boot)

    async def wait_up(self, timeout: float = 10.0) -> None:
        """Wait until the camera answers again after a reboot."""
        await asyncio.wait_for(self._up.wait(), timeout)

    async def set_clock_skew(self, seconds: float) -> None:
        """The camera's clock runs ``seconds`` ahead of the host's (negative: behind)."""
        _check_number(seconds, "skew", -MAX_SKEW, MAX_SKEW)
        self._skew = float(seconds)

    async def set_delay(self, seconds: float) -> None:
        """Every SOAP answer and snapshot comes ``seconds`` late."""
        _check_number(seconds, "delay", 0, MAX_DELAY)
        self._delay = float(seconds)

    async def set_picture(self, mode: PictureMode) -> None:
        """normal (a moving test pattern: motion in every frame), still (a textured scene with
        sensor noise: live, no motion), black, frozen (the same bytes each time), blocked
        (uniform grey with a little noise: the lens covered) or defocused (the still scene
        blurred)."""
        if mode not in PICTURE_MODES:
            raise ValueError(f"picture mode {mode!r}: one of {', '.join(PICTURE_MODES)}")
        self._frames.set_mode(mode)
        self._picture = mode

    async def refuse_renew(self, on: bool = True) -> None:
        """Renew answers a Receiver fault (the subscription itself stays until it expires)."""
        self._renew_refused = bool(on)

    async def set_max_subscriptions(self, limit: int) -> None:
        """Concurrent subscriptions allowed; CreatePullPointSubscription beyond answers a fault.
        Lowering it does not end subscriptions already there."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError("limit must be an integer 1..1000")
        self._max_subscriptions = limit

    async def set_hostile(self, mode: HostileMode | None) -> None:
        """Answer every SOAP request with an XXE or billion-laughs document (None: stop)."""
        if mode is not None and mode not in HOSTILE_MODES:
            raise ValueError(f"hostile mode {mode!r}: one of {', '.join(HOSTILE_MODES)} or null")
        self._hostile = mode

    async def set_malformed_faults(self, on: bool = True) -> None:
        """Faults carry a subcode whose prefix is declared nowhere (as some firmware sends)."""
        self._malformed_faults = bool(on)

    async def fail_operation(self, operation: str, on: bool = True) -> None:
        """``operation`` (e.g. GetServices, PullMessages) answers a ``ter:ActionNotSupported``
        Receiver fault instead of its answer (after authentication)."""
        if not re.fullmatch(r"[A-Za-z]+", operation or ""):
            raise ValueError(f"operation {operation!r} is not an operation name")
        if on:
            self._failing.add(operation)
        else:
            self._failing.discard(operation)

    # ---- internals: subscriptions ------------------------------------------------------

    def _drop_subscriptions(self, *, count: bool) -> None:
        for sub in self._subs.values():
            sub.gone = True
            sub.wake.set()
        if count:
            self._counters.dropped += len(self._subs)
        self._subs.clear()

    async def _come_back(self, downtime: float) -> None:
        await asyncio.sleep(downtime)
        await self._listen()

    async def _run_reaper(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_TICK)
            now = self.clock()
            for sid, sub in list(self._subs.items()):
                if sub.termination <= now:
                    sub.gone = True
                    sub.wake.set()
                    del self._subs[sid]
                    self._counters.expired += 1

    def _subscription(self, sid: str | None) -> _Subscription:
        sub = self._subs.get(sid or "")
        if sub is None or sub.termination <= self.clock():
            raise _SoapFault("Sender", ("ter:InvalidArgVal",), f"no such subscription: {sid}")
        return sub

    def _message(
        self,
        topic: str,
        *,
        source: Mapping[str, Any],
        data: Mapping[str, Any],
        style: str,
        operation: str | None,
        ns_decl: str,
    ) -> str:
        def items(values: Mapping[str, Any]) -> str:
            return "".join(
                f"<tt:SimpleItem Name={quoteattr(k)} Value={quoteattr(_value(v, style))}/>"
                for k, v in values.items()
            )

        op = f" PropertyOperation={quoteattr(operation)}" if operation else ""
        return (
            f"<wsnt:NotificationMessage{ns_decl}>"
            f"<wsnt:Topic Dialect={quoteattr(TOPIC_DIALECT)}>{escape(topic)}</wsnt:Topic>"
            f"<wsnt:ProducerReference><wsa:Address>{escape(self.base_url)}/onvif/events_service"
            "</wsa:Address></wsnt:ProducerReference>"
            f'<wsnt:Message><tt:Message UtcTime="{_xml_time(self.clock())}"{op}>'
            f"<tt:Source>{items(source)}</tt:Source><tt:Data>{items(data)}</tt:Data>"
            "</tt:Message></wsnt:Message></wsnt:NotificationMessage>"
        )

    def _initialized(self) -> list[str]:
        """The last message of every property, as Initialized."""
        out = []
        for topic, source, data, style, ns_decl in self._properties.values():
            out.append(
                self._message(
                    topic, source=source, data=data, style=style, operation="Initialized", ns_decl=ns_decl
                )
            )
        return out

    def _lifetime(self, element: etree._Element | None, *, default: float | None) -> dt.datetime:
        """A termination time on the camera clock from a relative (PT60S) or absolute time."""
        now = self.clock()
        text = (element.text or "").strip() if element is not None else ""
        nil = element is not None and element.get("{http://www.w3.org/2001/XMLSchema-instance}nil") == "true"
        if not text or nil:
            if default is None:
                raise _SoapFault("Sender", ("wsnt:UnacceptableTerminationTimeFault",), "no termination time")
            return now + dt.timedelta(seconds=default)
        if text.startswith("P"):
            seconds = _duration(text)
            if seconds is None:
                raise _SoapFault("Sender", ("ter:InvalidArgVal",), f"bad duration {text!r}")
            end = now + dt.timedelta(seconds=seconds)
        else:
            try:
                end = dt.datetime.fromisoformat(text)
            except ValueError:
                raise _SoapFault("Sender", ("ter:InvalidArgVal",), f"bad time {text!r}") from None
            if end.tzinfo is None:
                end = end.replace(tzinfo=dt.UTC)
        if end <= now:
            raise _SoapFault(
                "Sender", ("wsnt:UnacceptableTerminationTimeFault",), f"termination time {text} is past"
            )
        return min(end, now + dt.timedelta(seconds=MAX_SUBSCRIPTION))

    # ---- internals: SOAP ---------------------------------------------------------------

    def _onvif_app(self) -> web.Application:
        app = web.Application()
        for kind in ("device", "media", "events"):
            app.router.add_post(f"/onvif/{kind}_service", self._soap_handler(kind))
        app.router.add_post("/onvif/subscription/{sid}", self._soap_handler("subscription"))
        app.router.add_get("/snapshot/{profile}.jpg", self._http_snapshot)
        app.router.add_get("/mjpeg/{profile}", self._http_mjpeg)
        return app

    def _soap_handler(self, kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            transport = request.transport
            if transport is not None:
                self._inflight.add(transport)
            try:
                return await self._soap(kind, request)
            except _Dropped:
                if request.transport is not None:
                    request.transport.abort()
                raise web.HTTPServiceUnavailable from None  # written nowhere: the connection is gone
            finally:
                if transport is not None:
                    self._inflight.discard(transport)

        return handle

    async def _soap(self, kind: str, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self._delay:
            await asyncio.sleep(self._delay)
        try:
            answer = await self._dispatch(kind, body, request.match_info.get("sid"))
        except _SoapFault as fault:
            return self._fault_response(fault)
        if isinstance(answer, bytes):  # a hostile document, sent as it is
            return web.Response(body=answer, headers={"Content-Type": SOAP_CONTENT_TYPE})
        return web.Response(
            body=f"<?xml version='1.0' encoding='utf-8'?><env:Envelope {_NSDECL}><env:Body>{answer}"
            "</env:Body></env:Envelope>",
            headers={"Content-Type": SOAP_CONTENT_TYPE},
        )

    async def _dispatch(self, kind: str, body: bytes, sid: str | None) -> str | bytes:
        """The answer's Body content (or a whole hostile document); raises _SoapFault."""
        envelope = _parse_request(body)
        op_element = envelope.find(f"{{{NS_ENV}}}Body/*")
        if op_element is None:
            raise _SoapFault("Sender", ("ter:InvalidArgVal",), "empty Body")
        op = str(etree.QName(op_element).localname)
        self._counters.requests[op] += 1
        if self._hostile is not None:
            return _HOSTILE[self._hostile]
        if op not in PREAUTH:
            self._authenticate(envelope)
        handler = self._ops.get((kind, op))
        if handler is None:
            raise _SoapFault("Receiver", ("ter:ActionNotSupported",), f"{op} is not supported here")
        if op in self._failing:
            raise _SoapFault("Receiver", ("ter:ActionNotSupported",), f"{op} fails (injected)")
        return await handler(op_element, sid)

    def _fault_response(self, fault: _SoapFault) -> web.Response:
        if self._malformed_faults:
            # Only env is declared; the subcode's "ter2" prefix is declared nowhere.
            decl = f"xmlns:env={quoteattr(NS_ENV)}"
            subcodes = "<env:Subcode><env:Value>ter2:InvalidArgs</env:Value></env:Subcode>"
        else:
            decl = _NSDECL
            subcodes = ""
            for sub in reversed(fault.subcodes):
                subcodes = f"<env:Subcode><env:Value>{sub}</env:Value>{subcodes}</env:Subcode>"
        body = (
            f"<?xml version='1.0' encoding='utf-8'?><env:Envelope {decl}><env:Body><env:Fault>"
            f"<env:Code><env:Value>env:{fault.code}</env:Value>{subcodes}</env:Code>"
            f'<env:Reason><env:Text xml:lang="en">{escape(fault.reason)}</env:Text></env:Reason>'
            "</env:Fault></env:Body></env:Envelope>"
        )
        status = 400 if fault.code == "Sender" else 500  # SOAP 1.2 HTTP binding
        return web.Response(status=status, body=body, headers={"Content-Type": SOAP_CONTENT_TYPE})

    def _authenticate(self, envelope: etree._Element) -> None:
        try:
            self._check_token(envelope)
        except _SoapFault:
            self._counters.soap_auth_failures += 1
            raise

    def _check_token(self, envelope: etree._Element) -> None:
        token = envelope.find(f"{{{NS_ENV}}}Header/{{{NS_WSSE}}}Security/{{{NS_WSSE}}}UsernameToken")
        if token is None:
            raise _not_authorized("no WS-Security UsernameToken")
        username = token.findtext(f"{{{NS_WSSE}}}Username") or ""
        password_el = token.find(f"{{{NS_WSSE}}}Password")
        if password_el is None:
            raise _not_authorized("no password")
        password = password_el.text or ""
        kind = password_el.get("Type", PASSWORD_TEXT)
        if kind == PASSWORD_TEXT:
            if not self.allow_password_text:
                raise _not_authorized("PasswordText not accepted")
            if not (_same(username, self.user) & _same(password, self.password)):
                raise _not_authorized("wrong user or password")
            return
        if kind != PASSWORD_DIGEST:
            raise _not_authorized(f"password type {kind!r}")
        self._check_digest(token, username, password)

    def _check_digest(self, token: etree._Element, username: str, password: str) -> None:
        nonce_text = (token.findtext(f"{{{NS_WSSE}}}Nonce") or "").strip()
        created = (token.findtext(f"{{{NS_WSU}}}Created") or "").strip()
        try:
            nonce = base64.b64decode(nonce_text, validate=True)
            created_at = dt.datetime.fromisoformat(created)
        except ValueError:
            raise _not_authorized("bad Nonce or Created") from None
        if not nonce:
            raise _not_authorized("empty Nonce")
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=dt.UTC)
        off = (created_at - self.clock()).total_seconds()
        if abs(off) > self.auth_window:
            raise _not_authorized(f"Created is {off:+.0f} s off the camera clock")
        expected = base64.b64encode(
            hashlib.sha1(nonce + created.encode() + self.password.encode()).digest()  # noqa: S324 - WS-Security's own
        ).decode()
        if not (_same(username, self.user) & _same(password, expected)):
            raise _not_authorized("wrong user or password")
        now = time.monotonic()
        while self._nonces and (
            len(self._nonces) >= NONCE_CACHE_MAX or next(iter(self._nonces.values())) < now
        ):
            self._nonces.popitem(last=False)
        if nonce_text in self._nonces:
            raise _not_authorized("Nonce replayed")
        self._nonces[nonce_text] = now + 2 * self.auth_window

    # ---- operations ------------------------------------------------------------------

    async def _get_services(self, _el: etree._Element, _sid: str | None) -> str:
        services = "".join(
            f"<tds:Service><tds:Namespace>{ns}</tds:Namespace><tds:XAddr>{self.base_url}/onvif/{kind}_service"
            f"</tds:XAddr><tds:Version><tt:Major>{major}</tt:Major><tt:Minor>{minor}</tt:Minor>"
            "</tds:Version></tds:Service>"
            for ns, kind, major, minor in (
                (NS_DEVICE, "device", 2, 60),
                (NS_MEDIA, "media", 2, 60),
                (NS_EVENTS, "events", 2, 60),
            )
        )
        return f"<tds:GetServicesResponse>{services}</tds:GetServicesResponse>"

    async def _get_capabilities(self, _el: etree._Element, _sid: str | None) -> str:
        base = self.base_url
        return (
            "<tds:GetCapabilitiesResponse><tds:Capabilities>"
            f"<tt:Device><tt:XAddr>{base}/onvif/device_service</tt:XAddr></tt:Device>"
            f"<tt:Events><tt:XAddr>{base}/onvif/events_service</tt:XAddr>"
            "<tt:WSSubscriptionPolicySupport>false</tt:WSSubscriptionPolicySupport>"
            "<tt:WSPullPointSupport>true</tt:WSPullPointSupport>"
            "<tt:WSPausableSubscriptionManagerInterfaceSupport>false"
            "</tt:WSPausableSubscriptionManagerInterfaceSupport></tt:Events>"
            f"<tt:Media><tt:XAddr>{base}/onvif/media_service</tt:XAddr><tt:StreamingCapabilities>"
            "<tt:RTPMulticast>false</tt:RTPMulticast><tt:RTP_TCP>true</tt:RTP_TCP>"
            "<tt:RTP_RTSP_TCP>true</tt:RTP_RTSP_TCP></tt:StreamingCapabilities></tt:Media>"
            "</tds:Capabilities></tds:GetCapabilitiesResponse>"
        )

    async def _get_system_date_and_time(self, _el: etree._Element, _sid: str | None) -> str:
        now = self.clock()
        date_time = (
            f"<tt:Time><tt:Hour>{now.hour}</tt:Hour><tt:Minute>{now.minute}</tt:Minute>"
            f"<tt:Second>{now.second}</tt:Second></tt:Time><tt:Date><tt:Year>{now.year}</tt:Year>"
            f"<tt:Month>{now.month}</tt:Month><tt:Day>{now.day}</tt:Day></tt:Date>"
        )
        return (
            "<tds:GetSystemDateAndTimeResponse><tds:SystemDateAndTime>"
            "<tt:DateTimeType>Manual</tt:DateTimeType><tt:DaylightSavings>false</tt:DaylightSavings>"
            "<tt:TimeZone><tt:TZ>UTC0</tt:TZ></tt:TimeZone>"
            f"<tt:UTCDateTime>{date_time}</tt:UTCDateTime><tt:LocalDateTime>{date_time}</tt:LocalDateTime>"
            "</tds:SystemDateAndTime></tds:GetSystemDateAndTimeResponse>"
        )

    async def _get_device_information(self, _el: etree._Element, _sid: str | None) -> str:
        return (
            f"<tds:GetDeviceInformationResponse><tds:Manufacturer>{escape(self.manufacturer)}"
            f"</tds:Manufacturer><tds:Model>{escape(self.model)}</tds:Model>"
            "<tds:FirmwareVersion>1.0.0-sim</tds:FirmwareVersion>"
            f"<tds:SerialNumber>{self.serial}</tds:SerialNumber><tds:HardwareId>sim-1</tds:HardwareId>"
            "</tds:GetDeviceInformationResponse>"
        )

    async def _get_profiles(self, _el: etree._Element, _sid: str | None) -> str:
        profiles = "".join(
            f'<trt:Profiles token="{token}" fixed="true"><tt:Name>{name}</tt:Name>'
            f'<tt:VideoSourceConfiguration token="{VIDEO_SOURCE_CONFIG}"><tt:Name>VideoSource</tt:Name>'
            f"<tt:UseCount>{len(self.profiles)}</tt:UseCount><tt:SourceToken>{VIDEO_SOURCE}</tt:SourceToken>"
            f'<tt:Bounds x="0" y="0" width="{PROFILES[0][3]}" height="{PROFILES[0][4]}"/>'
            "</tt:VideoSourceConfiguration>"
            f'<tt:VideoEncoderConfiguration token="{encoder}"><tt:Name>{name}</tt:Name>'
            "<tt:UseCount>1</tt:UseCount><tt:Encoding>JPEG</tt:Encoding>"
            f"<tt:Resolution><tt:Width>{width}</tt:Width><tt:Height>{height}</tt:Height></tt:Resolution>"
            "<tt:Quality>5</tt:Quality><tt:RateControl><tt:FrameRateLimit>10</tt:FrameRateLimit>"
            "<tt:EncodingInterval>1</tt:EncodingInterval><tt:BitrateLimit>4096</tt:BitrateLimit>"
            "</tt:RateControl><tt:SessionTimeout>PT60S</tt:SessionTimeout></tt:VideoEncoderConfiguration>"
            "</trt:Profiles>"
            for token, name, encoder, width, height in self.profiles
        )
        return f"<trt:GetProfilesResponse>{profiles}</trt:GetProfilesResponse>"

    def _profile_token(self, el: etree._Element) -> str:
        token = (el.findtext(f"{{{NS_MEDIA}}}ProfileToken") or "").strip()
        if token not in {p[0] for p in self.profiles}:
            raise _SoapFault("Sender", ("ter:InvalidArgVal", "ter:NoProfile"), f"no profile {token!r}")
        return token

    async def _get_stream_uri(self, el: etree._Element, _sid: str | None) -> str:
        uri = self.mjpeg_url(self._profile_token(el))
        return f"<trt:GetStreamUriResponse>{_media_uri(uri)}</trt:GetStreamUriResponse>"

    async def _get_snapshot_uri(self, el: etree._Element, _sid: str | None) -> str:
        uri = self.snapshot_url(self._profile_token(el))
        return f"<trt:GetSnapshotUriResponse>{_media_uri(uri)}</trt:GetSnapshotUriResponse>"

    async def _get_event_properties(self, _el: etree._Element, _sid: str | None) -> str:
        return (
            "<tev:GetEventPropertiesResponse>"
            "<tev:TopicNamespaceLocation>http://www.onvif.org/onvif/ver10/topics/topicns.xml"
            "</tev:TopicNamespaceLocation><wsnt:FixedTopicSet>true</wsnt:FixedTopicSet>"
            "<wstop:TopicSet/>"
            f"<wsnt:TopicExpressionDialect>{TOPIC_DIALECT}</wsnt:TopicExpressionDialect>"
            "<tev:MessageContentFilterDialect>http://www.onvif.org/ver10/tev/messageContentFilter/ItemFilter"
            "</tev:MessageContentFilterDialect>"
            "<tev:MessageContentSchemaLocation>http://www.onvif.org/onvif/ver10/schema/onvif.xsd"
            "</tev:MessageContentSchemaLocation></tev:GetEventPropertiesResponse>"
        )

    async def _get_event_capabilities(self, _el: etree._Element, _sid: str | None) -> str:
        return (
            '<tev:GetServiceCapabilitiesResponse><tev:Capabilities WSSubscriptionPolicySupport="false" '
            'WSPausableSubscriptionManagerInterfaceSupport="false" '
            f'MaxNotificationProducers="0" MaxPullPoints="{self._max_subscriptions}" '
            'PersistentNotificationStorage="false"/></tev:GetServiceCapabilitiesResponse>'
        )

    async def _create_pull_point(self, el: etree._Element, _sid: str | None) -> str:
        if len(self._subs) >= self._max_subscriptions:
            self._counters.refused += 1
            raise _SoapFault(
                "Receiver",
                ("ter:Action", "ter:TooManySubscriptions"),
                f"too many subscriptions (limit {self._max_subscriptions})",
            )
        termination = self._lifetime(
            el.find(f"{{{NS_EVENTS}}}InitialTerminationTime"), default=self.default_subscription_seconds
        )
        sid = uuid.uuid4().hex
        sub = _Subscription(sid, termination, termination - self.clock())
        for message in self._initialized():
            _enqueue(sub, message)
        self._subs[sid] = sub
        self._counters.created += 1
        return (
            "<tev:CreatePullPointSubscriptionResponse><tev:SubscriptionReference>"
            f"<wsa:Address>{self.subscription_url(sid)}</wsa:Address></tev:SubscriptionReference>"
            f"<wsnt:CurrentTime>{_xml_time(self.clock())}</wsnt:CurrentTime>"
            f"<wsnt:TerminationTime>{_xml_time(termination)}</wsnt:TerminationTime>"
            "</tev:CreatePullPointSubscriptionResponse>"
        )

    async def _pull_messages(self, el: etree._Element, sid: str | None) -> str:
        sub = self._subscription(sid)
        timeout = _duration((el.findtext(f"{{{NS_EVENTS}}}Timeout") or "").strip())
        limit_text = (el.findtext(f"{{{NS_EVENTS}}}MessageLimit") or "").strip()
        if timeout is None or not limit_text.isdigit() or int(limit_text) < 1:
            raise _SoapFault("Sender", ("ter:InvalidArgVal",), "Timeout (a duration) and MessageLimit (>= 1)")
        limit = min(int(limit_text), MAX_MESSAGE_LIMIT)
        if self.pull_extends:
            sub.termination = max(sub.termination, self.clock() + sub.lifetime)
        if not sub.queue:
            sub.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.wake.wait(), min(timeout, MAX_PULL_TIMEOUT))
        if sub.gone and sid not in self._subs:
            if not self._up.is_set() or not self._running:
                raise _Dropped
            raise _SoapFault("Sender", ("ter:InvalidArgVal",), f"no such subscription: {sid}")
        messages = [sub.queue.popleft() for _ in range(min(limit, len(sub.queue)))]
        now = self.clock()
        return (
            f"<tev:PullMessagesResponse><tev:CurrentTime>{_xml_time(now)}</tev:CurrentTime>"
            f"<tev:TerminationTime>{_xml_time(sub.termination)}</tev:TerminationTime>"
            f"{''.join(messages)}</tev:PullMessagesResponse>"
        )

    async def _renew(self, el: etree._Element, sid: str | None) -> str:
        sub = self._subscription(sid)
        if self._renew_refused:
            self._counters.renew_refused += 1
            raise _SoapFault("Receiver", ("ter:Action",), "renew refused (injected)")
        sub.termination = self._lifetime(el.find(f"{{{NS_WSNT}}}TerminationTime"), default=None)
        sub.lifetime = sub.termination - self.clock()
        self._counters.renewed += 1
        return (
            f"<wsnt:RenewResponse><wsnt:TerminationTime>{_xml_time(sub.termination)}</wsnt:TerminationTime>"
            f"<wsnt:CurrentTime>{_xml_time(self.clock())}</wsnt:CurrentTime></wsnt:RenewResponse>"
        )

    async def _unsubscribe(self, _el: etree._Element, sid: str | None) -> str:
        sub = self._subscription(sid)
        sub.gone = True
        sub.wake.set()
        del self._subs[sub.sid]
        self._counters.unsubscribed += 1
        return "<wsnt:UnsubscribeResponse/>"

    async def _set_synchronization_point(self, _el: etree._Element, sid: str | None) -> str:
        sub = self._subscription(sid)
        for message in self._initialized():
            _enqueue(sub, message)
        return "<tev:SetSynchronizationPointResponse/>"

    # ---- internals: HTTP pictures ------------------------------------------------------

    def _digest_ok(self, request: web.Request) -> tuple[bool, bool]:
        """(authorised, stale nonce) for an RFC 7616 MD5 digest Authorization header."""
        if self.snapshot_auth == "none":
            return True, False
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("digest "):
            if header:
                self._counters.http_auth_failures += 1
            return False, False
        params = {m[1].lower(): m[2] if m[2] or not m[3] else m[3] for m in _AUTH_PARAM.finditer(header[7:])}
        nonce = params.get("nonce", "")
        issued = self._digest_nonces.get(nonce)
        if issued is None or time.monotonic() - issued > DIGEST_NONCE_LIFETIME:
            return False, issued is not None
        if params.get("algorithm", "MD5").upper() != "MD5" or params.get("uri") != request.path_qs:
            self._counters.http_auth_failures += 1
            return False, False
        ha1 = _md5(f"{self.user}:{REALM}:{self.password}")
        ha2 = _md5(f"{request.method}:{params['uri']}")
        qop = params.get("qop")
        if qop == "auth":
            expected = _md5(f"{ha1}:{nonce}:{params.get('nc', '')}:{params.get('cnonce', '')}:auth:{ha2}")
        else:
            expected = _md5(f"{ha1}:{nonce}:{ha2}")
        ok = _same(params.get("username", ""), self.user) & _same(params.get("response", ""), expected)
        if not ok:
            self._counters.http_auth_failures += 1
        return ok, False

    def _challenge(self, stale: bool) -> web.Response:
        nonce = secrets.token_hex(16)
        while len(self._digest_nonces) >= DIGEST_NONCES_MAX:
            self._digest_nonces.popitem(last=False)
        self._digest_nonces[nonce] = time.monotonic()
        challenge = (
            f'Digest realm="{REALM}", qop="auth", algorithm=MD5, nonce="{nonce}", '
            f'opaque="{secrets.token_hex(8)}"' + (", stale=true" if stale else "")
        )
        return web.Response(status=401, text="401 Unauthorized", headers={"WWW-Authenticate": challenge})

    def _picture_profile(self, request: web.Request) -> tuple[int, int]:
        token = request.match_info["profile"]
        for p_token, _name, _enc, width, height in self.profiles:
            if p_token == token:
                return width, height
        raise web.HTTPNotFound(text=f"no profile {token!r}")

    async def _http_snapshot(self, request: web.Request) -> web.StreamResponse:
        size = self._picture_profile(request)
        ok, stale = self._digest_ok(request)
        if not ok:
            return self._challenge(stale)
        if self._delay:
            await asyncio.sleep(self._delay)
        self._counters.snapshots += 1
        return web.Response(body=self._frames.jpeg(size), content_type="image/jpeg")

    async def _http_mjpeg(self, request: web.Request) -> web.StreamResponse:
        size = self._picture_profile(request)
        ok, stale = self._digest_ok(request)
        if not ok:
            return self._challenge(stale)
        response = web.StreamResponse(
            headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        transport = request.transport
        if transport is not None:
            self._inflight.add(transport)
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + MJPEG_MAX_SECONDS
            while loop.time() < end and self._up.is_set():
                jpeg = self._frames.jpeg(size)
                await response.write(
                    b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                    + str(len(jpeg)).encode()
                    + b"\r\n\r\n"
                    + jpeg
                    + b"\r\n"
                )
                await asyncio.sleep(MJPEG_INTERVAL)
        except ConnectionError:  # the viewer went away
            return response
        finally:
            if transport is not None:
                self._inflight.discard(transport)
        return response

    # ---- HTTP control API ------------------------------------------------------------

    def _control_app(self) -> web.Application:
        app = web.Application(middlewares=[bad_request])
        app.router.add_get("/state", self._http_state)
        app.router.add_post("/emit", self._http_emit)
        app.router.add_post("/reboot", self._http_reboot)
        app.router.add_post("/clock", self._http_clock)
        app.router.add_post("/delay", self._http_delay)
        app.router.add_post("/picture", self._http_picture)
        app.router.add_post("/renew", self._http_renew)
        app.router.add_post("/subscriptions/limit", self._http_limit)
        app.router.add_post("/hostile", self._http_hostile)
        app.router.add_post("/malformed-faults", self._http_malformed)
        app.router.add_post("/fail", self._http_fail)
        return app

    async def _http_state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _http_emit(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        topic = body.get("topic")
        if not isinstance(topic, str):
            raise ValueError("'topic' must be a string like 'tns1:VideoSource/MotionAlarm'")  # noqa: TRY004
        data, source, namespaces = body.get("data"), body.get("source"), body.get("namespaces")
        for key, value in (("data", data), ("source", source), ("namespaces", namespaces)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{key!r} must be an object")
        style = body.get("state_style")
        if style is not None:
            _check_state_style(style)
        operation = body.get("property_operation", "Changed")
        delivered = await self.emit(
            topic,
            data=data,
            source=source,
            state_style=style,
            property_operation=operation,
            namespaces=namespaces,
        )
        return web.json_response({"delivered": delivered})

    async def _http_reboot(self, request: web.Request) -> web.Response:
        downtime = (await json_body(request)).get("downtime", 1.5)
        _check_number(downtime, "downtime", 0, MAX_DOWNTIME)
        await self.reboot(float(downtime))
        return web.json_response(self.state())

    async def _http_clock(self, request: web.Request) -> web.Response:
        await self.set_clock_skew((await json_body(request)).get("skew"))  # type: ignore[arg-type]  # checked
        return web.json_response(self.state())

    async def _http_delay(self, request: web.Request) -> web.Response:
        await self.set_delay((await json_body(request)).get("seconds"))  # type: ignore[arg-type]  # checked
        return web.json_response(self.state())

    async def _http_picture(self, request: web.Request) -> web.Response:
        mode = (await json_body(request)).get("mode")
        if mode not in PICTURE_MODES:
            raise ValueError(f"'mode' must be one of {', '.join(PICTURE_MODES)}, not {mode!r}")
        await self.set_picture(mode)
        return web.json_response(self.state())

    async def _http_renew(self, request: web.Request) -> web.Response:
        await self.refuse_renew(body_bool(await json_body(request), "refuse"))
        return web.json_response(self.state())

    async def _http_limit(self, request: web.Request) -> web.Response:
        await self.set_max_subscriptions((await json_body(request)).get("limit"))  # type: ignore[arg-type]
        return web.json_response(self.state())

    async def _http_hostile(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if "mode" not in body:
            raise ValueError(f"'mode' must be one of {', '.join(HOSTILE_MODES)} or null")
        mode = body["mode"]
        if mode is not None and mode not in HOSTILE_MODES:
            raise ValueError(f"'mode' must be one of {', '.join(HOSTILE_MODES)} or null, not {mode!r}")
        await self.set_hostile(mode)
        return web.json_response(self.state())

    async def _http_malformed(self, request: web.Request) -> web.Response:
        await self.set_malformed_faults(body_bool(await json_body(request), "on"))
        return web.json_response(self.state())

    async def _http_fail(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        operation = body.get("operation")
        if not isinstance(operation, str):
            raise ValueError("'operation' must be an operation name like 'GetServices'")  # noqa: TRY004
        await self.fail_operation(operation, body.get("on", True) is True)
        return web.json_response(self.state())


# ---- pictures ----------------------------------------------------------------------------


class _FrameSource:
    """JPEG frames: a moving textured test pattern, a still scene, or a broken picture."""

    def __init__(self) -> None:
        self._mode: PictureMode = "normal"
        self._n = 0
        self._rng = np.random.default_rng(7)
        self._frozen: dict[tuple[int, int], bytes] = {}
        self._texture: dict[tuple[int, int], np.ndarray[Any, np.dtype[np.uint8]]] = {}

    def set_mode(self, mode: PictureMode) -> None:
        self._mode = mode
        self._frozen.clear()

    def jpeg(self, size: tuple[int, int]) -> bytes:
        if self._mode == "frozen":
            if size not in self._frozen:
                self._frozen[size] = _encode(self._pattern(size))
            return self._frozen[size]
        width, height = size
        if self._mode == "black":
            return _encode(np.zeros((height, width, 3), np.uint8))
        if self._mode == "blocked":
            noise = self._rng.normal(BLOCKED_GREY, 1.5, (height, width, 1))
            return _encode(np.repeat(np.clip(noise, 0, 255).astype(np.uint8), 3, axis=2))
        if self._mode in ("still", "defocused"):
            scene: np.ndarray[Any, Any] = self._scene(size)[:, :width].astype(np.float32)
            if self._mode == "defocused":
                scene = cv2.GaussianBlur(scene, (0, 0), DEFOCUS_SIGMA)
            noisy = scene + self._rng.normal(0, SENSOR_NOISE, scene.shape[:2])[:, :, None]
            return _encode(np.clip(noisy, 0, 255).astype(np.uint8))
        return _encode(self._pattern(size))

    def _scene(self, size: tuple[int, int]) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A textured scene twice as wide as the picture (the moving pattern pans over it)."""
        width, height = size
        if size not in self._texture:
            rng = np.random.default_rng(width * 10_000 + height)
            noise = cv2.GaussianBlur(rng.uniform(0, 120, (height, width * 2)).astype(np.float32), (0, 0), 1.2)
            ramp = np.linspace(40, 130, width * 2, dtype=np.float32)[None, :]
            grey = noise + ramp
            colour = np.stack([grey, grey + 20, grey + 40], axis=2)
            self._texture[size] = np.clip(colour, 0, 255).astype(np.uint8)
        return self._texture[size]

    def _pattern(self, size: tuple[int, int]) -> np.ndarray[Any, np.dtype[np.uint8]]:
        width, height = size
        scene = self._scene(size)
        self._n += 1
        shift = (self._n * 8) % width
        frame = np.ascontiguousarray(scene[:, shift : shift + width])
        x = (self._n * 12) % max(1, width - 60)
        cv2.rectangle(frame, (x, height // 3), (x + 50, height // 3 + 50), (240, 240, 255), -1)
        white = (255, 255, 255)
        cv2.putText(frame, f"{self._n:06d}", (8, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, white, 2)
        return frame


def _encode(frame: np.ndarray[Any, np.dtype[np.uint8]]) -> bytes:
    ok, buffer = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return bytes(buffer.tobytes())


# ---- hostile answers -------------------------------------------------------------------

_XXE = (
    "<?xml version='1.0' encoding='utf-8'?>\n"
    '<!DOCTYPE env:Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    f"<env:Envelope {_NSDECL}><env:Body><tds:GetDeviceInformationResponse>"
    "<tds:Manufacturer>&xxe;</tds:Manufacturer><tds:Model>&xxe;</tds:Model>"
    "<tds:FirmwareVersion>1</tds:FirmwareVersion><tds:SerialNumber>1</tds:SerialNumber>"
    "<tds:HardwareId>1</tds:HardwareId></tds:GetDeviceInformationResponse></env:Body></env:Envelope>"
).encode()
# lol1 is ten lol0, lol2 ten lol1 ...: &lol9; would expand to 10**9 "lol" (3 GB).
_LAUGHS = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
_BILLION_LAUGHS = (
    "<?xml version='1.0' encoding='utf-8'?>\n"
    f'<!DOCTYPE env:Envelope [<!ENTITY lol0 "lol">{_LAUGHS}]>\n'
    f"<env:Envelope {_NSDECL}><env:Body><tds:GetDeviceInformationResponse>"
    "<tds:Manufacturer>&lol9;</tds:Manufacturer><tds:Model>m</tds:Model>"
    "<tds:FirmwareVersion>1</tds:FirmwareVersion><tds:SerialNumber>1</tds:SerialNumber>"
    "<tds:HardwareId>1</tds:HardwareId></tds:GetDeviceInformationResponse></env:Body></env:Envelope>"
).encode()
_HOSTILE = {"xxe": _XXE, "billion_laughs": _BILLION_LAUGHS}


# ---- helpers -----------------------------------------------------------------------------

_REQUEST_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=True
)


def _parse_request(body: bytes) -> etree._Element:
    try:
        root = etree.fromstring(body, parser=_REQUEST_PARSER)
    except etree.XMLSyntaxError as exc:
        raise _SoapFault("Sender", ("ter:WellFormed",), f"not well-formed XML: {exc}") from None
    if root.getroottree().docinfo.doctype:
        raise _SoapFault("Sender", ("ter:WellFormed",), "a DTD is not accepted")
    if root.tag != f"{{{NS_ENV}}}Envelope":
        raise _SoapFault("Sender", ("ter:WellFormed",), "not a SOAP 1.2 Envelope")
    return root


def _not_authorized(reason: str) -> _SoapFault:
    return _SoapFault("Sender", ("ter:NotAuthorized",), f"Sender not authorized: {reason}")


def _enqueue(sub: _Subscription, message: str) -> None:
    if len(sub.queue) == sub.queue.maxlen:
        sub.dropped_messages += 1
    sub.queue.append(message)
    sub.wake.set()


def _media_uri(uri: str) -> str:
    return (
        f"<trt:MediaUri><tt:Uri>{escape(uri)}</tt:Uri><tt:InvalidAfterConnect>false</tt:InvalidAfterConnect>"
        "<tt:InvalidAfterReboot>false</tt:InvalidAfterReboot><tt:Timeout>PT0S</tt:Timeout></trt:MediaUri>"
    )


def _value(value: Any, style: str) -> str:
    if isinstance(value, bool):
        on, off = STATE_STYLES[style]
        return on if value else off
    return str(value)


def _xml_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(text: str) -> float | None:
    """Seconds in an xs:duration like PT600S or P1DT2H (a year 365 days, a month 30); None if bad."""
    m = _DURATION.match(text)
    if m is None or text in ("P", "PT") or text.endswith("T"):
        return None
    parts = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    days = parts["y"] * 365 + parts["mo"] * 30 + parts["d"]
    return days * 86_400 + parts["h"] * 3600 + parts["mi"] * 60 + parts["s"]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - HTTP digest's algorithm, not ours to choose


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _check_state_style(style: Any) -> None:
    if style not in STATE_STYLES:
        raise ValueError(f"state_style {style!r}: one of {', '.join(STATE_STYLES)}")


def _check_number(value: Any, name: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name!r} must be a number {low:g}..{high:g}")

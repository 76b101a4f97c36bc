"""The normalized event model (schema ``campus-event/1``), shared by drivers and the core.

Drivers produce :class:`Observation` values (what a device did, and when). The
core stamps each one into an :class:`Event` (id, per-gateway ``seq``, gateway and
school identity, ``received_at``), serialises it once, and from then on the same
bytes travel through the outbox and every retry, so consumers can dedupe on ``id``.
"""

from __future__ import annotations

import enum
import json
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

SCHEMA = "campus-event/1"


class Severity(enum.StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    INFO = "info"

    @property
    def rank(self) -> int:
        """Higher is more urgent; used by routing filters and outbox shedding."""
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.MINOR: 1, Severity.MAJOR: 2, Severity.CRITICAL: 3}


class EventState(enum.StrEnum):
    ACTIVE = "active"
    CLEARED = "cleared"


class DeviceKind(enum.StrEnum):
    ALARM_BOX = "alarm_box"
    BOLLARD = "bollard"
    CAMERA = "camera"
    GATEWAY = "gateway"


class ContactId(enum.IntEnum):
    """Ademco Contact ID event codes as 4 digits: qualifier (1 new / 3 restore) + 3-digit code."""

    MEDICAL = 1100
    FIRE = 1110
    PANIC = 1120
    PANIC_RESTORE = 3120
    DURESS = 1121
    BURGLARY = 1130
    BURGLARY_RESTORE = 3130
    TAMPER = 1137
    TAMPER_RESTORE = 3137
    FIRE_RESTORE = 3110
    GENERIC = 1140
    GENERIC_RESTORE = 3140
    COMM_TROUBLE = 1350
    COMM_RESTORE = 3350
    LINE_OPEN = 1371
    LINE_OPEN_RESTORE = 3371
    LINE_SHORT = 1372
    LINE_SHORT_RESTORE = 3372
    MANUAL_TEST = 1601  # a test report triggered by a person (campus-gateway test-alarm)


def restore_code(code: int) -> int:
    """The restore (qualifier 3) variant of a new-event (qualifier 1) Contact ID code."""
    return 3000 + code % 1000 if code // 1000 == 1 else code


@dataclass(frozen=True, slots=True)
class DeviceRef:
    id: str
    kind: DeviceKind
    name: str = ""
    location: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "kind": self.kind.value, "name": self.name, "location": self.location}


@dataclass(frozen=True, slots=True)
class Attachment:
    kind: str
    camera: str
    topic: str
    content_type: str
    sha256: str
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "camera": self.camera,
            "topic": self.topic,
            "content_type": self.content_type,
            "sha256": self.sha256,
            "bytes": self.bytes,
        }


SNAPSHOT = "snapshot"  # the kind (and outbox type) of snapshot Blobs: published on snapshots/{id}


@dataclass(frozen=True, slots=True)
class Blob:
    """Binary content published on a topic of its own (a snapshot: ``snapshots/{id}``).

    Queued in the outbox like an event, but it is not an event: it takes no ``seq`` (the
    event stream stays gapless for consumers) and its bytes are published as they are.
    """

    id: str  # the last topic level
    kind: str  # "snapshot"
    content: bytes
    content_type: str = "image/jpeg"


@dataclass(frozen=True, slots=True)
class Observation:
    """What a driver saw. ``occurred_at`` is epoch seconds (``time.time()``) at detection."""

    device: DeviceRef
    type: str
    severity: Severity
    state: EventState | None = None
    occurred_at: float = field(default_factory=time.time)
    data: Mapping[str, Any] = field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()

    @property
    def is_alarm(self) -> bool:
        return is_alarm_type(self.type)


def is_alarm_type(event_type: str) -> bool:
    return event_type == "alarm" or event_type.startswith("alarm.")


@dataclass(frozen=True, slots=True)
class Identity:
    gateway: str
    school: str
    region: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """A stamped event. ``payload`` is the canonical JSON, produced once."""

    id: str
    seq: int
    type: str
    severity: Severity
    state: EventState | None
    payload: bytes

    @property
    def is_alarm(self) -> bool:
        return is_alarm_type(self.type)

    @property
    def topic_suffix(self) -> str:
        """``alarm.panic`` -> ``alarm/panic``: an event type's dots become topic levels."""
        return self.type.replace(".", "/")


# Whole seconds formatted lately, and their text up to the '.': an event's occurred_at and
# received_at usually fall in one or two recent seconds. Cleared when it grows past a few.
_PREFIXES: dict[int, str] = {}
_PREFIXES_MAX = 16


def format_time(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-22T06:45:01.123Z``.

    Events come in bursts within one second: its prefix is formatted once and reused.
    """
    whole = math.floor(ts)
    us = round((ts - whole) * 1e6)  # rounded to the microsecond, as datetime.fromtimestamp does
    if us >= 1_000_000:
        whole, us = whole + 1, us - 1_000_000
    ms = us // 1000
    prefix = _PREFIXES.get(whole)
    if prefix is None:
        if len(_PREFIXES) >= _PREFIXES_MAX:
            _PREFIXES.clear()
        prefix = _PREFIXES[whole] = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{prefix}{ms:03d}Z"


# Ids need uniqueness, not secrecy: a generator seeded once from the OS is enough, and unlike
# os.urandom per id it does not release the GIL on every event (which stalled the event loop
# while the outbox writer stamped large batches).
_RANDOM = random.Random(os.urandom(32))


def uuid7(ts: float | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit unix milliseconds, then random bits. Sortable by time."""
    ms = int((time.time() if ts is None else ts) * 1000) & ((1 << 48) - 1)
    rand = _RANDOM.getrandbits(80)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"  # the same text as str(uuid.UUID(int=value)), without the object
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# One encoder for every event: json.dumps with arguments builds a new one per call (half its cost).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def stamp(obs: Observation, identity: Identity, seq: int, received_at: float | None = None) -> Event:
    """Turn an observation into an event with a fresh id and the given ``seq``."""
    now = time.time() if received_at is None else received_at
    event_id = uuid7(now)
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "id": event_id,
        "seq": seq,
        "gateway": identity.gateway,
        "school": identity.school,
        "device": obs.device.as_dict(),
        "type": obs.type,
        "severity": obs.severity.value,
        "occurred_at": format_time(obs.occurred_at),
        "received_at": format_time(now),
        "data": dict(obs.data),
    }
    if identity.region:
        body["region"] = identity.region
    if obs.state is not None:
        body["state"] = obs.state.value
    if obs.attachments:
        body["attachments"] = [a.as_dict() for a in obs.attachments]
    payload = _ENCODER.encode(body).encode()
    return Event(event_id, seq, obs.type, obs.severity, obs.state, payload)


class EventSink(Protocol):
    """Where drivers hand their observations. Returns once the event is durably taken."""

    async def publish(self, obs: Observation) -> None: ...


def schema() -> dict[str, Any]:
    """The JSON Schema of ``campus-event/1`` shipped in this package."""
    from importlib.resources import files

    text = files("gateway").joinpath("schema/campus-event-1.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded

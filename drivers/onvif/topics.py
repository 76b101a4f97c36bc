"""ONVIF notification topics, decoded through one table into camera signals.

A pull-point ``PullMessages`` reply (onvif-zeep-async, i.e. zeep objects) carries
``NotificationMessage`` items: ``msg.Topic._value_1`` is the topic text and
``msg.Message._value_1`` the ``tt:Message`` with ``Source`` / ``Data`` SimpleItems,
``UtcTime`` and ``PropertyOperation``. :func:`decode` turns one of them into a
:class:`CameraSignal`, or ``None`` for a topic the table does not know (counted per
topic in :data:`UNKNOWN_TOPICS` and logged once) or a value it cannot read (counted
in :data:`UNPARSEABLE`).

The table follows the topics Home Assistant's onvif integration handles, packaged as
onvif-parsers (``parsers/uncategorized.py``, ``parsers/hikvision.py``). That package is
not used directly: it matches topics by exact text (no prefix or vendor tolerance), it
reads only ``Data.SimpleItem[0] == "true"`` (so Dahua's ``State="1"`` reads as
inactive), and it produces Home Assistant entities rather than gateway events.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.events import EventState, Severity

_LOG = structlog.get_logger(__name__)

MOTION = "camera.motion"
TAMPER = "camera.tamper"
IMAGE_QUALITY = "camera.image_quality"
LINE_CROSSING = "camera.line_crossing"
FIELD_INTRUSION = "camera.field_intrusion"
DIGITAL_INPUT = "camera.digital_input"
VIDEO_LOSS = "camera.video_loss"

# Values read case-insensitively. "active"/"inactive" is the Device IO LogicalState
# vocabulary (onvif-parsers' Relay parser), "1"/"0" is what Dahua and Axis send.
_ACTIVE = frozenset({"true", "1", "active"})
_INACTIVE = frozenset({"false", "0", "inactive"})

# Source item names, most specific first: analytics rules name the video source
# configuration, VideoSource topics the video source, IO topics the input.
_VIDEO_SOURCE = ("VideoSourceConfigurationToken", "VideoSourceToken", "Source")


@dataclass(frozen=True, slots=True)
class CameraSignal:
    """One normalized camera observation (no device identity: the driver adds it).

    ``state`` is True (active), False (cleared) or None for edge events (a line crossed).
    ``operation`` is the ONVIF PropertyOperation: ``Initialized`` messages describe the
    state at subscription time, ``Changed`` a transition. ``occurred_at`` is the
    camera's UtcTime as epoch seconds, None when it sent none (camera clocks are often
    wrong: the driver decides whether to trust it).
    """

    type: str
    state: bool | None
    source: str | None
    rule: str | None
    data: dict[str, Any] = field(default_factory=dict, hash=False)
    severity: Severity = Severity.INFO
    topic: str = ""
    operation: str | None = None
    occurred_at: float | None = None

    @property
    def event_state(self) -> EventState | None:
        if self.state is None:
            return None
        return EventState.ACTIVE if self.state else EventState.CLEARED


@dataclass(frozen=True, slots=True)
class TopicRule:
    """One table row. ``topic`` is canonical: no namespace prefixes, '/'-separated.

    A row matches a message topic whose canonical segments start with ``topic``
    (compared case-insensitively), so service suffixes such as ``/ImagingService``
    and vendor tails match the row they extend; the longest matching row wins.
    """

    topic: str
    type: str
    severity: Severity
    state_items: tuple[str, ...]  # Data items holding the boolean, first present wins
    source_items: tuple[str, ...] = _VIDEO_SOURCE
    data: Mapping[str, str] = field(default_factory=dict)  # constant data for the row
    data_items: Mapping[str, str] = field(default_factory=dict)  # Data item -> data key
    edge: bool = False  # a momentary event: no state

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(s.casefold() for s in self.topic.split("/"))


# Severities are defaults for a school: tamper and video loss blind a camera (major);
# picture problems and analytics rules need a look (minor); raw motion is routine (info).
TABLE: tuple[TopicRule, ...] = (
    # onvif-parsers hikvision.py; ONVIF Core "VideoSource/MotionAlarm" (Source, State).
    TopicRule("VideoSource/MotionAlarm", MOTION, Severity.INFO, ("State",)),
    # onvif-parsers uncategorized.py; ONVIF Analytics cell motion (IsMotion).
    TopicRule("RuleEngine/CellMotionDetector/Motion", MOTION, Severity.INFO, ("IsMotion",)),
    # onvif-parsers uncategorized.py accepts "1" here: Dahua / Profile T region motion.
    TopicRule("RuleEngine/MotionRegionDetector/Motion", MOTION, Severity.INFO, ("State",)),
    TopicRule("RuleEngine/TamperDetector/Tamper", TAMPER, Severity.MAJOR, ("IsTamper",)),
    # .../AnalyticsService, /ImagingService, /RecordingService in onvif-parsers.
    TopicRule(
        "VideoSource/GlobalSceneChange", TAMPER, Severity.MAJOR, ("State",), data={"cause": "scene_change"}
    ),
    TopicRule(
        "VideoSource/ImageTooBlurry",
        IMAGE_QUALITY,
        Severity.MINOR,
        ("State",),
        data={"problem": "too_blurry"},
    ),
    TopicRule(
        "VideoSource/ImageTooDark", IMAGE_QUALITY, Severity.MINOR, ("State",), data={"problem": "too_dark"}
    ),
    TopicRule(
        "VideoSource/ImageTooBright",
        IMAGE_QUALITY,
        Severity.MINOR,
        ("State",),
        data={"problem": "too_bright"},
    ),
    # An edge: Data carries the crossing object's id, no state (onvif-parsers: a sensor).
    TopicRule(
        "RuleEngine/LineDetector/Crossed",
        LINE_CROSSING,
        Severity.MINOR,
        (),
        data_items={"ObjectId": "object_id"},
        edge=True,
    ),
    TopicRule("RuleEngine/FieldDetector/ObjectsInside", FIELD_INTRUSION, Severity.MINOR, ("IsInside",)),
    TopicRule(
        "Device/Trigger/DigitalInput", DIGITAL_INPUT, Severity.MINOR, ("LogicalState",), ("InputToken",)
    ),
    # Hikvision's alarm input terminal: tns1:Device/Trigger/tnshik:AlarmIn (onvif-parsers
    # hikvision.py, which calls it "Motion Alarm"; it is the wired alarm input).
    TopicRule("Device/Trigger/AlarmIn", DIGITAL_INPUT, Severity.MINOR, ("State",), ("AlarmInToken",)),
    # Axis: tns1:Device/tnsaxis:IO/Port (source "port", data "state"), IO/VirtualInput
    # ("active"). Axis reports output ports on the same topic: configure inputs only.
    TopicRule(
        "Device/IO",
        DIGITAL_INPUT,
        Severity.MINOR,
        ("LogicalState", "State", "active"),
        ("InputToken", "port", "Source"),
    ),
    # Not in onvif-parsers / Home Assistant: the ONVIF VideoSource event device firmware
    # emits (Source VideoSourceToken, Data State). See tests/data/onvif/README.md.
    TopicRule("VideoSource/SignalLoss", VIDEO_LOSS, Severity.MAJOR, ("State",)),
)

# Longest key first, so a more specific row wins over a shorter prefix.
_ROWS: tuple[TopicRule, ...] = tuple(sorted(TABLE, key=lambda r: len(r.key), reverse=True))

_URI_TOPIC = re.compile(r"^[a-z][a-z0-9+.-]*://\S*?/topics/", re.IGNORECASE)


def canonical_topic(text: str) -> tuple[str, ...]:
    """``tns1:RuleEngine/tnsaxis:X/Motion//.`` -> ``("RuleEngine", "X", "Motion")``.

    Drops namespace prefixes on every segment (tns1:, tt:, tnshik:, tnsaxis:, ns0:),
    a leading ``{uri}`` or ``http://www.onvif.org/ver10/topics/`` namespace, and empty
    or ``.`` segments (Home Assistant strips ``//.`` some cameras append).
    """
    text = text.strip()
    if text.startswith("{"):
        text = text.partition("}")[2]
    text = _URI_TOPIC.sub("", text)
    segments = []
    for raw in text.split("/"):
        seg = raw.rpartition(":")[2].strip()
        if seg and seg != ".":
            segments.append(seg)
    return tuple(segments)


def match(topic: str) -> TopicRule | None:
    """The table row for a topic text, or None."""
    key = tuple(s.casefold() for s in canonical_topic(topic))
    for row in _ROWS:
        if key[: len(row.key)] == row.key:
            return row
    return None


def parse_bool(value: object) -> bool | None:
    """ "true"/"1"/"active" -> True, "false"/"0"/"inactive" -> False, anything else None."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    text = value.strip().casefold()
    if text in _ACTIVE:
        return True
    if text in _INACTIVE:
        return False
    return None


class TopicCounter:
    """Counts per topic; the first sighting of each is logged, the rest only counted.

    Topic texts come from the camera: at most ``max_topics`` distinct ones are kept,
    later ones fold into ``"<other>"`` so a misbehaving device cannot grow the map.
    """

    def __init__(self, event: str, *, max_topics: int = 256) -> None:
        self.event = event
        self.max_topics = max_topics
        self.counts: Counter[str] = Counter()

    def add(self, topic: str, **context: Any) -> None:
        if topic not in self.counts and len(self.counts) >= self.max_topics:
            topic = "<other>"
        first = topic not in self.counts
        self.counts[topic] += 1
        if first:
            _LOG.warning(self.event, topic=topic, **context)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def clear(self) -> None:
        self.counts.clear()


UNKNOWN_TOPICS = TopicCounter("onvif_unknown_topic")
UNPARSEABLE = TopicCounter("onvif_unparseable_message")


def _get(obj: Any, name: str) -> Any:
    """Attribute of a zeep object, key of a dict (serialized form), else None."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _local(tag: object) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _items(message: Any, part: str) -> dict[str, str]:
    """SimpleItems of ``Source`` / ``Data`` as {Name: Value}, in document order.

    ``message`` is a zeep ``tt:Message`` object (the usual case), its serialized dict,
    or an lxml element (zeep leaves ``xsd:any`` content it cannot type as lxml, e.g. a
    tt:Message in a wrong namespace).
    """
    out: dict[str, str] = {}
    if hasattr(message, "iterchildren") and hasattr(message, "tag"):
        for child in message.iterchildren():
            if _local(child.tag) != part:
                continue
            for item in child.iterchildren():
                if _local(item.tag) == "SimpleItem" and item.get("Name") is not None:
                    out.setdefault(str(item.get("Name")), str(item.get("Value", "")))
        return out
    holder = _get(message, part)
    simple = _get(holder, "SimpleItem") if holder is not None else None
    for item in simple or ():
        name, value = _get(item, "Name"), _get(item, "Value")
        if name is not None:
            out.setdefault(str(name), "" if value is None else str(value))
    return out


def _pick(items: Mapping[str, str], names: Iterable[str]) -> tuple[str, str] | None:
    """The first of ``names`` present in ``items``, compared case-insensitively."""
    folded = {k.casefold(): (k, v) for k, v in items.items()}
    for name in names:
        hit = folded.get(name.casefold())
        if hit is not None:
            return hit
    return None


def _message_attr(message: Any, name: str) -> Any:
    if hasattr(message, "iterchildren") and hasattr(message, "get"):
        return message.get(name)
    return _get(message, name)


def _epoch(value: Any) -> float | None:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:  # Hikvision sends 0000-00-00T00:00:00Z before NTP sync
            return None
        return _epoch(parsed)
    return None


def topic_text(notification: Any) -> str | None:
    """The topic text of a NotificationMessage, or None when it has none."""
    topic = _get(notification, "Topic")
    if topic is None:
        return None
    text = topic if isinstance(topic, str) else _get(topic, "_value_1")
    if not isinstance(text, str) or not text.strip():
        return None
    return text.strip()


def decode(notification: Any) -> CameraSignal | None:
    """One ONVIF NotificationMessage -> a :class:`CameraSignal`, or None (counted).

    Never raises on device content: unknown topics go to :data:`UNKNOWN_TOPICS`,
    messages whose state value or structure cannot be read to :data:`UNPARSEABLE`.
    """
    topic = topic_text(notification)
    if topic is None:
        UNPARSEABLE.add("<no topic>")
        return None
    row = match(topic)
    if row is None:
        UNKNOWN_TOPICS.add(topic)
        return None
    message = _get(_get(notification, "Message"), "_value_1")
    if message is None:
        UNPARSEABLE.add(topic, reason="no tt:Message")
        return None
    source_items = _items(message, "Source")
    data_items = _items(message, "Data")

    state: bool | None = None
    if not row.edge:
        found = _pick(data_items, row.state_items)
        state = parse_bool(found[1]) if found else None
        if state is None:
            UNPARSEABLE.add(topic, value=found[1] if found else None, items=sorted(data_items))
            return None

    src = _pick(source_items, row.source_items)
    rule = _pick(source_items, ("Rule", "RuleName"))
    data: dict[str, Any] = dict(row.data)
    for item, key in row.data_items.items():
        hit = _pick(data_items, (item,))
        if hit is not None:
            data[key] = hit[1]
    operation = _message_attr(message, "PropertyOperation")
    return CameraSignal(
        type=row.type,
        state=state,
        source=src[1] if src else None,
        rule=rule[1] if rule else None,
        data=data,
        severity=row.severity,
        topic="/".join(canonical_topic(topic)),
        operation=str(operation) if operation is not None else None,
        occurred_at=_epoch(_message_attr(message, "UtcTime")),
    )


def decode_all(notifications: Iterable[Any] | None) -> list[CameraSignal]:
    """``decode`` over a PullMessages reply's ``NotificationMessage`` list (None -> [])."""
    return [s for n in notifications or () if (s := decode(n)) is not None]

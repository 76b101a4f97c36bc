"""What arrives from the broker, checked: payload parsing for the console.

:func:`parse_event` checks a ``campus-event/1`` payload (the parts the console relies on,
plus the alarm rules) against its topic and returns a :class:`ConsoleEvent`;
:func:`classify` tells an event from a reply, a status or a heartbeat by its topic; the
``*_field`` helpers check one field of a JSON object. Anything malformed raises
:class:`InvalidPayload`. :func:`presence_payload` is what the console itself publishes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.events import SCHEMA

SEVERITIES: Final = frozenset({"critical", "major", "minor", "info"})
STATES: Final = frozenset({"active", "cleared"})
RESULT_STATUSES: Final = frozenset({"accepted", "done", "failed", "refused"})
RETRYABLE: Final = frozenset({"failed", "refused"})  # a reply after which an ack may be retried
# results.gateway.ack of a reply to alarm.ack (docs/INTEGRATION.md, "Acknowledging alarms"):
ACK_RECORDED: Final = frozenset({"acknowledged", "already", "late"})  # the gateway holds our ack
ACK_SETTLED: Final = ACK_RECORDED | {"unknown"}  # nothing to retry ("unknown": no such alarm for us)

# Deeper JSON is refused: campus-event/1 and replies nest a few levels (command args at most
# 8), and a value nested near the parser's limit would overflow the stack of the sink that
# renders or re-serialises it.
MAX_DEPTH: Final = 32
MAX_NOTES: Final = 8  # device notes shown for one reply (an ack targets one device)

_UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class InvalidPayload(ValueError):
    """A payload that is not what its topic promises; counted, reported once per topic."""


@dataclass(frozen=True, slots=True)
class ConsoleEvent:
    """The fields of a ``campus-event/1`` payload the console uses, plus where it came from."""

    topic: str
    base: str  # the gateway base: the topic before /events/
    id: str
    seq: int
    gateway: str
    school: str
    device: str
    device_name: str
    location: str
    type: str
    severity: str
    state: str | None
    occurred_at: str
    repeat: int | None

    @property
    def is_alarm(self) -> bool:
        return self.type.startswith("alarm.")

    @property
    def needs_ack(self) -> bool:
        """An active alarm: the kind a platform acknowledges."""
        return self.is_alarm and self.state == "active"


def parse_json_object(payload: bytes) -> dict[str, Any]:
    try:
        obj: Any = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidPayload(f"not UTF-8 (byte {exc.start})") from exc
    except RecursionError as exc:
        raise InvalidPayload("JSON nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and int() of a number with too many digits
        raise InvalidPayload(f"not JSON: {str(exc)[:120]}") from exc
    if not isinstance(obj, dict):
        raise InvalidPayload(f"a JSON {type(obj).__name__}, not an object")
    if _depth_over(obj, MAX_DEPTH):
        raise InvalidPayload(f"JSON nested more than {MAX_DEPTH} levels deep")
    return obj


def _depth_over(obj: object, limit: int) -> bool:
    """True if ``obj`` nests lists and objects more than ``limit`` deep (no recursion: a
    payload just under the parser's limit would overflow the stack of whoever walks it)."""
    level: list[dict[str, Any] | list[Any]] = [obj] if isinstance(obj, (dict, list)) else []
    for _ in range(limit):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


def text_field(obj: Mapping[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value or (pattern is not None and not pattern.fullmatch(value)):
        raise InvalidPayload(f"{name}: missing or malformed ({_short(value)})")
    return value


def integer_field(obj: Mapping[str, Any], name: str, *, optional: bool = False) -> int | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidPayload(f"{name}: must be an integer >= 1, not {_short(value)}")
    return value


def choice_field(
    obj: Mapping[str, Any], name: str, allowed: frozenset[str], *, optional: bool = False
) -> str | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in allowed:  # a list or dict is unhashable
        raise InvalidPayload(f"{name}: {_short(value)} is not one of {', '.join(sorted(allowed))}")
    return str(value)


@dataclass(frozen=True, slots=True)
class AckReply:
    """What a final reply to an ``alarm.ack`` says beyond its status: ``results.gateway.ack``
    (None if absent or not a string) and a note per device that is not ``done`` (its LED)."""

    ack: str | None
    notes: tuple[str, ...]


def ack_reply(obj: Mapping[str, Any]) -> AckReply:
    """Read ``results`` of a reply leniently: odd shapes are skipped, never raised on."""
    results = obj.get("results")
    if not isinstance(results, dict):
        return AckReply(None, ())
    gateway = results.get("gateway")
    ack = gateway.get("ack") if isinstance(gateway, dict) else None
    notes = []
    for device, outcome in results.items():
        if device == "gateway" or not isinstance(outcome, dict) or outcome.get("status") == "done":
            continue
        why = ": ".join(str(x) for x in (outcome.get("reason"), outcome.get("detail")) if x)
        notes.append(f"{device}: {outcome.get('status')}" + (f" ({why})" if why else ""))
        if len(notes) >= MAX_NOTES:
            break
    return AckReply(ack if isinstance(ack, str) else None, tuple(notes))


def parse_event(topic: str, payload: bytes) -> ConsoleEvent:
    """Check the payload against ``campus-event/1`` (the parts the console relies on, plus the
    alarm rules) and the topic against its type. Raises :class:`InvalidPayload`."""
    obj = parse_json_object(payload)
    if obj.get("schema") != SCHEMA:
        raise InvalidPayload(f"schema is {_short(obj.get('schema'))}, not {SCHEMA!r}")
    device = obj.get("device")
    if not isinstance(device, dict):
        raise InvalidPayload("device: missing or not an object")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise InvalidPayload("data: missing or not an object")
    event_type = text_field(obj, "type", _TYPE)
    state = choice_field(obj, "state", STATES, optional=True)
    if event_type.startswith("alarm."):
        if state is None:
            raise InvalidPayload("state: required for an alarm")
        contact = data.get("contact_id")
        if not isinstance(contact, int) or isinstance(contact, bool) or not 1000 <= contact <= 3999:
            raise InvalidPayload(
                f"data.contact_id: an alarm needs a 4-digit Contact ID, not {_short(contact)}"
            )
    suffix = "/events/" + event_type.replace(".", "/")
    if not topic.endswith(suffix) or len(topic) == len(suffix):
        raise InvalidPayload(f"type {event_type!r} does not match the topic")
    text_field(obj, "received_at")
    seq = integer_field(obj, "seq")
    assert seq is not None, "not optional"
    return ConsoleEvent(
        topic=topic,
        base=topic[: -len(suffix)],
        id=text_field(obj, "id", _UUID7),
        seq=seq,
        gateway=text_field(obj, "gateway"),
        school=text_field(obj, "school"),
        device=text_field(device, "id"),
        device_name=str(device.get("name") or ""),
        location=str(device.get("location") or ""),
        type=event_type,
        severity=str(choice_field(obj, "severity", SEVERITIES)),
        state=state,
        occurred_at=text_field(obj, "occurred_at"),
        repeat=integer_field(obj, "repeat", optional=True),
    )


def classify(topic: str) -> tuple[str, str]:
    """(kind, gateway base) of a topic under a gateway base: event, snapshots, cmd-result,
    cmd, status, heartbeat; ("other", "") for anything else."""
    if "/events/" in topic:
        return "event", ""
    base, _, last = topic.rpartition("/")
    if not base or not last:
        return "other", ""
    parent, _, marker = base.rpartition("/")
    if parent and marker in ("snapshots", "cmd-result", "cmd"):
        return marker, parent
    if last in ("status", "heartbeat"):
        return last, base
    return "other", ""


def presence_payload(online: bool, timestamp_ms: int | None = None) -> bytes:
    ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return json.dumps({"online": online, "timestamp": ms}, separators=(",", ":")).encode()


def _short(value: object, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Delivery to the platform itself: its presence, and acknowledgements of critical alarms.

A broker's PUBACK only says the broker took a message (DESIGN.md, Guarantees). Two things
close the gap, per uplink:

* :class:`PlatformPresence` follows the platform's retained presence topic
  (``{"online": bool, "timestamp": ms}``, set offline by the platform's own will, as
  Sparkplug B's primary host STATE). The uplink publishes events only while it is online.
* :class:`AckSupervisor` keeps the critical alarms the platform has not acknowledged (the
  outbox's ledger, written with the event itself), re-publishes each at
  ``renotify_interval`` with the same id and seq plus ``"repeat": n``, raises trouble when
  one is not acknowledged within ``ack_deadline`` or after ``renotify_limit`` repeats, and
  records the platform's ``alarm.ack`` durably, so a restart does not re-notify it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from gateway.config import PlatformConfig
from gateway.driver import Outcome, Verdict
from gateway.errors import OutboxError
from gateway.events import DeviceRef, EventState, Observation, Severity
from gateway.logs import RateLimited
from gateway.outbox import Awaiting, Outbox, Settled
from gateway.tasks import consume_outcome

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

TROUBLE = "uplink.trouble"
# A presence payload is a few dozen bytes; anything this large is not one.
PRESENCE_MAX_BYTES = 4096


class Presence(enum.StrEnum):
    DISABLED = "disabled"  # no presence topic configured: publish whenever connected
    UNKNOWN = "unknown"  # nothing (valid) heard in this session yet
    ONLINE = "online"
    OFFLINE = "offline"


class TroubleCode(enum.StrEnum):
    """``data.code`` of an ``uplink.trouble`` event: what was not delivered in time."""

    BROKER_DEADLINE = "broker_deadline"  # an alarm not at the broker within alarm_deadline
    ACK_DEADLINE = "ack_deadline"  # a critical alarm not acknowledged within ack_deadline
    ACK_LIMIT = "ack_limit"  # renotify_limit repeats and still no acknowledgement


def trouble(
    ref: DeviceRef, uplink: str, code: TroubleCode, state: EventState, reason: str, **data: Any
) -> Observation:
    """An ``uplink.trouble`` observation; pairs of active/cleared share uplink, code and event_id."""
    body = {"uplink": uplink, "code": code.value, "reason": reason, **data}
    return Observation(device=ref, type=TROUBLE, severity=Severity.MAJOR, state=state, data=body)


class PlatformPresence:
    """The platform's presence as last heard on its retained topic (reset every session)."""

    def __init__(self, uplink: str, topic: str | None) -> None:
        self.uplink = uplink
        self.topic = topic
        self.state = Presence.DISABLED if topic is None else Presence.UNKNOWN
        self.since = time.time()
        self.timestamp: int | None = None  # the platform's own stamp of the current state
        self.invalid = 0  # payloads refused
        self._limiter = RateLimited()

    @property
    def allows_publishing(self) -> bool:
        return self.state in (Presence.DISABLED, Presence.ONLINE)

    def reset(self) -> None:
        """A new session: the retained message is delivered again after the subscription."""
        if self.topic is not None:
            self._set(Presence.UNKNOWN, None)

    def update(self, payload: bytes) -> bool:
        """Take one message of the presence topic; True if the state changed."""
        if not payload:  # the retained message was cleared: nobody says the platform is there
            return self._set(Presence.UNKNOWN, None)
        parsed = _parse_presence(payload)
        if isinstance(parsed, str):
            self.invalid += 1
            suppressed = self._limiter.should_log("invalid")
            if suppressed is not None:
                log.warning(
                    "platform presence refused; holding events",
                    uplink=self.uplink,
                    topic=self.topic,
                    error=parsed,
                    repeats=suppressed,
                )
            return self._set(Presence.UNKNOWN, None)
        online, stamp = parsed
        if stamp is not None and self.timestamp is not None and stamp < self.timestamp:
            # An older state than the one we have: e.g. the will of a previous platform
            # session arriving after the new session said online (Sparkplug B's rule).
            log.info("stale platform presence ignored", uplink=self.uplink, timestamp=stamp)
            return False
        return self._set(Presence.ONLINE if online else Presence.OFFLINE, stamp)

    def _set(self, state: Presence, stamp: int | None) -> bool:
        self.timestamp = stamp if stamp is not None else self.timestamp
        if state is Presence.UNKNOWN:
            self.timestamp = None
        if state is self.state:
            return False
        log.info("platform presence", uplink=self.uplink, presence=state.value, was=self.state.value)
        self.state = state
        self.since = time.time()
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"presence": self.state.value, "since": round(self.since, 3), "topic": self.topic}


def _parse_presence(payload: bytes) -> tuple[bool, int | None] | str:
    """(online, timestamp ms or None), or why the payload is not a presence message."""
    if len(payload) > PRESENCE_MAX_BYTES:
        return f"{len(payload)} bytes; a presence message is a small JSON object"
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return f"not JSON: {str(exc)[:120]}"
    if not isinstance(body, dict) or not isinstance(body.get("online"), bool):
        return 'not {"online": true|false, "timestamp": ms}'
    stamp = body.get("timestamp")
    if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, int) or stamp < 0):
        return "timestamp must be a non-negative integer (milliseconds since the epoch)"
    return body["online"], stamp


@dataclass
class AckStats:
    renotified: int = 0  # repeats handed to the broker
    acked: int = 0  # acknowledgements that closed an open entry
    expired: int = 0  # entries given up after renotify_limit repeats
    late_deadline: int = 0  # entries whose ack deadline passed


Publish = Callable[[Awaiting, bytes], bool]
"""Publish a repeat (entry, payload); False if the uplink cannot publish now."""


class AckSupervisor:
    """Re-notification and acknowledgement of one uplink's critical alarms (see module doc)."""

    def __init__(
        self,
        uplink: str,
        cfg: PlatformConfig,
        outbox: Outbox,
        ref: DeviceRef,
        report: Callable[[Observation], None],
    ) -> None:
        self.uplink = uplink
        self.cfg = cfg
        self.outbox = outbox
        self.ref = ref
        self._report = report
        self.stats = AckStats()
        # event id -> monotonic time it was last at the broker (first PUBACK seen, or a repeat).
        self._last: dict[str, float] = {}
        self._log = log.bind(uplink=uplink)
        self._limiter = RateLimited()
        # Settles with their reports run as tasks of their own that a cancelled caller (a
        # command cut short by shutdown) does not cut in half: a committed acknowledgement
        # always clears its trouble.
        self._settling: set[asyncio.Task[Any]] = set()

    @property
    def pending(self) -> int:
        return len(self.outbox.awaiting(self.uplink))

    async def tick(self, publish: Publish | None) -> float | None:
        """Do what is due now; seconds until the next thing falls due (None: nothing open).

        Deadlines and repeats are decided on one snapshot without awaiting; the give-ups,
        which commit, come after it, each re-checked and on its own (one failing does not
        hold up the rest).
        """
        wall, mono = time.time(), time.monotonic()
        delivered_upto = self.outbox.acked_upto(self.uplink)
        waits: list[float] = []
        exhausted: list[Awaiting] = []
        for entry in self.outbox.awaiting(self.uplink):
            waits.append(self._check_deadline(entry, wall))
            if entry.rowid > delivered_upto:
                continue  # the first copy is not at the broker yet: the stream delivers it
            last = self._last.setdefault(entry.event_id, mono)
            due = last + self.cfg.renotify_interval
            if mono < due:
                waits.append(due - mono)
            elif entry.repeats >= self.cfg.renotify_limit:
                exhausted.append(entry)
            elif publish is not None and publish(entry, repeat_payload(entry.payload, entry.repeats + 1)):
                entry.repeats += 1
                self.stats.renotified += 1
                self._last[entry.event_id] = mono
                self.outbox.note(entry)
                waits.append(self.cfg.renotify_interval)
        recorded = [await self._give_up(entry) for entry in exhausted]
        if not all(recorded):
            waits.append(self.cfg.renotify_interval)  # not recorded: try again later
        return min(waits, default=None)

    def _check_deadline(self, entry: Awaiting, wall: float) -> float:
        """Raise the ack deadline's trouble once; seconds until the deadline (inf once past)."""
        if entry.troubled:
            return float("inf")
        left = entry.created + self.cfg.ack_deadline - wall
        if left > 0:
            return left
        entry.troubled = True
        self.stats.late_deadline += 1
        self.outbox.note(entry)
        reason = f"not acknowledged by the platform within {self.cfg.ack_deadline:g} s"
        self._log.error(
            "alarm not acknowledged in time", event_id=entry.event_id, deadline=self.cfg.ack_deadline
        )
        self._report(self._trouble(TroubleCode.ACK_DEADLINE, EventState.ACTIVE, reason, entry))
        return float("inf")

    async def _give_up(self, entry: Awaiting) -> bool:
        """Settle an entry whose repeats are used up; False if that could not be recorded."""
        if not self.outbox.is_open(self.uplink, entry.event_id):
            return True  # acknowledged while this tick ran
        try:
            return await self._unbroken(self._expire(entry), "give-up")
        except OutboxError as exc:
            self._last[entry.event_id] = time.monotonic()  # try again an interval later
            suppressed = self._limiter.should_log("give-up")
            if suppressed is not None:
                self._log.error(
                    "could not record giving up on an alarm",
                    event_id=entry.event_id,
                    error=str(exc),
                    repeats=suppressed,
                )
            return False

    async def _expire(self, entry: Awaiting) -> bool:
        settlement = await self.outbox.settle(self.uplink, entry.event_id, Settled.EXPIRED)
        self._last.pop(entry.event_id, None)
        if not settlement.closed_now:
            return True  # acknowledged meanwhile
        self.stats.expired += 1
        reason = f"no acknowledgement after {entry.repeats} re-notifications; re-notification stopped"
        self._log.error(
            "alarm never acknowledged by the platform; giving up",
            event_id=entry.event_id,
            alarm_type=entry.type,
            repeats=entry.repeats,
        )
        self._report(self._trouble(TroubleCode.ACK_LIMIT, EventState.ACTIVE, reason, entry))
        return True

    async def acknowledge(self, event_id: str) -> Outcome:
        """The platform's alarm.ack for ``event_id``: recorded durably before this returns.

        Raises :class:`~gateway.errors.OutboxError` if it could not be recorded.
        """
        return await self._unbroken(self._acknowledge(event_id), "ack")

    async def _unbroken(self, work: Coroutine[Any, Any, _T], what: str) -> _T:
        """Run ``work`` in a task that cancelling the caller does not cancel."""
        task = asyncio.get_running_loop().create_task(work, name=f"acks:{self.uplink}:{what}")
        self._settling.add(task)
        task.add_done_callback(self._settled)
        return await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._settling.discard(task)
        consume_outcome(task)  # the caller, if still there, gets the outcome too

    async def _acknowledge(self, event_id: str) -> Outcome:
        settlement = await self.outbox.settle(self.uplink, event_id, Settled.ACKED)
        self._last.pop(event_id, None)
        entry = settlement.entry
        if entry is None:
            detail = f"{event_id} is not an alarm awaiting this platform's acknowledgement"
            return Outcome(Verdict.DONE, None, detail, {"ack": "unknown"})
        if settlement.previous is Settled.ACKED:
            detail = f"alarm {event_id} was already acknowledged"
            return Outcome(Verdict.DONE, None, detail, {"ack": "already"})
        self.stats.acked += 1
        age = max(0.0, time.time() - entry.created)
        self._log.info("alarm acknowledged by the platform", event_id=event_id, after=round(age, 3))
        reason = f"acknowledged after {age:.1f} s"
        if entry.troubled:  # its deadline's trouble is active: the acknowledgement clears it
            self._report(self._trouble(TroubleCode.ACK_DEADLINE, EventState.CLEARED, reason, entry))
        if settlement.previous is Settled.EXPIRED:
            self._report(self._trouble(TroubleCode.ACK_LIMIT, EventState.CLEARED, reason, entry))
            return Outcome(Verdict.DONE, None, f"alarm {event_id} acknowledged (late)", {"ack": "late"})
        detail = f"alarm {event_id} acknowledged after {age:.1f} s and {entry.repeats} re-notifications"
        return Outcome(Verdict.DONE, None, detail, {"ack": "acknowledged"})

    def _trouble(self, code: TroubleCode, state: EventState, reason: str, entry: Awaiting) -> Observation:
        return trouble(
            self.ref,
            self.uplink,
            code,
            state,
            reason,
            event_id=entry.event_id,
            alarm_type=entry.type,
            seq=entry.seq,
            repeats=entry.repeats,
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "awaiting_ack": self.pending,
            "renotified": self.stats.renotified,
            "acked": self.stats.acked,
            "expired": self.stats.expired,
        }


def repeat_payload(payload: bytes, repeat: int) -> bytes:
    """The event's own bytes with ``"repeat": n`` added (same id, seq and everything else)."""
    if not payload.endswith(b"}"):
        raise ValueError("an event payload is a JSON object")
    return b'%s,"repeat":%d}' % (payload[:-1], repeat)

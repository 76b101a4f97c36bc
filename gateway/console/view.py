"""Sinks for the console's records: :class:`JsonLines` and :class:`HumanView`.

:class:`JsonLines` writes each record as one JSON object per line (for pipes, tests,
bridges); :class:`HumanView` renders each as one readable line for a person, alarms in
red on a terminal, duplicates and heartbeats only counted. Both are callables a
:class:`~gateway.console.core.Console` takes as its sink.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import IO, Final

from gateway.console.messages import ACK_RECORDED, RETRYABLE
from gateway.console.options import Record

# What a payload may carry that must not reach a terminal as is: C0 controls (ESC starts
# the ANSI/CSI sequences that move the cursor, retitle the window, rewrite the screen), DEL,
# C1 controls (U+009B is a one-character CSI on many terminals) and lone surrogates (a JSON
# "\ud800" escape: no encoding can write one).
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# In JSON text, C0 controls are already escaped (json.dumps does it); the rest of them.
_UNSAFE_IN_JSON: Final = re.compile("[\x7f-\x9f\ud800-\udfff]")


def escape(text: str) -> str:
    """``text`` with every control character and lone surrogate as a visible escape
    (``\\x1b``, ``\\x9b``, ``\\ud800``): safe to print, one line."""
    return _UNSAFE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class JsonLines:
    """One JSON object per line, flushed at once (for pipes: ``| jq``, a test, a bridge)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, record: Record) -> None:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        # DEL, C1 and lone surrogates as JSON escapes: the same JSON, and writable and safe
        # on a terminal whatever the stream's encoding.
        self.stream.write(_UNSAFE_IN_JSON.sub(_json_escaped, text) + "\n")
        self.stream.flush()


_RED_BOLD = "\x1b[1;31m"
_YELLOW = "\x1b[33m"
_DIM = "\x1b[2m"
_RESET = "\x1b[0m"

_STAMP_SHOWN: Final = 32  # characters of a time stamp shown as sent (unparsable, out of range)

_Line = str | tuple[str, str]  # a renderer's text, or its text and color


class HumanView:
    """One line per record for a person; alarms stand out (upper case, red on a terminal).

    Ids are shown by their last 8 hex digits: a UUIDv7 starts with its timestamp, alike for
    every event of the same minute. Duplicates and heartbeats are only counted.
    """

    def __init__(self, stream: IO[str], *, color: bool = False) -> None:
        self.stream = stream
        self.color = color

    def __call__(self, record: Record) -> None:
        line = self.render(record)
        if line is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def render(self, record: Record) -> str | None:
        """The record's line, or None if it is not shown.

        Every record's text may hold what a broker payload carried (device names, reasons,
        details, topics...): the whole line is escaped (:func:`escape`) before the view's
        own colors go around it, so no payload can send a terminal a control sequence.
        """
        kind = record.get("kind")
        renderer = getattr(self, f"_render_{str(kind).replace('-', '_')}", None)
        if renderer is None:
            return None
        line: _Line | None = renderer(record)
        if line is None:
            return None
        text, color = (line, None) if isinstance(line, str) else line
        text = escape(text)
        return f"{color}{text}{_RESET}" if color is not None and self.color else text

    @staticmethod
    def _paint(text: str, color: str) -> tuple[str, str]:
        """``text`` to be shown in ``color`` (on a terminal), once :meth:`render` escaped it."""
        return text, color

    def _now(self, record: Record) -> str:
        return _clock(record.get("at"))

    def _render_event(self, r: Record) -> _Line | None:
        if r["duplicate"]:
            return None
        device = r["device"]
        where = ", ".join(x for x in (r.get("device_name"), r.get("location")) if x)
        if where:
            device = f"{device} ({where})"
        flags = []
        if r.get("number") is not None:
            flags.append(f"[{r['number']}] to acknowledge")
        if r.get("repeat"):
            flags.append(f"repeat {r['repeat']}")
        if r.get("gap"):
            first, last = r["gap"]
            flags.append(f"GAP: seq {first}-{last} missing (lost, or not routed to this platform)")
        if r.get("late"):
            flags.append("LATE: fills a gap")
        if r.get("seq_unexpected"):
            flags.append("seq out of order")
        tag = "ALARM" if r["alarm"] else "event"
        line = (
            f"{_clock(r.get('occurred_at'))} {tag:<5} {r['gateway']} {device} {r['type']} "
            f"{r.get('state') or '-'} {r['severity']} seq={r['seq']} id={_sid(r['id'])}"
        )
        if flags:
            line += "  " + "; ".join(flags)
        if r["alarm"]:
            return self._paint(line, _RED_BOLD)
        return self._paint(line, _YELLOW) if r.get("gap") or r.get("late") else line

    def _render_connected(self, r: Record) -> _Line:
        session = "session resumed" if r["session_present"] else "new session"
        return (
            f"{self._now(r)} connected to {r['broker']} as {r['client_id']} ({session}); "
            f"subscribed {', '.join(r['topics'])}; presence {r['presence_topic']} online"
        )

    def _render_disconnected(self, r: Record) -> _Line:
        text = f"{self._now(r)} DISCONNECTED: {r['reason']}; retrying in {r['retry_in']:.1f} s"
        return self._paint(text, _YELLOW)

    def _render_status(self, r: Record) -> _Line:
        return f"{self._now(r)} gateway {r['gateway']} is {r['state']}"

    def _render_snapshot(self, r: Record) -> _Line:
        return self._paint(
            f"{self._now(r)} snapshot from {r['gateway']} for {_sid(r['event_id'])} ({r['bytes']} bytes)",
            _DIM,
        )

    def _render_ack_sent(self, r: Record) -> _Line:
        return (
            f"{self._now(r)} ack sent for {_sid(r['event_id'])} "
            f"({r['type']} at {r['gateway']}/{r['device']}), command {_sid(r['command_id'])}"
        )

    def _render_ack_result(self, r: Record) -> _Line:
        """The reply's status, or what ``results.gateway.ack`` says when that decides: a
        reply that failed (the box's LED) on an ack the gateway recorded is "ack recorded",
        with the failure as a note."""
        ack, status = r.get("ack"), str(r["status"])
        overruled = r.get("settled") and status != "done"
        if overruled and ack in ACK_RECORDED:
            head = "ack recorded" if ack == "acknowledged" else f"ack recorded ({ack})"
        elif overruled and ack == "unknown":
            head = "ack UNKNOWN"
        else:
            head = f"ack {status.upper()}"
        text = f"{self._now(r)} {head} for {_sid(r['event_id'])}"
        if r.get("type"):
            text += f" ({r['type']} at {r['gateway']}/{r['device']})"
        notes = r.get("notes") or []
        why = ": ".join(str(x) for x in (r.get("reason"), r.get("detail")) if x)
        if r.get("settled") and notes:  # what failed besides (the box's LED), device by device
            text += "; " + "; ".join(str(n) for n in notes)
        elif why:
            text += f": {why}"
        if r.get("settled") and ack == "unknown":
            text += " (the gateway holds no such alarm for this platform: nothing to retry)"
        if r.get("number") is not None:
            text += f"  [{r['number']}] to try again"
        return self._paint(text, _YELLOW) if status in RETRYABLE or ack == "unknown" else text

    def _render_cmd_result(self, r: Record) -> _Line:
        why = ": ".join(str(x) for x in (r.get("reason"), r.get("detail")) if x)
        return self._paint(
            f"{self._now(r)} reply on {r['gateway']} to command {r['command_id']} ({r.get('name')}): "
            f"{r['status']}{': ' + why if why else ''}",
            _DIM,
        )

    def _render_ack_queued(self, r: Record) -> _Line:
        return f"{self._now(r)} ack for {_sid(r['event_id'])} queued: {r['reason']}"

    def _render_ack_unsent(self, r: Record) -> _Line:
        return (
            f"{self._now(r)} ack for {_sid(r['event_id'])} not confirmed by the broker, resent on reconnect"
        )

    def _render_ack_error(self, r: Record) -> _Line:
        return self._paint(f"{self._now(r)} cannot acknowledge {_sid(r['event_id'])}: {r['error']}", _YELLOW)

    def _render_invalid(self, r: Record) -> _Line:
        return self._paint(
            f"{self._now(r)} invalid payload on {r['topic']}: {r['reason']} (more there: only counted)",
            _YELLOW,
        )

    def _render_notice(self, r: Record) -> _Line:
        return f"{self._now(r)} {r['message']}"

    def _render_presence(self, r: Record) -> _Line | None:
        return None if r["online"] else f"{self._now(r)} presence {r['topic']} offline"

    def _render_stopped(self, r: Record) -> _Line:
        return (
            f"{self._now(r)} stopped: {r['events']} events ({r['alarms']} alarms), "
            f"{r['duplicates']} duplicates, {r['gaps']} gaps, {r['late']} late, {r['invalid']} invalid, "
            f"{r['acks_sent']} acks sent, {r['ack_done']} done"
        )


def _sid(event_id: object) -> str:
    """A short id: the last 8 characters (a UUIDv7's first ones are its timestamp)."""
    return f"..{str(event_id)[-8:]}"


def _clock(stamp: object) -> str:
    """Local wall-clock time of an RFC 3339 stamp (HH:MM:SS.mmm); the text itself if unparsable."""
    if not isinstance(stamp, str):
        return "--:--:--"
    try:
        moment = datetime.fromisoformat(stamp)
        if moment.tzinfo is None:
            return stamp[:_STAMP_SHOWN]
        local = moment.astimezone()
    except (ValueError, OverflowError, OSError):  # e.g. 9999-12-31T23:59:59-12:00 is past year 9999 here
        return stamp[:_STAMP_SHOWN]
    return local.strftime("%H:%M:%S.%f")[:12]

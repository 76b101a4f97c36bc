"""The console's alarm desk: the alarms it tracks and their acknowledgement.

:class:`AlarmDesk` is the base of :class:`~gateway.console.core.Console` that holds the
console's state and does what a platform does with an active alarm: it keeps it (bounded)
under a number for the operator, sends a signed ``alarm.ack`` (subscribing to the
gateway's replies first when the topics miss them), queues it while disconnected, reads
the operator's input (a number, Enter for the oldest, q to quit) and turns every outcome
into a record for the sink. The connection itself is the subclass's.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from paho.mqtt.client import topic_matches_sub

from gateway.commands.signing import build_command
from gateway.console.messages import ACK_SETTLED, AckReply, ConsoleEvent
from gateway.console.options import ConsoleOptions, Sink
from gateway.errors import CommandError, UplinkError
from gateway.events import format_time
from gateway.mqtt import MqttConnection

ACK_COMMAND: Final = "alarm.ack"

# Bounds on memory, whatever the broker sends.
MAX_ALARMS: Final = 10_000  # alarms kept for acknowledgement (oldest dropped)
MAX_COMMANDS: Final = 10_000  # our command ids kept to match replies
MAX_RESULT_FILTERS: Final = 10_000  # extra cmd-result subscriptions (one per gateway acked)
MAX_INPUT_LINE: Final = 1_024  # bytes of one operator line; a longer one is dropped


@dataclass
class _Alarm:
    event: ConsoleEvent
    number: int | None = None  # the operator's handle while un-acknowledged
    acked_at: float | None = None  # loop time of our last ack for it
    settled: bool = False  # a reply said the gateway holds our ack (or has nothing to ack)


class AlarmDesk:
    """Alarms, acks, operator input and records: everything of a console but its connection.

    ``counts`` holds the totals. The subclass sets ``_conn`` while connected and extends
    :meth:`stop` to end its connection.
    """

    def __init__(self, options: ConsoleOptions, sink: Sink) -> None:
        self.options = options
        self._sink = sink
        self.counts: Counter[str] = Counter()
        self._alarms: OrderedDict[str, _Alarm] = OrderedDict()
        self._unacked: OrderedDict[str, None] = OrderedDict()  # waiting for the operator, oldest first
        self._numbers: dict[int, str] = {}
        self._commands: OrderedDict[str, str] = OrderedDict()  # our command id -> event id
        self._unsent: OrderedDict[str, None] = OrderedDict()  # acks to send once connected
        self._result_filters: set[str] = set()  # cmd-result subscriptions the topics miss
        self._results_ready: set[str] = set()  # ...of those, subscribed on this connection
        self._stop = asyncio.Event()
        self._conn: MqttConnection | None = None  # set by the subclass while connected
        self._tasks: set[asyncio.Task[None]] = set()
        self._input_fd: int | None = None
        self._input = b""
        self._held: list[dict[str, Any]] | None = None  # records held back by _ack_first

    # -- public --------------------------------------------------------------------------------

    @property
    def unacked(self) -> list[str]:
        """Event ids of the alarms waiting for the operator, oldest first."""
        return list(self._unacked)

    def stop(self) -> None:
        """Stop: :meth:`~gateway.console.core.Console.run` returns."""
        self._stop.set()

    def ack(self, event_id: str) -> bool:
        """Acknowledge the alarm ``event_id`` (sent now, or once connected). False if unknown
        or there is no key."""
        alarm = self._alarms.get(event_id)
        if alarm is None:
            return False
        if self.options.key is None:
            self._notice("cannot acknowledge: no --key-file")
            return False
        self._release(alarm)
        self._send_ack(alarm)
        return True

    # -- acknowledgement -----------------------------------------------------------------------

    def _track_alarm(self, ev: ConsoleEvent) -> _Alarm:
        alarm = self._alarms[ev.id] = _Alarm(ev)
        if len(self._alarms) > MAX_ALARMS:
            _, oldest = self._alarms.popitem(last=False)
            self._release(oldest)
            self._unsent.pop(oldest.event.id, None)
        if self.options.key is not None and not self.options.auto_ack:
            self._offer(alarm)
        return alarm

    def _offer(self, alarm: _Alarm) -> int:
        """Put the alarm in the operator's list, under the smallest free number."""
        if alarm.number is None:
            number = 1
            while number in self._numbers:
                number += 1
            alarm.number = number
            self._numbers[number] = alarm.event.id
        self._unacked[alarm.event.id] = None
        return alarm.number

    def _settle(self, alarm: _Alarm, status: str, reply: AckReply) -> tuple[bool, int | None]:
        """An ack's fate from a reply to it: (settled, the number it is offered under again).

        ``results.gateway.ack`` decides, not the overall status: a reply ``failed`` because
        the box's LED did not light still says ``acknowledged`` there, and the alarm is done
        (the LED is a note). ``unknown`` (the gateway holds no such alarm for this platform)
        leaves nothing to retry either. Only an ack the gateway did not record (refused,
        failed before it was stored) is offered to the operator again, and not once another
        reply said it was recorded (a late failure of an earlier command).
        """
        if status == "accepted":
            return False, None  # the final reply follows
        if reply.ack in ACK_SETTLED or status == "done":
            alarm.settled = True
            self._release(alarm)  # e.g. offered again after a failure, then a retry got through
            return True, None
        if alarm.settled or self.options.auto_ack:
            return False, None
        return False, self._offer(alarm)  # the operator may try again

    def _release(self, alarm: _Alarm) -> None:
        self._unacked.pop(alarm.event.id, None)
        if alarm.number is not None:
            self._numbers.pop(alarm.number, None)
            alarm.number = None

    def _send_ack(self, alarm: _Alarm) -> None:
        key, conn, ev = self.options.key, self._conn, alarm.event
        assert key is not None, "callers check"
        if conn is None or not conn.connected:
            if not self._stop.is_set():
                self._unsent[ev.id] = None
                self._emit("ack_queued", event_id=ev.id, gateway=ev.gateway, reason="not connected")
            return
        try:
            command = build_command(key, ACK_COMMAND, ev.device, {"event_id": ev.id})
        except CommandError as exc:  # e.g. a device id no command can target
            self._emit("ack_error", event_id=ev.id, gateway=ev.gateway, error=str(exc))
            return
        alarm.acked_at = asyncio.get_running_loop().time()
        topic_filter = self._results_filter(ev.base)
        if topic_filter is None or topic_filter in self._results_ready:
            self._publish_ack(conn, alarm, command)
        else:  # subscribe to the replies first, or the reply may come before the SUBACK
            self._spawn(self._subscribe_then_ack(conn, topic_filter, alarm, command))

    def _ack_first(self, send: Callable[[], None], show: Callable[[], None]) -> None:
        """``send`` (an ack) before ``show`` (the record of the alarm it is for), so that
        nothing in showing the alarm can hold its ack back; ``send``'s own records (ack sent,
        queued) still follow the alarm's, in the order a person reads them, even if showing
        it failed."""
        held: list[dict[str, Any]] = []
        self._held = held
        try:
            try:
                send()
            finally:
                self._held = None
            show()
        finally:
            for record in held:
                self._sink(record)

    def _results_filter(self, base: str) -> str | None:
        """The cmd-result filter for ``base`` if the topics do not cover it, else None."""
        if any(topic_matches_sub(t, f"{base}/cmd-result/x") for t in self.options.topics):
            return None
        topic_filter = f"{base}/cmd-result/+"
        if topic_filter not in self._result_filters and len(self._result_filters) < MAX_RESULT_FILTERS:
            self._result_filters.add(topic_filter)
        return topic_filter

    async def _subscribe_then_ack(
        self, conn: MqttConnection, topic_filter: str, alarm: _Alarm, command: dict[str, Any]
    ) -> None:
        try:
            await conn.subscribe(topic_filter, qos=1)
        except UplinkError as exc:
            self._notice(f"replies on {topic_filter} will not be seen: {exc}")
        else:
            self._results_ready.add(topic_filter)
        if conn.connected:
            self._publish_ack(conn, alarm, command)
        elif not self._stop.is_set():
            self._unsent[alarm.event.id] = None

    def _publish_ack(self, conn: MqttConnection, alarm: _Alarm, command: dict[str, Any]) -> None:
        ev = alarm.event
        topic = f"{ev.base}/cmd/{ACK_COMMAND}"
        payload = json.dumps(command, separators=(",", ":")).encode()
        try:
            fut = conn.publish(topic, payload, qos=1)
        except UplinkError:
            self._unsent[ev.id] = None
            return
        command_id: str = command["id"]
        self._commands[command_id] = ev.id
        if len(self._commands) > MAX_COMMANDS:
            self._commands.popitem(last=False)
        self.counts["acks_sent"] += 1
        self._emit(
            "ack_sent",
            event_id=ev.id,
            command_id=command_id,
            gateway=ev.gateway,
            device=ev.device,
            type=ev.type,
            topic=topic,
        )
        fut.add_done_callback(partial(self._ack_published, ev.id, command_id))

    def _ack_published(self, event_id: str, command_id: str, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            return
        self._emit("ack_unsent", event_id=event_id, command_id=command_id, reason=str(exc))
        if not self._stop.is_set() and event_id in self._alarms:
            self._unsent[event_id] = None  # a fresh command once connected again

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- operator input ------------------------------------------------------------------------

    def _start_input(self) -> None:
        fd = self.options.input_fd
        if fd is None:
            return
        try:
            asyncio.get_running_loop().add_reader(fd, self._on_input)
        except (OSError, ValueError) as exc:  # e.g. a regular file: epoll cannot watch it
            self._notice(f"cannot read commands from the input: {exc}")
            return
        self._input_fd = fd

    def _stop_input(self) -> None:
        fd, self._input_fd = self._input_fd, None
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)

    def _on_input(self) -> None:
        fd = self._input_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._notice(f"input: {exc.strerror or exc}")
            data = b""
        if not data:
            self._stop_input()
            rest, self._input = self._input, b""
            if rest.strip():
                self._command(rest.decode("utf-8", "replace").strip())
            self._notice("input closed: alarms are still shown; stop with Ctrl-C")
            return
        self._input += data
        while b"\n" in self._input:
            line, _, self._input = self._input.partition(b"\n")
            self._command(line.decode("utf-8", "replace").strip())
        if len(self._input) > MAX_INPUT_LINE:
            self._input = b""

    def _command(self, line: str) -> None:
        if line.lower() in ("q", "quit", "exit"):
            self.stop()
            return
        if self.options.key is None:
            self._notice("cannot acknowledge: no --key-file")
            return
        if not line:
            oldest = next(iter(self._unacked), None)
            if oldest is None:
                self._notice("no alarm is waiting for acknowledgement")
            else:
                self.ack(oldest)
            return
        if line.isascii() and line.isdigit():
            event_id = self._numbers.get(int(line))
            if event_id is None:
                self._notice(f"no alarm number {line} is waiting for acknowledgement")
            else:
                self.ack(event_id)
            return
        self._notice("type an alarm's number and Enter, Enter alone for the oldest, q to quit")

    # -- records -------------------------------------------------------------------------------

    def _greet(self) -> None:
        if self.options.key is None:
            self._notice("no --key-file: alarms are shown but cannot be acknowledged")
        elif self.options.input_fd is not None and not self.options.auto_ack:
            self._notice("to acknowledge: an alarm's number and Enter, Enter alone for the oldest; q to quit")

    def _notice(self, message: str) -> None:
        self._emit("notice", message=message)

    def _totals(self) -> dict[str, int]:
        keys = ("events", "alarms", "duplicates", "gaps", "late", "invalid", "acks_sent", "ack_done")
        return {k: self.counts[k] for k in keys}

    def _emit(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "at": format_time(time.time()), **fields}
        if self._held is not None:
            self._held.append(record)
        else:
            self._sink(record)

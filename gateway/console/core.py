"""The console itself: :class:`Console`, a platform on one broker.

It holds the connection: a persistent session with a stable client id, QoS 1
subscriptions renewed after every connect, retained online/offline presence (and a will),
reconnects with capped, jittered backoff, and a clean stop. It dispatches what arrives by
topic: events (deduped, seq-checked, alarms tracked), replies to its acks, gateway status,
heartbeats and snapshots. Alarms, acks and operator input are its base's
(:class:`~gateway.console.desk.AlarmDesk`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from functools import partial
from typing import Any, Final

from gateway.backoff import Backoff
from gateway.console.desk import AlarmDesk
from gateway.console.messages import (
    RESULT_STATUSES,
    ConsoleEvent,
    InvalidPayload,
    ack_reply,
    choice_field,
    classify,
    parse_event,
    parse_json_object,
    presence_payload,
    text_field,
)
from gateway.console.options import ConsoleOptions, Sink, tls_context
from gateway.console.tracking import RecentIds, SeqTracker, SeqVerdict
from gateway.errors import UplinkError
from gateway.mqtt import MqttConnection, Will
from gateway.tasks import cancel_and_wait, consume_outcome

# On a clean exit the offline presence gets 2 s for its PUBACK: a round trip on a working
# link is milliseconds, and a stop (Ctrl-C, systemd) must not hang on a dead broker.
GOODBYE_TIMEOUT: Final = 2.0
# The backoff starts over only after a connection held this long: a broker that accepts and
# drops at once (a second console taking over the client id, an ACL) is not hammered.
STABLE_AFTER: Final = 10.0
# Reconnect backoff: first retry after ~0.2 s (a broker restart takes well under a second),
# then doubling up to 5 s, so an alarm center is back within seconds of its broker.
BACKOFF_INITIAL: Final = 0.2
BACKOFF_CAP: Final = 5.0
# Bounds on memory, whatever the broker sends.
MAX_INVALID_TOPICS: Final = 1_000  # topics whose bad payload was reported (then only counted)
MAX_INFLIGHT: Final = 32  # acks and presence in flight at once: far more than ever needed
# An "offline" on our own presence topic while we are up is answered with "online" at most
# once a second: enough to undo a late will at once, too little to feed a loop with another
# client that keeps writing offline.
REASSERT_EVERY: Final = 1.0
# The last-resort guard of message handling: what a payload no check foresaw can still raise
# (a value of an odd type, a number out of range, text the output cannot encode). Parsing
# raises InvalidPayload for everything known; these are reported the same way, once per
# topic, rather than through the loop's exception handler with the message half handled.
UNEXPECTED: Final = (TypeError, ValueError, OverflowError)


class Console(AlarmDesk):
    """A platform console on one broker. ``await run()`` until :meth:`stop` (or ``duration``).

    Every outcome becomes a record for ``sink`` (see :mod:`gateway.console`); ``counts``
    holds the totals.
    """

    def __init__(self, options: ConsoleOptions, sink: Sink) -> None:
        super().__init__(options, sink)
        self._tls = tls_context(options)
        self._ids = RecentIds()
        self._seqs = SeqTracker()
        self._invalid_topics: set[str] = set()
        self._session_task: asyncio.Task[tuple[bool, str, float]] | None = None
        self._down_reason: str | None = None
        self._started = False
        self._reasserted = -REASSERT_EVERY  # loop time of the last reasserted "online"

    # -- public --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.connected

    def stop(self) -> None:
        """Stop: publish offline presence (if connected), disconnect, return from :meth:`run`."""
        super().stop()
        task = self._session_task
        if task is not None and self._conn is None:
            task.cancel()  # still connecting: nothing to say goodbye on

    async def run(self) -> None:
        if self._started:
            raise RuntimeError("a Console runs once; build a new one")
        self._started = True
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.options.duration, self.stop) if self.options.duration else None
        self._greet()
        self._start_input()
        try:
            await self._connect_forever()
        finally:
            if timer is not None:
                timer.cancel()
            self._stop_input()
            await cancel_and_wait(*self._tasks)
            self._emit("stopped", **self._totals())

    # -- connection ----------------------------------------------------------------------------

    async def _connect_forever(self) -> None:
        backoff = Backoff(initial=BACKOFF_INITIAL, cap=BACKOFF_CAP)
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            task = loop.create_task(self._session())
            self._session_task = task
            try:
                was_up, reason, lasted = await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if (
                    task.cancelled()
                    and self._stop.is_set()
                    and current is not None
                    and not current.cancelling()
                ):
                    return  # stop() cancelled a connect attempt
                raise
            finally:
                self._session_task = None
            if self._stop.is_set():
                return
            if lasted >= STABLE_AFTER:
                backoff.reset()
            delay = backoff.next_delay()
            self._report_down(was_up, reason, delay)
            await self._sleep_unless_stopped(delay)

    async def _session(self) -> tuple[bool, str, float]:
        """One connection from connect to its end: (was it up, why it ended, seconds up)."""
        loop = asyncio.get_running_loop()
        conn = self._new_connection()
        started: float | None = None
        try:
            async with conn:
                started = loop.time()
                self._conn = conn
                await self._serve(conn)
        except UplinkError as exc:
            reason = str(exc).removeprefix(f"uplink {conn.name}: ")
        else:
            reason = conn.close_reason or "closed"
        finally:
            self._conn = None
        lasted = 0.0 if started is None else loop.time() - started
        return started is not None, reason, lasted

    def _new_connection(self) -> MqttConnection:
        opts = self.options
        # The will carries the connect time: the broker publishes it for us, later, as is.
        will = Will(opts.presence_topic, presence_payload(False), qos=1, retain=True)
        return MqttConnection(
            name="broker",
            host=opts.broker.host,
            port=opts.broker.port,
            client_id=opts.client_id,
            keepalive=opts.keepalive,
            connect_timeout=opts.connect_timeout,
            max_inflight=MAX_INFLIGHT,
            clean_session=False,
            tls=self._tls,
            username=opts.username,
            password=opts.password,
            will=will,
            on_message=self._on_message,
        )

    async def _serve(self, conn: MqttConnection) -> None:
        await self._until(conn, self._announce(conn))
        if conn.connected and not self._stop.is_set():
            await self._until(conn, None)
        if conn.connected and self._stop.is_set():
            await self._goodbye(conn)

    async def _announce(self, conn: MqttConnection) -> None:
        """Subscribe (every time: the broker may have forgotten the session), then say online."""
        for topic in self.options.topics:
            await conn.subscribe(topic, qos=1)
        await conn.subscribe(self.options.presence_topic, qos=1)  # to undo a late will of ours
        self._results_ready.clear()
        for topic_filter in sorted(self._result_filters):
            await conn.subscribe(topic_filter, qos=1)
            self._results_ready.add(topic_filter)
        await conn.publish(self.options.presence_topic, presence_payload(True), qos=1, retain=True)
        self._down_reason = None
        self._emit(
            "connected",
            broker=str(self.options.broker),
            client_id=self.options.client_id,
            session_present=conn.session_present,
            topics=list(self.options.topics),
            presence_topic=self.options.presence_topic,
        )
        for event_id in list(self._unsent):
            del self._unsent[event_id]
            alarm = self._alarms.get(event_id)
            if alarm is not None:
                self._send_ack(alarm)

    async def _until(self, conn: MqttConnection, work: Coroutine[Any, Any, None] | None) -> None:
        """Wait for ``work`` to finish, the connection to end or a stop, whichever is first;
        cancel the rest. Raises what ``work`` (or a connection bug) raised."""
        tasks = [asyncio.ensure_future(conn.wait_closed()), asyncio.ensure_future(self._stop.wait())]
        if work is not None:
            tasks.append(asyncio.ensure_future(work))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*tasks)
        for task in tasks:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error

    async def _goodbye(self, conn: MqttConnection) -> None:
        """Offline presence, retained, and its PUBACK (bounded) before DISCONNECT."""
        try:
            fut = conn.publish(self.options.presence_topic, presence_payload(False), qos=1, retain=True)
            async with asyncio.timeout(GOODBYE_TIMEOUT):
                await fut
        except TimeoutError:
            self._notice(f"offline presence not acknowledged within {GOODBYE_TIMEOUT} s")
        except UplinkError as exc:
            self._notice(f"offline presence not sent: {exc}")
        else:
            self._emit("presence", online=False, topic=self.options.presence_topic)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            return

    def _on_own_presence(self, payload: bytes, retain: bool) -> None:
        """Sparkplug B's host rule: an "offline" published on our presence topic while we are
        up (the late will of an earlier session of ours, or another client) is overwritten
        with "online" at once, or the gateways would hold their events for nobody."""
        conn = self._conn
        if retain or self._stop.is_set() or conn is None or not conn.connected:
            return  # retained: the state before we said online (our own publish follows it)
        try:
            online = parse_json_object(payload).get("online")
        except InvalidPayload:
            return
        now = asyncio.get_running_loop().time()
        if online is not False or now - self._reasserted < REASSERT_EVERY:
            return
        self._reasserted = now
        try:
            fut = conn.publish(self.options.presence_topic, presence_payload(True), qos=1, retain=True)
        except UplinkError:
            return  # the connection is going; the next one announces online anyway
        fut.add_done_callback(consume_outcome)
        self._emit("presence", online=True, topic=self.options.presence_topic, reason="reasserted")

    def _report_down(self, was_up: bool, reason: str, retry_in: float) -> None:
        """Once per outage (and when the reason changes), not on every failed attempt."""
        if was_up or reason != self._down_reason:
            self._emit("disconnected", reason=reason, was_connected=was_up, retry_in=round(retry_in, 2))
        self._down_reason = reason

    # -- messages ------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic == self.options.presence_topic:
            self._on_own_presence(payload, retain)
            return
        self.counts["messages"] += 1
        kind, base = classify(topic)
        try:
            if kind == "event":
                self._on_event(topic, payload)
            elif kind == "cmd-result":
                self._on_result(topic, base, payload)
            elif kind == "status":
                self._on_status(topic, base, payload, retain)
            elif kind == "heartbeat":
                parse_json_object(payload)
                self.counts["heartbeats"] += 1
                self._emit("heartbeat", topic=topic, gateway=_last_level(base))
            elif kind == "snapshots":
                self.counts["snapshots"] += 1
                event_id = topic.rsplit("/", 1)[-1]
                self._emit(
                    "snapshot", topic=topic, gateway=_last_level(base), event_id=event_id, bytes=len(payload)
                )
            else:  # commands (our own acks among them) and anything else: not for display
                self.counts["other"] += 1
        except InvalidPayload as exc:
            self._invalid(topic, str(exc))
        except UNEXPECTED as exc:  # a payload no check foresaw: counted and reported like one
            self._invalid(topic, f"cannot handle it: {type(exc).__name__}: {exc}")

    def _on_event(self, topic: str, payload: bytes) -> None:
        ev = parse_event(topic, payload)
        self.counts["events"] += 1
        if not self._ids.add(ev.id):
            self.counts["duplicates"] += 1
            show = partial(self._emit_event, ev, SeqVerdict(), duplicate=True, number=None)
            self._ack_first(partial(self._on_duplicate, ev), show)  # a fresh ack if due
            return
        verdict = self._seqs.see(f"{ev.school}/{ev.gateway}", ev.seq, repeat=ev.repeat is not None)
        self.counts["gaps"] += verdict.gap is not None
        self.counts["late"] += verdict.late
        if ev.is_alarm:
            self.counts["alarms"] += 1
        alarm = self._track_alarm(ev) if ev.needs_ack else None
        show = partial(self._emit_event, ev, verdict, duplicate=False, number=alarm.number if alarm else None)
        if alarm is not None and self.options.auto_ack:
            self._ack_first(partial(self._send_ack, alarm), show)
        else:
            show()

    def _on_duplicate(self, ev: ConsoleEvent) -> None:
        """A repeat of an alarm acked a while ago: our ack, or its reply, got lost. Again."""
        alarm = self._alarms.get(ev.id)
        if alarm is None or alarm.acked_at is None or self._stop.is_set():
            return
        if asyncio.get_running_loop().time() - alarm.acked_at > self.options.ack_retry_after:
            self._send_ack(alarm)

    def _on_result(self, topic: str, base: str, payload: bytes) -> None:
        obj = parse_json_object(payload)
        status = choice_field(obj, "status", RESULT_STATUSES)
        command_id = obj.get("id")
        event_id = self._commands.get(command_id) if isinstance(command_id, str) else None
        fields = {
            "command_id": command_id,
            "status": status,
            "reason": obj.get("reason"),
            "detail": obj.get("detail") or "",
            "gateway": _last_level(base),
        }
        if event_id is None:  # another platform's command, or one from before a restart
            self.counts["other_results"] += 1
            self._emit("cmd_result", topic=topic, name=obj.get("name"), **fields)
            return
        assert status is not None, "not optional"
        self.counts[f"ack_{status}"] += 1
        reply = ack_reply(obj)
        alarm = self._alarms.get(event_id)
        settled, number = self._settle(alarm, status, reply) if alarm is not None else (False, None)
        extra = {"type": alarm.event.type, "device": alarm.event.device} if alarm is not None else {}
        self._emit(
            "ack_result",
            event_id=event_id,
            number=number,
            ack=reply.ack,
            settled=settled,
            notes=list(reply.notes),
            results=obj.get("results"),
            **fields,
            **extra,
        )

    def _on_status(self, topic: str, base: str, payload: bytes, retain: bool) -> None:
        obj = parse_json_object(payload)
        state = text_field(obj, "state")
        self.counts["status"] += 1
        self._emit("status", topic=topic, gateway=_last_level(base), state=state, retained=retain)

    def _invalid(self, topic: str, reason: str) -> None:
        self.counts["invalid"] += 1
        if topic in self._invalid_topics or len(self._invalid_topics) >= MAX_INVALID_TOPICS:
            return
        self._invalid_topics.add(topic)
        self._emit("invalid", topic=topic, reason=reason)

    def _emit_event(
        self, ev: ConsoleEvent, verdict: SeqVerdict, *, duplicate: bool, number: int | None
    ) -> None:
        self._emit(
            "event",
            topic=ev.topic,
            id=ev.id,
            seq=ev.seq,
            gateway=ev.gateway,
            school=ev.school,
            type=ev.type,
            state=ev.state,
            severity=ev.severity,
            device=ev.device,
            device_name=ev.device_name,
            location=ev.location,
            occurred_at=ev.occurred_at,
            alarm=ev.is_alarm,
            repeat=ev.repeat,
            duplicate=duplicate,
            gap=list(verdict.gap) if verdict.gap else None,
            late=verdict.late,
            seq_unexpected=verdict.unexpected,
            number=number,
        )


def _last_level(base: str) -> str:
    return base.rsplit("/", 1)[-1]

"""One uplink = one platform: drains its outbox over MQTT QoS 1, in order, without loss.

Rows leave the outbox only on PUBACK (the acked cursor advances over the
contiguous acknowledged prefix). After any reconnect, delivery resumes from the
cursor, so messages that were in flight are sent again with the same bytes
(consumers dedupe on ``id``). Endpoints are tried in order; a connection that
fails, or an alarm not acknowledged within ``alarm_deadline``, moves the uplink
to the next endpoint. Reconnects back off (capped, jittered).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.acks import AckSupervisor, PlatformPresence, TroubleCode, trouble
from gateway.backoff import Backoff
from gateway.config import Endpoint, UplinkConfig
from gateway.errors import OutboxError, UplinkError
from gateway.events import (
    SNAPSHOT,
    DeviceKind,
    DeviceRef,
    EventState,
    Identity,
    Observation,
    format_time,
    is_alarm_type,
)
from gateway.logs import RateLimited
from gateway.mqtt import MqttConnection, Will
from gateway.outbox import Awaiting, Outbox, Row
from gateway.tasks import cancel_and_wait, consume_outcome

log = structlog.get_logger(__name__)

READ_BATCH = 256  # rows per outbox read: amortises the thread hop, small enough to stay fresh
# How long a clean stop may spend finishing in-flight publishes before it disconnects;
# the whole daemon must stop within 5 s (systemd TimeoutStopSec is larger still).
STOP_DRAIN_TIMEOUT = 1.5
STALL_MIN = 10.0
# The supervision loop (held alarms, re-notification, ack deadlines) looks at least this
# often: deadlines are whole seconds (2 s, 30 s), so a quarter second is precise enough,
# and a look costs a few dict reads. It also sees a critical alarm's first copy reach the
# broker this way (repeats count from then), instead of being woken on every PUBACK.
SUPERVISE_TICK = 0.25
# A session that ends within a second of its CONNACK was refused in effect (a subscription
# the broker's ACL refuses, a second client with our id): retry after the backoff, not at
# once, or the uplink would reconnect in a tight loop.
SESSION_STABLE = 1.0


class UplinkState(enum.StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class _Failover(Exception):
    """Delivery supervision gave up on this endpoint."""


@dataclass
class UplinkStats:
    published: int = 0
    acked: int = 0
    connects: int = 0
    connect_failures: int = 0
    failovers: int = 0
    last_puback_latency: float | None = None
    publish_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


def topic_base(cfg: UplinkConfig, ident: Identity) -> str:
    prefix = cfg.topic_prefix.format(region=ident.region, school=ident.school, gateway=ident.gateway)
    return f"{prefix}/{ident.school}/{ident.gateway}"


def tls_context(cfg: UplinkConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None)
    if cfg.tls.cert_file and cfg.tls.key_file:
        ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
    if cfg.tls.insecure:
        ctx.check_hostname = False
    return ctx


GATEWAY_DEVICE_KIND = DeviceKind.GATEWAY


CommandSink = Callable[[str, str, bytes, Callable[[str, bytes], None]], None]
"""(uplink name, command topic level, payload, reply(level, payload)): the command service."""
# Replies kept while the uplink is down: a platform sends a handful of commands a day; a
# thousand is far beyond any real backlog and bounds memory if one floods while offline.
MAX_QUEUED_REPLIES = 1000


class Uplink:
    """Delivers one outbox stream to one platform. ``run`` until cancelled or :meth:`stop`."""

    def __init__(
        self,
        cfg: UplinkConfig,
        identity: Identity,
        outbox: Outbox,
        *,
        report: Callable[[Observation], None],
        birth: Callable[[], Mapping[str, Any]],
        heartbeat: Callable[[], Mapping[str, Any]],
        heartbeat_interval: float,
        commands: CommandSink | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.identity = identity
        self.outbox = outbox
        self.base = topic_base(cfg, identity)
        self._report = report
        self._birth = birth
        self._heartbeat = heartbeat
        self._heartbeat_interval = heartbeat_interval
        self._commands = commands
        self._conn: MqttConnection | None = None  # the connection of the session in progress
        # Command replies not yet handed to a connection (published at the next session).
        self._replies: deque[tuple[str, bytes]] = deque(maxlen=MAX_QUEUED_REPLIES)
        self.state = UplinkState.IDLE
        self.endpoint: Endpoint | None = None
        self.stats = UplinkStats()
        self._stopping = asyncio.Event()
        # The delivery loop sleeps on one future of its own; whatever it waits for (a PUBACK,
        # a commit, the connection's end, stop()) resolves it through _poke. _progress says
        # a publish finished since the loop last looked (a poke while it was not waiting).
        self._waiter: asyncio.Future[None] | None = None
        self._progress = False
        self._topics: dict[str, str] = {}  # event type -> topic (a handful of types)
        self._limiter = RateLimited()
        self._trouble_active = False
        self._log = log.bind(uplink=cfg.name)
        self._password = cfg.read_password()
        self._tls = tls_context(cfg) if any(e.tls for e in cfg.endpoints) else None
        self._gateway_ref = DeviceRef(identity.gateway, DeviceKind.GATEWAY, "gateway")
        platform = cfg.platform
        self.presence = PlatformPresence(cfg.name, platform.presence_topic if platform else None)
        self.acks = (
            AckSupervisor(cfg.name, platform, outbox, self._gateway_ref, report)
            if platform is not None and platform.ack_types
            else None
        )
        self._supervise_wake = asyncio.Event()
        # A session whose oldest message has had no PUBACK this long is wedged: 5 alarm
        # deadlines, at least 10 s, so a slow WAN link is not mistaken for a dead one.
        self._stall_deadline = max(STALL_MIN, 5 * cfg.alarm_deadline)

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a clean stop: finish in-flight publishes (bounded), publish offline, disconnect."""
        self._stopping.set()
        self._poke()

    async def run(self) -> None:
        supervisor = asyncio.create_task(self._supervise_loop(), name=f"uplink:{self.name}:supervise")
        supervisor.add_done_callback(self._supervisor_ended)
        try:
            await self._run_sessions()
        finally:
            await cancel_and_wait(supervisor)

    async def _run_sessions(self) -> None:
        backoff = Backoff(initial=self.cfg.reconnect_initial, cap=self.cfg.reconnect_max)
        index = 0
        failures_in_round = 0
        while not self._stopping.is_set():
            endpoint = self.cfg.endpoints[index]
            healthy = await self._connect_and_deliver(endpoint)
            if self._stopping.is_set():
                break
            if healthy:
                backoff.reset()
                failures_in_round = 0
                continue  # the endpoint worked for a while: try it again first
            failures_in_round += 1
            index = (index + 1) % len(self.cfg.endpoints)
            if failures_in_round >= len(self.cfg.endpoints):
                failures_in_round = 0
                self.state = UplinkState.BACKOFF
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next_delay()):
                        await self._stopping.wait()
        self.state = UplinkState.STOPPED

    async def _connect_and_deliver(self, endpoint: Endpoint) -> bool:
        """One connection's life. True if it was up and lost later (worth retrying at once)."""
        self.state = UplinkState.CONNECTING
        self.endpoint = endpoint
        will = Will(f"{self.base}/status", self._status_payload("offline"), qos=1, retain=True)
        conn = MqttConnection(
            name=self.name,
            host=endpoint.host,
            port=endpoint.port,
            client_id=self.cfg.client_id or f"{self.identity.gateway}-{self.name}",
            keepalive=self.cfg.keepalive,
            connect_timeout=self.cfg.connect_timeout,
            max_inflight=self.cfg.inflight,
            tls=self._tls if endpoint.tls else None,
            username=self.cfg.username,
            password=self._password.get_secret_value() if self._password else None,
            will=will,
            on_message=self._on_message if self._commands is not None or self.presence.topic else None,
        )
        established = False
        up_since = 0.0
        try:
            async with conn:
                established = True
                up_since = time.monotonic()
                self.stats.connects += 1
                self.state = UplinkState.CONNECTED
                self._limiter.clear("connect")
                self._log.info("uplink connected", endpoint=str(endpoint))
                await self._session(conn)
                return True
        except UplinkError as exc:
            if not established:
                self.stats.connect_failures += 1
            suppressed = self._limiter.should_log("connect")
            if suppressed is not None:
                self._log.warning("uplink down", endpoint=str(endpoint), error=str(exc), repeats=suppressed)
            return established and time.monotonic() - up_since >= SESSION_STABLE
        except _Failover:
            self.stats.failovers += 1
            return False
        except OutboxError as exc:
            # A slow or failing disk: the rows stay where they are; retry after a backoff.
            suppressed = self._limiter.should_log("outbox")
            if suppressed is not None:
                self._log.error("outbox read failed", error=str(exc), repeats=suppressed)
            return False

    # -- the session ---------------------------------------------------------------------------

    async def _session(self, conn: MqttConnection) -> None:
        if self._commands is not None:  # before "online": a platform that sees it can command
            await conn.subscribe(f"{self.base}/cmd/+", qos=1)
        if self.presence.topic is not None:  # its retained state arrives after the SUBACK
            self.presence.reset()
            await conn.subscribe(self.presence.topic, qos=1)
        await conn.publish(f"{self.base}/status", self._status_payload("online"), qos=1, retain=True)
        self._conn = conn
        self._flush_replies()
        self._supervise_wake.set()  # repeats that fell due while disconnected go out now
        # Not a TaskGroup: the delivery loop's own errors must surface as themselves, not wrapped.
        beat = asyncio.create_task(self._heartbeat_loop(conn), name=f"uplink:{self.name}:heartbeat")
        try:
            await self._deliver(conn)
        finally:
            self._conn = None
            await cancel_and_wait(beat)
        if self._stopping.is_set() and conn.connected:
            with contextlib.suppress(UplinkError, TimeoutError):
                fut = conn.publish(f"{self.base}/status", self._status_payload("offline"), qos=1, retain=True)
                async with asyncio.timeout(STOP_DRAIN_TIMEOUT):
                    await fut

    async def _deliver(self, conn: MqttConnection) -> None:
        """Publish outbox rows in order with a window; advance the cursor on PUBACK."""
        wakeup = self.outbox.wakeup(self.name)
        pending: dict[int, tuple[Row, asyncio.Future[None], float]] = {}
        buffer: deque[Row] = deque()
        last_read = 0
        stop_deadline: float | None = None
        closed = asyncio.ensure_future(conn.wait_closed())
        closed.add_done_callback(self._poke)
        self.outbox.set_wake_callback(self.name, self._poke)
        try:
            while True:
                # Collect before filling: acknowledged rows free the window, and the fill must
                # then take from the read-ahead buffer at once; waiting first would stall on a
                # wakeup that only a new commit sets.
                self._collect(pending)
                if self._stopping.is_set():
                    stop_deadline = stop_deadline or time.monotonic() + STOP_DRAIN_TIMEOUT
                    if not pending or time.monotonic() >= stop_deadline:
                        return
                elif self.presence.allows_publishing:
                    last_read = await self._fill(conn, pending, buffer, last_read, wakeup)
                self._supervise(pending)
                if closed.done():
                    raise UplinkError(self.name, conn.close_reason or "connection lost")
                await self._wait_progress(wakeup, closed, pending, stop_deadline)
        finally:
            self.outbox.set_wake_callback(self.name, None)
            await cancel_and_wait(closed)
            for _, fut, _ in pending.values():
                fut.cancel()

    async def _fill(
        self,
        conn: MqttConnection,
        pending: dict[int, tuple[Row, asyncio.Future[None], float]],
        buffer: deque[Row],
        last_read: int,
        wakeup: asyncio.Event,
    ) -> int:
        window = self.cfg.inflight
        while len(pending) < window:
            if not buffer:
                wakeup.clear()  # cleared before the read: a commit after it sets it again
                rows = await self.outbox.read(self.name, last_read, READ_BATCH)
                if not rows:
                    break
                buffer.extend(rows)
                last_read = rows[-1].rowid
            row = buffer.popleft()
            topic = self._topic(row)
            fut = conn.publish(topic, row.payload, qos=1)
            fut.add_done_callback(self._on_done)
            pending[row.rowid] = (row, fut, time.monotonic())
            self.stats.published += 1
        return last_read

    def _on_done(self, _fut: asyncio.Future[None]) -> None:
        self._progress = True
        self._poke()

    def _poke(self, _fut: object = None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _collect(self, pending: dict[int, tuple[Row, asyncio.Future[None], float]]) -> None:
        """Advance the cursor over the acknowledged prefix (dict order is publish order)."""
        upto = None
        now = time.monotonic()
        while pending:
            rowid, (_row, fut, sent) = next(iter(pending.items()))
            if not fut.done():
                break
            if fut.cancelled() or fut.exception() is not None:
                exc = None if fut.cancelled() else fut.exception()
                raise UplinkError(self.name, f"publish failed: {exc}")
            del pending[rowid]
            upto = rowid
            self.stats.acked += 1
            latency = now - sent
            self.stats.last_puback_latency = latency
            self.stats.publish_latencies.append(latency)
        if upto is not None:
            self.outbox.ack(self.name, upto)
            if self._trouble_active and not self._alarm_overdue():
                # Cleared once no late alarm is left short of the broker: clearing at the first
                # PUBACK of a drain would flap active/cleared until the late alarm's turn came.
                self._trouble_active = False
                self._raise_trouble(EventState.CLEARED, "delivery restored", None)

    def _supervise(self, pending: dict[int, tuple[Row, asyncio.Future[None], float]]) -> None:
        """An alarm not PUBACKed within its deadline: trouble event, log once, fail over.

        Any message without a PUBACK for ``stall_deadline`` means the session is wedged
        even if keepalive still passes: reconnect and resend from the cursor.
        """
        now = time.monotonic()
        if pending:
            _row, first, first_sent = next(iter(pending.values()))
            if not first.done() and now - first_sent > self._stall_deadline:
                raise UplinkError(self.name, f"no PUBACK for {self._stall_deadline:.0f} s; reconnecting")
        for row, fut, sent in pending.values():
            if is_alarm_type(row.type) and not fut.done() and now - sent > self.cfg.alarm_deadline:
                self._log.error(
                    "alarm not acknowledged by broker in time; failing over",
                    event_id=row.event_id,
                    endpoint=str(self.endpoint),
                    deadline=self.cfg.alarm_deadline,
                )
                if not self._trouble_active:
                    self._trouble_active = True
                    self._raise_trouble(EventState.ACTIVE, "alarm not acknowledged within deadline", row)
                raise _Failover
            if now - sent <= self.cfg.alarm_deadline:
                break  # later rows were sent later still

    async def _wait_progress(
        self,
        wakeup: asyncio.Event,
        closed: asyncio.Future[None],
        pending: dict[int, tuple[Row, asyncio.Future[None], float]],
        stop_deadline: float | None,
    ) -> None:
        stopping = stop_deadline is not None  # draining for a stop: no new rows, only PUBACKs
        if self._progress or closed.done() or (not stopping and self._stopping.is_set()):
            self._progress = False
            return
        if (
            not stopping
            and len(pending) < self.cfg.inflight
            and wakeup.is_set()
            and self.presence.allows_publishing
        ):
            return  # a commit since the last read, and room in the window
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timeout = self._next_deadline(pending, stop_deadline)
        timer = None if timeout is None else loop.call_later(timeout, self._poke)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            self._progress = False

    def _next_deadline(
        self, pending: dict[int, tuple[Row, asyncio.Future[None], float]], stop_deadline: float | None
    ) -> float | None:
        now = time.monotonic()
        # Only the oldest pending alarm matters; stop at it instead of scanning the window.
        first_alarm = next((sent for row, _, sent in pending.values() if is_alarm_type(row.type)), None)
        deadlines = [] if first_alarm is None else [first_alarm + self.cfg.alarm_deadline]
        if pending:
            deadlines.append(next(iter(pending.values()))[2] + self._stall_deadline)
        if stop_deadline is not None:
            deadlines.append(stop_deadline)
        return max(0.0, min(deadlines) - now) + 0.001 if deadlines else None

    # -- status, heartbeat, trouble -------------------------------------------------------------

    def _topic(self, row: Row) -> str:
        if row.type == SNAPSHOT:  # a Blob: binary, on a topic of its own
            return f"{self.base}/snapshots/{row.event_id}"
        return self._type_topic(row.type)

    def _type_topic(self, event_type: str) -> str:
        topic = self._topics.get(event_type)
        if topic is None:
            topic = self._topics[event_type] = f"{self.base}/events/{event_type.replace('.', '/')}"
        return topic

    # -- commands -------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, _retain: bool) -> None:
        if topic == self.presence.topic:
            if self.presence.update(payload):
                self._poke()  # the delivery loop starts or stops filling
                self._supervise_wake.set()
            return
        prefix = f"{self.base}/cmd/"
        if self._commands is None or not topic.startswith(prefix):
            return
        self._commands(self.name, topic[len(prefix) :], payload, self.publish_reply)

    def publish_reply(self, level: str, payload: bytes) -> None:
        """Publish a command reply on ``cmd-result/{level}`` (QoS 1); queued while disconnected."""
        self._replies.append((f"{self.base}/cmd-result/{level}", payload))
        self._flush_replies()

    def _flush_replies(self) -> None:
        conn = self._conn
        while self._replies and conn is not None and conn.connected:
            topic, payload = self._replies[0]
            try:
                fut = conn.publish(topic, payload, qos=1)
            except UplinkError:
                return  # the connection is going; the next session publishes it
            self._replies.popleft()
            fut.add_done_callback(functools.partial(self._reply_sent, topic, payload))

    def _reply_sent(self, topic: str, payload: bytes, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:  # the connection died before PUBACK
            self._replies.append((topic, payload))

    def _status_payload(self, state: str) -> bytes:
        body: dict[str, Any] = {
            "state": state,
            "gateway": self.identity.gateway,
            "at": format_time(time.time()),
        }
        if state == "online":
            body.update(self._birth())
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    async def _heartbeat_loop(self, conn: MqttConnection) -> None:
        topic = f"{self.base}/heartbeat"
        while True:
            body = {"gateway": self.identity.gateway, "at": format_time(time.time()), **self._heartbeat()}
            payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            with contextlib.suppress(UplinkError):
                # QoS 0: a stale heartbeat is worthless; its outcome is read only to keep it quiet.
                conn.publish(topic, payload, qos=0).add_done_callback(consume_outcome)
            await asyncio.sleep(self._heartbeat_interval)

    def _raise_trouble(self, state: EventState, reason: str, row: Row | None) -> None:
        data: dict[str, Any] = {"endpoint": str(self.endpoint)}
        if row is not None:
            data["event_id"] = row.event_id
        code = TroubleCode.BROKER_DEADLINE
        self._report(trouble(self._gateway_ref, self.name, code, state, reason, **data))

    # -- supervision: held alarms, re-notification, ack deadlines ------------------------------

    async def _supervise_loop(self) -> None:
        while True:
            self._supervise_wake.clear()
            self._check_held_alarms()
            wait = SUPERVISE_TICK
            if self.acks is not None:
                publish = self._publish_repeat if self._can_publish() else None
                try:
                    due = await self.acks.tick(publish)
                except OutboxError as exc:
                    suppressed = self._limiter.should_log("ledger")
                    if suppressed is not None:
                        self._log.error("ack ledger update failed", error=str(exc), repeats=suppressed)
                    due = None
                if due is not None:
                    wait = min(wait, max(due, 0.001))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._supervise_wake.wait()

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        """The supervision loop ends only when cancelled; anything else is a bug to shout about
        (held alarms, re-notification and ack deadlines would stop silently)."""
        if not task.cancelled() and task.exception() is not None:
            self._log.critical(
                "delivery supervision stopped", error=repr(task.exception()), exc_info=task.exception()
            )

    def _check_held_alarms(self) -> None:
        """An alarm still short of the broker ``alarm_deadline`` after it happened is trouble,
        whether the uplink is down, the platform away or the window full (once per episode;
        cleared when delivery resumes)."""
        if self._trouble_active or not self._alarm_overdue():
            return
        age = self.outbox.oldest_alarm_age(self.name) or 0.0
        if self._conn is None:
            why = "uplink not connected"
        elif not self.presence.allows_publishing:
            why = f"platform {self.presence.state.value}; alarms held in the outbox"
        else:
            why = "alarm not yet at the broker"
        self._trouble_active = True
        self._log.error("alarm not delivered to the broker in time", reason=why, age=round(age, 3))
        self._raise_trouble(
            EventState.ACTIVE, f"alarm not at the broker within {self.cfg.alarm_deadline:g} s: {why}", None
        )

    def _alarm_overdue(self) -> bool:
        """An alarm of this uplink is still without a PUBACK ``alarm_deadline`` after it happened."""
        age = self.outbox.oldest_alarm_age(self.name)
        return age is not None and age > self.cfg.alarm_deadline

    def _can_publish(self) -> bool:
        conn = self._conn
        return conn is not None and conn.connected and self.presence.allows_publishing

    def _publish_repeat(self, entry: Awaiting, payload: bytes) -> bool:
        conn = self._conn
        if conn is None or not self._can_publish():
            return False
        try:
            fut = conn.publish(self._type_topic(entry.type), payload, qos=1)
        except UplinkError:
            return False  # the connection is going; the next session repeats it
        fut.add_done_callback(consume_outcome)
        self._log.info("critical alarm re-notified", event_id=entry.event_id, repeat=entry.repeats + 1)
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "endpoint": str(self.endpoint) if self.endpoint else None,
            "depth": self.outbox.depth(self.name),
            "oldest_age": self.outbox.oldest_age(self.name),
            "published": self.stats.published,
            "acked": self.stats.acked,
            "connects": self.stats.connects,
            "failovers": self.stats.failovers,
            "platform": {
                **self.presence.snapshot(),
                **(self.acks.snapshot() if self.acks is not None else {"awaiting_ack": None}),
            },
        }

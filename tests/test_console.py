"""``campus-gateway console``: presence, persistent session, dedupe, seq gaps, signed acks.

A private mosquitto per test; the gateway is played by a plain MqttConnection publishing
stamped events and answering the console's ``alarm.ack`` commands after checking them.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import pytest

from gateway.cli import main
from gateway.commands.reply import Status, result_payload
from gateway.commands.signing import FIELDS, signature
from gateway.console import (
    BrokerUrl,
    Console,
    ConsoleOptions,
    HumanView,
    InvalidPayload,
    JsonLines,
    RecentIds,
    SeqTracker,
    UsageError,
    classify,
)
from gateway.console.messages import choice_field, parse_json_object
from gateway.events import (
    DeviceKind,
    DeviceRef,
    Event,
    EventState,
    Identity,
    Observation,
    Severity,
    stamp,
    uuid7,
)
from gateway.mqtt import MqttConnection
from tests.support.broker import Mosquitto, free_port
from tests.support.waiting import eventually

KEY = b"c0ffee" * 8  # 48 bytes: over the 32-byte minimum of load_key
IDENT = Identity("gw-1", "school-1", "530102")
BASE = "campus/530102/school-1/gw-1"
BOX = DeviceRef("box-1", DeviceKind.ALARM_BOX, "Alarm box 1", "Main gate")
BOX2 = DeviceRef("box-2", DeviceKind.ALARM_BOX, "Alarm box 2", "Gym")
GATE = DeviceRef("gate", DeviceKind.BOLLARD, "Bollards", "Car park")
PRESENCE = "campus-platform/police/state"
STOP_TIMEOUT = 5.0  # a clean stop takes milliseconds; GOODBYE_TIMEOUT (2 s) is the worst case
PROCESS_TIMEOUT = 20.0  # a cold interpreter start imports paho, structlog: ~1 s on a loaded box

Record = dict[str, Any]


def alarm(seq: int, device: DeviceRef = BOX, state: EventState = EventState.ACTIVE) -> Event:
    code = 1120 if state is EventState.ACTIVE else 3120
    obs = Observation(device, "alarm.panic", Severity.CRITICAL, state, data={"contact_id": code})
    return stamp(obs, IDENT, seq)


def info(seq: int) -> Event:
    return stamp(Observation(GATE, "bollard.raised", Severity.INFO), IDENT, seq)


def topic_of(ev: Event) -> str:
    return f"{BASE}/events/{ev.topic_suffix}"


def repeat_of(ev: Event, n: int) -> bytes:
    body = json.loads(ev.payload)
    body["repeat"] = n
    return json.dumps(body, separators=(",", ":")).encode()


def of_kind(records: list[Record], kind: str, **match: Any) -> list[Record]:
    return [r for r in list(records) if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


class Client:
    """A plain MQTT client keeping what it receives on ``topics`` (the test's eyes)."""

    def __init__(self, port: int, *topics: str) -> None:
        self.topics = topics
        self.messages: list[tuple[str, bytes, bool]] = []
        self.conn = MqttConnection(
            name="test",
            host="127.0.0.1",
            port=port,
            client_id=f"test-{uuid.uuid4().hex[:8]}",
            keepalive=5,
            connect_timeout=2,
            max_inflight=100,
            on_message=self._on_message,
        )

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        self.messages.append((topic, payload, retain))

    async def __aenter__(self) -> Self:
        await self.conn.__aenter__()
        for topic in self.topics:
            await self.conn.subscribe(topic, qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.__aexit__(None, None, None)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self.conn.publish(topic, payload, qos=1, retain=retain)

    def json_on(self, topic: str) -> list[tuple[Any, bool]]:
        return [(json.loads(p), r) for t, p, r in list(self.messages) if t == topic]


def accepted_then_done(cmd: dict[str, Any]) -> list[bytes]:
    return [result_payload(cmd["id"], cmd["name"], status) for status in (Status.ACCEPTED, Status.DONE)]


class FakeGateway(Client):
    """Publishes events; answers each alarm.ack it receives (``answer``: accepted, then done)
    after checking its signature, or stays silent with ``reply=False`` (a lost ack)."""

    def __init__(
        self,
        port: int,
        *,
        reply: bool = True,
        answer: Callable[[dict[str, Any]], list[bytes]] = accepted_then_done,
    ) -> None:
        super().__init__(port, "campus/+/+/+/cmd/#")
        self.reply = reply
        self.answer = answer
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.forged: list[str] = []

    async def send(self, ev: Event, payload: bytes | None = None) -> None:
        await self.publish(topic_of(ev), ev.payload if payload is None else payload)

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        super()._on_message(topic, payload, retain)
        cmd = json.loads(payload)
        if sorted(cmd) != sorted(FIELDS) or signature(KEY, cmd) != cmd["sig"]:
            self.forged.append(topic)
            return
        self.commands.append((topic, cmd))
        if not self.reply:
            return
        base = topic.rsplit("/cmd/", 1)[0]
        for body in self.answer(cmd):
            self.conn.publish(f"{base}/cmd-result/{cmd['id']}", body, qos=1).add_done_callback(_consume)


def options(port: int, **kw: Any) -> ConsoleOptions:
    kw.setdefault("client_id", f"console-{uuid.uuid4().hex[:8]}")
    return ConsoleOptions(broker=BrokerUrl("127.0.0.1", port, False), **kw)


@asynccontextmanager
async def running(opts: ConsoleOptions) -> AsyncIterator[tuple[Console, list[Record]]]:
    """A console in-process, connected (subscribed, presence online) when this yields."""
    records: list[Record] = []
    console = Console(opts, records.append)
    task = asyncio.create_task(console.run())
    try:
        await eventually(lambda: of_kind(records, "connected") or task.done())
        if task.done():
            task.result()
        yield console, records
    finally:
        console.stop()
        async with asyncio.timeout(STOP_TIMEOUT):
            await task


async def barrier(gw: FakeGateway, records: list[Record], seq: int) -> None:
    """Publish an info event and wait until the console has it: everything published before
    it (same publisher, QoS 1, in order) has been handled."""
    ev = info(seq)
    await gw.send(ev)
    await eventually(lambda: of_kind(records, "event", id=ev.id))


# -- presence ---------------------------------------------------------------------------------


def start_cli(
    tmp_path: Path, port: int, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / f"console-{uuid.uuid4().hex[:6]}.jsonl"
    with out.open("wb") as stdout, (tmp_path / "console.err").open("ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "console", "--broker", f"mqtt://127.0.0.1:{port}", *extra],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return proc, out


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    await eventually(lambda: proc.poll() is not None, timeout=PROCESS_TIMEOUT)
    return proc.returncode


def end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


async def test_presence_is_retained_and_the_will_says_offline_on_sigkill(
    broker: Mosquitto, tmp_path: Path
) -> None:
    async with Client(broker.port, PRESENCE) as watcher:
        proc, _ = start_cli(tmp_path, broker.port, "--json", "--client-id", "console-kill")
        try:
            await eventually(lambda: watcher.json_on(PRESENCE), timeout=PROCESS_TIMEOUT)
            (online, _), *_ = watcher.json_on(PRESENCE)
            assert online["online"] is True
            assert isinstance(online["timestamp"], int)
            async with Client(broker.port, PRESENCE) as late:  # a newcomer gets it retained
                await eventually(lambda: late.json_on(PRESENCE))
                assert late.json_on(PRESENCE) == [(online, True)]
            proc.kill()  # SIGKILL: no goodbye, the broker publishes the will
            await wait_exit(proc)
            await eventually(lambda: len(watcher.json_on(PRESENCE)) == 2)
        finally:
            end(proc)
        will, _ = watcher.json_on(PRESENCE)[1]
        assert will["online"] is False
        assert isinstance(will["timestamp"], int)
        assert will["timestamp"] <= online["timestamp"]  # set at connect, before the online one
        async with Client(broker.port, PRESENCE) as late:
            await eventually(lambda: late.json_on(PRESENCE))
            assert late.json_on(PRESENCE) == [(will, True)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_publishes_offline_and_exits_0(
    broker: Mosquitto, tmp_path: Path, sig: signal.Signals
) -> None:
    async with Client(broker.port, PRESENCE) as watcher:
        proc, out = start_cli(tmp_path, broker.port, "--json", "--platform", "police")
        try:
            await eventually(lambda: watcher.json_on(PRESENCE), timeout=PROCESS_TIMEOUT)
            proc.send_signal(sig)
            assert await wait_exit(proc) == 0
            await eventually(lambda: len(watcher.json_on(PRESENCE)) == 2)
        finally:
            end(proc)
    (online, _), (offline, _) = watcher.json_on(PRESENCE)
    assert (online["online"], offline["online"]) == (True, False)
    assert offline["timestamp"] >= online["timestamp"]
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line is JSON
    kinds = [r["kind"] for r in records]
    assert kinds[-2:] == ["presence", "stopped"]
    assert "connected" in kinds
    assert of_kind(records, "presence") == [records[-2]]
    assert records[-2]["online"] is False


async def test_duration_stops_cleanly_with_offline_presence(broker: Mosquitto) -> None:
    async with Client(broker.port, PRESENCE) as watcher:
        records: list[Record] = []
        # Long enough to connect and say online on a loaded box; the stop is what is tested.
        console = Console(options(broker.port, duration=2.0), records.append)
        async with asyncio.timeout(STOP_TIMEOUT):
            await console.run()
        await eventually(lambda: len(watcher.json_on(PRESENCE)) == 2)
    assert [p["online"] for p, _ in watcher.json_on(PRESENCE)] == [True, False]
    assert [r["kind"] for r in records][-2:] == ["presence", "stopped"]
    assert of_kind(records, "notice")[0]["message"].startswith("no --key-file")


async def test_an_offline_written_over_its_presence_while_up_is_undone(broker: Mosquitto) -> None:
    # A late will of an earlier session of ours (same client id taken over) overwrites the
    # retained state with offline while we run: we say online again (Sparkplug B's host rule).
    async with running(options(broker.port)) as (_, records), Client(broker.port) as other:
        stale = json.dumps({"online": False, "timestamp": 1}).encode()
        await other.publish(PRESENCE, stale, retain=True)
        await eventually(lambda: of_kind(records, "presence", reason="reasserted"))
        async with Client(broker.port, PRESENCE) as late:  # what a gateway subscribing now gets
            await eventually(lambda: late.json_on(PRESENCE))
            (state, retained), *_ = late.json_on(PRESENCE)
        assert retained
        assert state["online"] is True
        assert state["timestamp"] > 1
        assert len(of_kind(records, "presence", reason="reasserted")) == 1


async def test_stop_while_connecting_or_retrying_returns_at_once(broker: Mosquitto) -> None:
    loop = asyncio.get_running_loop()
    broker.freeze()  # TCP connects (the kernel accepts), CONNACK never comes
    try:
        records: list[Record] = []
        console = Console(options(broker.port, connect_timeout=30), records.append)
        task = asyncio.create_task(console.run())
        await asyncio.sleep(0.2)  # into the connect attempt; there is no event to wait for
        started = loop.time()
        console.stop()
        async with asyncio.timeout(STOP_TIMEOUT):
            await task
        assert loop.time() - started < 1.0  # not the 30 s connect timeout
        assert [r["kind"] for r in records] == ["notice", "stopped"]
    finally:
        broker.thaw()
    records = []
    console = Console(options(free_port()), records.append)  # nothing listens: backing off
    task = asyncio.create_task(console.run())
    await eventually(lambda: of_kind(records, "disconnected"))
    started = loop.time()
    console.stop()
    async with asyncio.timeout(STOP_TIMEOUT):
        await task
    assert loop.time() - started < 1.0
    assert "Connection refused" in of_kind(records, "disconnected")[0]["reason"]
    assert len(of_kind(records, "disconnected")) == 1  # said once, not on every attempt


# -- acknowledgement ----------------------------------------------------------------------------


async def test_auto_ack_sends_one_signed_ack_per_alarm_and_shows_the_reply(broker: Mosquitto) -> None:
    async with (
        FakeGateway(broker.port) as gw,
        running(options(broker.port, key=KEY, auto_ack=True)) as (
            console,
            records,
        ),
    ):
        first, second = alarm(1), alarm(2, BOX2)
        await gw.send(first)
        await eventually(lambda: of_kind(records, "ack_result", event_id=first.id, status="done"))
        await gw.send(first, repeat_of(first, 1))  # a re-notification crossing our ack
        await gw.send(first)  # a plain duplicate (e.g. a resend after a lost PUBACK)
        await gw.send(second)
        await gw.send(alarm(3, state=EventState.CLEARED))  # cleared: nothing to acknowledge
        await eventually(lambda: of_kind(records, "ack_result", event_id=second.id, status="done"))
        await barrier(gw, records, 4)
        await eventually(lambda: len(gw.commands) == 2)

    sent = of_kind(records, "ack_sent")
    assert [r["event_id"] for r in sent] == [first.id, second.id]
    assert gw.forged == []
    for (topic, cmd), ev, device in zip(gw.commands, (first, second), ("box-1", "box-2"), strict=True):
        assert topic == f"{BASE}/cmd/alarm.ack"
        assert cmd["name"] == "alarm.ack"
        assert cmd["target"] == device
        assert cmd["args"] == {"event_id": ev.id}
    assert [r["command_id"] for r in sent] == [cmd["id"] for _, cmd in gw.commands]
    results = of_kind(records, "ack_result", event_id=first.id)
    assert [r["status"] for r in results] == ["accepted", "done"]
    assert results[0]["command_id"] == sent[0]["command_id"]
    assert results[1]["device"] == "box-1"
    firsts = of_kind(records, "event", id=first.id)
    assert [(r["duplicate"], r["repeat"]) for r in firsts] == [(False, None), (True, 1), (True, None)]
    assert console.counts["duplicates"] == 2
    assert console.counts["acks_sent"] == 2
    assert console.unacked == []


async def test_auto_ack_sends_a_fresh_ack_when_a_repeat_shows_the_first_was_lost(
    broker: Mosquitto,
) -> None:
    # 1.5 s: the first repeat must land within it even on a loaded box.
    opts = options(broker.port, key=KEY, auto_ack=True, ack_retry_after=1.5)
    async with FakeGateway(broker.port, reply=False) as gw, running(opts) as (_, records):
        ev = alarm(1)
        await gw.send(ev)
        await eventually(lambda: len(gw.commands) == 1)
        await gw.send(ev, repeat_of(ev, 1))  # within 1.5 s of the ack: may have crossed it
        await barrier(gw, records, 2)
        assert len(of_kind(records, "ack_sent")) == 1
        await asyncio.sleep(1.6)  # past ack_retry_after: the time itself is the condition
        await gw.send(ev, repeat_of(ev, 2))
        await eventually(lambda: len(gw.commands) == 2)
        await barrier(gw, records, 3)
    assert len(of_kind(records, "ack_sent")) == 2
    (_, one), (_, two) = gw.commands
    assert one["args"] == two["args"] == {"event_id": ev.id}
    assert one["id"] != two["id"]  # a fresh command: the gateway would refuse a replayed id


async def test_replies_are_seen_when_the_topics_do_not_cover_them(broker: Mosquitto) -> None:
    """Subscribed to events only: the console subscribes to cmd-result/+ before it acks."""
    opts = options(broker.port, key=KEY, auto_ack=True, topics=("campus/+/+/+/events/#",))
    async with FakeGateway(broker.port) as gw, running(opts) as (_, records):
        ev = alarm(1)
        await gw.send(ev)
        await eventually(lambda: of_kind(records, "ack_result", event_id=ev.id, status="done"))


async def test_the_operator_acks_by_number_or_the_oldest_with_enter(broker: Mosquitto) -> None:
    read_end, write_end = os.pipe()
    try:
        opts = options(broker.port, key=KEY, input_fd=read_end)
        async with FakeGateway(broker.port) as gw, running(opts) as (console, records):
            a1, a2 = alarm(1), alarm(2, BOX2)
            await gw.send(a1)
            await gw.send(a2)
            await eventually(lambda: len(console.unacked) == 2)
            numbers = {r["id"]: r["number"] for r in of_kind(records, "event")}
            assert numbers == {a1.id: 1, a2.id: 2}
            assert gw.commands == []  # nothing without the operator

            os.write(write_end, b"2\n")
            await eventually(lambda: of_kind(records, "ack_result", event_id=a2.id, status="done"))
            assert console.unacked == [a1.id]
            os.write(write_end, b"\n")  # Enter alone: the oldest
            await eventually(lambda: of_kind(records, "ack_result", event_id=a1.id, status="done"))
            os.write(write_end, b"\nhello\n")
            await eventually(lambda: len(of_kind(records, "notice")) >= 3)
            assert "no alarm is waiting" in of_kind(records, "notice")[1]["message"]
            assert "number" in of_kind(records, "notice")[2]["message"]

            a3 = alarm(3)
            await gw.send(a3)
            await eventually(lambda: of_kind(records, "event", id=a3.id))
            assert of_kind(records, "event", id=a3.id)[0]["number"] == 1  # numbers are reused

            os.close(write_end)  # EOF: no more input, the console keeps running
            write_end = -1
            await eventually(lambda: any("input closed" in r["message"] for r in of_kind(records, "notice")))
            a4 = alarm(4)
            await gw.send(a4)
            await eventually(lambda: of_kind(records, "event", id=a4.id))
            assert console.connected
        assert [cmd["args"]["event_id"] for _, cmd in gw.commands] == [a2.id, a1.id]
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def final_reply(
    cmd: dict[str, Any], status: Status, reason: str | None, detail: str, **results: dict[str, Any]
) -> list[bytes]:
    """accepted, then ``status`` with ``results`` (the gateway's own entry and the box's)."""
    return [
        result_payload(cmd["id"], cmd["name"], Status.ACCEPTED),
        result_payload(cmd["id"], cmd["name"], status, reason=reason, detail=detail, results=results),
    ]


def led_failed(ack: str) -> Callable[[dict[str, Any]], list[bytes]]:
    """The gateway's answer when the ack is ``ack`` (recorded, or unknown) but the LED failed."""

    def answer(cmd: dict[str, Any]) -> list[bytes]:
        box = cmd["target"]
        return final_reply(
            cmd,
            Status.FAILED,
            "unavailable",
            f"1 of 2 done; {box}: unavailable (no answer from the box)",
            gateway={"status": "done", "reason": None, "detail": f"ack: {ack}", "ack": ack},
            **{box: {"status": "failed", "reason": "unavailable", "detail": "no answer from the box"}},
        )

    return answer


def not_stored(cmd: dict[str, Any]) -> list[bytes]:
    """The gateway could not record the ack (no results.gateway.ack): try again."""
    failure = {"status": "failed", "reason": "storage", "detail": "the acknowledgement could not be recorded"}
    return final_reply(cmd, Status.FAILED, "storage", "disk full", gateway=failure)


def recorded(cmd: dict[str, Any]) -> list[bytes]:
    ok = {"status": "done", "reason": None, "detail": "acknowledged", "ack": "acknowledged"}
    return final_reply(
        cmd, Status.DONE, None, "2 of 2 done", gateway=ok, **{cmd["target"]: {"status": "done"}}
    )


def refused(cmd: dict[str, Any]) -> list[bytes]:
    return [
        result_payload(cmd["id"], cmd["name"], Status.REFUSED, reason="expired", detail="expired 41 s ago")
    ]


async def test_an_ack_the_gateway_recorded_is_done_even_if_the_box_led_failed(broker: Mosquitto) -> None:
    """results.gateway.ack decides, not the overall status: an ack recorded with the LED
    failing is done (the LED is a note), ``unknown`` leaves nothing to retry, and only an ack
    the gateway did not record is offered to the operator again."""
    led_ok, not_recorded, unknown, too_late = alarm(1), alarm(2, BOX2), alarm(3), alarm(4, BOX2)
    plan: dict[str, list[Callable[[dict[str, Any]], list[bytes]]]] = {
        led_ok.id: [led_failed("acknowledged")],
        not_recorded.id: [not_stored, recorded],  # the operator's second try gets through
        unknown.id: [led_failed("unknown")],
        too_late.id: [refused],
    }

    def answer(cmd: dict[str, Any]) -> list[bytes]:
        return plan[cmd["args"]["event_id"]].pop(0)(cmd)

    def finals(ev: Event) -> list[Record]:
        return [r for r in of_kind(records, "ack_result", event_id=ev.id) if r["status"] != "accepted"]

    alarms = (led_ok, not_recorded, unknown, too_late)
    async with (
        FakeGateway(broker.port, answer=answer) as gw,
        running(options(broker.port, key=KEY)) as (
            console,
            records,
        ),
    ):
        for ev in alarms:
            await gw.send(ev)
        await eventually(lambda: len(console.unacked) == 4)
        for ev in alarms:
            assert console.ack(ev.id)
        await eventually(lambda: all(finals(ev) for ev in alarms))
        assert console.unacked == [not_recorded.id, too_late.id]  # offered again: not recorded
        assert console.ack(not_recorded.id)
        await eventually(lambda: len(finals(not_recorded)) == 2)
        assert console.unacked == [too_late.id]

    (led,) = finals(led_ok)
    assert (led["status"], led["ack"], led["settled"], led["number"]) == (
        "failed",
        "acknowledged",
        True,
        None,
    )
    assert led["notes"] == ["box-1: failed (unavailable: no answer from the box)"]
    first, second = finals(not_recorded)
    assert (first["ack"], first["settled"], first["number"]) == (None, False, 1)
    assert (second["ack"], second["settled"], second["number"]) == ("acknowledged", True, None)
    (unk,) = finals(unknown)
    assert (unk["status"], unk["ack"], unk["settled"], unk["number"]) == ("failed", "unknown", True, None)
    (late,) = finals(too_late)
    assert (late["status"], late["settled"], late["number"]) == ("refused", False, 2)

    view = HumanView(io.StringIO())
    shown = {ev.id: [str(view.render(r)) for r in finals(ev)] for ev in alarms}
    (line,) = shown[led_ok.id]
    assert "ack recorded for" in line
    assert "box-1: failed (unavailable: no answer from the box)" in line
    assert "try again" not in line
    assert "ack FAILED" in shown[not_recorded.id][0]
    assert "storage: disk full  [1] to try again" in shown[not_recorded.id][0]
    assert "ack DONE for" in shown[not_recorded.id][1]
    (line,) = shown[unknown.id]
    assert "ack UNKNOWN" in line
    assert "nothing to retry" in line
    assert "try again" not in line
    assert "ack REFUSED" in shown[too_late.id][0]
    assert "[2] to try again" in shown[too_late.id][0]


async def test_auto_ack_is_sent_before_the_alarm_is_shown() -> None:
    """A sink that cannot show the alarm (here: its output cannot encode it) must not hold
    its acknowledgement back; the failure is counted and reported like a bad payload."""
    records: list[Record] = []

    def sink(record: Record) -> None:
        if record["kind"] == "event":
            raise UnicodeEncodeError("ascii", "caf\u00e9", 3, 4, "ordinal not in range(128)")
        records.append(record)

    console = Console(options(free_port(), key=KEY, auto_ack=True, ack_retry_after=0.01), sink)
    ev = alarm(1)
    console._on_message(topic_of(ev), ev.payload, False)
    assert [r["event_id"] for r in of_kind(records, "ack_queued")] == [ev.id]  # sent once connected
    assert console.counts["invalid"] == 1
    (invalid,) = of_kind(records, "invalid")
    assert "UnicodeEncodeError" in invalid["reason"]
    # A repeat long after our ack (it got lost): the fresh ack goes before the record too.
    console._alarms[ev.id].acked_at = asyncio.get_running_loop().time() - 1
    console._on_message(topic_of(ev), repeat_of(ev, 1), False)
    assert [r["event_id"] for r in of_kind(records, "ack_queued")] == [ev.id, ev.id]
    assert console.counts["invalid"] == 2
    shown: list[Record] = []  # a sink that works: the alarm's record still comes first
    Console(options(free_port(), key=KEY, auto_ack=True), shown.append)._on_message(
        topic_of(ev), ev.payload, False
    )
    assert [r["kind"] for r in shown] == ["event", "ack_queued"]


async def test_q_quits_and_without_a_key_alarms_are_only_shown(broker: Mosquitto) -> None:
    read_end, write_end = os.pipe()
    try:
        records: list[Record] = []
        console = Console(options(broker.port, input_fd=read_end), records.append)
        task = asyncio.create_task(console.run())
        async with FakeGateway(broker.port) as gw:
            await eventually(lambda: of_kind(records, "connected"))
            await gw.send(alarm(1))
            await gw.send(alarm(2))
            await eventually(lambda: len(of_kind(records, "event")) == 2)
            os.write(write_end, b"1\n")
            os.write(write_end, b"q\n")
            async with asyncio.timeout(STOP_TIMEOUT):
                await task
        assert gw.commands == []
        assert [r["number"] for r in of_kind(records, "event")] == [None, None]
        notices = [r["message"] for r in of_kind(records, "notice")]
        assert notices[0] == "no --key-file: alarms are shown but cannot be acknowledged"
        assert notices[1] == "cannot acknowledge: no --key-file"
        assert records[-1]["kind"] == "stopped"
    finally:
        os.close(read_end)
        os.close(write_end)


# -- dedupe, seq, session -----------------------------------------------------------------------


async def test_duplicates_are_counted_and_a_seq_gap_is_flagged_then_filled_late(broker: Mosquitto) -> None:
    async with FakeGateway(broker.port) as gw, running(options(broker.port)) as (console, records):
        events = {seq: alarm(seq) if seq % 2 else info(seq) for seq in range(1, 7)}
        for seq in (1, 2):
            await gw.send(events[seq])
        await gw.send(events[2])  # duplicate
        await gw.send(events[5])  # 3 and 4 missing
        await gw.send(events[5], repeat_of(events[5], 1))  # a repeat: a duplicate too
        await gw.send(events[3])  # late
        await gw.send(events[4])  # late
        await gw.send(events[6])
        await eventually(lambda: of_kind(records, "event", id=events[6].id))

    shown = [r for r in of_kind(records, "event") if not r["duplicate"]]
    assert [r["seq"] for r in shown] == [1, 2, 5, 3, 4, 6]
    assert [r["gap"] for r in shown] == [None, None, [3, 4], None, None, None]
    assert [r["late"] for r in shown] == [False, False, False, True, True, False]
    dups = [r for r in of_kind(records, "event") if r["duplicate"]]
    assert [(r["seq"], r["repeat"]) for r in dups] == [(2, None), (5, 1)]
    assert console.counts["duplicates"] == 2
    assert (console.counts["gaps"], console.counts["late"]) == (1, 2)
    assert records[-1]["kind"] == "stopped"
    assert records[-1]["duplicates"] == 2


async def test_events_sent_while_away_arrive_with_the_same_client_id(broker: Mosquitto) -> None:
    opts = options(broker.port, client_id="console-persistent")
    async with running(opts) as (_, records):
        pass  # connected and subscribed: the broker now holds the session
    assert records[-1]["kind"] == "stopped"
    async with FakeGateway(broker.port) as gw:
        away = [alarm(1), info(2), alarm(3)]
        for ev in away:
            await gw.send(ev)
        async with running(opts) as (_, records):
            await eventually(lambda: len(of_kind(records, "event")) == 3)
            assert of_kind(records, "connected")[0]["session_present"] is True
    assert [r["id"] for r in of_kind(records, "event")] == [ev.id for ev in away]


async def test_after_a_broker_restart_it_resubscribes_and_says_online_again(broker: Mosquitto) -> None:
    async with running(options(broker.port, key=KEY, auto_ack=True)) as (console, records):
        broker.restart()  # no persistence: subscriptions, session and retained presence gone
        await eventually(lambda: len(of_kind(records, "connected")) == 2)
        assert of_kind(records, "disconnected")[0]["was_connected"] is True
        assert of_kind(records, "connected")[1]["session_present"] is False
        async with Client(broker.port, PRESENCE) as watcher:
            await eventually(lambda: watcher.json_on(PRESENCE))
            assert watcher.json_on(PRESENCE)[0][0]["online"] is True
        async with FakeGateway(broker.port) as gw:
            ev = alarm(1)
            await gw.send(ev)
            await eventually(lambda: of_kind(records, "ack_result", event_id=ev.id, status="done"))
        assert console.connected


async def test_bad_payloads_are_counted_reported_once_per_topic_and_never_crash(broker: Mosquitto) -> None:
    good = alarm(1)
    body = json.loads(good.payload)
    no_contact = {**body, "type": "alarm.tamper", "data": {}}
    no_seq = {k: v for k, v in body.items() if k != "seq"} | {"type": "alarm.duress"}
    bad = [
        (topic_of(good), b"\xff\xfe not utf-8"),
        (topic_of(good), b"not json"),  # the same topic again: counted, not reported again
        (f"{BASE}/events/alarm/fire", b"[1, 2]"),
        (f"{BASE}/events/alarm/tamper", json.dumps(no_contact).encode()),
        (f"{BASE}/events/alarm/duress", json.dumps(no_seq).encode()),
        (f"{BASE}/events/bollard/raised", good.payload),  # topic and type disagree
        (f"{BASE}/events/x/y", b'{"a": ' * 100_000),  # deeply nested
        (f"{BASE}/status", b"offline"),
        (f"{BASE}/heartbeat", b"\x00"),
        (f"{BASE}/cmd-result/abc", b'{"id": "abc", "status": "maybe"}'),
    ]
    async with FakeGateway(broker.port) as gw, running(options(broker.port)) as (console, records):
        for topic, payload in bad:
            await gw.publish(topic, payload)
        await gw.send(good)
        await eventually(lambda: of_kind(records, "event", id=good.id))
        assert console.connected
    assert console.counts["invalid"] == len(bad)
    reported = of_kind(records, "invalid")
    assert [r["topic"] for r in reported] == list(dict.fromkeys(t for t, _ in bad))
    assert "UTF-8" in reported[0]["reason"]
    assert "contact_id" in reported[2]["reason"]
    assert "seq" in reported[3]["reason"]
    assert "does not match the topic" in reported[4]["reason"]


def edited(ev: Event, device: dict[str, Any] | None = None, **fields: Any) -> bytes:
    """The event's payload with some fields (and device fields) replaced."""
    body = json.loads(ev.payload)
    body.update(fields)
    body["device"].update(device or {})
    return json.dumps(body).encode()


def offline_console(sink: Callable[[Record], None], **kw: Any) -> Console:
    """A console never connected: its message handling is called directly."""
    return Console(options(free_port(), **kw), sink)


OWN_COLORS = ("\x1b[1;31m", "\x1b[33m", "\x1b[2m", "\x1b[0m")  # the view's own


def unsafe(text: str) -> list[str]:
    """The control characters (C0 but newline, DEL, C1) and lone surrogates in ``text``."""
    return [
        c
        for c in text
        if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF)
    ]


async def test_the_human_view_escapes_control_characters_from_payloads() -> None:
    """Whatever a publisher puts in a device name, a reason or a topic reaches the terminal
    as visible escapes, never as a control sequence; the view's own colors still work."""
    out = io.StringIO()
    console = offline_console(HumanView(out, color=True))
    ev = alarm(1)
    hostile = edited(
        ev,
        device={"id": "box\x1b[2J", "name": "\x1b]0;owned\x07", "location": "\x9b31mgate\x7f"},
        gateway="gw\r\n-1",
        school="s\x1bc",
        occurred_at="\x1b[5m2026",
    )
    console._on_message(topic_of(ev), hostile, False)
    console._on_message(f"{BASE}/status", b'{"state":"on\\u001b[8mline"}', False)
    reply = {"id": "x\x1b[1A", "name": "n\x9b2K", "status": "done", "reason": ["\x1b[2J"], "detail": "d\x07"}
    console._on_message(f"{BASE}/cmd-result/x", json.dumps(reply).encode(), False)
    console._on_message(f"{BASE}/events/x\x1b[2J/y", b"not json", False)
    console._on_message(f"{BASE}/snapshots/\x1b[2J", b"jpeg", False)
    text = out.getvalue()
    assert len(text.splitlines()) == 5  # one line each: no payload adds one (CR LF escaped)
    own = text
    for color in OWN_COLORS:
        own = own.replace(color, "")
    assert unsafe(own) == []
    for visible in (
        "box\\x1b[2J",
        "\\x1b]0;owned\\x07",
        "\\x9b31mgate\\x7f",
        "gw\\x0d\\x0a-1",
        "\\x1b[5m2026",
    ):
        assert visible in text
    for visible in ("on\\x1b[8mline", "x\\x1b[1A", "n\\x9b2K", "d\\x07", "events/x\\x1b[2J/y", "..\\x1b[2J"):
        assert visible in text
    alarm_line = text.splitlines()[0]
    assert alarm_line.startswith("\x1b[1;31m")  # still red, bold
    assert alarm_line.endswith("\x1b[0m")
    assert console.counts["invalid"] == 1


async def test_hostile_values_are_invalid_payloads_not_exceptions() -> None:
    """A list or an object where a choice (state, status, severity) belongs is refused by
    the field's check, like any other bad value, not by a TypeError."""
    records: list[Record] = []
    console = offline_console(records.append)
    fire = edited(alarm(2), type="alarm.fire", state={})
    hostile = [
        (topic_of(alarm(1)), edited(alarm(1), state=[1]), "state: [1] is not one of"),
        (f"{BASE}/events/alarm/fire", fire, "state: {} is not one of"),
        (f"{BASE}/cmd-result/x", b'{"id":"x","status":{}}', "status: {} is not one of"),
        (f"{BASE}/cmd-result/y", b'{"id":"y","status":["done"]}', "status: ['done'] is not one of"),
        (topic_of(info(3)), edited(info(3), severity=[]), "severity: [] is not one of"),
    ]
    for topic, payload, _ in hostile:
        console._on_message(topic, payload, False)
    assert console.counts["invalid"] == len(hostile)
    reported = of_kind(records, "invalid")
    assert [r["topic"] for r in reported] == [topic for topic, *_ in hostile]
    for record, (*_, reason) in zip(reported, hostile, strict=True):
        assert record["reason"].startswith(reason), record["reason"]
    with pytest.raises(InvalidPayload):
        choice_field({"state": [1]}, "state", frozenset({"active"}))
    with pytest.raises(InvalidPayload):
        choice_field({"status": {}}, "status", frozenset({"done"}))


async def test_a_time_past_year_9999_here_is_shown_as_sent() -> None:
    out = io.StringIO()
    console = offline_console(HumanView(out))
    ev = alarm(1)
    console._on_message(topic_of(ev), edited(ev, occurred_at="9999-12-31T23:59:59-12:00"), False)
    assert console.counts["invalid"] == 0
    (line,) = out.getvalue().splitlines()
    assert line.startswith("9999-12-31T23:59:59-12:00 ALARM")
    assert HumanView(io.StringIO()).render(
        {"kind": "notice", "at": "9999-12-31T23:59:59-12:00", "message": "x"}
    )


async def test_a_lone_surrogate_is_written_escaped_by_both_sinks() -> None:
    ev = alarm(1)
    payload = edited(ev, device={"name": "caf\u00e9 \ud800"})  # JSON: "caf\u00e9 \ud800"
    assert b"\\ud800" in payload
    human_bytes, json_bytes = io.BytesIO(), io.BytesIO()
    human = io.TextIOWrapper(human_bytes, encoding="utf-8")  # strict, as a UTF-8 terminal
    lines = io.TextIOWrapper(json_bytes, encoding="utf-8")
    for stream, sink in ((human, HumanView(human)), (lines, JsonLines(lines))):
        console = offline_console(sink)
        console._on_message(topic_of(ev), payload, False)
        assert console.counts["invalid"] == 0
        stream.flush()
    assert "box-1 (caf\u00e9 \\ud800, Main gate)" in human_bytes.getvalue().decode()
    (record,) = [json.loads(line) for line in json_bytes.getvalue().decode().splitlines()]
    assert record["device_name"] == "caf\u00e9 \ud800"  # the same JSON value, escaped


async def test_json_nested_too_deep_for_the_sinks_is_an_invalid_payload() -> None:
    """A value nested just under the parser's limit would overflow the stack of the sink
    that re-serialises it: such a payload is refused when parsed, at any depth."""
    for sink_type in (JsonLines, HumanView):
        out = io.StringIO()
        console = offline_console(sink_type(out))
        for depth in range(1, 1_000):
            payload = '{"id":"x","status":"done","name":' + "[" * depth + "]" * depth + "}"
            console._on_message(f"{BASE}/cmd-result/d{depth}", payload.encode(), False)
        assert console.counts["other_results"] + console.counts["invalid"] == 999
        assert console.counts["invalid"] == 999 - 31  # up to 32 levels: the object and 31 lists
    with pytest.raises(InvalidPayload, match="nested"):
        parse_json_object(b'{"a":' * 33 + b"1" + b"}" * 33)
    assert parse_json_object(b'{"a":' * 31 + b"1" + b"}" * 31)


async def test_status_snapshots_heartbeats_and_foreign_replies_are_shown(broker: Mosquitto) -> None:
    snap_id, jpeg = uuid7(), b"\xff\xd8 jpeg \xff\xd9"
    async with FakeGateway(broker.port) as gw:
        await gw.publish(f"{BASE}/status", b'{"state":"online","version":"1"}', retain=True)
        async with running(options(broker.port)) as (_, records):
            await gw.publish(f"{BASE}/snapshots/{snap_id}", jpeg)
            await gw.publish(f"{BASE}/heartbeat", b'{"gateway":"gw-1"}')
            reply = result_payload("someone-else-1", "bollard.raise", Status.DONE)
            await gw.publish(f"{BASE}/cmd-result/someone-else-1", reply)
            await eventually(lambda: of_kind(records, "cmd_result"))
        await gw.publish(f"{BASE}/status", b"", retain=True)  # leave no retained message behind
    (status,) = of_kind(records, "status")
    assert (status["gateway"], status["state"], status["retained"]) == ("gw-1", "online", True)
    (snap,) = of_kind(records, "snapshot")
    assert (snap["event_id"], snap["bytes"]) == (snap_id, len(jpeg))
    assert of_kind(records, "heartbeat")[0]["gateway"] == "gw-1"
    assert of_kind(records, "cmd_result")[0]["status"] == "done"
    view = io.StringIO()
    human = HumanView(view)
    for record in records:
        human(record)
    text = view.getvalue()
    assert "gateway gw-1 is online" in text
    assert f"snapshot from gw-1 for ..{snap_id[-8:]}" in text
    assert "heartbeat" not in text


# -- TLS ----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, int, Path]]:
    """A broker with a TLS listener whose certificate (for 127.0.0.1) a throwaway CA signed."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "1",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf",
        cwd=d,
    )  # fmt: skip
    tls_port = free_port()
    extra = [
        f"listener {tls_port} 127.0.0.1",
        f"cafile {d / 'ca.crt'}",
        f"certfile {d / 'server.crt'}",
        f"keyfile {d / 'server.key'}",
    ]
    with Mosquitto(tmp_path / "broker", extra_conf=extra) as b:
        yield b, tls_port, d / "ca.crt"


async def test_mqtts_with_a_ca_file(tls_broker: tuple[Mosquitto, int, Path]) -> None:
    _, tls_port, ca = tls_broker
    opts = ConsoleOptions(broker=BrokerUrl.parse(f"mqtts://127.0.0.1:{tls_port}"), ca_file=ca)
    async with running(opts) as (console, records):
        assert console.connected
        assert of_kind(records, "connected")[0]["broker"] == f"mqtts://127.0.0.1:{tls_port}"
    untrusted = ConsoleOptions(broker=BrokerUrl.parse(f"mqtts://127.0.0.1:{tls_port}"), duration=0.5)
    records = []
    async with asyncio.timeout(STOP_TIMEOUT):
        await Console(untrusted, records.append).run()  # the system CAs do not know the test CA
    assert "certificate" in of_kind(records, "disconnected")[0]["reason"]


# -- the command line ---------------------------------------------------------------------------


def _bad_cli_cases(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "short.key").write_text("too short\n")
    (tmp / "good.key").write_bytes(KEY)
    return [
        (["--broker", "http://127.0.0.1:1883"], "mqtt:// or mqtts://"),
        (["--broker", "mqtt://127.0.0.1:99999"], "out of range"),
        (["--broker", "mqtt://127.0.0.1:1883/campus"], "nothing may follow"),
        (["--broker", "mqtt://"], "no valid host"),
        (["--broker", "mqtt://user:secret@127.0.0.1"], "--username and --password-file"),
        (["--key-file", str(tmp / "missing.key")], "cannot read the command key"),
        (["--key-file", str(tmp / "short.key")], "at least 32"),
        (["--auto-ack"], "--auto-ack needs --key-file"),
        (["--topic", "campus/#/events"], "not a topic filter"),
        (["--topic", "campus/a+b"], "not a topic filter"),
        (["--presence-topic", "campus-platform/+/state"], "--presence-topic"),
        (["--platform", "police center"], "--platform"),
        (["--duration", "-1"], "positive"),
        (["--duration", "nan"], "positive"),
        (["--ca-file", str(tmp / "ca.pem")], "needs an mqtts://"),
        (["--broker", "mqtts://127.0.0.1", "--ca-file", str(tmp / "missing.pem")], "--ca-file"),
        (["--username", "u", "--password-file", str(tmp / "missing.pw")], "cannot read"),
        (["--password-file", str(tmp / "good.key")], "needs --username"),
    ]


def test_bad_cli_input_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, expected in _bad_cli_cases(tmp_path):
        assert main(["console", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)
        assert "Traceback" not in err
        assert "secret" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["console", "--duration", "soon"])
    assert exit_.value.code == 2
    assert "invalid float value" in capsys.readouterr().err


async def test_the_cli_writes_what_its_output_encoding_cannot_hold_escaped(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """An ASCII stdout (LANG=C, a serial console) and a device name in another script: the
    line is written with a backslash escape, not lost to a UnicodeEncodeError."""
    cafe = DeviceRef("box-9", DeviceKind.ALARM_BOX, "Caf\u00e9 \u2603", "Main gate")
    proc, out = start_cli(tmp_path, broker.port, env={"PYTHONIOENCODING": "ascii"})
    try:
        await eventually(lambda: b" connected to " in out.read_bytes(), timeout=PROCESS_TIMEOUT)
        async with FakeGateway(broker.port) as gw:
            await gw.send(alarm(1, cafe))
            await eventually(lambda: b"box-9" in out.read_bytes())
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    finally:
        end(proc)
    text = out.read_bytes().decode("ascii")
    assert "box-9 (Caf\\xe9 \\u2603, Main gate)" in text
    assert "Traceback" not in (tmp_path / "console.err").read_text()


def test_console_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["console", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--auto-ack" in out
    assert "--presence-topic" in out


# -- pieces -------------------------------------------------------------------------------------


def test_broker_urls() -> None:
    assert BrokerUrl.parse("mqtt://broker.example") == BrokerUrl("broker.example", 1883, False)
    assert BrokerUrl.parse("mqtts://10.0.0.1") == BrokerUrl("10.0.0.1", 8883, True)
    assert BrokerUrl.parse("mqtt://[::1]:1884/") == BrokerUrl("::1", 1884, False)
    assert str(BrokerUrl.parse("mqtt://[::1]:1884")) == "mqtt://[::1]:1884"
    for bad in ("127.0.0.1:1883", "mqtt://host:0", "mqtt://host:x", "mqtt://host?a=1", "tcp://host"):
        with pytest.raises(UsageError):
            BrokerUrl.parse(bad)


def test_defaults_follow_the_platform() -> None:
    opts = ConsoleOptions(broker=BrokerUrl("h", 1883, False), platform="edu")
    assert opts.presence_topic == "campus-platform/edu/state"
    assert opts.client_id == "campus-console-edu"
    assert opts.topics == ("campus/#",)
    assert "c0ffee" not in repr(ConsoleOptions(broker=BrokerUrl("h", 1883, False), key=KEY))


def test_seq_tracker_gaps_late_fills_repeats_and_bounds() -> None:
    seqs = SeqTracker(max_gateways=2, max_ranges=2)
    assert seqs.see("a", 10).gap is None  # the first seen is the baseline
    assert seqs.see("a", 14).gap == (11, 13)
    assert seqs.see("a", 12).late
    assert seqs.missing("a") == 2
    assert seqs.see("a", 3, repeat=True) == seqs.see("a", 3, repeat=True)  # old repeat: nothing
    assert not seqs.see("a", 3, repeat=True).unexpected
    assert seqs.see("a", 5).unexpected
    assert seqs.see("a", 16).gap == (15, 15)
    assert seqs.see("a", 18).gap == (17, 17)  # a third range: the oldest (11, 13 less 12) goes
    assert not seqs.see("a", 11).late
    assert seqs.see("a", 15).late
    assert seqs.see("a", 1).unexpected  # a gateway counting from 1 again: start over
    assert seqs.see("a", 2) == seqs.see("b", 1)  # both plain
    seqs.see("c", 1)  # a third gateway: the least recently seen ("a") is dropped
    assert seqs.see("a", 100).gap is None


def test_seq_tracker_stays_bounded_when_fills_split_ranges() -> None:
    """Each seq arriving from the middle of a missing range splits it in two: the cap holds
    after a split too (the oldest ranges go), not only when a gap adds one."""
    seqs = SeqTracker(max_ranges=10)
    seqs.see("a", 1)
    assert seqs.see("a", 1_002).gap == (2, 1_001)
    assert all(seqs.see("a", seq).late for seq in range(3, 1_000, 2))  # 2, 4, ... 998 still missing
    newest = [(seq, seq) for seq in range(982, 1_000, 2)] + [(1_000, 1_001)]
    assert seqs.missing("a") == 11  # not 501: 500 ranges, 490 of them over the cap
    assert seqs.missing_ranges("a") == newest
    assert seqs.see("a", 2).unexpected  # forgotten: only out of order now
    assert seqs.see("a", 1_000).late
    assert seqs.see("a", 982).late
    assert seqs.missing_ranges("a") == [*newest[1:-1], (1_001, 1_001)]


def test_recent_ids_are_bounded() -> None:
    ids = RecentIds(capacity=3)
    assert all(ids.add(x) for x in "abc")
    assert not ids.add("a")  # seen, and now the most recent
    assert ids.add("d")  # "b" is forgotten
    assert len(ids) == 3
    assert ids.add("b")
    assert not ids.add("a")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (f"{BASE}/events/alarm/panic", ("event", "")),
        (f"{BASE}/status", ("status", BASE)),
        (f"{BASE}/heartbeat", ("heartbeat", BASE)),
        (f"{BASE}/snapshots/abc", ("snapshots", BASE)),
        (f"{BASE}/cmd-result/abc", ("cmd-result", BASE)),
        (f"{BASE}/cmd/alarm.ack", ("cmd", BASE)),
        ("status", ("other", "")),
        (f"{BASE}/other", ("other", "")),
    ],
)
def test_topics_are_classified(topic: str, expected: tuple[str, str]) -> None:
    assert classify(topic) == expected


def test_human_view_makes_alarms_stand_out_and_hides_duplicates() -> None:
    ev = alarm(7)
    event: Record = {
        "kind": "event",
        "at": "2026-11-22T06:45:01.123Z",
        "id": ev.id,
        "seq": 7,
        "gateway": "gw-1",
        "type": "alarm.panic",
        "state": "active",
        "severity": "critical",
        "device": "box-1",
        "device_name": "Alarm box 1",
        "location": "Main gate",
        "occurred_at": "2026-11-22T06:45:01.000Z",
        "alarm": True,
        "repeat": None,
        "duplicate": False,
        "gap": [5, 6],
        "late": False,
        "number": 1,
    }
    plain, colored = io.StringIO(), io.StringIO()
    HumanView(plain)(event)
    HumanView(colored, color=True)(event)
    line = plain.getvalue()
    for part in ("ALARM", "gw-1", "box-1 (Alarm box 1, Main gate)", "alarm.panic", "active", "critical"):
        assert part in line
    assert "seq=7" in line
    assert f"id=..{ev.id[-8:]}" in line
    assert "[1] to acknowledge" in line
    assert "GAP: seq 5-6 missing (lost, or not routed to this platform)" in line
    assert colored.getvalue().startswith("\x1b[1;31m")
    assert HumanView(io.StringIO()).render({**event, "duplicate": True}) is None
    result = {
        "kind": "ack_result",
        "at": event["at"],
        "event_id": ev.id,
        "command_id": "c1",
        "status": "refused",
        "reason": "expired",
        "detail": "expired 3 s ago",
        "gateway": "gw-1",
        "number": 2,
    }
    assert "ack REFUSED" in str(HumanView(io.StringIO()).render(result))
    assert "expired: expired 3 s ago  [2] to try again" in str(HumanView(io.StringIO()).render(result))


def test_json_lines_are_one_object_per_line() -> None:
    out = io.StringIO()
    sink: Callable[[Record], None] = JsonLines(out)
    sink({"kind": "notice", "message": "é"})
    sink({"kind": "event", "path": Path("/x")})
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["notice", "event"]
    assert "é" in lines[0]

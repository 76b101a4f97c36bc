"""Alarm acknowledgement round trip: panic pressed -> alarm at the platform -> signed
``alarm.ack`` with the event's id -> acknowledgement stored durably + ack LED lit -> ``done``.

    python benchmarks/bench_ack.py [--quick] [--alarms 100] [--poll 0.1] [--linger 32]

The real daemon runs in a subprocess (``campus-gateway run``) with one uplink, ``police``, to a
private mosquitto: a command key allowing ``alarm.ack`` and a platform section
(``presence_topic: campus-platform/police/state``, ``ack_types: [alarm.panic]``,
``renotify_interval: 30``). An alarm box simulator (``generic-8di``: panic zones 0-5, tamper
6, reset key switch 7) runs in this process, polled every ``--poll`` seconds. A paho client
(its own thread, Nagle off) plays the platform: a retained presence ``{"online": true,
"timestamp": ms}`` (and the same offline as its will), subscriptions to ``events/#``,
``cmd-result/#`` and ``heartbeat``, every arrival timestamped.

Each alarm, one at a time, round the panic zones:

1. press the zone; the platform waits for its ``alarm.panic`` ``active`` event:
   *press -> alarm* latency (poll phase, debounce, outbox commit, uplink, broker);
2. at once, from the thread that saw the event, a signed ``alarm.ack`` with
   ``args.event_id`` = the event's id, target ``box-gate``: *event ack* latency, publish ->
   final reply (``done`` with ``results.gateway.ack == "acknowledged"``). This includes the
   verification, the durable ledger commit of the acknowledgement and the box's ack LED
   write + read-back;
3. release the zone and turn the key switch (input 7); the platform waits for the zone's
   ``cleared`` event (``cleared_by: key_switch``), so the next press is a new alarm;
4. at once, the baseline: the same ``alarm.ack`` to ``box-gate`` *without* ``event_id``
   (LED only, no ledger write), publish -> ``done``. Both commands are thus sent right after
   an alarm event of the same box reached the platform (the gateway's side of that event,
   PUBACK and latch file, is in the same state), interleaved alarm by alarm;
5. release the key, wait a poll and a half plus a random part of one poll (so that presses
   fall at every phase of the poll grid).

The ratio event ack / plain ack (p50 and p99) is the cost of recording the acknowledgement
durably. Every event carrying a ``"repeat"`` field (a re-notification) is counted: with a
30 s interval and each ack in milliseconds, the expected count is 0. After the last alarm
the platform keeps listening ``--linger`` seconds (default 32: the interval plus margin), so
every alarm of the run has had its whole interval; then the next heartbeat's
``awaiting_ack`` (expected 0) is read. ``uplink.trouble`` events are counted too (expected
none). Every wait is bounded; a timeout ends the run with the daemon's log tail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib  # also puts the repository root on sys.path
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.commands.signing import build_command
from simulators.alarm_box import AlarmBoxSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config

BASE = "campus/530102/sch-1/gw-1"
KEY = b"bench-key-0123456789abcdef0123456789abcdef"
BOX = "box-gate"
PRESENCE = "campus-platform/police/state"
PANIC_ZONES = range(6)  # generic-8di: inputs 0-5 are panic buttons
KEY_SWITCH = 7  # generic-8di: the reset key switch
RENOTIFY = 30.0  # seconds; the default
EVENT_TIMEOUT = 5.0  # an alarm not at the platform by then: the run stops (expected ~0.1 s)
REPLY_TIMEOUT = 10.0  # one command's bound (expected ~10 ms)
HEARTBEAT_WAIT = 8.0  # the daemon's heartbeat_interval (5 s) plus margin
MAX_ALARMS = 1000
WARMUP = 2  # unmeasured rounds first: connections, presence, first-time code paths


def now_ms() -> int:
    return int(time.time() * 1000)


class Platform:
    """The police platform: presence, events, command replies (paho's own thread)."""

    def __init__(self, port: int) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.first: dict[str, float] = {}
        self.final: dict[str, tuple[float, dict[str, Any]]] = {}
        self.heartbeats: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-police")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        offline = json.dumps({"online": False, "timestamp": now_ms()})
        self.client.will_set(PRESENCE, offline, qos=1, retain=True)
        self.client.connect("127.0.0.1", port, keepalive=5)
        # Nagle off, as bench_commands: otherwise a PUBACK then a command back to back wait
        # for the broker's delayed ACK (40 ms), a cost of this client, not of the gateway.
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        topics = [(f"{BASE}/events/#", 1), (f"{BASE}/cmd-result/#", 1), (f"{BASE}/heartbeat", 0)]
        self.client.subscribe(topics)
        self.client.loop_start()
        if not self._subscribed.wait(REPLY_TIMEOUT):
            raise TimeoutError("the platform's subscription was not acknowledged")
        self.set_presence(True)

    def set_presence(self, online: bool) -> None:
        body = json.dumps({"online": online, "timestamp": now_ms()})
        self.client.publish(PRESENCE, body, qos=1, retain=True).wait_for_publish(REPLY_TIMEOUT)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        at = time.monotonic()
        body = json.loads(msg.payload)
        with self._cond:
            if "/cmd-result/" in msg.topic:
                self.first.setdefault(body["id"], at)
                if body["status"] != "accepted":
                    self.final[body["id"]] = (at, body)
            elif msg.topic.endswith("/heartbeat"):
                self.heartbeats.append((at, body))
            else:
                self.events.append((at, body))
            self._cond.notify_all()

    def wait_event(
        self, since: int, match: Callable[[dict[str, Any]], bool]
    ) -> tuple[int, float, dict[str, Any]]:
        """The first event from index ``since`` on that ``match``es: (index, arrival, body)."""

        def find() -> tuple[int, float, dict[str, Any]] | None:
            for i in range(since, len(self.events)):
                at, body = self.events[i]
                if match(body):
                    return i, at, body
            return None

        with self._cond:
            found = None
            deadline = time.monotonic() + EVENT_TIMEOUT
            while (found := find()) is None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if found is None:
                raise TimeoutError(f"no matching event within {EVENT_TIMEOUT} s")
            return found

    def send_ack(self, event_id: str | None) -> tuple[str, float]:
        args = {"event_id": event_id} if event_id is not None else {}
        cmd = build_command(KEY, "alarm.ack", target=BOX, args=args, ttl=60)
        at = time.monotonic()
        self.client.publish(f"{BASE}/cmd/alarm.ack", json.dumps(cmd), qos=1).wait_for_publish(REPLY_TIMEOUT)
        return cmd["id"], at

    def wait_final(self, command_id: str) -> tuple[float, dict[str, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: command_id in self.final, REPLY_TIMEOUT):
                raise TimeoutError(f"no final reply to {command_id} within {REPLY_TIMEOUT} s")
            return self.final[command_id]

    def event_then_ack(
        self, since: int, match: Callable[[dict[str, Any]], bool], with_event_id: bool
    ) -> dict[str, Any]:
        """Wait for the event, then at once ``alarm.ack`` (with its id or without), wait for ``done``."""
        index, arrived, event = self.wait_event(since, match)
        cid, sent = self.send_ack(event["id"] if with_event_id else None)
        done, reply = self.wait_final(cid)
        return {
            "index": index,
            "arrived": arrived,
            "event": event,
            "accepted": self.first[cid] - sent,
            "done": done - sent,
            "reply": reply,
        }

    def heartbeat_after(self, t: float) -> dict[str, Any] | None:
        with self._cond:
            self._cond.wait_for(lambda: any(at > t for at, _ in self.heartbeats), HEARTBEAT_WAIT)
            later = [body for at, body in self.heartbeats if at > t]
            return later[-1] if later else None

    def close(self) -> None:
        self.set_presence(False)  # a clean stop, as the integration guide asks
        self.client.disconnect()
        self.client.loop_stop()


def panic(zone: int, state: str) -> Callable[[dict[str, Any]], bool]:
    def match(body: dict[str, Any]) -> bool:
        return (
            body.get("type") == "alarm.panic"
            and body.get("state") == state
            and body.get("data", {}).get("zone") == zone
            and "repeat" not in body
        )

    return match


def config(tmp: Path, broker: Mosquitto, box_port: int, poll: float) -> dict[str, Any]:
    (tmp / "police.key").write_bytes(KEY)
    uplink = {
        "name": "police",
        "endpoints": [broker.url],
        "commands": {"key_file": str(tmp / "police.key"), "allow": ["alarm.ack"]},
        "platform": {
            "presence_topic": PRESENCE,
            "ack_types": ["alarm.panic"],
            "renotify_interval": RENOTIFY,
        },
    }
    box = {"id": BOX, "driver": "modbus_alarm", "host": "127.0.0.1", "port": box_port,
           "profile": "generic-8di", "poll_interval": poll}  # fmt: skip
    return base_config(tmp / "state", [uplink], [box])


def problem(kind: str, body: dict[str, Any], want_ack: bool) -> str | None:
    """Why a final reply is not the expected one (None: it is)."""
    if body["status"] != "done":
        return f"{kind}: {body['status']} {body.get('reason')}: {body.get('detail')}"
    ack = body.get("results", {}).get("gateway", {}).get("ack")
    if want_ack and ack != "acknowledged":
        return f"{kind}: results.gateway.ack = {ack!r}"
    if not want_ack and ack is not None:
        return f"{kind}: unexpected results.gateway.ack = {ack!r}"
    return None


async def one_alarm(
    box: AlarmBoxSimulator, platform: Platform, zone: int, poll: float
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """One press -> alarm -> event ack; reset by the key switch -> plain ack. See the module doc."""
    since = len(platform.events)
    pressed = time.monotonic()
    await box.press(zone)
    acked = await asyncio.to_thread(platform.event_then_ack, since, panic(zone, "active"), True)
    since = acked["index"] + 1
    await box.release(zone)
    await box.press(KEY_SWITCH)  # the zone's release is seen no later than the key's press
    plain = await asyncio.to_thread(platform.event_then_ack, since, panic(zone, "cleared"), False)
    await box.release(KEY_SWITCH)
    await asyncio.sleep(1.5 * poll + random.uniform(0, poll))  # key release settled; a random phase
    return acked["arrived"] - pressed, acked, plain


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    # Nagle off on the broker's sockets too, as bench_commands (a platform's broker should).
    broker = Mosquitto(tmp / "broker", extra_conf=("set_tcp_nodelay true",)).start()
    alarm_ms: list[float] = []
    event_ack: dict[str, list[float]] = {"accepted": [], "done": []}
    plain_ack: dict[str, list[float]] = {"accepted": [], "done": []}
    per_round: list[float] = []
    bad: list[str] = []
    try:
        async with AlarmBoxSimulator(inputs=8) as box:
            platform = await asyncio.to_thread(Platform, broker.port)
            daemon = Daemon(tmp / "daemon", config(tmp, broker, box.port, args.poll))
            try:
                await asyncio.to_thread(daemon.start)
                try:
                    for i in range(WARMUP + args.alarms):
                        zone = PANIC_ZONES[i % len(PANIC_ZONES)]
                        latency, acked, plain = await one_alarm(box, platform, zone, args.poll)
                        whys = (problem("event ack", acked["reply"], True),
                                problem("plain ack", plain["reply"], False))  # fmt: skip
                        bad.extend(f"alarm {i}: {why}" for why in whys if why is not None)
                        if i < WARMUP:
                            continue
                        alarm_ms.append(latency)
                        for into, res in ((event_ack, acked), (plain_ack, plain)):
                            into["accepted"].append(res["accepted"])
                            into["done"].append(res["done"])
                        per_round.append(acked["done"] / plain["done"])
                    # Every alarm gets its whole re-notification interval: a missed ack shows.
                    await asyncio.sleep(args.linger)
                    beat = await asyncio.to_thread(platform.heartbeat_after, time.monotonic())
                except TimeoutError as exc:
                    raise TimeoutError(f"{exc}\ndaemon log tail:\n{daemon.log_tail()}") from exc
            finally:
                await asyncio.to_thread(daemon.stop)
                await asyncio.to_thread(platform.close)
    finally:
        broker.stop()
    events = [body for _, body in platform.events]
    repeats = [b for b in events if "repeat" in b]
    troubles = [b.get("data", {}).get("code") for b in events if b.get("type") == "uplink.trouble"]
    police = (beat or {}).get("uplinks", {}).get("police", {})
    e50, p50 = benchlib.pct(event_ack["done"], 50), benchlib.pct(plain_ack["done"], 50)
    e99, p99 = benchlib.pct(event_ack["done"], 99), benchlib.pct(plain_ack["done"], 99)
    return {
        "alarms": args.alarms,
        "poll_s": args.poll,
        "renotify_interval_s": RENOTIFY,
        "linger_s": args.linger,
        "press_to_alarm_ms": benchlib.ms_stats(alarm_ms),
        "event_ack_ms": {k: benchlib.ms_stats(v) for k, v in event_ack.items()},
        "plain_ack_ms": {k: benchlib.ms_stats(v) for k, v in plain_ack.items()},
        "ratio_p50": round(e50 / p50, 2),
        "ratio_p99": round(e99 / p99, 2),
        "ratio_per_round_median": round(benchlib.median(per_round), 2),
        "ledger_cost_p50_ms": round((e50 - p50) * 1000, 1),
        "repeats": len(repeats),
        "uplink_trouble": troubles,
        "awaiting_ack_last_heartbeat": police.get("awaiting_ack") if beat else "no heartbeat",
        "not_as_expected": bad[:5],
        "not_as_expected_count": len(bad),
    }


def bounded_alarms(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_ALARMS:
        raise argparse.ArgumentTypeError(f"1..{MAX_ALARMS}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 alarms: a smoke run")
    ap.add_argument("--alarms", type=bounded_alarms, default=100, help=f"alarms (1..{MAX_ALARMS})")
    ap.add_argument("--poll", type=float, default=0.1, help="the box's poll interval, seconds")
    ap.add_argument(
        "--linger",
        type=float,
        default=RENOTIFY + 2,
        help=f"seconds to count re-notifications after the last alarm (0..120; {RENOTIFY + 2:g})",
    )
    args = ap.parse_args()
    if args.quick:
        args.alarms = 20
    if not 0.05 <= args.poll <= 1.0:
        ap.error("--poll: 0.05..1.0 s")
    if not 0 <= args.linger <= 120:
        ap.error("--linger: 0..120 s")
    benchlib.quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-ack-") as tmp:
        res = asyncio.run(run(args, Path(tmp)))
    a = res["press_to_alarm_ms"]
    rows = [["press -> alarm at the platform", a["n"], "", "", a["p50"], a["p90"], a["p99"], a["max"]]]
    for label, key in (("alarm.ack with event_id (ledger + LED)", "event_ack_ms"),
                       ("alarm.ack without (LED only): baseline", "plain_ack_ms")):  # fmt: skip
        acc, done = res[key]["accepted"], res[key]["done"]
        rows.append(
            [label, done["n"], acc["p50"], acc["p99"], done["p50"], done["p90"], done["p99"], done["max"]]
        )
    print(benchlib.table(["what", "n", "accepted p50", "p99", "p50", "p90", "p99", "max"], rows))
    print(
        f"times in ms; acks from publish to the final reply; poll {args.poll} s. "
        f"ratio with / without event_id: p50 {res['ratio_p50']}, p99 {res['ratio_p99']}, "
        f"per-alarm median {res['ratio_per_round_median']} (+{res['ledger_cost_p50_ms']} ms p50)"
    )
    print(
        f"re-notifications seen: {res['repeats']} (renotify_interval {RENOTIFY:g} s, "
        f"listened {args.linger:g} s past the last alarm); "
        f"uplink.trouble: {len(res['uplink_trouble'])}; awaiting_ack at the last heartbeat: "
        f"{res['awaiting_ack_last_heartbeat']}; not as expected: {res['not_as_expected_count']}"
    )
    benchlib.emit({"bench": "ack", "quick": args.quick, "machine": benchlib.machine(), **res})


if __name__ == "__main__":
    main()

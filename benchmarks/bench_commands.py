"""Command round trip: signed command published -> verified -> Modbus write + read-back ->
state confirmed -> reply at the platform. p50 / p99 per command.

    python benchmarks/bench_commands.py [--quick] [--rounds 100]

The real daemon runs in a subprocess (``campus-gateway run``) with one uplink to a private
mosquitto and a command key; a bollard PLC simulator (one controller, travel 0.2 s both
ways) and an alarm box simulator run in this process. A paho client (its own thread)
publishes each command and timestamps the replies on ``cmd-result/{id}``:

* ``alarm.ack``: verify, write the ack LED coil, read it back, reply ``done``: the
  gateway's own overhead end to end (no mechanical travel);
* ``bollard.raise`` / ``bollard.lower``, alternating: verify, read the state, write the
  command register, read it back, follow the state (a read every 0.1 s) until raised /
  lowered, reply ``done``. This includes the simulated 0.2 s travel and the 0.1 s
  confirmation grid, so its floor is about 0.3 s.

Commands are sent one at a time (each after the previous one's final reply); every loop
is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib  # also puts the repository root on sys.path
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from gateway.commands.signing import build_command
from simulators.alarm_box import AlarmBoxSimulator
from simulators.bollard import BollardSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config

ROOT = Path(__file__).resolve().parents[1]
BASE = "campus/530102/sch-1/gw-1"
KEY = b"bench-key-0123456789abcdef0123456789abcdef"
TRAVEL = 0.2  # seconds, both ways, in the simulator and the profile
REPLY_TIMEOUT = 10.0  # one command's bound: far above its travel and confirmation bounds


class Replies:
    """Final replies by command id, timestamped on arrival (paho's own thread)."""

    def __init__(self, port: int) -> None:
        self.first: dict[str, float] = {}
        self.final: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-platform")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        # Nagle off here too: two PUBACKs back to back would hold the next command for the
        # broker's delayed ACK (40 ms), a cost of this client, not of the gateway.
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.subscribe(f"{BASE}/cmd-result/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        at = time.monotonic()
        body = json.loads(msg.payload)
        with self._cond:
            self.first.setdefault(body["id"], at)
            if body["status"] != "accepted":
                self.final[body["id"]] = (at, body)
                self._cond.notify_all()

    def wait(self, command_id: str) -> tuple[float, dict[str, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: command_id in self.final, REPLY_TIMEOUT):
                raise TimeoutError(f"no final reply to {command_id} within {REPLY_TIMEOUT} s")
            return self.final[command_id]

    def send(self, name: str, target: str) -> tuple[str, float]:
        cmd = build_command(KEY, name, target, ttl=60)
        at = time.monotonic()
        self.client.publish(f"{BASE}/cmd/{name}", json.dumps(cmd), qos=1).wait_for_publish(REPLY_TIMEOUT)
        return cmd["id"], at

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def config(tmp: Path, broker: Mosquitto, bollard_port: int, box_port: int) -> dict[str, Any]:
    profile = yaml.safe_load((ROOT / "config/profiles/generic-bollard-plc.yaml").read_text())
    profile["travel"] = {"raise": TRAVEL, "lower": TRAVEL, "emergency_raise": TRAVEL}
    (tmp / "profiles").mkdir()
    (tmp / "profiles/bench-bollard.yaml").write_text(yaml.safe_dump(profile))
    (tmp / "police.key").write_bytes(KEY)
    uplink = {
        "name": "police",
        "endpoints": [broker.url],
        "commands": {
            "key_file": str(tmp / "police.key"),
            "allow": ["bollard.raise", "bollard.lower", "alarm.ack"],
        },
    }
    devices = [
        {"id": "bollard-1", "driver": "modbus_bollard", "host": "127.0.0.1", "port": bollard_port,
         "profile": "bench-bollard", "gate": "main"},
        {"id": "box-1", "driver": "modbus_alarm", "host": "127.0.0.1", "port": box_port,
         "profile": "generic-8di"},
    ]  # fmt: skip
    cfg = base_config(tmp / "state", [uplink], devices)
    cfg["profiles_dir"] = str(tmp / "profiles")
    return cfg


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    # Nagle off on the broker's sockets, as a platform's broker should be configured: with it
    # on, mosquitto holds a reply back until the client's delayed ACK of the previous packet
    # (40 ms on Linux), which measured 44-87 ms per reply here instead of about 2.
    broker = Mosquitto(tmp / "broker", extra_conf=("set_tcp_nodelay true",)).start()
    raise_seconds = {"raise_seconds": TRAVEL, "lower_seconds": TRAVEL, "emergency_seconds": TRAVEL}
    try:
        async with BollardSimulator(**raise_seconds) as gate, AlarmBoxSimulator(inputs=8) as box:
            daemon = Daemon(tmp / "daemon", config(tmp, broker, gate.port, box.port))
            await asyncio.to_thread(daemon.start)
            replies = await asyncio.to_thread(Replies, broker.port)
            try:
                await asyncio.sleep(1.0)  # the first polls and the uplink's subscription
                plan = [("alarm.ack", "box-1")] * args.rounds
                plan += [
                    ("bollard.raise" if i % 2 == 0 else "bollard.lower", "bollard-1")
                    for i in range(args.rounds)
                ]
                accepted: dict[str, list[float]] = {}
                final: dict[str, list[float]] = {}
                bad: list[dict[str, Any]] = []
                for name, target in plan:
                    cid, sent = await asyncio.to_thread(replies.send, name, target)
                    at, body = await asyncio.to_thread(replies.wait, cid)
                    if body["status"] != "done":
                        bad.append(body)
                    key = "bollard.raise/lower" if name.startswith("bollard") else name
                    accepted.setdefault(key, []).append(replies.first[cid] - sent)
                    final.setdefault(key, []).append(at - sent)
            finally:
                await asyncio.to_thread(replies.close)
                await asyncio.to_thread(daemon.stop)
    finally:
        broker.stop()
    return {
        "rounds": args.rounds,
        "travel_s": TRAVEL,
        "accepted_ms": {k: benchlib.ms_stats(v) for k, v in accepted.items()},
        "done_ms": {k: benchlib.ms_stats(v) for k, v in final.items()},
        "not_done": bad[:5],
        "not_done_count": len(bad),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 rounds: a smoke run")
    ap.add_argument("--rounds", type=int, default=100, help="commands of each kind")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 20
    benchlib.quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-commands-") as tmp:
        res = asyncio.run(run(args, Path(tmp)))
    rows = []
    for key in res["done_ms"]:
        a, d = res["accepted_ms"][key], res["done_ms"][key]
        rows.append([key, d["n"], a["p50"], a["p99"], d["p50"], d["p90"], d["p99"], d["max"]])
    print(benchlib.table(["command", "n", "accepted p50", "p99", "done p50", "p90", "p99", "max"], rows))
    print(
        f"times in ms from publish at the platform; bollard travel {TRAVEL} s; "
        f"not done: {res['not_done_count']}"
    )
    benchlib.emit({"bench": "commands", "quick": args.quick, "machine": benchlib.machine(), **res})


if __name__ == "__main__":
    main()

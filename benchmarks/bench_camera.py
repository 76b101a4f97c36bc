"""Camera event latency: an event emitted by the ONVIF camera simulator -> the daemon's
pull-point -> outbox -> mosquitto -> platform subscriber. p50 / p99.

    python benchmarks/bench_camera.py [--quick] [--events 200] [--cameras 4]

The real daemon runs in a subprocess (``campus-gateway run``, READY over NOTIFY_SOCKET)
with ``--cameras`` cameras, each an ``OnvifCameraSimulator`` in this process, pulled with
a 5 s long poll (the default ``pull_timeout``). A paho subscriber (its own thread)
timestamps arrivals. Events alternate motion on / off on a random camera, one every
0.2 s plus a random offset, so they land at every phase of the long poll. Latency =
arrival - the moment the simulator queued the message (``time.time()`` of this process).
Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import benchlib  # also puts the repository root on sys.path

from simulators.onvif_camera import OnvifCameraSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config
from tests.support.subscriber import Subscriber

PASSWORD = "bench-pass"
TOPIC = "campus/530102/sch-1/gw-1/events/camera/#"
SPACING = 0.2  # seconds between events (plus up to as much again at random)
ARRIVAL_TIMEOUT = 10.0  # the last event must arrive within this after it was emitted


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    broker = Mosquitto(tmp / "broker", extra_conf=("set_tcp_nodelay true",)).start()
    try:
        async with AsyncExitStack() as stack:
            sims = [
                await stack.enter_async_context(OnvifCameraSimulator(user="admin", password=PASSWORD))
                for _ in range(args.cameras)
            ]
            (tmp / "cam.pw").write_text(PASSWORD)
            devices = [
                {"id": f"cam-{i + 1}", "driver": "onvif_camera", "host": "127.0.0.1", "port": s.port,
                 "username": "admin", "password_file": str(tmp / "cam.pw")}
                for i, s in enumerate(sims)
            ]  # fmt: skip
            uplink = {"name": "police", "endpoints": [broker.url]}
            daemon = Daemon(tmp / "daemon", base_config(tmp / "state", [uplink], devices))
            sub = Subscriber(broker.port, TOPIC).start()
            await asyncio.to_thread(daemon.start)
            try:
                for _ in range(200):  # bounded: every camera subscribed
                    if all(s.subscriptions() for s in sims):
                        break
                    await asyncio.sleep(0.1)
                sent: list[tuple[str, str, float]] = []  # (camera, state, emitted at)
                rng = random.Random(7)
                states = dict.fromkeys(range(len(sims)), False)
                for _ in range(args.events):
                    i = rng.randrange(len(sims))
                    states[i] = not states[i]
                    await sims[i].emit("tns1:VideoSource/MotionAlarm", data={"State": states[i]})
                    sent.append((f"cam-{i + 1}", "active" if states[i] else "cleared", time.time()))
                    await asyncio.sleep(SPACING + rng.uniform(0, SPACING))
                for _ in range(int(ARRIVAL_TIMEOUT / 0.1)):  # bounded: the stragglers arrive
                    if len(sub.messages) >= len(sent):
                        break
                    await asyncio.sleep(0.1)
            finally:
                sub.stop()
                await asyncio.to_thread(daemon.stop)
    finally:
        broker.stop()
    latencies = match(sent, [(m.at, json.loads(m.payload)) for m in sub.messages])
    return {
        "cameras": args.cameras,
        "events": len(sent),
        "arrived": len(latencies),
        "latency_ms": {
            "p50": round(benchlib.pct(latencies, 50), 1),
            "p90": round(benchlib.pct(latencies, 90), 1),
            "p99": round(benchlib.pct(latencies, 99), 1),
            "max": round(max(latencies), 1),
        }
        if latencies
        else None,
    }


def match(sent: list[tuple[str, str, float]], got: list[tuple[float, dict[str, Any]]]) -> list[float]:
    """Each emitted event with the first not yet used arrival of its camera and state after it."""
    used: set[int] = set()
    out = []
    for camera, state, at in sent:
        for n, (arrived, body) in enumerate(got):
            if (
                n not in used
                and arrived >= at
                and body["device"]["id"] == camera
                and body.get("state") == state
            ):
                used.add(n)
                out.append((arrived - at) * 1000)
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 events: a smoke run")
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--cameras", type=int, default=4)
    args = ap.parse_args()
    if args.quick:
        args.events = 40
    benchlib.quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-camera-") as tmp:
        res = asyncio.run(run(args, Path(tmp)))
    lat = res["latency_ms"] or {}
    print(
        benchlib.table(
            ["cameras", "events", "arrived", "p50 ms", "p90 ms", "p99 ms", "max ms"],
            [
                [
                    res["cameras"],
                    res["events"],
                    res["arrived"],
                    lat.get("p50"),
                    lat.get("p90"),
                    lat.get("p99"),
                    lat.get("max"),
                ]
            ],
        )
    )
    benchlib.emit({"bench": "camera", "quick": args.quick, "machine": benchlib.machine(), **res})


if __name__ == "__main__":
    main()

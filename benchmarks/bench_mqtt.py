"""QoS 1 publishing: MqttConnection against raw paho, on a private mosquitto (loopback).

    python benchmarks/bench_mqtt.py --count 20000

(a) baseline: a plain paho Client driven by paho's own network thread (loop_start), the same
    window (max_inflight_messages_set), every message handed to publish() at once;
(b) MqttConnection (paho driven by the asyncio loop), window 32, every message at once,
    awaiting all PUBACK futures;
(c) PUBACK round trip through MqttConnection with one message in flight: p50 / p99.

Both throughput runs publish the same payloads to the same broker in the same process, one
after the other; the broker has no subscriber, so it acknowledges and drops (both alike).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mqtt import MqttConnection
from tests.support.broker import Mosquitto

# Everything below is bounded: a run that does not finish in this time is reported as failed.
RUN_TIMEOUT = 120.0


def bench_paho(port: int, count: int, window: int, payload: bytes) -> float:
    """msgs/s for a plain paho client on its own network thread."""
    done = threading.Event()
    acked = 0

    def on_publish(client: paho.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        nonlocal acked
        acked += 1
        if acked == count:
            done.set()

    connected = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError("paho: no CONNACK")
        started = time.perf_counter()
        for _ in range(count):
            client.publish("bench/paho", payload, qos=1)
        if not done.wait(RUN_TIMEOUT):
            raise TimeoutError(f"paho: {acked} of {count} acknowledged")
        elapsed = time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()
    return count / elapsed


def connection(port: int, window: int, client_id: str) -> MqttConnection:
    return MqttConnection(
        name="bench",
        host="127.0.0.1",
        port=port,
        client_id=client_id,
        keepalive=30,
        connect_timeout=5,
        max_inflight=window,
    )


async def bench_ours(port: int, count: int, window: int, payload: bytes) -> float:
    """msgs/s for MqttConnection, all handed over at once, waiting for every PUBACK."""
    async with connection(port, window, "bench-ours") as conn:
        started = time.perf_counter()
        futs = [conn.publish("bench/ours", payload) for _ in range(count)]
        await asyncio.wait_for(asyncio.gather(*futs), RUN_TIMEOUT)
        elapsed = time.perf_counter() - started
    return count / elapsed


async def bench_rtt(port: int, samples: int, payload: bytes) -> list[float]:
    """PUBACK round trips (seconds) with exactly one message in flight."""
    out = []
    async with connection(port, 1, "bench-rtt") as conn:
        for _ in range(samples):
            started = time.perf_counter()
            await asyncio.wait_for(conn.publish("bench/rtt", payload), RUN_TIMEOUT)
            out.append(time.perf_counter() - started)
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _rates(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="messages per throughput run")
    ap.add_argument("--window", type=int, default=32, help="QoS 1 messages in flight")
    ap.add_argument("--size", type=int, default=300, help="payload bytes (a typical event is 300-600)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved throughput rounds")
    ap.add_argument("--rtt-samples", type=int, default=2000, help="round trips measured one at a time")
    args = ap.parse_args()
    # Connect/close lines would interleave with the figures; warnings still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    payload = b"x" * args.size

    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp, Mosquitto(Path(tmp)) as broker:
        print(
            f"mosquitto on 127.0.0.1:{broker.port}; {args.count} messages of {args.size} bytes, "
            f"QoS 1, window {args.window}"
        )
        # Warm-up: first connections, imports and the broker's allocations are not measured.
        bench_paho(broker.port, 1000, args.window, payload)
        asyncio.run(bench_ours(broker.port, 1000, args.window, payload))

        # Interleaved rounds, medians reported: a shared box drifts; both sides see the drift.
        bases, ours_runs = [], []
        for _ in range(args.repeat):
            bases.append(bench_paho(broker.port, args.count, args.window, payload))
            ours_runs.append(asyncio.run(bench_ours(broker.port, args.count, args.window, payload)))
        rtt = asyncio.run(bench_rtt(broker.port, args.rtt_samples, payload))

    base, ours = statistics.median(bases), statistics.median(ours_runs)
    runs = f"median of {args.repeat} runs"
    print(f"(a) paho, own network thread (baseline): {base:10,.0f} msg/s  ({runs}: {_rates(bases)})")
    print(f"(b) MqttConnection on the asyncio loop:   {ours:10,.0f} msg/s  ({runs}: {_rates(ours_runs)})")
    print(f"    ratio b/a {ours / base:.2f}")
    print(
        f"(c) PUBACK round trip, one in flight ({len(rtt)} samples): "
        f"p50 {pct(rtt, 50) * 1e3:.3f} ms  p99 {pct(rtt, 99) * 1e3:.3f} ms  "
        f"mean {statistics.fmean(rtt) * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()

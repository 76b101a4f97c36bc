"""Pipeline throughput and backlog drain, as ratios of raw paho QoS 1 publishing in the same run.

    python benchmarks/bench_pipeline.py [--quick] [--count 20000] [--backlog 100000]
                                        [--producers 50] [--window 32] [--rounds 3]

Everything runs in this process against a private mosquitto on a loopback port (no
subscriber: the broker acknowledges and drops, alike for both sides).

* ours, throughput: the gateway's own ``Outbox`` (SQLite WAL, synchronous=FULL, group
  commit) and ``Uplink`` (``MqttConnection``, QoS 1, window ``--window``), built the way
  ``gateway/app.py`` builds them from a config parsed by ``gateway.config.parse``. The
  uplink is connected first; then ``--producers`` tasks call ``Outbox.append`` (the path
  a driver's event takes) for ``--count`` events in all; the time runs until the last one
  is PUBACKed (the uplink's outbox depth is 0).
* ours, drain: ``--backlog`` rows are appended with ``append_many`` while no uplink runs;
  then the uplink is started and the time runs until the depth is 0 (connect included).
* baseline, both: a plain paho client on paho's own network thread (``loop_start``), the
  same window, the same number of messages of the same size (the mean size of the events
  ours publishes) to the same topic, handed to ``publish()`` as fast as paho takes them
  (at most 10,000 queued: see :func:`paho`); timed from the first publish to the last
  PUBACK. It is ``bench_mqtt.bench_paho`` made able to send 100,000 messages.
* diagnostics, not part of the goals: ``bench_mqtt.bench_ours`` (``MqttConnection`` alone,
  no outbox) and the same appends with no uplink (the outbox alone).

Baseline and ours alternate over ``--rounds`` rounds; medians and per-round ratios are
reported. The CPU column is process CPU (all threads: the outbox writer and reader,
paho's thread) per message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib  # also puts the repository root on sys.path
import paho.mqtt.client as mqtt
from bench_mqtt import bench_ours
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from gateway import config
from gateway.events import DeviceKind, DeviceRef, EventState, Identity, Observation, Severity, stamp
from gateway.outbox import Outbox
from gateway.uplink import Uplink, UplinkState
from tests.support.broker import Mosquitto

GOAL_RATIO = 0.7
RUN_TIMEOUT = 300.0  # one measured run; far above what any run takes
FILL_CHUNK = 2000
PAHO_QUEUE = 10_000  # messages queued in the baseline's paho client at most (ids are 16 bits)
PAHO_TOPIC = "campus/530102/sch-1/gw-1/events/alarm/intrusion"  # the topic ours publishes to
DEVICE = DeviceRef("box-1", DeviceKind.ALARM_BOX, "Alarm box 1", "Main gate")


def observation(i: int, event_type: str) -> Observation:
    return Observation(
        DEVICE,
        event_type,
        Severity.MAJOR,
        EventState.ACTIVE if i % 2 == 0 else EventState.CLEARED,
        data={"zone": 1, "name": "Perimeter beam", "contact_id": 1130, "n": i},
    )


def gateway_config(state_dir: Path, port: int, window: int) -> config.GatewayConfig:
    return config.parse(
        {
            "identity": {"school": "sch-1", "gateway": "gw-1", "region": "530102"},
            "state_dir": str(state_dir),
            "api": {"socket": None},
            "uplinks": [
                {
                    "name": "police",
                    "endpoints": [f"mqtt://127.0.0.1:{port}"],
                    "topic_prefix": "campus/{region}",
                    "inflight": window,
                }
            ],
        },
        "bench_pipeline",
    )


class Pipeline:
    """An Outbox and the Uplink draining it, as gateway/app.py composes them."""

    def __init__(self, state_dir: Path, port: int, window: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = gateway_config(state_dir, port, window)
        self.identity = Identity(
            self.cfg.identity.gateway, self.cfg.identity.school, self.cfg.identity.region
        )
        self.uplink_cfg = self.cfg.uplinks[0]
        self.name = self.uplink_cfg.name
        self.reports: list[Observation] = []
        self.outbox = Outbox(
            state_dir / "outbox.db", self.identity, {self.name: self.uplink_cfg.outbox_max_rows}
        )
        self.uplink: Uplink | None = None
        self.task: asyncio.Task[None] | None = None

    async def start_uplink(self) -> None:
        self.uplink = Uplink(
            self.uplink_cfg,
            self.identity,
            self.outbox,
            report=self.reports.append,
            birth=lambda: {"version": "bench", "devices": []},
            heartbeat=dict,
            heartbeat_interval=self.cfg.heartbeat_interval,
        )
        self.task = asyncio.create_task(self.uplink.run(), name="uplink")

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = RUN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.task is not None and self.task.done():
                self.task.result()
                raise RuntimeError(f"the uplink stopped while waiting for {what}")
            if time.monotonic() > deadline:
                print(self.diagnose(), flush=True)
                raise TimeoutError(f"{what}: not within {timeout} s")
            await asyncio.sleep(0.002)

    def diagnose(self) -> str:
        """What the uplink and the outbox say when a run does not finish (for a bug report)."""
        lines = [f"STALLED: depth {self.outbox.depth(self.name)}; outbox {self.outbox.stats}"]
        lane = self.outbox._lanes[self.name]  # a private view, for the report only
        lines.append(
            f"lane: acked {lane.acked} handed {lane.handed} depth {lane.depth} "
            f"oldest {lane.oldest()} wake set {lane.wake.is_set()}"
        )
        if self.uplink is not None:
            u = self.uplink
            lines.append(f"uplink: state {u.state} endpoint {u.endpoint} stats {u.stats}")
        lines.append(f"reports: {[(r.type, r.state, dict(r.data)) for r in self.reports]}")
        lines.extend(f"task {t.get_name()}: {t.get_stack(limit=12)}" for t in asyncio.all_tasks())
        return "\n".join(lines)

    async def stop_uplink(self) -> None:
        if self.uplink is not None and self.task is not None:
            self.uplink.stop()
            try:
                await asyncio.wait_for(self.task, 10)
            finally:
                self.task = None


async def ours_throughput(
    tmp: Path, port: int, args: argparse.Namespace, spy: benchlib.PySpy | None = None
) -> tuple[float, float, dict[str, float]]:
    """(events/s, CPU us per event, outbox stats) from the first append to the last PUBACK.

    With ``spy``, py-spy records the timed part.
    """
    pipe = Pipeline(tmp, port, args.window)
    async with pipe.outbox:
        await pipe.start_uplink()
        assert pipe.uplink is not None
        uplink = pipe.uplink
        await pipe.wait(lambda: uplink.state is UplinkState.CONNECTED, "uplink connected", 10)
        per = args.count // args.producers

        async def producer(k: int) -> None:
            for i in range(per):
                await pipe.outbox.append(observation(k * per + i, args.type), [pipe.name])

        with spy or contextlib.nullcontext():
            cpu0, t0 = time.process_time(), time.perf_counter()
            producers = asyncio.gather(*(producer(k) for k in range(args.producers)))
            await asyncio.wait_for(producers, RUN_TIMEOUT)
            await pipe.wait(lambda: pipe.outbox.depth(pipe.name) == 0, "all acknowledged")
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await pipe.stop_uplink()
        if pipe.reports:
            print(f"    uplink reported: {[r.type for r in pipe.reports]}")
        st = pipe.outbox.stats
    n = per * args.producers
    stats = {
        "commits": st.commits,
        "event_commits": st.event_commits,
        "mean_batch": st.mean_batch,
        "mean_commit_ms": 1e3 * st.mean_commit_seconds,
    }
    return n / elapsed, 1e6 * cpu / n, stats


async def append_only(tmp: Path, args: argparse.Namespace) -> float:
    """Diagnostic: events/s of the same appends with no uplink running (commits only)."""
    await asyncio.to_thread(tmp.mkdir, parents=True, exist_ok=True)
    async with Outbox(tmp / "outbox.db", Identity("gw-1", "sch-1", "530102"), {"police": 10**7}) as outbox:
        per = args.count // args.producers

        async def producer(k: int) -> None:
            for i in range(per):
                await outbox.append(observation(k * per + i, args.type), ["police"])

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(producer(k) for k in range(args.producers))), RUN_TIMEOUT)
        elapsed = time.perf_counter() - t0
    return per * args.producers / elapsed


async def ours_drain(
    tmp: Path, port: int, args: argparse.Namespace, spy: benchlib.PySpy | None = None
) -> tuple[float, float, float]:
    """(rows/s, CPU us per row, seconds to fill) for a backlog drained by a starting uplink.

    With ``spy``, py-spy records the drain (not the fill).
    """
    pipe = Pipeline(tmp, port, args.window)
    async with pipe.outbox:
        f0 = time.perf_counter()
        for start in range(0, args.backlog, FILL_CHUNK):
            n = min(FILL_CHUNK, args.backlog - start)
            await pipe.outbox.append_many(
                [(observation(start + i, args.type), [pipe.name]) for i in range(n)]
            )
        fill = time.perf_counter() - f0
        depth = pipe.outbox.depth(pipe.name)
        assert depth == args.backlog, depth
        with spy or contextlib.nullcontext():
            cpu0, t0 = time.process_time(), time.perf_counter()
            await pipe.start_uplink()
            await pipe.wait(lambda: pipe.outbox.depth(pipe.name) == 0, "backlog drained")
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await pipe.stop_uplink()
    return depth / elapsed, 1e6 * cpu / depth, fill


def paho(port: int, count: int, window: int, payload: bytes) -> tuple[float, float]:
    """(msg/s, CPU us per message) of a plain paho client on paho's own network thread.

    Like ``bench_mqtt.bench_paho`` (same window, every message handed to ``publish()`` as
    fast as paho takes it, timed from the first publish to the last PUBACK), with two
    differences: the topic is the one ours publishes to, and at most ``PAHO_QUEUE`` messages
    are queued in paho at once. paho's message ids are 16 bits and ``publish()`` refuses
    (``MQTT_ERR_QUEUE_SIZE``, easy to miss) a message whose id is still queued, so handing
    it 100,000 messages at once loses about a third of them and never finishes.
    """
    done = threading.Event()
    room = threading.Semaphore(PAHO_QUEUE)
    acked = 0

    def on_publish(client: mqtt.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        nonlocal acked
        acked += 1
        room.release()
        if acked == count:
            done.set()

    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError("paho: no CONNACK")
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            if not room.acquire(timeout=RUN_TIMEOUT):
                raise TimeoutError(f"paho: {acked} of {count} acknowledged")
            info = client.publish(PAHO_TOPIC, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"paho refused a publish: {info.rc}")
        if not done.wait(RUN_TIMEOUT):
            raise TimeoutError(f"paho: {acked} of {count} acknowledged")
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        client.disconnect()
        client.loop_stop()
    return count / elapsed, 1e6 * cpu / count


def typical_payload(event_type: str) -> bytes:
    ident = Identity("gw-1", "sch-1", "530102")
    sizes = [len(stamp(observation(i, event_type), ident, 100_000 + i).payload) for i in range(100)]
    return b"x" * round(sum(sizes) / len(sizes))


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    payload = typical_payload(args.type)
    broker = Mosquitto(tmp / "broker").start()
    rounds: list[dict[str, Any]] = []
    profiles: dict[str, str | None] = {}
    try:
        print(
            f"mosquitto on 127.0.0.1:{broker.port}; {args.type} events of {len(payload)} bytes, QoS 1, "
            f"window {args.window}; throughput {args.count:,} events ({args.producers} producers), "
            f"backlog {args.backlog:,} rows; {args.rounds} interleaved rounds"
        )
        # Warm-up: imports, first connections, the broker's allocations.
        paho(broker.port, 1000, args.window, payload)
        warm = argparse.Namespace(**{**vars(args), "count": 1000, "backlog": 1000})
        asyncio.run(ours_throughput(tmp / "warm1", broker.port, warm))
        asyncio.run(ours_drain(tmp / "warm2", broker.port, warm))
        for r in range(args.rounds):
            res: dict[str, Any] = {"round": r + 1}
            res["base_tput"], res["base_tput_cpu_us"] = paho(broker.port, args.count, args.window, payload)
            res["conn_tput"] = asyncio.run(bench_ours(broker.port, args.count, args.window, payload))
            res["ours_tput"], res["ours_tput_cpu_us"], stats = asyncio.run(
                ours_throughput(tmp / f"t{r}", broker.port, args)
            )
            res.update({f"tput_outbox_{k}": v for k, v in stats.items()})
            res["append_only"] = asyncio.run(append_only(tmp / f"a{r}", args))
            res["base_drain"], res["base_drain_cpu_us"] = paho(
                broker.port, args.backlog, args.window, payload
            )
            res["ours_drain"], res["ours_drain_cpu_us"], res["fill_s"] = asyncio.run(
                ours_drain(tmp / f"d{r}", broker.port, args)
            )
            res["tput_ratio"] = res["ours_tput"] / res["base_tput"]
            res["drain_ratio"] = res["ours_drain"] / res["base_drain"]
            rounds.append(res)
            print(
                f"  round {r + 1}: throughput {res['ours_tput']:,.0f} vs paho {res['base_tput']:,.0f}/s "
                f"({res['tput_ratio']:.2f}); drain {res['ours_drain']:,.0f} vs paho "
                f"{res['base_drain']:,.0f}/s ({res['drain_ratio']:.2f})",
                flush=True,
            )
        if args.profile:
            print("profiling one more run of each of ours with py-spy (not measured)")
            out = args.profile_out or tmp
            out.mkdir(parents=True, exist_ok=True)
            spy = benchlib.PySpy(out / "throughput.collapsed")
            asyncio.run(ours_throughput(tmp / "p1", broker.port, args, spy))
            profiles["throughput"] = spy.summary
            spy = benchlib.PySpy(out / "drain.collapsed")
            asyncio.run(ours_drain(tmp / "p2", broker.port, args, spy))
            profiles["drain"] = spy.summary
    finally:
        broker.stop()

    def med(key: str) -> float:
        return benchlib.median([r[key] for r in rounds])

    out: dict[str, Any] = {
        "payload_bytes": len(payload),
        "event_type": args.type,
        "window": args.window,
        "count": args.count,
        "producers": args.producers,
        "backlog": args.backlog,
        "rounds": len(rounds),
    }
    for key in (
        "base_tput",
        "ours_tput",
        "base_drain",
        "ours_drain",
        "base_tput_cpu_us",
        "ours_tput_cpu_us",
        "base_drain_cpu_us",
        "ours_drain_cpu_us",
        "fill_s",
        "conn_tput",
        "append_only",
        "tput_outbox_commits",
        "tput_outbox_mean_batch",
        "tput_outbox_mean_commit_ms",
    ):
        out[key] = round(med(key), 1)
    out["tput_ratio"] = round(med("ours_tput") / med("base_tput"), 3)
    out["drain_ratio"] = round(med("ours_drain") / med("base_drain"), 3)
    out["tput_ratio_per_round"] = [round(r["tput_ratio"], 3) for r in rounds]
    out["drain_ratio_per_round"] = [round(r["drain_ratio"], 3) for r in rounds]
    out["profiles"] = profiles
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5,000 events and a 20,000-row backlog")
    ap.add_argument("--count", type=int, default=None, help="events per throughput run (default 20,000)")
    ap.add_argument("--backlog", type=int, default=None, help="rows per drain run (default 100,000)")
    ap.add_argument("--producers", type=int, default=50, help="concurrent appenders (throughput)")
    ap.add_argument("--window", type=int, default=32, help="QoS 1 messages in flight, both sides")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument(
        "--type", default="alarm.intrusion", help="event type published (default alarm.intrusion)"
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="diagnosis: sys.setswitchinterval (s) for this process (Python's default: 0.005)",
    )
    ap.add_argument("--profile", action="store_true", help="then py-spy one more run of each of ours")
    ap.add_argument("--profile-out", type=Path, default=None, help="directory for py-spy's collapsed stacks")
    args = ap.parse_args()
    args.count = args.count or (5_000 if args.quick else 20_000)
    args.backlog = args.backlog or (20_000 if args.quick else 100_000)
    if not (
        1 <= args.producers <= args.count <= 1_000_000
        and 1 <= args.backlog <= 1_000_000
        and 1 <= args.rounds <= 10
    ):
        ap.error("1 <= --producers <= --count <= 1e6, --backlog 1..1e6, --rounds 1..10")
    benchlib.quiet_logs()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    host = benchlib.machine()
    host["switch_interval_s"] = sys.getswitchinterval()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        res = run(args, Path(tmp))

    print()
    print(
        benchlib.table(
            [
                "median of rounds",
                "paho (baseline) /s",
                "ours /s",
                "ratio",
                "per round",
                "CPU us/msg paho / ours",
            ],
            [
                [
                    "append -> uplink -> PUBACK",
                    f"{res['base_tput']:,.0f}",
                    f"{res['ours_tput']:,.0f}",
                    f"{res['tput_ratio']:.2f}",
                    " ".join(f"{x:.2f}" for x in res["tput_ratio_per_round"]),
                    f"{res['base_tput_cpu_us']:.0f} / {res['ours_tput_cpu_us']:.0f}",
                ],
                [
                    f"drain {res['backlog']:,} backlog",
                    f"{res['base_drain']:,.0f}",
                    f"{res['ours_drain']:,.0f}",
                    f"{res['drain_ratio']:.2f}",
                    " ".join(f"{x:.2f}" for x in res["drain_ratio_per_round"]),
                    f"{res['base_drain_cpu_us']:.0f} / {res['ours_drain_cpu_us']:.0f}",
                ],
            ],
        )
    )
    print(f"backlog filled with append_many in {res['fill_s']:.1f} s (median), not timed in the ratio")
    print(
        f"diagnostics (medians, same rounds): MqttConnection alone (bench_mqtt's (b)) "
        f"{res['conn_tput']:,.0f} msg/s; Outbox.append alone ({res['producers']} producers, no uplink) "
        f"{res['append_only']:,.0f} events/s; during the throughput run the outbox committed "
        f"{res['tput_outbox_commits']:.0f} transactions, mean batch {res['tput_outbox_mean_batch']:.1f} "
        f"events, mean commit {res['tput_outbox_mean_commit_ms']:.2f} ms"
    )
    for name, summary in res["profiles"].items():
        print(f"py-spy, ours, {name} (all threads of this process):")
        print(summary)
    tput_ok, drain_ok = res["tput_ratio"] >= GOAL_RATIO, res["drain_ratio"] >= GOAL_RATIO
    print(
        f"goal ratio >= {GOAL_RATIO}: throughput {'met' if tput_ok else 'MISSED'}, "
        f"drain {'met' if drain_ok else 'MISSED'}"
    )
    benchlib.emit(
        {
            "bench": "pipeline",
            "quick": args.quick,
            "machine": host,
            "goal": {"ratio": GOAL_RATIO},
            "tput_goal_met": tput_ok,
            "drain_goal_met": drain_ok,
            **res,
        }
    )


if __name__ == "__main__":
    main()

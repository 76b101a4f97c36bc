"""CPU and memory of the camera video checks (black, frozen, blocked, defocused, motion).

    python benchmarks/bench_video.py [--quick] [--cameras 50] [--interval 10] [--window 60]

Three measurements, all on synthesized 1280x720 JPEG snapshots (a textured scene with a
person walking across it, quality 80, about 70 KiB; snapshots are made before timing):

* analyze alone: ``drivers.onvif.video.analyze`` in a loop on this thread, ms of CPU
  (thread time) and wall per snapshot: the cost of the checks themselves;
* at rate: ``--cameras`` cameras, each handing one snapshot every ``--interval`` seconds
  (staggered) to one shared ``VideoChecker`` (2 worker threads) and its own
  ``VideoMonitor``, as the camera driver does; the whole process's CPU (event loop, pool
  threads, everything) over ``--window`` seconds, as % of one core and ms per snapshot,
  and the wall time of each check (queueing included). Fetching snapshots over HTTP is
  not part of it;
* memory: two fresh subprocesses import the gateway and its drivers (``gateway.app``, the
  Modbus families, ``drivers.onvif.video``); the first checks that cv2 and numpy are not
  loaded, the second then loads OpenCV and analyses one snapshot. VmRSS and VmHWM of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib  # also puts the repository root on sys.path

from drivers.onvif.video import (
    FrameStats,
    VideoCheckConfig,
    VideoChecker,
    VideoCheckError,
    VideoMonitor,
    analyze,
    require_cv2,
)
from gateway.events import DeviceKind, DeviceRef

W, H = 1280, 720
GOAL_CPU_PERCENT = 5.0  # of one core, for 50 cameras at 10 s: video checks must stay a side job
IMPORTS = "import gateway.app, drivers.modbus_alarm, drivers.modbus_bollard, drivers.onvif.video"


def snapshots(count: int) -> list[bytes]:
    """``count`` snapshots of a textured scene, a person at a different place in each."""
    cv2 = require_cv2()
    import numpy as np

    rng = np.random.default_rng(1)
    scene = np.full((H, W, 3), (90, 100, 110), np.uint8)
    for _ in range(80):
        x, y = (int(v) for v in rng.integers(0, (W, H)))
        dx, dy = (int(v) for v in rng.integers(20, 200, 2))
        cv2.rectangle(scene, (x, y), (x + dx, y + dy), [int(v) for v in rng.integers(20, 235, 3)], -1)
    cv2.putText(scene, "CORRIDOR B", (50, 100), cv2.FONT_HERSHEY_SIMPLEX, 2, (250, 250, 250), 3)
    out = []
    for n in range(count):
        img = scene.copy()
        x = 100 + (n * 97) % (W - 200)
        cv2.rectangle(img, (x, 300), (x + 80, 560), (30, 200, 30), -1)
        noise = rng.standard_normal(img.shape, dtype=np.float32) * 3
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
        assert ok
        out.append(bytes(buf.tobytes()))
    return out


def analyze_alone(frames: list[bytes], rounds: int) -> dict[str, float]:
    cfg = VideoCheckConfig(motion=True)
    prev: FrameStats | None = None
    for f in frames[:4]:  # warm-up
        prev = analyze(f, prev, cfg)
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for n in range(rounds):
        prev = analyze(frames[n % len(frames)], prev, cfg)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return {
        "frames": rounds,
        "cpu_ms": round(1e3 * cpu / rounds, 2),
        "wall_ms": round(1e3 * wall / rounds, 2),
    }


async def at_rate(frames: list[bytes], cameras: int, interval: float, window: float) -> dict[str, Any]:
    cfg = VideoCheckConfig(interval=interval, timeout=min(2.0, interval / 2), motion=True)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    events = 0
    measuring = False

    async def camera(i: int, checker: VideoChecker) -> None:
        nonlocal events
        monitor = VideoMonitor(DeviceRef(f"cam-{i}", DeviceKind.CAMERA), cfg)
        prev: FrameStats | None = None
        await asyncio.sleep(interval * i / cameras)  # staggered, as independent cameras are
        n = i
        next_at = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                prev = await checker.check(frames[n % len(frames)], prev, cfg)
            except VideoCheckError as exc:
                errors[exc.reason] = errors.get(exc.reason, 0) + 1
            else:
                events += len(monitor.update(prev))
                if measuring:
                    latencies.append(time.monotonic() - started)
            n += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async with VideoChecker() as checker, asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(camera(i, checker), name=f"cam-{i}") for i in range(cameras)]
        await asyncio.sleep(interval + 1)  # every camera has had its first snapshot
        measuring = True
        pid = os.getpid()
        analyzed0, thread_cpu0 = checker.counters.analyzed, checker.counters.cpu_seconds
        cpu0, wall0 = benchlib.cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(window)
        cpu, wall = benchlib.cpu_seconds(pid) - cpu0, time.monotonic() - wall0
        analyzed = checker.counters.analyzed - analyzed0
        thread_cpu = checker.counters.cpu_seconds - thread_cpu0
        measuring = False
        for t in tasks:
            t.cancel()
    mem = benchlib.memory_kib(os.getpid())
    return {
        "cameras": cameras,
        "interval_s": interval,
        "window_s": round(wall, 1),
        "frames": analyzed,
        "frames_per_s": round(analyzed / wall, 2),
        "cpu_percent": round(100 * cpu / wall, 2),
        "cpu_ms_per_frame": round(1e3 * cpu / max(1, analyzed), 2),
        "analyze_cpu_ms_per_frame": round(1e3 * thread_cpu / max(1, analyzed), 2),
        "check_wall_ms": {
            "p50": round(1e3 * benchlib.pct(latencies, 50), 2),
            "p99": round(1e3 * benchlib.pct(latencies, 99), 2),
            "max": round(1e3 * max(latencies), 2),
        },
        "errors": errors,
        "events": events,
        "rss_mib": round(mem["VmRSS"] / 1024, 1),
    }


def rss_subprocess(code: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=benchlib.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


PROBE = """
import json, sys
{imports}
{extra}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({{
    "cv2_loaded": "cv2" in sys.modules, "numpy_loaded": "numpy" in sys.modules,
    "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
    "hwm_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1),
}}))
"""


def memory(frame: Path) -> dict[str, Any]:
    without = rss_subprocess(PROBE.format(imports=IMPORTS, extra=""))
    extra = (
        "from drivers.onvif.video import analyze, require_cv2, VideoCheckConfig\n"
        "require_cv2()\n"
        f"analyze(open({str(frame)!r}, 'rb').read(), None, VideoCheckConfig())"
    )
    loaded = rss_subprocess(PROBE.format(imports=IMPORTS, extra=extra))
    return {"without_cv2": without, "with_cv2": loaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s window, 100 frames alone")
    ap.add_argument("--cameras", type=int, default=50)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between snapshots of a camera")
    ap.add_argument("--window", type=float, default=None, help="measured seconds at rate (default 60)")
    args = ap.parse_args()
    args.window = args.window if args.window is not None else (20.0 if args.quick else 60.0)
    if not 1 <= args.cameras <= 2000 or not 1 <= args.interval <= 600 or not 0 < args.window <= 600:
        ap.error("--cameras 1..2000, --interval 1..600 s, --window up to 600 s")
    benchlib.quiet_logs()
    host = benchlib.machine()
    frames = snapshots(16)
    alone = analyze_alone(frames, 100 if args.quick else 400)
    rate = asyncio.run(at_rate(frames, args.cameras, args.interval, args.window))
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        path = Path(tmp) / "snapshot.jpg"
        path.write_bytes(frames[0])
        mem = memory(path)

    kib = sum(len(f) for f in frames) / len(frames) / 1024
    print()
    print(f"1280x720 JPEG snapshots (quality 80, {kib:.0f} KiB on average), analysed at 320x180 grey")
    print(
        benchlib.table(
            ["measurement", "value"],
            [
                ["analyze alone: CPU ms per snapshot", alone["cpu_ms"]],
                ["analyze alone: wall ms per snapshot", alone["wall_ms"]],
                [
                    f"{rate['cameras']} cameras every {rate['interval_s']:g} s: snapshots/s",
                    rate["frames_per_s"],
                ],
                ["  process CPU % of one core", rate["cpu_percent"]],
                ["  process CPU ms per snapshot", rate["cpu_ms_per_frame"]],
                ["  of which analyze (pool threads)", rate["analyze_cpu_ms_per_frame"]],
                ["  check wall ms p50 / p99 / max", "{p50} / {p99} / {max}".format(**rate["check_wall_ms"])],
                [
                    "  timeouts / rejected",
                    f"{rate['errors'].get('timeout', 0)} / {rate['errors'].get('busy', 0)}",
                ],
            ],
        )
    )
    w, c = mem["without_cv2"], mem["with_cv2"]
    print()
    print(
        benchlib.table(
            ["process (fresh, gateway + drivers imported)", "cv2 loaded", "VmRSS MiB", "VmHWM MiB"],
            [
                ["without video checks", w["cv2_loaded"], w["rss_mib"], w["hwm_mib"]],
                ["cv2 loaded, one snapshot analysed", c["cv2_loaded"], c["rss_mib"], c["hwm_mib"]],
            ],
        )
    )
    added = round(c["rss_mib"] - w["rss_mib"], 1)
    ok = rate["cpu_percent"] <= GOAL_CPU_PERCENT * rate["cameras"] / 50 * 10 / rate["interval_s"]
    print(
        f"OpenCV adds {added} MiB RSS; goal CPU <= {GOAL_CPU_PERCENT:g}% of one core per 50 cameras at 10 s: "
        f"{'met' if ok else 'MISSED'}"
    )
    benchlib.emit(
        {
            "bench": "video",
            "quick": args.quick,
            "machine": host,
            "goal": {"cpu_percent_per_50_cameras_at_10s": GOAL_CPU_PERCENT},
            "cpu_goal_met": ok,
            "analyze_alone": alone,
            "at_rate": rate,
            "memory": {**mem, "cv2_adds_rss_mib": added},
        }
    )


if __name__ == "__main__":
    main()

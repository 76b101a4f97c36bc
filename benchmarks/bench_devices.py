"""CPU and memory of the daemon polling 200 simulated alarm boxes at 10 Hz.

    python benchmarks/bench_devices.py [--quick] [--devices 200] [--layout ports|units]
                                       [--units-per-link 10] [--poll 0.1] [--window 25]

Three kinds of processes, each measured on its own from /proc/PID/stat (utime + stime,
all threads) over the same window:

* the daemon (``campus-gateway run`` as a subprocess, READY over NOTIFY_SOCKET), polling
  ``--devices`` boxes (``generic-8di``: one read of 8 discrete inputs per poll) every
  ``--poll`` seconds and connected to a private mosquitto (heartbeats only: the inputs do
  not change, so no events flow; polling is the whole load);
* the simulators: ``benchmarks/sim_farm.py``, a separate process hosting the simulated
  boxes (pymodbus servers behind the fault-injecting proxy). Reported so readers can see
  it is not counted in the daemon's figure; on a 2-core machine it competes for the CPU;
* mosquitto.

Layouts: ``ports`` (default) gives every box its own port (one TCP connection and one
hub per box: Modbus TCP boxes on the school LAN); ``units`` puts ``--units-per-link`` unit
ids behind each port (RS-485 boxes behind serial-to-Ethernet gateways: one connection per
link, transactions serialised per link).

After ``--warmup`` seconds the CPU is measured over ``--window`` seconds; the achieved
poll rate is the simulators' request count over the same window (if the machine cannot
keep up, the daemon polls less often and the CPU figure is for that lower rate). RSS is
VmRSS at the end of the window and VmHWM (the peak) since start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib  # also puts the repository root on sys.path

from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config

GOAL_CPU_PERCENT = 25.0
GOAL_RSS_MIB = 60.0
FARM_START_TIMEOUT = 120.0  # 200 pymodbus servers and proxies start in a few seconds
FARM = Path(__file__).resolve().parent / "sim_farm.py"


class Farm:
    """The simulator process: started, queried over stdin/stdout, stopped by its PID."""

    def __init__(self, boxes: int, units: int, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(FARM), "--boxes", str(boxes), "--units", str(units), "--inputs", "8"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        ready = self._line(FARM_START_TIMEOUT)
        self.ports: list[int] = ready["ports"]
        self.units: list[int] = ready["units"]

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sim_farm exited with {self.proc.returncode}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    return json.loads(line)  # type: ignore[no-any-return]
        raise TimeoutError(f"sim_farm: no answer within {timeout} s")

    def requests(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"requests\n")
        self.proc.stdin.flush()
        return int(self._line(10.0)["requests"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._log.close()


def devices_config(farm: Farm, count: int, poll: float) -> list[dict[str, Any]]:
    devices = []
    for port in farm.ports:
        for unit in farm.units:
            if len(devices) == count:
                return devices
            devices.append(
                {
                    "id": f"box-{port}-{unit}",
                    "driver": "modbus_alarm",
                    "name": f"Alarm box {len(devices) + 1}",
                    "location": "bench",
                    "host": "127.0.0.1",
                    "port": port,
                    "unit": unit,
                    "profile": "generic-8di",
                    "poll_interval": poll,
                }
            )
    return devices


def py_spy(pid: int, seconds: float, out: Path) -> str | None:
    """Sample ``pid`` with py-spy for ``seconds`` (after the measured window: it costs CPU)."""
    if seconds <= 0:
        return None
    exe = shutil.which("py-spy")
    if exe is None:
        return "py-spy not installed (pip install py-spy)"
    print(f"profiling the daemon with py-spy for {seconds:.0f} s (after the measured window)")
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"]
    cmd += ["--format", "raw", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, timeout=seconds + 30, check=False)
    if proc.returncode != 0 or not out.exists():
        return f"py-spy failed: {proc.stderr.decode(errors='replace')[-500:]}"
    return benchlib.profile_summary(out)


def log_counts(path: Path) -> dict[str, Any]:
    counts = {"poll_failed": 0, "device_offline": 0, "warnings": 0}
    examples: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        event = str(rec.get("event", ""))
        counts["poll_failed"] += event.startswith("poll failed")
        counts["device_offline"] += event == "device.offline"
        if rec.get("level") in ("warning", "error", "critical"):
            counts["warnings"] += 1
            if len(examples) < 5 and event not in examples:
                examples.append(event)
    return {**counts, "warning_events": examples}


def user_system(pid: int) -> tuple[float, float]:
    """(utime, stime) seconds of a process: Python work vs. the kernel's (loopback TCP is both
    ends' network stack, much of it charged to the sending process)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / benchlib.CLK_TCK, int(fields[12]) / benchlib.CLK_TCK


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    per_link = args.units_per_link if args.layout == "units" else 1
    links = -(-args.devices // per_link)
    broker = Mosquitto(tmp / "broker").start()
    farm: Farm | None = None
    daemon: Daemon | None = None
    try:
        started = time.monotonic()
        farm = Farm(links, per_link, tmp / "farm.log")
        print(
            f"sim_farm pid {farm.proc.pid}: {links} simulated box(es) x {per_link} unit id(s), "
            f"ready in {time.monotonic() - started:.1f} s"
        )
        devices = devices_config(farm, args.devices, args.poll)
        uplink = {"name": "police", "endpoints": [broker.url], "topic_prefix": "campus/{region}"}
        daemon = Daemon(tmp / "daemon", base_config(tmp / "state", [uplink], devices), loop=args.loop)
        started = time.monotonic()
        daemon.start()
        assert daemon.proc is not None
        assert broker.proc is not None
        pids = {"daemon": daemon.proc.pid, "simulators": farm.proc.pid, "mosquitto": broker.proc.pid}
        ready = time.monotonic() - started
        print(f"daemon pid {pids['daemon']}: READY in {ready:.1f} s; warm-up {args.warmup} s")
        time.sleep(args.warmup)
        req0 = farm.requests()
        split0 = user_system(pids["daemon"])
        window, samples = benchlib.measure_cpu(list(pids.values()), args.window)
        split1 = user_system(pids["daemon"])
        req1 = farm.requests()
        mem = {name: benchlib.memory_kib(pid) for name, pid in pids.items()}
        speed_after = benchlib.speed_index()  # the machine's pace right after the window
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited during the window:\n{daemon.log_tail()}")
        profile = py_spy(pids["daemon"], args.profile, args.profile_out or tmp / "daemon.collapsed")
    finally:
        if daemon is not None:
            daemon.stop()
        if farm is not None:
            farm.stop()
        broker.stop()
    counts = log_counts(daemon.log_path)
    reads = (req1 - req0) / window.wall
    expected = args.devices / args.poll
    return {
        "layout": args.layout,
        "loop": args.loop,
        "devices": args.devices,
        "links": links,
        "units_per_link": per_link,
        "poll_interval_s": args.poll,
        "window_s": round(window.wall, 1),
        "reads_per_s": round(reads, 0),
        "reads_expected_per_s": round(expected, 0),
        "poll_rate_achieved": round(reads / expected, 3),
        "cpu_percent": {name: round(window.percent(pid), 1) for name, pid in pids.items()},
        "machine_busy_percent": round(window.machine_busy, 1),
        "other_processes_percent": round(window.others(), 1),
        "steal_percent": round(window.steal, 1),
        "speed_index_after_ms": speed_after,
        "daemon_cpu_per_read_us": round(1e6 * window.cpu[pids["daemon"]] / max(1, req1 - req0), 1),
        "daemon_user_system_percent": [
            round(100 * (b - a) / window.wall, 1) for a, b in zip(split0, split1, strict=True)
        ],
        "daemon_cpu_samples_1s": {
            "min": round(min(samples), 1),
            "median": round(benchlib.median(samples), 1),
            "max": round(max(samples), 1),
        },
        "rss_mib": {name: round(m["VmRSS"] / 1024, 1) for name, m in mem.items()},
        "hwm_mib": {name: round(m["VmHWM"] / 1024, 1) for name, m in mem.items()},
        "daemon_log": counts,
        "profile": profile,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s warm-up, 8 s window")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--layout", choices=["ports", "units"], default="ports")
    ap.add_argument("--units-per-link", type=int, default=10, help="with --layout units")
    ap.add_argument("--poll", type=float, default=0.1, help="poll interval of every box (s)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds after READY (default 10)")
    ap.add_argument("--window", type=float, default=None, help="measured seconds (default 25)")
    ap.add_argument(
        "--loop", default="auto", choices=["auto", "uvloop", "asyncio"], help="the daemon's event loop"
    )
    ap.add_argument("--profile", type=float, default=0, help="then py-spy the daemon this many seconds")
    ap.add_argument("--profile-out", type=Path, default=None, help="keep py-spy's collapsed stacks here")
    args = ap.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    args.window = args.window if args.window is not None else (8.0 if args.quick else 25.0)
    if not 1 <= args.devices <= 1000 or not 0 < args.window <= 600 or not 0 <= args.warmup <= 600:
        ap.error("--devices 1..1000, --window up to 600 s, --warmup up to 600 s")
    host = benchlib.machine()
    with tempfile.TemporaryDirectory(prefix="bench-devices-") as tmp:
        res = run(args, Path(tmp))

    cpu, rss, hwm = res["cpu_percent"], res["rss_mib"], res["hwm_mib"]
    print()
    print(
        f"{res['devices']} alarm boxes ({res['links']} link(s) x {res['units_per_link']} unit id(s)), "
        f"poll {res['poll_interval_s'] * 1e3:.0f} ms; {res['window_s']} s window "
        f"after {args.warmup:.0f} s warm-up; daemon loop: {args.loop} (auto: uvloop if installed)"
    )
    print(
        benchlib.table(
            ["process", "CPU % of one core", "VmRSS MiB", "VmHWM MiB"],
            [[name, cpu[name], rss[name], hwm[name]] for name in ("daemon", "simulators", "mosquitto")],
        )
    )
    s = res["daemon_cpu_samples_1s"]
    print(
        f"daemon: {res['daemon_cpu_per_read_us']} us CPU per read "
        f"(user / system % {res['daemon_user_system_percent']}); 1 s samples min {s['min']} / "
        f"median {s['median']} / max {s['max']} %"
    )
    print(
        f"whole machine during the window: {res['machine_busy_percent']}% busy (of one core; "
        f"{os.cpu_count()} cores), of which other processes {res['other_processes_percent']}%, "
        f"steal {res['steal_percent']}%; speed index {host['speed_index_ms']} ms before, "
        f"{res['speed_index_after_ms']} ms after (a fixed Python workload; lower is faster)"
    )
    print(
        f"reads: {res['reads_per_s']:.0f}/s of {res['reads_expected_per_s']:.0f}/s expected "
        f"({100 * res['poll_rate_achieved']:.1f} %); daemon log: {res['daemon_log']}"
    )
    if res["profile"]:
        print("py-spy, daemon (all threads):")
        print(res["profile"])
    cpu_ok = cpu["daemon"] <= GOAL_CPU_PERCENT
    rss_ok = max(rss["daemon"], hwm["daemon"]) <= GOAL_RSS_MIB
    print(
        f"goal CPU <= {GOAL_CPU_PERCENT:.0f}% of one core: {'met' if cpu_ok else 'MISSED'}; "
        f"goal RSS <= {GOAL_RSS_MIB:.0f} MiB (VmHWM): {'met' if rss_ok else 'MISSED'}"
    )
    benchlib.emit(
        {
            "bench": "devices",
            "quick": args.quick,
            "machine": host,
            "goal": {"cpu_percent": GOAL_CPU_PERCENT, "rss_mib": GOAL_RSS_MIB},
            "cpu_goal_met": cpu_ok,
            "rss_goal_met": rss_ok,
            **res,
        }
    )


if __name__ == "__main__":
    main()

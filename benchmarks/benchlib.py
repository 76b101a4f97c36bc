"""Small helpers shared by the benchmarks: process accounting, percentiles, output.

Imported by the ``bench_*.py`` scripts (run as ``python benchmarks/NAME.py``, so this
directory is on ``sys.path``). Importing it also puts the repository root on ``sys.path``
so that ``tests.support`` (the private mosquitto, the daemon runner) can be used.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")


def quiet_logs() -> None:
    """Only warnings from the gateway's own modules while a benchmark runs in-process."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def system_jiffies() -> tuple[int, int]:
    """(busy, steal) clock ticks of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    idle = values[3] + values[4]
    steal = values[7] if len(values) > 7 else 0
    return sum(values[:8]) - idle - steal, steal


@dataclass
class CpuWindow:
    """CPU used by some processes over a wall-clock window, as % of one core.

    ``machine_busy`` and ``steal`` are for the whole machine (all processes, all cores),
    also as % of one core: on 2 cores, 200 is everything.
    """

    wall: float
    cpu: dict[int, float]
    machine_busy: float = 0.0
    steal: float = 0.0

    def percent(self, pid: int) -> float:
        return 100.0 * self.cpu[pid] / self.wall

    def others(self) -> float:
        """Machine busy % (of one core) not spent by the measured processes: the noise."""
        return max(0.0, self.machine_busy - sum(self.percent(p) for p in self.cpu))


def measure_cpu(pids: Sequence[int], seconds: float, *, sample: float = 1.0) -> tuple[CpuWindow, list[float]]:
    """CPU of ``pids`` over ``seconds`` of wall time; also per-``sample`` % of the first pid."""
    start_wall = time.monotonic()
    start = {p: cpu_seconds(p) for p in pids}
    sys_busy0, sys_steal0 = system_jiffies()
    samples = []
    last_wall, last = start_wall, start[pids[0]]
    deadline = start_wall + seconds
    while (now := time.monotonic()) < deadline:
        time.sleep(min(sample, deadline - now))
        wall, cpu = time.monotonic(), cpu_seconds(pids[0])
        if wall - last_wall > 0.2:
            samples.append(100.0 * (cpu - last) / (wall - last_wall))
        last_wall, last = wall, cpu
    wall = time.monotonic() - start_wall
    sys_busy1, sys_steal1 = system_jiffies()
    window = CpuWindow(
        wall,
        {p: cpu_seconds(p) - start[p] for p in pids},
        machine_busy=100.0 * (sys_busy1 - sys_busy0) / CLK_TCK / wall,
        steal=100.0 * (sys_steal1 - sys_steal0) / CLK_TCK / wall,
    )
    return window, samples


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def ms_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Count, p50, p90, p99 and max of durations given in seconds, in milliseconds."""
    ms = [v * 1000 for v in seconds]
    return {
        "n": len(ms),
        "p50": round(pct(ms, 50), 1),
        "p90": round(pct(ms, 90), 1),
        "p99": round(pct(ms, 99), 1),
        "max": round(max(ms), 1),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def speed_index() -> float:
    """Milliseconds a fixed pure-Python workload takes (best of 5): how fast the machine is now.

    Not a ratio baseline, only a hint for comparing runs on a shared machine.
    """
    body = {"id": "0190c0de-0000-7000-8000-000000000000", "seq": 1, "data": {"zone": 1, "name": "x" * 40}}
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(20_000):
            body["seq"] = i
            json.dumps(body)
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 1)


def code_state() -> dict[str, Any]:
    """The commit measured, and the files of the working tree that differ from it."""
    import subprocess

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return proc.stdout

    status = git("status", "--porcelain", "--", "gateway", "drivers", "simulators")
    changed = [line[3:] for line in status.splitlines() if len(line) > 3]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_code": changed}


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "code": code_state(),
        "speed_index_ms": speed_index(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_1m": round(load[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        padded = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(padded))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(result: dict[str, Any]) -> None:
    """The final line of every benchmark: one JSON object, for scripts that collect results."""
    print(json.dumps(result, sort_keys=False), flush=True)


# Leaves where a sampled thread waits rather than works; py-spy's own idle detection misses
# some of them in containers, so they are left out of the shares (and counted apart).
IDLE_LEAVES = ("EpollSelector.select", "Condition.wait", "_worker (", "Event.wait", "Thread.join")


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


def _owner(frames: Sequence[str]) -> str:
    """Who a busy sample is spent for: socket syscalls, else the innermost non-stdlib frame."""
    leaf = frames[-1]
    if leaf.startswith("_SelectorSocketTransport.write") or (
        leaf.startswith("_SelectorSocketTransport._read_ready__data_received") and ":995)" in leaf
    ):
        return "socket send / recv syscalls (loopback TCP, kernel side included)"
    for f in reversed(frames):
        where = _short(f).rpartition("(")[2]
        for pkg in ("pymodbus/", "paho/", "structlog/", "pydantic/"):
            if where.startswith(pkg):
                return pkg.rstrip("/")
        if where.startswith(("drivers/", "gateway/", "simulators/", "benchmarks/", "tests/")):
            if where.startswith(("gateway/cli.py", "benchmarks/bench_")):
                break  # the entry point: what is below it is the loop itself
            return where.rpartition(":")[0]
    return "asyncio event loop itself (scheduling, timers, selector)"


def profile_summary(collapsed: Path, top: int = 15) -> str:
    """Where the busy samples of a py-spy ``--format raw`` file go: by owner, self, inclusive.

    A frame's inclusive share counts each sample once even if the frame recurs in its stack.
    """
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    owner_n: dict[str, int] = {}
    total = idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n
            continue
        total += n
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n
        owner = _owner(frames)
        owner_n[owner] = owner_n.get(owner, 0) + n
    if not total:
        return "no busy samples"
    lines = [f"{total} busy samples ({idle} idle ones left out); by owner (innermost non-stdlib frame):"]
    for f, n in sorted(owner_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}%  {f}")
    lines.append("self time:")
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}%  {_short(f)}")
    lines.append("inclusive time (below the event loop):")
    skip = ("<module>", "_run_module_as_main", "_run_code", "main (", "run (", "Runner.run", "BaseEventLoop.")
    skip += ("_cmd_run", "Handle._run", "Thread.run", "Thread._bootstrap")
    shown = 0
    for f, n in sorted(incl_n.items(), key=lambda kv: -kv[1]):
        if f.startswith(skip):
            continue
        lines.append(f"  {100 * n / total:5.1f}%  {_short(f)}")
        shown += 1
        if shown == top * 2:
            break
    return "\n".join(lines)


class PySpy:
    """``py-spy record`` of a process (default: this one) while the ``with`` block runs.

    Stopped with SIGINT (py-spy then writes its file), by the PID it was started with.
    ``summary`` is None if py-spy is not installed.
    """

    def __init__(self, out: Path, pid: int | None = None, rate: int = 200) -> None:
        self.out = out
        self.pid = pid or os.getpid()
        self.rate = rate
        self.proc: Any = None
        self.summary: str | None = None

    def __enter__(self) -> PySpy:
        import shutil
        import subprocess

        # A venv's python run without activating the venv: py-spy sits next to it, off PATH.
        beside = Path(sys.executable).parent / "py-spy"
        exe = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
        if exe is None:
            self.summary = "py-spy not installed (pip install py-spy)"
            return self
        cmd = [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw"]
        cmd += ["--output", str(self.out), "--duration", "600"]
        self.out.unlink(missing_ok=True)  # never summarise a stale file
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached and sampling
        return self

    def __exit__(self, *exc: object) -> None:
        import signal
        import subprocess

        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        if self.out.exists():
            self.summary = profile_summary(self.out)
        else:
            self.summary = f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"

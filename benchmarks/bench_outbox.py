"""Outbox throughput: concurrent appends through the async API, then draining a backlog.

    python benchmarks/bench_outbox.py [--producers 50] [--events 20000] [--backlog 100000]
                                      [--uplinks 1] [--commit-delay-ms 0] [--dir DIR]

``--commit-delay-ms`` sleeps inside every write transaction, playing a slow flash
fsync, to show how group commit holds up. ``--dir`` puts the file on the disk to
measure (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import structlog

from gateway.events import DeviceKind, DeviceRef, Identity, Observation, Severity
from gateway.outbox import Outbox

DEVICE = DeviceRef("box-1", DeviceKind.ALARM_BOX, "gate box", "gate")


async def run(args: argparse.Namespace, path: Path) -> None:
    uplinks = [f"u{i}" for i in range(args.uplinks)]
    async with Outbox(path, Identity("gw-1", "school-1"), dict.fromkeys(uplinks, 10**8)) as outbox:
        if args.commit_delay_ms:
            delay = args.commit_delay_ms / 1000

            def slow_disk(conn: sqlite3.Connection) -> None:
                time.sleep(delay)

            outbox._on_begin = slow_disk
        per_producer = args.events // args.producers
        latencies: list[float] = []

        async def producer(k: int) -> None:
            for i in range(per_producer):
                started = time.perf_counter()
                await outbox.append(
                    Observation(DEVICE, "alarm.panic", Severity.CRITICAL, data={"k": k, "i": i}), uplinks
                )
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(producer(k) for k in range(args.producers)))
        elapsed = time.perf_counter() - started
        stats = outbox.stats
        q = statistics.quantiles(latencies, n=100)
        print(
            f"append: {len(latencies) / elapsed:,.0f} events/s"
            f" with {args.producers} producers, {args.uplinks} uplink(s);"
            f" latency p50 {q[49] * 1000:.2f} ms p99 {q[98] * 1000:.2f} ms;"
            f" {stats.event_commits} commits, mean batch {stats.mean_batch:.1f},"
            f" mean commit {stats.mean_commit_seconds * 1000:.2f} ms"
        )

        outbox._on_begin = None
        uplink = uplinks[0]
        chunk = 2000
        started = time.perf_counter()
        missing = args.backlog - outbox.depth(uplink)
        for start in range(0, max(missing, 0), chunk):
            n = min(chunk, missing - start)
            await outbox.append_many([(Observation(DEVICE, "camera.motion", Severity.MINOR), [uplink])] * n)
        fill = time.perf_counter() - started
        depth = outbox.depth(uplink)
        started = time.perf_counter()
        after = 0
        drained = 0
        for _ in range(depth):
            rows = await outbox.read(uplink, after, 1000)
            if not rows:
                break
            drained += len(rows)
            after = rows[-1].rowid
            outbox.ack(uplink, after)
        elapsed = time.perf_counter() - started
        print(
            f"backlog: filled {max(missing, 0):,} rows with append_many at {max(missing, 0) / fill:,.0f}/s;"
            f" drained {drained:,} rows (read 1000 + ack) at {drained / elapsed:,.0f}/s"
        )
        size = await asyncio.to_thread(lambda: path.stat().st_size)
    print(f"file: {size / 1e6:.1f} MB after the drain (freed pages are reused, the file does not shrink)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--producers", type=int, default=50)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--uplinks", type=int, default=1)
    parser.add_argument("--commit-delay-ms", type=float, default=0.0)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        asyncio.run(run(args, Path(tmp) / "outbox.db"))


if __name__ == "__main__":
    main()

"""Many simulated alarm boxes in one process, for bench_devices.py (not a benchmark itself).

    python benchmarks/sim_farm.py --boxes 200 [--units 1] [--inputs 8]

Starts ``--boxes`` :class:`~simulators.alarm_box.AlarmBoxSimulator` instances on free
loopback ports, each serving unit ids 1..``--units``, prints one JSON line
``{"ports": [...], "units": [...], "pid": ...}`` once all listen, then answers commands read
from stdin, one per line: ``requests`` prints ``{"requests": N}`` (Modbus requests received
so far, all boxes). It stops on EOF on stdin, ``quit``, SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys

import benchlib  # also puts the repository root on sys.path

from simulators.alarm_box import AlarmBoxSimulator


async def serve(args: argparse.Namespace) -> None:
    benchlib.quiet_logs()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    units = list(range(1, args.units + 1))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with contextlib.AsyncExitStack() as stack:
        sims = [
            await stack.enter_async_context(AlarmBoxSimulator(port=0, units=units, inputs=args.inputs))
            for _ in range(args.boxes)
        ]
        print(json.dumps({"ports": [s.port for s in sims], "units": units, "pid": os.getpid()}), flush=True)

        async def commands() -> None:
            for _ in range(1_000_000):  # bounded; ends at EOF long before
                line = await reader.readline()
                if not line or line.strip() == b"quit":
                    break
                if line.strip() == b"requests":
                    print(json.dumps({"requests": sum(s.requests() for s in sims)}), flush=True)
            stop.set()

        task = asyncio.create_task(commands())
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, default=20, help="simulators, one loopback port each")
    ap.add_argument("--units", type=int, default=1, help="unit ids per simulator (1..N)")
    ap.add_argument("--inputs", type=int, default=8, help="discrete inputs per unit")
    args = ap.parse_args()
    if not 1 <= args.boxes <= 1000 or not 1 <= args.units <= 247:
        ap.error("--boxes 1..1000, --units 1..247")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()

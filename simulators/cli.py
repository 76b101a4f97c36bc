"""``sim`` subcommands: run a simulator as its own process, driven over its HTTP control API.

``add_sim_parser(subparsers)`` registers ``sim alarm-box ...`` on a parent argparse
parser; each leaf sets ``func`` (``func(args) -> int``, the exit status). The process
prints one JSON line with its ports once it listens, then runs until SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

from simulators.alarm_box import AlarmBoxSimulator


def add_sim_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sim`` (with ``alarm-box``) to ``subparsers`` (from ``parser.add_subparsers()``)."""
    sim: argparse.ArgumentParser = subparsers.add_parser(
        "sim", help="run a hardware simulator (loopback only)"
    )
    kinds = sim.add_subparsers(dest="sim_kind", required=True, metavar="KIND")
    box = kinds.add_parser(
        "alarm-box",
        help="a Modbus TCP alarm box with fault injection",
        description="A Modbus TCP alarm box on 127.0.0.1 with an HTTP control API: "
        "POST /inputs/{i} {'active': true}, POST /tamper {'on': true}, "
        "POST /lines/{zone} {'state': 'open'}, POST /fault {'mode': 'silent'}, GET /state.",
    )
    box.add_argument(
        "--port", type=_port, default=5020, help="Modbus TCP port (0: any free one; default 5020)"
    )
    box.add_argument(
        "--control-port", type=_port, default=8502, help="HTTP control port (0: any; default 8502)"
    )
    box.add_argument("--inputs", type=int, default=16, help="number of discrete inputs (default 16)")
    box.add_argument(
        "--unit", type=int, action="append", dest="units", help="unit id served (repeatable; default 1)"
    )
    box.set_defaults(func=run_alarm_box)
    return sim


def run_alarm_box(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_serve_alarm_box(args))
    except ValueError as exc:
        print(f"sim alarm-box: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sim alarm-box: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_alarm_box(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    units = args.units or [1]
    async with AlarmBoxSimulator(
        port=args.port, control_port=args.control_port, inputs=args.inputs, units=units
    ) as sim:
        ready = {"sim": "alarm-box", "port": sim.port, "control_port": sim.control_port, "units": units}
        print(json.dumps(ready), flush=True)
        await stop.wait()


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m simulators.cli sim alarm-box --port 5020``."""
    parser = argparse.ArgumentParser(prog="python -m simulators.cli")
    add_sim_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())

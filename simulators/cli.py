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
from collections.abc import Callable, Sequence
from typing import Any

from simulators.alarm_box import AlarmBoxSimulator
from simulators.bollard import BollardSimulator


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
    _add_bollard_parser(kinds)
    _add_camera_parser(kinds)
    return sim


def _add_bollard_parser(kinds: Any) -> None:
    bollard = kinds.add_parser(
        "bollard",
        help="Modbus TCP anti-ram bollard controllers with physics and fault injection",
        description="Bollard controller PLCs (one per unit id) on 127.0.0.1 with an HTTP control "
        "API (?unit=N picks the unit): POST /loop {'occupied': true}, POST /photocell "
        "{'blocked': true}, POST /mode {'mode': 'local'}, POST /faults/{name} {'on': true}, "
        "POST /jam {'on': true}, POST /command {'command': 1}, POST /fault {'mode': 'silent'}, "
        "GET /state. Register map: docs/drivers/bollard-plc.md.",
    )
    bollard.add_argument(
        "--port", type=_port, default=5021, help="Modbus TCP port (0: any free one; default 5021)"
    )
    bollard.add_argument(
        "--control-port", type=_port, default=8503, help="HTTP control port (0: any; default 8503)"
    )
    bollard.add_argument(
        "--units", type=_units, default=[1], help="unit ids served, one bollard each: 1,2,3 (default 1)"
    )
    for name, default, what in (
        ("raise", 4.0, "a full rise"),
        ("lower", 3.0, "a full lowering"),
        ("emergency", 1.5, "a full emergency rise"),
    ):
        bollard.add_argument(
            f"--{name}-seconds",
            type=float,
            default=default,
            help=f"{what} takes this long (default {default})",
        )
    bollard.set_defaults(func=run_bollard)


def _add_camera_parser(kinds: Any) -> None:
    camera = kinds.add_parser(
        "camera",
        help="an ONVIF camera (device, media, pull-point events, snapshots) with fault injection",
        description="An ONVIF camera on 127.0.0.1 (SOAP 1.2, WS-Security digest, HTTP digest "
        "snapshots, MJPEG) with an HTTP control API: POST /emit {'topic': "
        "'tns1:VideoSource/MotionAlarm', 'data': {'State': true}}, POST /reboot {'downtime': 1.5}, "
        "POST /clock {'skew': 3600}, POST /delay {'seconds': 1}, POST /picture {'mode': 'black'}, "
        "POST /renew {'refuse': true}, POST /subscriptions/limit {'limit': 2}, POST /hostile "
        "{'mode': 'xxe'}, POST /malformed-faults {'on': true}, POST /fail {'operation': "
        "'GetServices', 'on': true}, GET /state. Details: docs/drivers/onvif-camera.md.",
    )
    camera.add_argument(
        "--port", type=_port, default=8080, help="ONVIF / HTTP port (0: any free one; default 8080)"
    )
    camera.add_argument(
        "--control-port", type=_port, default=8504, help="HTTP control port (0: any; default 8504)"
    )
    camera.add_argument("--user", default="admin", help="ONVIF and snapshot user (default admin)")
    camera.add_argument("--password", default="admin", help="its password (default admin)")
    camera.add_argument(
        "--profiles", type=int, choices=(1, 2), default=2, help="media profiles served (default 2)"
    )
    camera.add_argument(
        "--no-get-services",
        action="store_true",
        help="GetServices answers a fault (clients fall back to GetCapabilities)",
    )
    camera.add_argument(
        "--max-subscriptions", type=int, default=10, help="concurrent pull-point subscriptions (default 10)"
    )
    camera.add_argument(
        "--state-style",
        choices=("true", "1", "active"),
        default="true",
        help="how boolean event data is written: true/false, 1/0 or active/inactive (default true)",
    )
    camera.set_defaults(func=run_camera)


def run_camera(args: argparse.Namespace) -> int:
    def make() -> Any:
        from simulators.onvif_camera import OnvifCameraSimulator  # cv2 and numpy load only here

        return OnvifCameraSimulator(
            port=args.port,
            control_port=args.control_port,
            user=args.user,
            password=args.password,
            profiles=args.profiles,
            get_services=not args.no_get_services,
            max_subscriptions=args.max_subscriptions,
            state_style=args.state_style,
        )

    return _run("camera", make, {})


def run_alarm_box(args: argparse.Namespace) -> int:
    units = args.units or [1]

    def make() -> Any:
        return AlarmBoxSimulator(
            port=args.port, control_port=args.control_port, inputs=args.inputs, units=units
        )

    return _run("alarm-box", make, {"units": units})


def run_bollard(args: argparse.Namespace) -> int:
    def make() -> Any:
        return BollardSimulator(
            port=args.port,
            control_port=args.control_port,
            units=args.units,
            raise_seconds=args.raise_seconds,
            lower_seconds=args.lower_seconds,
            emergency_seconds=args.emergency_seconds,
        )

    return _run("bollard", make, {"units": args.units})


def _run(kind: str, make: Callable[[], Any], ready: dict[str, Any]) -> int:
    """Run one simulator until SIGINT / SIGTERM: exit 2 on bad settings, 1 if it cannot listen."""
    try:
        asyncio.run(_serve(kind, make, ready))
    except ValueError as exc:
        print(f"sim {kind}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sim {kind}: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(kind: str, make: Callable[[], Any], ready: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with make() as sim:
        line = {"sim": kind, "port": sim.port, "control_port": sim.control_port, **ready}
        print(json.dumps(line), flush=True)
        await stop.wait()


def _units(text: str) -> list[int]:
    try:
        units = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: unit ids separated by commas, like 1,2,3") from None
    if not all(1 <= u <= 247 for u in units) or len(set(units)) != len(units):
        raise argparse.ArgumentTypeError(f"{text!r}: unit ids 1..247, each once")
    return units


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

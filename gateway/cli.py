"""The ``campus-gateway`` command: run, check-config, demo, sim."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = (
    2  # bad config or usage: fix the input, do not restart in a loop (systemd RestartPreventExitStatus)
)


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway import app, config, logs

    logs.configure(args.log_level, args.log_format)
    try:
        cfg = config.load(Path(args.config))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    asyncio.run(app.serve(cfg))
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gateway import config

    try:
        cfg = config.load(Path(args.file))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"{args.file}: ok: school {cfg.identity.school}, gateway {cfg.identity.gateway}, "
        f"{len(cfg.uplinks)} uplink(s), {len(cfg.devices)} device(s)"
    )
    return EXIT_OK


# Subcommands whose modules (simulators, the embedded broker) load only when they are used:
# name -> (module, function adding the subcommand to the subparsers action, help).
_LAZY = {
    "demo": ("gateway.demo", "add_demo_parser", "the whole system on this machine, simulated"),
    "sim": ("simulators.cli", "add_sim_parser", "run a hardware simulator"),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="campus-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"campus-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", required=True, help="gateway config YAML")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config file; exit 2 with located errors")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check_config)

    for name, (module, func, help_text) in _LAZY.items():
        if name in argv:
            adder: Callable[[Any], Any] = getattr(importlib.import_module(module), func)
            adder(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func: Any = args.func
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``campus-gateway`` command: run, check-config, sign-command, demo, sim."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.ctl import add_ctl_parsers
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
    logs.register_config_secrets(cfg)  # their values are masked in every log line from now on
    runner = _loop_factory(args.loop)
    with asyncio.Runner(loop_factory=runner) as loop_runner:
        loop_runner.run(app.serve(cfg))
    return EXIT_OK


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (``auto``): its C event loop and transports took about 7 % less
    CPU per Modbus poll than the stdlib loop (docs/PERFORMANCE.md); ``asyncio`` forces the
    stdlib loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


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


def _cmd_sign_command(args: argparse.Namespace) -> int:
    import json

    from gateway.commands.names import KNOWN_COMMANDS
    from gateway.commands.signing import build_command, load_key, parse_timestamp
    from gateway.errors import CommandError

    if args.name not in KNOWN_COMMANDS:
        print(
            f"sign-command: unknown command {args.name!r}; known: {', '.join(sorted(KNOWN_COMMANDS))}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        cmd_args = json.loads(args.args)
    except ValueError as exc:
        print(f"sign-command: --args is not JSON: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(cmd_args, dict):
        print("sign-command: --args must be a JSON object, e.g. '{\"zone\": 3}'", file=sys.stderr)
        return EXIT_CONFIG
    try:
        key = load_key(Path(args.key_file))
        now = None if args.issued_at is None else parse_timestamp(args.issued_at)
        command = build_command(
            key, args.name, args.target, cmd_args, command_id=args.id, ttl=args.ttl, now=now
        )
    except CommandError as exc:
        print(f"sign-command: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(command, separators=(",", ":"), ensure_ascii=False))
    return EXIT_OK


# Subcommands whose modules (simulators, the embedded broker) load only when they are used:
# name -> (module, function adding the subcommand to the subparsers action, help).
_LAZY = {
    "demo": ("gateway.demo", "add_demo_parser", "the whole system on this machine, simulated"),
    "sim": ("simulators.cli", "add_sim_parser", "run a hardware simulator"),
    "console": (
        "gateway.console.cli",
        "add_console_parser",
        "a reference platform console: alarms live, ack",
    ),
}


def _cmd_completion(args: argparse.Namespace) -> int:
    """``eval "$(campus-gateway completion bash)"``: subcommands, then each one's options."""
    parser = build_parser(list(_LAZY))  # every lazy subcommand with its real options
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, child in sorted(sub.choices.items()):
        options = sorted(o for a in child._actions for o in a.option_strings)
        nested = next((a for a in child._actions if isinstance(a, argparse._SubParsersAction)), None)
        words = options + (sorted(nested.choices) if nested else [])
        cases.append(f'        {name}) opts="{" ".join(words)}" ;;')
    names = " ".join(sorted(sub.choices))
    print(
        "_campus_gateway() {\n"
        "    local cur=${COMP_WORDS[COMP_CWORD]} opts\n"
        '    if [ "$COMP_CWORD" -eq 1 ]; then\n'
        f'        COMPREPLY=($(compgen -W "{names} --help --version" -- "$cur")); return\n'
        "    fi\n"
        "    case ${COMP_WORDS[1]} in\n" + "\n".join(cases) + '\n        *) opts="" ;;\n    esac\n'
        '    COMPREPLY=($(compgen -W "$opts" -- "$cur"))\n'
        '    [ ${#COMPREPLY[@]} -eq 0 ] && COMPREPLY=($(compgen -f -- "$cur"))\n'
        "}\n"
        "complete -F _campus_gateway campus-gateway"
    )
    return EXIT_OK


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="campus-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"campus-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", required=True, help="gateway config YAML")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    run.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop (auto: uvloop if installed)",
    )
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config file; exit 2 with located errors")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check_config)

    sign = sub.add_parser(
        "sign-command",
        help="print a signed platform command (JSON) for testing and integration",
        description="Build and sign a command as a platform would; publish the output on "
        "{prefix}/{school}/{gateway}/cmd/{name}. Exit 2 on bad input.",
    )
    sign.add_argument("--key-file", required=True, help="the uplink's command key file (commands.key_file)")
    sign.add_argument("--name", required=True, help="command name, e.g. bollard.raise")
    sign.add_argument("--target", required=True, help="target device id, e.g. bollard-gate")
    sign.add_argument("--args", default="{}", help="arguments as a JSON object (no floats); default {}")
    sign.add_argument("--ttl", type=float, default=30.0, help="seconds until expires_at (default 30)")
    sign.add_argument("--id", default=None, help="command id (default: a fresh UUIDv7)")
    sign.add_argument("--issued-at", default=None, help="RFC 3339 issue time (default: now)")
    sign.set_defaults(func=_cmd_sign_command)
    importlib.import_module("gateway.diagnose").add_diagnose_parsers(sub)  # probe, discover: no daemon needed

    add_ctl_parsers(sub)
    comp = sub.add_parser("completion", help="print a shell completion script (bash)")
    comp.add_argument("shell", choices=["bash"])
    comp.set_defaults(func=_cmd_completion, parser=parser)

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

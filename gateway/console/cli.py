"""The ``campus-gateway console`` subcommand: a thin wrapper around a :class:`Console`.

:func:`add_console_parser` registers the options; :func:`options_from_args` reads the
files they name (password, command key) and builds :class:`ConsoleOptions`; the command
picks a sink (JSON lines or the human view), reads operator input from a terminal or a
pipe, and runs the console until SIGINT or SIGTERM (:func:`run_until_signalled`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import stat
import sys
from pathlib import Path
from typing import IO, Any, Final

from gateway.commands.signing import load_key
from gateway.console.core import Console
from gateway.console.options import (
    DEFAULT_PLATFORM,
    DEFAULT_TOPICS,
    BrokerUrl,
    ConsoleOptions,
    Sink,
    UsageError,
)
from gateway.console.view import HumanView, JsonLines
from gateway.errors import CommandError

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2  # bad option, URL or file: fix the input (as the other subcommands)


def add_console_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "console",
        help="a reference platform console: show alarms live, acknowledge them",
        description="Connect to a broker as a platform (e.g. the police alarm center), show the "
        "gateways' events live and acknowledge alarms with signed alarm.ack commands. "
        "Interactive: type an alarm's number and Enter (Enter alone: the oldest), q to quit. "
        "Exit 0 on a clean stop, 2 on bad input.",
    )
    parser.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port or mqtts://host:port"
    )
    parser.add_argument(
        "--topic",
        action="append",
        dest="topics",
        metavar="FILTER",
        help="subscribe to this filter, QoS 1 (repeatable; default campus/#)",
    )
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help="platform name (default police)")
    parser.add_argument(
        "--presence-topic",
        default="",
        help="retained presence topic (default campus-platform/{platform}/state)",
    )
    parser.add_argument("--client-id", default="", help="MQTT client id (default campus-console-{platform})")
    parser.add_argument("--username", default=None)
    parser.add_argument("--password-file", default=None, help="file holding the broker password")
    parser.add_argument("--ca-file", default=None, help="CA certificates (PEM) for mqtts://")
    parser.add_argument("--key-file", default=None, help="the uplink's command key; without it, no acks")
    parser.add_argument("--auto-ack", action="store_true", help="acknowledge every active alarm at once")
    parser.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    parser.add_argument(
        "--log-level",
        default="error",
        choices=["debug", "info", "warning", "error"],
        help="library log level on stderr (default error)",
    )
    parser.set_defaults(func=_cmd_console)


def options_from_args(args: argparse.Namespace, stdin: IO[str] | None = None) -> ConsoleOptions:
    """Read the files the options name and validate everything; raises :class:`UsageError`."""
    key = None
    if args.key_file is not None:
        try:
            key = load_key(Path(args.key_file))
        except CommandError as exc:
            raise UsageError(f"--key-file {exc}") from exc
    return ConsoleOptions(
        broker=BrokerUrl.parse(args.broker),
        topics=tuple(args.topics) if args.topics else DEFAULT_TOPICS,
        platform=args.platform,
        presence_topic=args.presence_topic,
        client_id=args.client_id,
        username=args.username,
        password=_read_password(args.password_file),
        ca_file=Path(args.ca_file) if args.ca_file is not None else None,
        key=key,
        auto_ack=args.auto_ack,
        input_fd=None if args.auto_ack else _interactive_fd(sys.stdin if stdin is None else stdin),
        duration=args.duration,
    )


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--password-file {path}: cannot read it: {exc}") from exc


def _interactive_fd(stream: IO[str] | None) -> int | None:
    """The stream's fd if it is a terminal or a pipe (or socket), else None."""
    if stream is None:
        return None
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):  # no real fd (replaced, closed)
        return None
    if os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return fd
    return None


def _cmd_console(args: argparse.Namespace) -> int:
    from gateway import logs

    logs.configure(args.log_level, "console" if sys.stderr.isatty() else "json", stream=sys.stderr)
    try:
        options = options_from_args(args)
        _safe_output(sys.stdout)
        sink: Sink = JsonLines(sys.stdout) if args.json else HumanView(sys.stdout, color=sys.stdout.isatty())
        console = Console(options, sink)
    except UsageError as exc:
        sys.stderr.write(f"campus-gateway console: {exc}\n")
        return EXIT_USAGE
    asyncio.run(run_until_signalled(console))
    return EXIT_OK


def _safe_output(stream: IO[str]) -> None:
    """What the output's encoding cannot hold (a payload's text on an ASCII or Latin-1
    terminal) is written as a backslash escape, never an error that loses the line."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")


async def run_until_signalled(console: Console) -> None:
    """Run ``console``; SIGINT and SIGTERM stop it cleanly (offline presence, DISCONNECT)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, console.stop)
    try:
        await console.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)

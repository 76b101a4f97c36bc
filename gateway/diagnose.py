"""Technician checks that need no running daemon: ``probe`` one device, ``discover`` devices.

    campus-gateway probe modbus://10.0.0.5:502?unit=1
    campus-gateway probe 'modbus://10.0.0.5?unit=2&table=input_registers&address=0&count=8'
    campus-gateway probe 'rtu:///dev/ttyUSB0?baudrate=9600&unit=1'
    campus-gateway probe onvif://admin@10.0.0.20:80 --password-file /etc/campus-gateway/cam.pw
    campus-gateway discover onvif [--timeout 3] [--interface 10.0.0.2]
    campus-gateway discover modbus 10.0.0.5[:502] [--units 1-247] [--timeout 0.2]

Each talks to the devices through the same driver code as the daemon (``ModbusHub``,
``CameraSession``), so what a probe sees is what the daemon will see. Output is a table
by default, or one JSON document on stdout with ``--json``. Exit codes: 0 everything
answered (discover: at least one device found), 1 something did not answer or failed
(discover: nothing found), 2 bad usage (a bad URL or option, no password). Errors are
one line on stderr.

Importing this module loads no driver: drivers (pymodbus, zeep, lxml) are imported inside
the command functions, so ``gateway.cli`` may import it on every start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import structlog

if TYPE_CHECKING:
    from drivers.modbus import Link, ModbusHub, UnitClient

# Same values as gateway.cli's EXIT_OK / EXIT_FAILURE / EXIT_CONFIG (cli imports this module).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

PASSWORD_ENV = "CAMPUS_GATEWAY_PROBE_PASSWORD"  # noqa: S105 - the variable's name, not a password
PROG = "campus-gateway"

TABLES = ("discrete_inputs", "coils", "holding_registers", "input_registers")
_BIT_TABLES = frozenset({"discrete_inputs", "coils"})
# The default probe: the given range (default discrete inputs 0+8) first, then these.
DEFAULT_SWEEP: tuple[tuple[str, int, int], ...] = (
    ("discrete_inputs", 0, 8),
    ("coils", 0, 8),
    ("holding_registers", 0, 4),
    ("input_registers", 0, 4),
)
# 1 s per Modbus request: a LAN device answers in milliseconds, one behind a serial server
# or a VPN in tens; the daemon's 0.3 s is for polling, a technician's check may be remote.
MODBUS_TIMEOUT = 1.0
MODBUS_CONNECT_TIMEOUT = 2.0
# 5 s per camera request, as the driver's default: a busy cheap camera answers in a second.
ONVIF_TIMEOUT = 5.0
# One short pull: the probe checks that a subscription works, not that events are flowing.
PULL_SECONDS = 1.0
SUBSCRIPTION_SECONDS = 60  # expires by itself if the unsubscribe never reaches the camera
UNSUBSCRIBE_TIMEOUT = 2.0

WS_DISCOVERY_GROUP = ("239.255.255.250", 3702)
WS_DISCOVERY_MAX_BYTES = 64 * 1024  # one ProbeMatches is a few KiB; a datagram at most 64 KiB
WS_DISCOVERY_MAX_RESPONDERS = 1024
_WSD_REPEAT_GAP = 0.1  # SOAP-over-UDP: a multicast message is sent twice (UDP may lose one)

DISCOVER_MODBUS_TIMEOUT = 0.2
DISCOVER_MODBUS_MAX_TIME = 120.0
# Modbus exception 10 / 11 come from a TCP-to-RTU gateway: nothing answered behind it.
GATEWAY_NO_TARGET = frozenset({10, 11})

SHOWN_BITS = 32
SHOWN_REGISTERS = 16


class UsageError(Exception):
    """Bad input from the command line: exit 2 with this message."""


class CommandFailed(Exception):
    """The command could not do its work at all (e.g. no network to send on): exit 1."""


# ---- the parsers -------------------------------------------------------------------------


def add_diagnose_parsers(subparsers: Any) -> None:
    """Add ``probe`` and ``discover`` to a ``campus-gateway`` subparsers action."""
    probe = subparsers.add_parser(
        "probe",
        help="check one device (Modbus TCP/RTU, ONVIF camera) without the daemon",
        description="Connect to one device through the gateway's own drivers and report what "
        "answers, with timings. Exit 0: everything answered; 1: something did not; 2: bad usage.",
        epilog="URLs: modbus://HOST[:PORT]?unit=N[&table=T&address=A&count=C] "
        "(T: discrete_inputs, coils, holding_registers, input_registers); "
        "rtu:///dev/ttyUSB0?unit=N[&baudrate=9600&parity=N&stopbits=1&bytesize=8&table=...]; "
        f"onvif://USER@HOST[:PORT] with the password in --password-file or ${PASSWORD_ENV}.",
    )
    probe.add_argument("url", help="modbus://..., rtu://... or onvif://user@host:port")
    probe.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help=f"onvif: file holding the camera password (else ${PASSWORD_ENV}); never on the command line",
    )
    probe.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        help=f"seconds per request (modbus default {MODBUS_TIMEOUT:g}, onvif {ONVIF_TIMEOUT:g})",
    )
    probe.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=MODBUS_CONNECT_TIMEOUT,
        help=f"modbus: seconds to connect (default {MODBUS_CONNECT_TIMEOUT:g})",
    )
    probe.add_argument("--only", action="store_true", help="modbus: read only the given range, no sweep")
    _common(probe)
    probe.set_defaults(func=cmd_probe)

    discover = subparsers.add_parser(
        "discover",
        help="find ONVIF cameras (WS-Discovery) or Modbus unit ids on a host",
        description="Exit 0: something was found; 1: nothing answered; 2: bad usage.",
    )
    kinds = discover.add_subparsers(dest="kind", required=True, metavar="KIND")

    onvif = kinds.add_parser(
        "onvif",
        help="WS-Discovery probe for ONVIF cameras (UDP multicast 239.255.255.250:3702)",
        description="Send a WS-Discovery Probe for NetworkVideoTransmitter and list the cameras "
        "that answer within --timeout. Multicast reaches this subnet only.",
    )
    onvif.add_argument("--timeout", type=_positive_float, default=3.0, help="seconds to listen (default 3)")
    onvif.add_argument(
        "--interface", default=None, metavar="ADDR", help="IPv4 source address (picks the network)"
    )
    onvif.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="send the probe by unicast to this address instead of multicast (one camera, or a test)",
    )
    _common(onvif)
    onvif.set_defaults(func=cmd_discover_onvif)

    modbus = kinds.add_parser(
        "modbus",
        help="scan the unit ids of one Modbus TCP host (or TCP-to-RTU gateway)",
        description="Try a cheap read on each unit id, one at a time over one connection, and "
        "list the units that answer (with data or a Modbus exception).",
    )
    modbus.add_argument("host", help="HOST[:PORT] (port default 502), or modbus://HOST:PORT")
    modbus.add_argument("--units", default="1-247", help="unit ids, e.g. 1-247 or 1,2,10-20 (default 1-247)")
    modbus.add_argument(
        "--timeout",
        type=_positive_float,
        default=DISCOVER_MODBUS_TIMEOUT,
        help=f"seconds to wait for each unit (default {DISCOVER_MODBUS_TIMEOUT:g})",
    )
    modbus.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=MODBUS_CONNECT_TIMEOUT,
        help=f"seconds to connect (default {MODBUS_CONNECT_TIMEOUT:g})",
    )
    modbus.add_argument(
        "--table",
        choices=TABLES,
        default="holding_registers",
        help="what to read (default holding_registers)",
    )
    modbus.add_argument("--address", type=int, default=0, help="address to read, count 1 (default 0)")
    modbus.add_argument(
        "--max-time",
        type=_positive_float,
        default=DISCOVER_MODBUS_MAX_TIME,
        help=f"stop the scan after this many seconds (default {DISCOVER_MODBUS_MAX_TIME:g})",
    )
    _common(modbus)
    modbus.set_defaults(func=cmd_discover_modbus)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="driver log lines on stderr (default: quiet)"
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 and at most 3600")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.diagnose probe ...``: the same commands without gateway.cli."""
    parser = argparse.ArgumentParser(prog=PROG, description="probe and discover devices")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_diagnose_parsers(sub)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


# ---- command plumbing ---------------------------------------------------------------------


def _run(args: argparse.Namespace, what: str, body: Callable[[], Any]) -> int:
    """Run ``body`` (a coroutine function returning (report, exit code, table renderer)), print."""
    try:
        with _driver_logs(verbose=args.verbose):
            report, code, render = asyncio.run(body())
    except UsageError as exc:
        _err(f"{what}: {exc}")
        return EXIT_USAGE
    except CommandFailed as exc:
        _err(f"{what}: {exc}")
        return EXIT_FAILURE
    _out(json.dumps(report, ensure_ascii=False) if args.json else render(report))
    if code != EXIT_OK and report.get("error"):
        _err(f"{what}: {report['error']}")  # the reason in one line, also with --json
    return int(code)


def _out(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"{PROG} {' '.join(text.split())}\n")  # one line, whatever the message holds


@contextlib.contextmanager
def _driver_logs(*, verbose: bool) -> Iterator[None]:
    """Driver log lines to stderr (never stdout: --json owns it), only with --verbose.

    structlog's configuration is restored afterwards, and loggers are not cached, so a
    caller in the same process (a test) keeps its own configuration.
    """
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.CRITICAL),
        cache_logger_on_first_use=False,
    )
    quiet = {name: logging.getLogger(name) for name in ("pymodbus", "onvif", "zeep", "aiohttp", "asyncio")}
    levels = {name: lg.level for name, lg in quiet.items()}
    if not verbose:
        for lg in quiet.values():
            lg.setLevel(logging.CRITICAL + 10)
    try:
        yield
    finally:
        for name, lg in quiet.items():
            lg.setLevel(levels[name])
        structlog.configure(**saved)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ---- probe: URLs --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModbusTarget:
    link: Link
    unit: int
    read: tuple[str, int, int]  # table, address, count
    explicit: bool  # the URL named a range


@dataclass(frozen=True)
class OnvifTarget:
    host: str
    port: int
    username: str


def parse_probe_url(url: str) -> ModbusTarget | OnvifTarget:
    """A probe URL checked field by field; UsageError names what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{url!r}: bad URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme == "modbus":
        return _modbus_target(url, parts, port)
    if scheme == "rtu":
        return _rtu_target(url, parts)
    if scheme == "onvif":
        return _onvif_target(url, parts, port)
    raise UsageError(
        f"{url!r}: unknown scheme; use modbus://HOST:PORT?unit=N, rtu:///dev/ttyX?unit=N "
        "or onvif://USER@HOST:PORT"
    )


def _query(url: str, parts: SplitResult, allowed: Sequence[str]) -> dict[str, str]:
    try:
        raw = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise UsageError(f"{url!r}: bad query string {parts.query!r}") from None
    out: dict[str, str] = {}
    for key, values in raw.items():
        if key not in allowed:
            raise UsageError(f"{url!r}: unknown parameter {key!r}; known: {', '.join(allowed)}")
        if len(values) != 1:
            raise UsageError(f"{url!r}: parameter {key!r} given {len(values)} times")
        out[key] = values[0]
    return out


def _int(url: str, q: dict[str, str], key: str, default: int, *, lo: int, hi: int) -> int:
    text = q.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{url!r}: {key}={text!r} is not an integer") from None
    if not lo <= value <= hi:
        raise UsageError(f"{url!r}: {key}={value} is outside {lo}..{hi}")
    return value


_RANGE_KEYS = ("unit", "table", "address", "count")


def _read_range(url: str, q: dict[str, str]) -> tuple[tuple[str, int, int], bool]:
    table = q.get("table", "discrete_inputs")
    if table not in TABLES:
        raise UsageError(f"{url!r}: table={table!r}; one of {', '.join(TABLES)}")
    most = 2000 if table in _BIT_TABLES else 125
    default_count = 8 if table in _BIT_TABLES else 4
    address = _int(url, q, "address", 0, lo=0, hi=0xFFFF)
    count = _int(url, q, "count", default_count, lo=1, hi=most)
    if address + count > 0x10000:
        raise UsageError(f"{url!r}: address {address} + count {count} goes past 65535")
    explicit = any(k in q for k in ("table", "address", "count"))
    return (table, address, count), explicit


def _modbus_target(url: str, parts: SplitResult, port: int | None) -> ModbusTarget:
    from drivers.modbus.links import TcpLink

    host = parts.hostname
    if not host:
        raise UsageError(f"{url!r}: no host; e.g. modbus://10.0.0.5:502?unit=1")
    if parts.username or parts.password:
        raise UsageError(f"{url!r}: Modbus has no user or password")
    if parts.path not in ("", "/"):
        raise UsageError(f"{url!r}: unexpected path {parts.path!r}; options go in ?unit=..&table=..")
    q = _query(url, parts, _RANGE_KEYS)
    unit = _int(url, q, "unit", 1, lo=0, hi=255)
    read, explicit = _read_range(url, q)
    return ModbusTarget(TcpLink(host, 502 if port is None else port), unit, read, explicit)


def _rtu_target(url: str, parts: SplitResult) -> ModbusTarget:
    from drivers.modbus.links import SerialLink

    if parts.netloc:
        raise UsageError(f"{url!r}: write the serial device as a path: rtu:///dev/ttyUSB0?unit=1")
    device = unquote(parts.path)
    if not device.startswith("/") or device == "/":
        raise UsageError(f"{url!r}: no serial device; e.g. rtu:///dev/ttyUSB0?unit=1")
    q = _query(url, parts, (*_RANGE_KEYS, "baudrate", "parity", "stopbits", "bytesize"))
    unit = _int(url, q, "unit", 1, lo=1, hi=247)
    baudrate = _int(url, q, "baudrate", 9600, lo=1200, hi=921600)
    parity = q.get("parity", "N").upper()
    if parity not in ("N", "E", "O"):
        raise UsageError(f"{url!r}: parity={parity!r}; one of N, E, O")
    stopbits = _int(url, q, "stopbits", 1, lo=1, hi=2)
    bytesize = _int(url, q, "bytesize", 8, lo=7, hi=8)
    read, explicit = _read_range(url, q)
    parity_: Any = parity  # one of the Literal's values, checked above
    link = SerialLink(device, baudrate=baudrate, parity=parity_, stopbits=stopbits, bytesize=bytesize)
    return ModbusTarget(link, unit, read, explicit)


def _onvif_target(url: str, parts: SplitResult, port: int | None) -> OnvifTarget:
    if parts.password is not None:
        raise UsageError(
            f"onvif://{parts.username or ''}:***@...: never put the password in the URL (shell "
            f"history, ps); use --password-file or ${PASSWORD_ENV}"
        )
    host = parts.hostname
    if not host:
        raise UsageError(f"{url!r}: no host; e.g. onvif://admin@10.0.0.20:80")
    if parts.path not in ("", "/") or parts.query:
        raise UsageError(f"{url!r}: only onvif://USER@HOST[:PORT]; the service paths are found by the probe")
    username = unquote(parts.username) if parts.username else "admin"
    return OnvifTarget(host, 80 if port is None else port, username)


def read_password(password_file: Path | None) -> str:
    """The camera password: --password-file, else the environment; UsageError if neither."""
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"--password-file {password_file}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        password = text.strip()
        if not password:
            raise UsageError(f"--password-file {password_file}: the file is empty")
        return password
    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise UsageError(f"no password: give --password-file FILE or set {PASSWORD_ENV}")
    return password


# ---- probe ------------------------------------------------------------------------------


def cmd_probe(args: argparse.Namespace) -> int:
    async def body() -> tuple[dict[str, Any], int, Callable[[dict[str, Any]], str]]:
        target = parse_probe_url(args.url)
        if isinstance(target, OnvifTarget):
            password = read_password(args.password_file)
            report = await probe_onvif(target, password, timeout=args.timeout or ONVIF_TIMEOUT)
            return report, EXIT_OK if report["ok"] else EXIT_FAILURE, render_onvif
        if args.password_file is not None:
            raise UsageError("--password-file is for onvif:// only")
        report = await probe_modbus(
            target,
            timeout=args.timeout or MODBUS_TIMEOUT,
            connect_timeout=args.connect_timeout,
            only=args.only,
        )
        return report, EXIT_OK if report["ok"] else EXIT_FAILURE, render_modbus

    return _run(args, "probe", body)


@dataclass
class _ConnectLog:
    """Connects a hub made, timed (``ModbusHub`` connects lazily, inside a transaction)."""

    attempts: list[dict[str, Any]] = field(default_factory=list)


def _timed_hub(link: Link, *, timeout: float, connect_timeout: float, log: _ConnectLog) -> ModbusHub:
    """A ModbusHub whose connects are timed into ``log``; drivers imported only here."""
    from drivers.modbus import ModbusHub
    from drivers.modbus.conn import Connection
    from gateway.backoff import Backoff

    class TimedHub(ModbusHub):
        async def _connect(self, device_id: str) -> Connection:
            start = time.perf_counter()
            try:
                conn = await super()._connect(device_id)
            except Exception as exc:
                log.attempts.append(
                    {"ok": False, "ms": _ms(time.perf_counter() - start), "error": _strip_device(exc)}
                )
                raise
            log.attempts.append({"ok": True, "ms": _ms(time.perf_counter() - start), "error": None})
            return conn

    # A short backoff: a probe retries a dropped link at once rather than report "link down".
    return TimedHub(link, timeout=timeout, connect_timeout=connect_timeout, backoff=Backoff(0.05, 0.5))


async def _read(client: UnitClient, table: str, address: int, count: int) -> list[int]:
    if table == "discrete_inputs":
        return [int(b) for b in await client.read_discrete_inputs(address, count)]
    if table == "coils":
        return [int(b) for b in await client.read_coils(address, count)]
    if table == "holding_registers":
        return await client.read_holding_registers(address, count)
    return await client.read_input_registers(address, count)


async def _timed_read(
    client: UnitClient, log: _ConnectLog, *, table: str, address: int, count: int
) -> dict[str, Any]:
    """One read as a report row: answered / exception / no_answer / bad_reply, with latency
    (a connect the read needed is timed separately, in ``log``)."""
    from drivers.modbus.unit import EXCEPTION_NAMES
    from gateway.errors import DeviceProtocolError, DeviceRejected, DriverError

    row: dict[str, Any] = {"table": table, "address": address, "count": count}
    connects = len(log.attempts)
    start = time.perf_counter()
    try:
        values = await _read(client, table, address, count)
    except DeviceRejected as exc:
        row.update(status="exception", exception_code=exc.code, error=EXCEPTION_NAMES.get(exc.code or 0, ""))
    except DeviceProtocolError as exc:
        row.update(status="bad_reply", error=_strip_device(exc))
    except DriverError as exc:
        row.update(status="no_answer", error=_strip_device(exc))
    else:
        row.update(status="answered", values=values)
    elapsed = time.perf_counter() - start
    new = log.attempts[connects:]
    if new and not new[-1]["ok"]:
        row.update(status="not_connected", ms=None, error="no connection")
        return row
    row["ms"] = _ms(max(0.0, elapsed - sum(a["ms"] for a in new) / 1000))
    return row


def _strip_device(exc: BaseException) -> str:
    """A driver error's message without the device id prefix (the probe has one device)."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("probe: ") else text


async def probe_modbus(
    target: ModbusTarget, *, timeout: float, connect_timeout: float, only: bool = False
) -> dict[str, Any]:
    """Connect, then each read in turn; a failed connect skips the rest (the link is down)."""
    reads = [target.read]
    if not only:
        reads += [r for r in DEFAULT_SWEEP if r != target.read]
    log = _ConnectLog()
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    hub = _timed_hub(target.link, timeout=timeout, connect_timeout=connect_timeout, log=log)
    async with hub:
        client = hub.unit(target.unit, device_id="probe", timeout=timeout)
        for table, address, count in reads:
            if log.attempts and not log.attempts[-1]["ok"]:
                rows.append(
                    {
                        "table": table,
                        "address": address,
                        "count": count,
                        "status": "skipped",
                        "ms": None,
                        "error": "not connected",
                    }
                )
                continue
            row = await _timed_read(client, log, table=table, address=address, count=count)
            if row["status"] == "not_connected":
                row.update(status="skipped", error="not connected")
            rows.append(row)
    connect = log.attempts[0] if log.attempts else {"ok": False, "ms": None, "error": "not tried"}
    answered = [r for r in rows if r["status"] in ("answered", "exception")]
    return {
        "probe": "modbus",
        "link": target.link.label,
        "unit": target.unit,
        "timeout": timeout,
        "connect": connect,
        "reconnects": max(0, len(log.attempts) - 1),
        "reads": rows,
        "answered": len(answered),
        "ok": bool(connect["ok"]) and len(answered) == len(rows),
        "error": _modbus_error(target, connect, rows),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _modbus_error(target: ModbusTarget, connect: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """The first failure, for the one line on stderr."""
    where = f"{target.link.label} unit {target.unit}"
    if not connect["ok"]:
        return str(connect["error"])
    bad = [r for r in rows if r["status"] not in ("answered", "exception")]
    if not bad:
        return None
    r = bad[0]
    more = f" (and {len(bad) - 1} more read(s))" if len(bad) > 1 else ""
    return f"{where}: {_table_name(r['table'], r['address'], r['count'])}: {r['error']}{more}"


def _table_name(table: str, address: int, count: int) -> str:
    return f"{table.replace('_', ' ')} {address}+{count}"


def _values(table: str, values: Sequence[int]) -> str:
    if table in _BIT_TABLES:
        shown = "".join(str(v) for v in values[:SHOWN_BITS])
        return shown + (f"... ({len(values)} bits)" if len(values) > SHOWN_BITS else "")
    shown = " ".join(str(v) for v in values[:SHOWN_REGISTERS])
    return shown + (f" ... ({len(values)} registers)" if len(values) > SHOWN_REGISTERS else "")


def render_modbus(report: dict[str, Any]) -> str:
    c = report["connect"]
    head = f"probe {report['link']} unit {report['unit']}"
    connect = f"connect: ok in {_fmt_ms(c['ms'])}" if c["ok"] else f"connect: FAILED: {c['error']}"
    if report["reconnects"]:
        connect += f" ({report['reconnects']} reconnect(s) after failed reads)"
    rows = []
    for r in report["reads"]:
        status = {
            "answered": "answered",
            "exception": f"exception {r.get('exception_code')}",
            "no_answer": "NO ANSWER",
            "bad_reply": "BAD REPLY",
            "skipped": "skipped",
        }[r["status"]]
        result = _values(r["table"], r["values"]) if r["status"] == "answered" else r.get("error") or ""
        rows.append([_table_name(r["table"], r["address"], r["count"]), status, _fmt_ms(r["ms"]), result])
    n = len(report["reads"])
    verdict = "ok" if report["ok"] else "FAILED"
    summary = f"{verdict}: {report['answered']} of {n} reads answered"
    exceptions = sum(1 for r in report["reads"] if r["status"] == "exception")
    if exceptions:
        summary += f" ({exceptions} with a Modbus exception: the device is there, the range is not)"
    table = _table(["READ", "STATUS", "LATENCY", "RESULT"], rows)
    return f"{head}\n{connect}\n{table}\n{summary}"


# ---- probe onvif ------------------------------------------------------------------------


class _Steps:
    """ONVIF probe steps, each ok / failed / skipped with its time."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def skip(self, name: str, why: str) -> None:
        self.rows.append({"step": name, "status": "skipped", "ms": None, "detail": why})

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> Any:
        """Times the body; a DriverError inside is recorded as the step's failure, not raised."""
        from gateway.errors import DriverError

        row: dict[str, Any] = {"step": name, "status": "ok", "ms": None, "detail": ""}
        self.rows.append(row)
        start = time.perf_counter()
        try:
            yield row
        except DriverError as exc:
            row.update(status="failed", detail=_strip_device(exc))
        finally:
            row["ms"] = _ms(time.perf_counter() - start)

    def ok(self, name: str) -> bool:
        return any(r["step"] == name and r["status"] == "ok" for r in self.rows)


async def probe_onvif(target: OnvifTarget, password: str, *, timeout: float) -> dict[str, Any]:
    """connect (clock) -> device info -> profiles -> snapshot URI -> snapshot -> pull-point
    (create, one pull, unsubscribe); a step whose prerequisite failed is skipped."""
    from drivers.onvif.config import CameraConfig
    from drivers.onvif.session import CameraSession

    cfg = CameraConfig(
        id="probe",
        driver="onvif_camera",
        host=target.host,
        port=target.port,
        username=target.username,
        timeout=min(timeout, 60.0),
    )
    steps = _Steps()
    info: dict[str, Any] = {}
    started = time.perf_counter()
    session = CameraSession(cfg, password)
    cam = session.camera
    try:
        async with steps.step("connect") as row:
            await session.call("connect (GetSystemDateAndTime, GetServices)", cam.update_xaddrs())
            offset = session.clock_offset
            info["clock_offset"] = None if offset is None else round(offset, 1)
            row["detail"] = "clock offset " + ("unknown" if offset is None else f"{offset:+.1f} s")
        if not steps.ok("connect"):
            for name in (
                "device info",
                "profiles",
                "snapshot uri",
                "snapshot",
                "subscribe",
                "pull",
                "unsubscribe",
            ):
                steps.skip(name, "not connected")
        else:
            await _onvif_media(session, steps, info, timeout)
            await _onvif_events(session, steps, info)
    finally:
        await session.close()
    failed = [r["step"] for r in steps.rows if r["status"] != "ok"]
    return {
        "probe": "onvif",
        "camera": f"http://{_host_port(target.host, target.port)}",
        "username": target.username,
        "timeout": timeout,
        "steps": steps.rows,
        "info": info,
        "ok": not failed,
        "error": next((f"{r['step']}: {r['detail']}" for r in steps.rows if r["status"] == "failed"), None),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _onvif_media(session: Any, steps: _Steps, info: dict[str, Any], timeout: float) -> None:
    from drivers.onvif.video import UndecodableFrame, jpeg_size
    from gateway.errors import DeviceProtocolError

    cam = session.camera
    async with steps.step("device info") as row:
        devicemgmt = await session.call("device service", cam.create_devicemgmt_service())
        answer = await session.call("GetDeviceInformation", devicemgmt.GetDeviceInformation())
        for key, attr in (
            ("manufacturer", "Manufacturer"),
            ("model", "Model"),
            ("firmware", "FirmwareVersion"),
            ("serial", "SerialNumber"),
        ):
            info[key] = str(getattr(answer, attr, "") or "")
        row["detail"] = (
            f"{info['manufacturer']} {info['model']}, firmware {info['firmware']}, serial {info['serial']}"
        )
    tokens: list[str] = []
    async with steps.step("profiles") as row:
        media = await session.call("media service", cam.create_media_service())
        profiles = await session.call("GetProfiles", media.GetProfiles())
        tokens = [str(p.token) for p in profiles or ()]
        info["profiles"] = tokens
        if not tokens:
            raise DeviceProtocolError("probe", "GetProfiles: the camera has no media profile")
        row["detail"] = ", ".join(tokens)
    if not tokens:
        steps.skip("snapshot uri", "no profile")
        steps.skip("snapshot", "no profile")
        return
    async with steps.step("snapshot uri") as row:
        uri = await session.call("GetSnapshotUri", cam.get_snapshot_uri(tokens[0]))
        info["snapshot_uri"] = uri
        if not uri:
            raise DeviceProtocolError("probe", f"GetSnapshotUri: no URI for profile {tokens[0]}")
        row["detail"] = f"{tokens[0]}: {uri}"
    if not info.get("snapshot_uri"):
        steps.skip("snapshot", "no snapshot URI")
        return
    async with steps.step("snapshot") as row:
        data = await session.call(
            "snapshot", cam.get_snapshot(tokens[0], timeout=timeout), timeout=timeout + 1
        )
        if not data:
            raise DeviceProtocolError("probe", "snapshot: the camera returned no picture")
        info["snapshot_bytes"] = len(data)
        try:
            width, height = jpeg_size(bytes(data))
        except UndecodableFrame as exc:
            raise DeviceProtocolError("probe", f"snapshot: {len(data)} bytes, not a JPEG: {exc}") from exc
        info["snapshot_size"] = [width, height]
        row["detail"] = f"{len(data)} bytes, JPEG {width}x{height}"


async def _onvif_events(session: Any, steps: _Steps, info: dict[str, Any]) -> None:
    """The driver's pull-point cycle (drivers.onvif.pullpoint), once: create, pull, unsubscribe."""
    cam = session.camera
    subscription: Any = None
    pullpoint: Any = None
    try:
        async with steps.step("subscribe") as row:
            events = await session.call("events service", cam.create_events_service())
            result = await session.call(
                "CreatePullPointSubscription",
                events.CreatePullPointSubscription({"InitialTerminationTime": f"PT{SUBSCRIPTION_SECONDS}S"}),
            )
            address = result.SubscriptionReference.Address._value_1  # zeep's text of an AnyURI
            key = "http://www.onvif.org/ver10/events/wsdl/PullPointSubscription"
            cam.xaddrs[key] = cam.rewrite_url(address)
            subscription = await session.call(
                "subscription service", cam.create_subscription_service("PullPointSubscription")
            )
            pullpoint = await session.call("pull-point service", cam.create_pullpoint_service())
            row["detail"] = str(address)
        if pullpoint is None:
            steps.skip("pull", "no subscription")
        else:
            async with steps.step("pull") as row:
                import datetime as dt

                answer = await session.call(
                    "PullMessages",
                    pullpoint.PullMessages(
                        {"Timeout": dt.timedelta(seconds=PULL_SECONDS), "MessageLimit": 10}
                    ),
                    timeout=PULL_SECONDS + session.timeout,
                )
                n = len(getattr(answer, "NotificationMessage", None) or [])
                info["messages"] = n
                row["detail"] = f"{n} message(s) in {PULL_SECONDS:g} s"
    finally:
        if subscription is None:
            steps.skip("unsubscribe", "no subscription")
        else:
            async with steps.step("unsubscribe"):
                await session.call("Unsubscribe", subscription.Unsubscribe(), timeout=UNSUBSCRIBE_TIMEOUT)


def render_onvif(report: dict[str, Any]) -> str:
    head = f"probe onvif {report['camera']} as {report['username']}"
    rows = [
        [
            r["step"],
            {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[r["status"]],
            _fmt_ms(r["ms"]),
            r["detail"],
        ]
        for r in report["steps"]
    ]
    bad = [r["step"] for r in report["steps"] if r["status"] != "ok"]
    summary = "ok: every step answered" if not bad else f"FAILED: {', '.join(bad)}"
    return f"{head}\n{_table(['STEP', 'STATUS', 'TIME', 'DETAIL'], rows)}\n{summary}"


# ---- discover onvif (WS-Discovery) ----------------------------------------------------

_NS_SOAP = "http://www.w3.org/2003/05/soap-envelope"
_NS_WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
_NS_WSD = "http://schemas.xmlsoap.org/ws/2005/04/discovery"


def ws_discovery_probe(message_id: str) -> bytes:
    """A WS-Discovery Probe for ONVIF NetworkVideoTransmitter devices."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<s:Envelope xmlns:s="{_NS_SOAP}" xmlns:a="{_NS_WSA}" xmlns:d="{_NS_WSD}" '
        'xmlns:dn="http://www.onvif.org/ver10/network/wsdl">'
        "<s:Header>"
        f"<a:MessageID>{message_id}</a:MessageID>"
        '<a:To s:mustUnderstand="true">urn:schemas-xmlsoap-org:ws:2005:04:discovery</a:To>'
        f'<a:Action s:mustUnderstand="true">{_NS_WSD}/Probe</a:Action>'
        "</s:Header>"
        "<s:Body><d:Probe><d:Types>dn:NetworkVideoTransmitter</d:Types></d:Probe></s:Body>"
        "</s:Envelope>"
    ).encode()


def _local_text(el: Any, name: str) -> str:
    found = el.xpath(f".//*[local-name()='{name}']")
    return " ".join((found[0].text or "").split()) if found else ""


def parse_probe_matches(data: bytes, message_id: str) -> list[dict[str, Any]]:
    """The ProbeMatch entries of one datagram (hardened parsing: xmlsafe.parse_xml).

    Raises xmlsafe.UnsafeXml for refused XML. Answers to another probe (RelatesTo) and
    messages that are not ProbeMatches give an empty list. Namespaces are matched by local
    name: cameras answer in the 2005/04 or the 2009/01 WS-Discovery namespace.
    """
    from drivers.onvif import xmlsafe

    root = xmlsafe.parse_xml(data, max_bytes=WS_DISCOVERY_MAX_BYTES)
    relates = _local_text(root, "RelatesTo")
    if relates and relates != message_id:
        return []
    matches = []
    for match in root.xpath(".//*[local-name()='ProbeMatch']")[:64]:
        scopes = _local_text(match, "Scopes").split()
        entry: dict[str, Any] = {
            "endpoint": _local_text(match, "Address"),
            "types": _local_text(match, "Types").split(),
            "xaddrs": _local_text(match, "XAddrs").split(),
            "scopes": scopes,
        }
        for kind in ("name", "hardware", "location"):
            prefix = f"onvif://www.onvif.org/{kind}/"
            values = [unquote(s[len(prefix) :]) for s in scopes if s.startswith(prefix)]
            entry[kind] = values[0] if values else ""
        matches.append(entry)
    return matches


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.found: dict[str, dict[str, Any]] = {}
        self.refused: list[dict[str, str]] = []
        self.datagrams = 0

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        from drivers.onvif import xmlsafe

        self.datagrams += 1
        if len(self.found) >= WS_DISCOVERY_MAX_RESPONDERS:
            return
        source = str(addr[0])
        try:
            matches = parse_probe_matches(data, self.message_id)
        except xmlsafe.UnsafeXml as exc:
            if len(self.refused) < WS_DISCOVERY_MAX_RESPONDERS:
                self.refused.append({"from": source, "reason": exc.reason})
            return
        for m in matches:
            key = m["endpoint"] or f"{source} {' '.join(m['xaddrs'])}"
            if key not in self.found:
                self.found[key] = {"from": source, **m}

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for one datagram; the listen window goes on


def _addr(text: str, what: str, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what} {text!r}: give an IP address, e.g. 127.0.0.1:3702") from None
    if not port_text and default_port is not None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{what} {text!r}: give HOST:PORT with a port 1..65535")
    return host, int(port_text)


async def discover_onvif(
    *, timeout: float, interface: str | None = None, target: tuple[str, int] | None = None
) -> dict[str, Any]:
    """Send the Probe (multicast, or unicast to ``target``) and collect ProbeMatches for ``timeout``."""
    loop = asyncio.get_running_loop()
    message_id = f"urn:uuid:{uuid.uuid4()}"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        try:
            sock.bind((interface or "", 0))
        except OSError as exc:
            raise UsageError(
                f"--interface {interface}: cannot send from it ({exc.strerror or exc})"
            ) from None
        if target is None:
            # TTL 1: discovery is link-local (SOAP-over-UDP); routers do not forward it anyway.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            if interface:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        transport, collector = await loop.create_datagram_endpoint(lambda: _Collector(message_id), sock=sock)
    except BaseException:
        sock.close()
        raise
    dest = target or WS_DISCOVERY_GROUP
    started = time.perf_counter()
    errors: list[str] = []
    try:
        for i in range(2):
            try:
                transport.sendto(ws_discovery_probe(message_id), dest)
            except OSError as exc:  # no route to the group: no multicast-capable interface
                errors.append(exc.strerror or str(exc))
            if i == 0:
                await asyncio.sleep(min(_WSD_REPEAT_GAP, timeout))
        await asyncio.sleep(max(0.0, timeout - (time.perf_counter() - started)))
    finally:
        transport.close()
    return {
        "discover": "onvif",
        "via": f"{'unicast' if target else 'multicast'} {_host_port(*dest)}",
        "interface": interface,
        "timeout": timeout,
        "cameras": list(collector.found.values()),
        "refused": collector.refused,
        "send_errors": errors,
        "ok": bool(collector.found),
        "error": None if collector.found else f"no camera answered within {timeout:g} s",
    }


def cmd_discover_onvif(args: argparse.Namespace) -> int:
    async def body() -> tuple[dict[str, Any], int, Callable[[dict[str, Any]], str]]:
        interface = args.interface
        if interface is not None:
            try:
                address = ipaddress.ip_address(interface)
            except ValueError:
                address = None
            if not isinstance(address, ipaddress.IPv4Address):
                raise UsageError(f"--interface {interface!r}: give this machine's IPv4 address")
        target = None if args.target is None else _addr(args.target, "--target")
        if target is not None and ":" in target[0]:
            raise UsageError(f"--target {args.target!r}: IPv4 only")
        report = await discover_onvif(timeout=args.timeout, interface=interface, target=target)
        if report["send_errors"] and not report["cameras"]:
            raise CommandFailed(f"cannot send the probe: {report['send_errors'][0]}")
        return report, EXIT_OK if report["ok"] else EXIT_FAILURE, render_discover_onvif

    return _run(args, "discover onvif", body)


def render_discover_onvif(report: dict[str, Any]) -> str:
    rows = [
        [c["from"], c["name"] or "-", c["hardware"] or "-", " ".join(c["xaddrs"]) or "-"]
        for c in report["cameras"]
    ]
    lines = [
        f"discover onvif via {report['via']}"
        + (f" from {report['interface']}" if report["interface"] else "")
    ]
    if rows:
        lines.append(_table(["FROM", "NAME", "HARDWARE", "XADDRS"], rows))
    lines.extend(f"refused an answer from {r['from']}: unsafe XML ({r['reason']})" for r in report["refused"])
    n = len(report["cameras"])
    lines.append(
        f"{n} camera(s) answered within {report['timeout']:g} s"
        if n
        else f"FAILED: no camera answered within {report['timeout']:g} s"
    )
    return "\n".join(lines)


# ---- discover modbus ----------------------------------------------------------------------


def parse_units(text: str) -> list[int]:
    """``1-247`` or ``1,2,10-20``: sorted unique unit ids 0..255."""
    units: set[int] = set()
    for part in text.split(","):
        lo_text, sep, hi_text = part.strip().partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise UsageError(f"--units {text!r}: use e.g. 1-247 or 1,2,10-20") from None
        if not 0 <= lo <= hi <= 255:
            raise UsageError(f"--units {text!r}: unit ids are 0..255, ranges low-high")
        units.update(range(lo, hi + 1))
    return sorted(units)


def _modbus_host(text: str) -> tuple[str, int]:
    if "://" in text:
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"{text!r}: bad URL ({exc})") from None
        if (
            parts.scheme.lower() != "modbus"
            or not parts.hostname
            or parts.query
            or parts.path not in ("", "/")
        ):
            raise UsageError(f"{text!r}: give HOST[:PORT] or modbus://HOST[:PORT]")
        return parts.hostname, 502 if port is None else port
    if text.count(":") > 1 and not text.startswith("["):
        return text, 502  # a bare IPv6 address
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, "502"
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{text!r}: give HOST[:PORT] with a port 1..65535")
    return host, int(port_text)


async def discover_modbus(
    host: str,
    port: int,
    units: Sequence[int],
    *,
    timeout: float,
    connect_timeout: float,
    table: str = "holding_registers",
    address: int = 0,
    max_time: float = DISCOVER_MODBUS_MAX_TIME,
) -> dict[str, Any]:
    """One read per unit id, in order, through one hub (one connection at a time)."""
    from drivers.modbus.links import TcpLink

    link = TcpLink(host, port)
    log = _ConnectLog()
    found: list[dict[str, Any]] = []
    silent: list[int] = []
    no_target: list[int] = []
    not_scanned: list[int] = []
    error: str | None = None
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    deadline = loop.time() + max_time
    hub = _timed_hub(link, timeout=timeout, connect_timeout=connect_timeout, log=log)
    async with hub:
        for i, unit in enumerate(units):
            wait = hub.retry_in
            if error is not None or loop.time() + wait + timeout > deadline:
                not_scanned += units[i:]
                break
            if wait:
                await asyncio.sleep(wait)
            client = hub.unit(unit, device_id="probe", timeout=timeout)
            row = await _timed_read(client, log, table=table, address=address, count=1)
            row["unit"] = unit
            status = row["status"]
            if status == "not_connected":
                not_scanned.append(unit)
                failures = 0
                for a in reversed(log.attempts):
                    if a["ok"]:
                        break
                    failures += 1
                # Never connected: the host is down. Connected before: give a flapping link 3 tries.
                if failures >= 3 or not any(a["ok"] for a in log.attempts):
                    error = f"cannot connect to {link.label}: {log.attempts[-1]['error']}"
            elif status == "no_answer":
                silent.append(unit)
            elif status == "exception" and row.get("exception_code") in GATEWAY_NO_TARGET:
                no_target.append(unit)
            else:
                found.append(row)
    return {
        "discover": "modbus",
        "link": link.label,
        "read": _table_name(table, address, 1),
        "timeout": timeout,
        "units_scanned": len(units) - len(not_scanned),
        "answered": found,
        "silent": silent,
        "gateway_no_target": no_target,
        "not_scanned": not_scanned,
        "connect_error": error,
        "ok": bool(found) and error is None,
        "error": error or (None if found else f"no unit answered on {link.label}"),
        "seconds": round(time.perf_counter() - started, 3),
    }


def cmd_discover_modbus(args: argparse.Namespace) -> int:
    async def body() -> tuple[dict[str, Any], int, Callable[[dict[str, Any]], str]]:
        host, port = _modbus_host(args.host)
        units = parse_units(args.units)
        if not 0 <= args.address <= 0xFFFF:
            raise UsageError(f"--address {args.address}: 0..65535")
        report = await discover_modbus(
            host,
            port,
            units,
            timeout=args.timeout,
            connect_timeout=args.connect_timeout,
            table=args.table,
            address=args.address,
            max_time=args.max_time,
        )
        return report, EXIT_OK if report["ok"] else EXIT_FAILURE, render_discover_modbus

    return _run(args, "discover modbus", body)


def render_discover_modbus(report: dict[str, Any]) -> str:
    lines = [f"discover modbus {report['link']}: {report['read']} on each unit"]
    rows = []
    for r in report["answered"]:
        if r["status"] == "answered":
            status, result = "data", _values(r["table"], r["values"])
        elif r["status"] == "exception":
            status, result = f"exception {r.get('exception_code')}", r.get("error") or ""
        else:
            status, result = "BAD REPLY", r.get("error") or ""
        rows.append([str(r["unit"]), status, _fmt_ms(r["ms"]), result])
    if rows:
        lines.append(_table(["UNIT", "STATUS", "LATENCY", "RESULT"], rows))
    if report["connect_error"]:
        lines.append(f"error: {report['connect_error']}")
    summary = (
        f"{len(report['answered'])} unit(s) answered of {report['units_scanned']} scanned "
        f"in {report['seconds']:.1f} s; {len(report['silent'])} silent"
    )
    if report["gateway_no_target"]:
        summary += f", {len(report['gateway_no_target'])} reported absent by the gateway (exception 10/11)"
    if report["not_scanned"]:
        summary += f", {len(report['not_scanned'])} not scanned"
    lines.append(("" if report["ok"] else "FAILED: ") + summary)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

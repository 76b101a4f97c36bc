"""Technician commands that ask the running daemon through its local API.

    campus-gateway status | devices | uplinks | outbox | events [--follow] | test-alarm DEVICE
                   | reset DEVICE [--zone N]

Each talks to the Unix socket (``--socket``, default the config's ``api.socket`` with
``--config``, else /run/campus-gateway/api.sock) or to ``--url http://127.0.0.1:PORT``
(writes then need ``--token-file``). Readable tables by default, ``--json`` for scripts.
Exit codes: 0 done, 1 the daemon is unreachable or refused, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from gateway.errors import ConfigError

DEFAULT_SOCKET = Path("/run/campus-gateway/api.sock")
# 10 s per request: the daemon answers in milliseconds; a daemon that does not is reported.
REQUEST_TIMEOUT = 10.0
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class ApiError(Exception):
    pass


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url = args.url.rstrip("/") if args.url else "http://gateway"
        self.socket = None if args.url else _socket(args)
        token = Path(args.token_file).read_text(encoding="utf-8").strip() if args.token_file else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def session(self, timeout: float | None = REQUEST_TIMEOUT) -> aiohttp.ClientSession:
        connector = aiohttp.UnixConnector(path=str(self.socket)) if self.socket else None
        return aiohttp.ClientSession(
            connector=connector, headers=self.headers, timeout=aiohttp.ClientTimeout(total=timeout)
        )

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with self.session() as s, s.request(method, self.url + path, json=body) as r:
                data = await r.json(content_type=None)
                if r.status >= 400:
                    message = data.get("error") if isinstance(data, dict) else r.reason
                    raise ApiError(f"{method} {path}: {r.status} {message}")
                return data
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as exc:
            raise ApiError(f"cannot reach the daemon at {self.socket or self.url}: {exc}") from exc


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        from gateway import config

        cfg = config.load(Path(args.config))
        if cfg.api.socket is None:
            raise ApiError(f"{args.config}: api.socket is not set; use --url")
        return cfg.api.socket
    return DEFAULT_SOCKET


# -- output ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ago(ts: float | None) -> str:
    return "-" if ts is None else f"{time.time() - ts:.1f}s ago"


def show_status(data: dict[str, Any]) -> str:
    devices = data["devices"]
    lines = [
        f"uptime {data['uptime']} s, last seq {data['seq']}",
        f"devices: {devices['total']} total, {devices.get('online', 0)} online, "
        f"{devices.get('offline', 0)} offline",
    ]
    rows = [
        [name, u["state"], u.get("platform"), u["depth"], u["oldest_age"], _or_dash(u.get("awaiting_ack"))]
        for name, u in data["uplinks"].items()
    ]
    header = ["uplink", "state", "platform", "outbox depth", "oldest unsent (s)", "awaiting ack"]
    lines.append(table(header, rows))
    return "\n".join(lines)


def show_devices(data: list[dict[str, Any]]) -> str:
    rows = [
        [
            d["id"],
            d["kind"],
            d["state"],
            _ago(d["last_poll_ok"]),
            d["polls"],
            d["poll_errors"],
            d["last_error"] or "",
        ]
        for d in data
    ]
    return table(["device", "kind", "state", "last answer", "polls", "errors", "last error"], rows)


def show_uplinks(data: list[dict[str, Any]]) -> str:
    rows = []
    for u in data:
        platform = u.get("platform") or {}
        presence = platform.get("presence")
        if presence not in (None, "disabled"):
            presence = f"{presence} since {_ago(platform.get('since'))}"
        rows.append(
            [
                u["name"],
                u["state"],
                u.get("endpoint"),
                presence,
                u["depth"],
                u["oldest_age"],
                _or_dash(platform.get("awaiting_ack")),
                u.get("connects"),
            ]
        )
    header = ["uplink", "state", "endpoint", "platform", "outbox depth", "oldest unsent (s)", "awaiting ack"]
    return table([*header, "connects"], rows)


def _or_dash(value: object) -> object:
    """A column an uplink without that feature has no value for."""
    return "-" if value is None else value


def show_outbox(data: dict[str, Any]) -> str:
    rows = [[name, lane["depth"], lane["oldest_age"]] for name, lane in data["uplinks"].items()]
    return f"last seq {data['last_seq']}\n" + table(["uplink", "depth", "oldest unsent (s)"], rows)


def show_event(e: dict[str, Any]) -> str:
    state = e.get("state", "")
    device = e["device"]["id"]
    return f"{e['received_at']}  {e['seq']:>6}  {e['type']:<22} {state:<8} {e['severity']:<8} {device}"


def show_events(data: list[dict[str, Any]]) -> str:
    return "\n".join(show_event(e) for e in data) or "(no events yet)"


# -- commands -------------------------------------------------------------------------------


def _run(args: argparse.Namespace, coro: Callable[[Client], Any]) -> int:
    try:
        client = Client(args)
        return int(asyncio.run(coro(client)))
    except ApiError as exc:
        print(f"campus-gateway {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # an unreadable token file
        print(f"campus-gateway {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:  # --config names a missing or invalid file
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE


def _print(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else render(data))


def _read(path: str, render: Callable[[Any], str]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        async def go(client: Client) -> int:
            _print(args, await client.call("GET", path), render)
            return EXIT_OK

        return _run(args, go)

    return command


def _events(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        if not args.follow:
            _print(args, await client.call("GET", f"/events?limit={args.limit}"), show_events)
            return EXIT_OK
        return await _follow(client, args)

    return _run(args, go)


async def _follow(client: Client, args: argparse.Namespace) -> int:
    shown = 0
    try:
        async with client.session(timeout=None) as s, s.get(client.url + "/events/stream") as r:
            if r.status >= 400:
                raise ApiError(f"/events/stream: {r.status}")
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                print(json.dumps(event, ensure_ascii=False) if args.json else show_event(event), flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    return EXIT_OK
    except (aiohttp.ClientError, OSError) as exc:
        raise ApiError(f"event stream: {exc}") from exc
    return EXIT_OK


def _test_alarm(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        data = await client.call("POST", "/test-alarm", {"device": args.device})
        _print(args, data, lambda d: f"test alarm sent from {d['device']} (alarm.test, Contact ID 1601)")
        return EXIT_OK

    return _run(args, go)


def _reset(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        body = {"zone": args.zone} if args.zone is not None else {}
        data = await client.call("POST", f"/devices/{args.device}/reset", body)
        _print(args, data, lambda d: f"{args.device}: {d['status']} {d.get('detail', '')}")
        return EXIT_OK

    return _run(args, go)


def add_ctl_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the daemon is")
    where.add_argument("--socket", default=None, help=f"the API socket (default {DEFAULT_SOCKET})")
    where.add_argument("--config", "-c", default=None, help="take the socket from this gateway config")
    where.add_argument("--url", default=None, help="http://127.0.0.1:PORT instead of the socket")
    where.add_argument("--token-file", default=None, help="bearer token for writes over --url")
    common.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    reads: dict[str, tuple[str, Callable[[Any], str], str]] = {
        "status": ("/health", show_status, "health at a glance: devices, uplinks, outbox"),
        "devices": ("/devices", show_devices, "every device, its state and last answer"),
        "uplinks": ("/uplinks", show_uplinks, "every uplink, its connection and backlog"),
        "outbox": ("/outbox", show_outbox, "events waiting per uplink"),
    }
    for name, (path, render, help_text) in reads.items():
        p = sub.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(func=_read(path, render), command=name)
    ev = sub.add_parser("events", parents=[common], help="recent events, or --follow the live stream")
    ev.add_argument("--follow", "-f", action="store_true", help="stream events as they are committed")
    ev.add_argument("--limit", type=int, default=50, help="recent events to show (1..1000)")
    ev.add_argument("--count", type=int, default=0, help="with --follow: stop after N events")
    ev.set_defaults(func=_events, command="events")
    ta = sub.add_parser("test-alarm", parents=[common], help="send a test alarm (alarm.test) from a device")
    ta.add_argument("device")
    ta.set_defaults(func=_test_alarm, command="test-alarm")
    rs = sub.add_parser("reset", parents=[common], help="reset an alarm box's latched panic zones")
    rs.add_argument("device")
    rs.add_argument("--zone", type=int, default=None)
    rs.set_defaults(func=_reset, command="reset")

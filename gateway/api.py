"""The local API for technicians and the CLI: aiohttp on a Unix socket (and optionally loopback TCP).

Reads: ``/health``, ``/devices``, ``/uplinks``, ``/outbox``, ``/events`` (recent),
``/events/stream`` (live, server-sent events), ``/config`` (secrets are files: only their
paths appear), ``/metrics`` (Prometheus text). Writes: ``POST /test-alarm``
``{"device": ID}``, ``POST /devices/{id}/reset`` ``{"zone": N}``. On the Unix socket
(mode 0660) the file permissions are the access control; on TCP every write needs
``Authorization: Bearer <token>`` (the token file's content).

Bad requests get a 4xx JSON error and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway.driver import Driver, Verdict
from gateway.events import ContactId, Observation, Severity

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

# 0660: the daemon's user and group (technicians in the group) may connect; nobody else.
SOCKET_MODE = 0o660
# A live stream's queue: a slow reader loses events beyond this (counted), never slows the gateway.
STREAM_QUEUE = 1000
# SSE keep-alive comment every 15 s: proxies and idle-timeouts keep the stream open.
STREAM_KEEPALIVE = 15.0
MAX_BODY = 16 * 1024  # writes carry a few fields
SHUTDOWN_TIMEOUT = 1.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        return _error(400, f"bad request: {exc}")


class Api:
    """The API of one running gateway. ``async with Api(gw):`` serves until exit."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.cfg.api
        self.token = self.cfg.read_token()
        self._runner: web.AppRunner | None = None
        self.stream_dropped = 0

    async def __aenter__(self) -> Api:
        if self.cfg.socket is None and self.cfg.tcp is None:
            return self
        # 1 s for open requests at shutdown: a technician's endless event stream must not hold
        # up the stop (aiohttp's default waits 60 s, beyond systemd's stop timeout).
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            if self.cfg.socket is not None:
                await self._unix(runner, self.cfg.socket)
            if (address := self.cfg.tcp_address) is not None:
                await web.TCPSite(runner, address[0], address[1], reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("local api listening", socket=str(self.cfg.socket), tcp=self.cfg.tcp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _unix(self, runner: web.AppRunner, path: Path) -> None:
        await asyncio.to_thread(_prepare_socket_path, path)
        await web.UnixSite(runner, str(path)).start()
        await asyncio.to_thread(os.chmod, path, SOCKET_MODE)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
        app.router.add_get("/health", self.health)
        app.router.add_get("/devices", self.devices)
        app.router.add_get("/uplinks", self.uplinks)
        app.router.add_get("/outbox", self.outbox)
        app.router.add_get("/events", self.events)
        app.router.add_get("/events/stream", self.stream)
        app.router.add_get("/config", self.config)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/test-alarm", self.test_alarm)
        app.router.add_post("/devices/{id}/reset", self.reset)
        return app

    # -- reads ----------------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response(self.gw.health())

    async def devices(self, _request: web.Request) -> web.Response:
        return web.json_response([device_view(d) for d in self.gw.drivers])

    async def uplinks(self, _request: web.Request) -> web.Response:
        outbox = self.gw.pipeline.outbox if self.gw.pipeline else None
        rows = [
            {
                **u.snapshot(),
                "depth": outbox.depth(u.name) if outbox else None,
                "oldest_age": outbox.oldest_age(u.name) if outbox else None,
            }
            for u in self.gw.uplinks
        ]
        return web.json_response(rows)

    async def outbox(self, _request: web.Request) -> web.Response:
        pipeline = self.gw.pipeline
        if pipeline is None:
            raise web.HTTPServiceUnavailable(reason="starting")
        box = pipeline.outbox
        lanes = {
            u.name: {"depth": box.depth(u.name), "oldest_age": box.oldest_age(u.name)}
            for u in self.gw.uplinks
        }
        stats = dataclasses.asdict(box.stats)
        return web.json_response({"last_seq": box.last_seq, "uplinks": lanes, "stats": _jsonable(stats)})

    async def events(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "50"))
        if not 1 <= limit <= 1000:
            raise ValueError("limit is 1..1000")
        pipeline = self.gw.pipeline
        recent = list(pipeline.recent)[-limit:] if pipeline else []
        return web.json_response([json.loads(e.payload) for e in recent])

    async def stream(self, request: web.Request) -> web.StreamResponse:
        pipeline = self.gw.pipeline
        if pipeline is None:
            raise web.HTTPServiceUnavailable(reason="starting")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        async with pipeline.listen(STREAM_QUEUE) as queue:
            while True:
                try:
                    async with asyncio.timeout(STREAM_KEEPALIVE):
                        event = await queue.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                await response.write(b"event: event\ndata: " + event.payload + b"\n\n")

    async def config(self, _request: web.Request) -> web.Response:
        return web.json_response(json.loads(self.gw.cfg.model_dump_json()))

    async def metrics(self, _request: web.Request) -> web.Response:
        from gateway.metrics import render

        body, content_type = render(self.gw)
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- writes ---------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        if request.transport is not None and _is_unix(request):
            return  # the socket's permissions decided already (fail closed without a transport)
        expected = self.token or ""
        given = request.headers.get("Authorization", "")
        if not expected or not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            raise web.HTTPUnauthorized(reason="a bearer token is needed for writes over TCP")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        body = await request.json()
        if not isinstance(body, dict):
            raise TypeError("the body must be a JSON object")
        return body

    async def test_alarm(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await self._body(request)
        driver = self._driver(str(body.get("device", "")))
        pipeline = self.gw.pipeline
        if pipeline is None:
            raise web.HTTPServiceUnavailable(reason="starting")
        data = {"contact_id": int(ContactId.MANUAL_TEST), "test": True, "requested_by": "local api"}
        obs = Observation(driver.device, "alarm.test", Severity.MINOR, data=data)
        await pipeline.publish(obs)
        log.info("test alarm sent", device=driver.device.id)
        return web.json_response({"sent": True, "device": driver.device.id}, status=201)

    async def reset(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await self._body(request)
        driver = self._driver(request.match_info["id"])
        args = {"zone": body["zone"]} if "zone" in body else {}
        outcome = await driver.command("alarm.reset", args)
        status = 200 if outcome.verdict is Verdict.DONE else 409
        return web.json_response(
            {
                "status": outcome.verdict.value,
                "reason": outcome.reason,
                "detail": outcome.detail,
                **outcome.data,
            },
            status=status,
        )

    def _driver(self, device_id: str) -> Driver:
        for d in self.gw.drivers:
            if d.device.id == device_id:
                return d
        raise web.HTTPNotFound(reason=f"no device {device_id!r}")


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a previous run


def _is_unix(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return not (isinstance(peer, tuple) and len(peer) >= 2)


def device_view(d: Driver) -> dict[str, Any]:
    s = d.status
    return {
        **d.device.as_dict(),
        "state": s.state.value,
        "since": s.since,
        "last_poll_ok": s.last_poll_ok,
        "polls": s.polls,
        "poll_errors": s.poll_errors,
        "last_error": s.last_error,
        "detail": _jsonable(s.detail),
        **{k: v for k, v in d.describe().items() if k not in ("state",)},
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))

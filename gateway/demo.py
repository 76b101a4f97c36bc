"""``campus-gateway demo``: the whole system on one machine, nothing to set up.

An embedded MQTT broker (amqtt) on a free loopback port (or ``--broker URL``), a
simulated school (alarm boxes, and two anti-ram bollards at the main gate), the
gateway with two uplinks (police and education) and a live view of what each
platform receives: the police alarm center is the reference console (``campus-gateway
console``) acknowledging every panic alarm by itself. A scripted scenario presses buttons,
shows the round trip (button, alarm at the police, signed acknowledgement, the box's ack
output lit), has the police center lock the gate down with signed commands, resets latches,
shows the bollard interlock refusing a raise over a waiting car, opens a box's lid
and silences a box, so something happens without input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway import config as config_mod
from gateway import logs
from gateway.app import Gateway
from gateway.commands import KNOWN_COMMANDS
from gateway.commands.signing import build_command
from gateway.console import Console, ConsoleOptions, HumanView
from gateway.console.options import BrokerUrl
from gateway.mqtt import MqttConnection

REGION = "530102"
GATE_UNITS = (1, 2)
CAMERA_PASSWORD = "demo-camera"  # noqa: S105 - the simulated camera's, on loopback only
SCHOOL = "demo-school"
GATEWAY = "gw-demo"
PRESENCE = "campus-platform/police/state"


def add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="the whole system on this machine, simulated", description=__doc__
    )
    parser.add_argument(
        "--duration", type=float, default=0, help="stop after N seconds (default: until Ctrl-C)"
    )
    parser.add_argument(
        "--broker", default="", help="use this broker (mqtt://host:port) instead of an embedded one"
    )
    parser.add_argument("--boxes", type=int, default=4, help="simulated alarm boxes (default 4)")
    parser.add_argument(
        "--state-dir", default="", help="keep the outbox here (default: a temporary directory)"
    )
    parser.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(args.duration, args.broker, args.boxes, args.state_dir))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def embedded_broker() -> AsyncIterator[tuple[str, int]]:
    """amqtt on a free loopback port: starts in ~15 ms, enough for a demo (not for broker tests)."""
    from amqtt.broker import Broker

    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    try:
        yield "127.0.0.1", port
    finally:
        await broker.shutdown()


def school_config(
    host: str,
    port: int,
    *,
    boxes: list[tuple[str, int, str]],
    gate_port: int,
    state_dir: Path,
    camera_port: int | None,
) -> dict[str, Any]:
    cameras = []
    if camera_port is not None:
        (state_dir / "camera.pw").write_text(CAMERA_PASSWORD)
        cameras.append(
            {
                "id": "cam-gate",
                "driver": "onvif_camera",
                "name": "Main gate camera",
                "location": "Main gate",
                "host": "127.0.0.1",
                "port": camera_port,
                "password_file": str(state_dir / "camera.pw"),
                "pull_timeout": 2.0,
                "evidence_for": ["box-1"],  # the main gate's alarm box
            }
        )
    bollards = [
        {
            "id": f"bollard-{u}",
            "driver": "modbus_bollard",
            "name": f"Main gate bollard {u}",
            "location": "Main gate",
            "host": "127.0.0.1",
            "port": gate_port,
            "unit": u,
            "gate": "main",
            "poll_interval": 0.2,
        }
        for u in GATE_UNITS
    ]
    return {
        "identity": {"school": SCHOOL, "gateway": GATEWAY, "region": REGION},
        "state_dir": str(state_dir),
        "heartbeat_interval": 10,
        "api": {"socket": None},
        "uplinks": [
            {
                "name": "police",
                "endpoints": [f"mqtt://{host}:{port}"],
                "topic_prefix": "campus/{region}",
                "commands": {"key_file": str(state_dir / "police.key"), "allow": sorted(KNOWN_COMMANDS)},
                # The police console's presence gates delivery; panics wait for its alarm.ack.
                "platform": {
                    "presence_topic": PRESENCE,
                    "ack_types": ["alarm.panic"],
                    "renotify_interval": 10,
                },
            },
            {
                "name": "education",
                "endpoints": [f"mqtt://{host}:{port}"],
                "topic_prefix": "edu/{region}",
                "route": {
                    "types": ["alarm.*", "device.*", "patrol.*", "camera.*"],
                    "exclude": ["camera.motion"],
                },
            },
        ],
        "devices": [
            {
                "id": box_id,
                "driver": "modbus_alarm",
                "name": name,
                "location": name,
                "host": "127.0.0.1",
                "port": box_port,
                "profile": "generic-8di",
                "poll_interval": 0.1,
                "zones": {1: {"type": "intrusion", "name": "Perimeter beam"}},
            }
            for box_id, box_port, name in boxes
        ]
        + bollards
        + cameras,
    }


PLACES = ["Main gate guard room", "Kindergarten block", "Dormitory A", "Playground"]


def _line(platform: str, topic: str, payload: bytes) -> str:
    stamp = time.strftime("%H:%M:%S")
    head = f"{stamp}  {platform:<9}"
    if "/snapshots/" in topic:
        return f"{head} {'snapshot (JPEG)':<22} {len(payload)} bytes on .../{topic.split('/', 4)[-1]}"
    if "/cmd-result/" in topic:
        body = json.loads(payload)
        why = f" ({body['reason']}: {body['detail']})" if body.get("reason") else ""
        return f"{head} {'reply ' + str(body['name']):<22} {body['status']}{why}"
    if "/cmd/" in topic:
        body = json.loads(payload)
        return f"{head} {'command ' + body['name']:<22} -> {body['target']} (signed)"
    if "/events/" not in topic:
        kind = topic.rsplit("/", 1)[-1]
        return f"{head} {kind:<22} {payload[:60].decode(errors='replace')}"
    body = json.loads(payload)
    data = body.get("data", {})
    what = _what(body["type"], data)
    return (
        f"{head} {body['type']:<22} {body.get('state', ''):<8} {body['severity']:<8} "
        f"{body['device']['id']}{what}  seq {body['seq']}"
    )


def _what(event_type: str, data: dict[str, Any]) -> str:
    if event_type == "bollard.state":
        return f" {data['state']}"
    if event_type in ("bollard.fault", "bollard.interlock"):
        return f" {data.get('text') or data.get('how') or ''}"
    if event_type == "camera.snapshot":
        return f" for {data['for_type']} at {data['for_device']}"
    if event_type == "command.result":
        return f" {data['name']} -> {data['target']}: {data['status']}"
    zone = f" zone {data['zone']} {data.get('zone_name', '')}" if "zone" in data else ""
    cid = f" CID {data['contact_id']}" if "contact_id" in data else ""
    return zone + cid


async def platform_view(host: str, port: int, platform: str, topic: str, out: Callable[[str], None]) -> None:
    def on_message(t: str, payload: bytes, retain: bool) -> None:
        if not t.endswith("/heartbeat"):
            out(_line(platform, t, payload))

    conn = MqttConnection(
        name=f"demo-{platform}",
        host=host,
        port=port,
        client_id=f"demo-platform-{platform}",
        keepalive=10,
        connect_timeout=5,
        max_inflight=10,
        on_message=on_message,
    )
    async with conn:
        await conn.subscribe(topic, qos=1)
        await conn.wait_closed()


async def scenario(
    sims: list[Any], gate: Any, camera: Any, police: Callable[[str, str], Any], out: Callable[[str], None]
) -> None:
    """A loop of things that happen at a school, a few seconds apart."""
    steps: list[tuple[float, str, Callable[[], Any]]] = [
        (2.0, "Panic button pressed at the main gate", lambda: sims[0].press(0)),
        (1.5, "", lambda: _ack_led(sims[0], out)),
        (
            1.0,
            "Police center locks the gate down (emergency raise, signed)",
            lambda: police("bollard.emergency_raise", "gate:main"),
        ),
        (2.0, "Button released (the panic alarm stays latched)", lambda: sims[0].release(0)),
        (3.0, "Guard resets the box with the key switch", lambda: sims[0].press(7)),
        (0.5, "", lambda: sims[0].release(7)),
        (1.0, "Police center lowers the bollards", lambda: police("bollard.lower", "gate:main")),
        (4.0, "A car waits on the loop of bollard 1", lambda: gate.set_loop(True, unit=1)),
        (1.0, "Police center tries to raise bollard 1", lambda: police("bollard.raise", "bollard-1")),
        (2.0, "The car drives off", lambda: gate.set_loop(False, unit=1)),
        (3.0, "Someone opens the lid of a box (tamper)", lambda: sims[1 % len(sims)].tamper(True)),
        (3.0, "Lid closed", lambda: sims[1 % len(sims)].tamper(False)),
        (3.0, "Someone walks past the gate camera", lambda: _motion(camera, True)),
        (2.0, "", lambda: _motion(camera, False)),
        (3.0, "Intrusion zone at the playground", lambda: sims[-1].press(1)),
        (2.0, "Intrusion clears", lambda: sims[-1].release(1)),
        (3.0, "A box loses power (goes silent)", sims[2 % len(sims)].silent),
        (5.0, "Power back", sims[2 % len(sims)].normal),
    ]
    while True:
        for delay, text, action in steps:
            await asyncio.sleep(delay)
            if text:
                out(f"{time.strftime('%H:%M:%S')}  >>> {text}")
            result = action()
            if asyncio.iscoroutine(result):
                await result


async def _camera(stack: AsyncExitStack) -> Any:
    """The simulated camera, or None where OpenCV (which draws its pictures) is missing."""
    try:
        from simulators.onvif_camera import OnvifCameraSimulator
    except ImportError:
        return None
    return await stack.enter_async_context(OnvifCameraSimulator(user="admin", password=CAMERA_PASSWORD))


async def _police_center(
    stack: AsyncExitStack, host: str, port: int, key: bytes
) -> Callable[[str, str], Any]:
    """The police platform's command sender: signs with the demo key, publishes to cmd/{name}."""
    commander = await stack.enter_async_context(
        MqttConnection(
            name="demo-police-commands",
            host=host,
            port=port,
            client_id="demo-police-commands",
            keepalive=10,
            connect_timeout=5,
            max_inflight=10,
        )
    )
    base = f"campus/{REGION}/{SCHOOL}/{GATEWAY}"

    async def police(name: str, target: str) -> None:
        payload = json.dumps(build_command(key, name, target)).encode()
        await commander.publish(f"{base}/cmd/{name}", payload)

    return police


def _banner(out: Callable[[str], None], where: str, boxes: int, camera: bool, log_path: Path) -> None:
    cam = (
        ", 1 ONVIF camera at the main gate" if camera else " (no camera: it needs OpenCV, the 'video' extra)"
    )
    out(
        f"campus-gateway demo: broker {where}, {boxes} alarm boxes, "
        f"{len(GATE_UNITS)} bollards at the main gate{cam}"
    )
    out("  police    the reference console on campus/530102/# (everything), acknowledging panics")
    out("  education subscribes edu/530102/#      (alarms, device, camera and patrol events)")
    out(f"  gateway log: {log_path}")
    out("")


async def _ack_led(box: Any, out: Callable[[str], None]) -> None:
    lit = await box.coil(0)
    state = "lit: the police has seen the alarm" if lit else "still off (no acknowledgement yet)"
    out(f"{time.strftime('%H:%M:%S')}  >>> box-1's ack LED is {state}")


async def police_console(host: str, port: int, key: bytes, out: Callable[[str], None]) -> None:
    """The police alarm center: the reference console, acknowledging every panic by itself."""
    view = HumanView(io.StringIO())

    def show(record: dict[str, Any]) -> None:
        if record.get("kind") in ("heartbeat", "presence"):
            return
        line = view.render(record)
        if line is not None:  # the view's own clock (with milliseconds) leads the line: ours instead
            out(f"{time.strftime('%H:%M:%S')}  {'police':<9} {line.split(' ', 1)[-1]}")

    options = ConsoleOptions(
        broker=BrokerUrl(host, port, tls=False),
        topics=(f"campus/{REGION}/#",),
        platform="police",
        presence_topic=PRESENCE,
        client_id="demo-police-console",
        key=key,
        auto_ack=True,
    )
    await Console(options, show).run()


async def _motion(camera: Any, on: bool) -> None:
    if camera is not None:
        await camera.emit("tns1:VideoSource/MotionAlarm", data={"State": on})


async def run_demo(duration: float, broker: str, boxes: int, state_dir: str) -> None:
    from simulators.alarm_box import AlarmBoxSimulator
    from simulators.bollard import BollardSimulator

    out = print
    async with AsyncExitStack() as stack:
        tmp = state_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="campus-demo-"))
        log_path = Path(tmp) / "gateway.log"
        # The terminal shows what the platforms receive; the gateway's own log goes to a file.
        logs.configure("info", "json", stack.enter_context(log_path.open("a", encoding="utf-8")))
        if broker:
            parts = urlsplit(broker)
            host, port = parts.hostname or "127.0.0.1", parts.port or 1883
        else:
            host, port = await stack.enter_async_context(embedded_broker())
        sims = []
        specs = []
        for i in range(max(1, boxes)):
            sim = await stack.enter_async_context(AlarmBoxSimulator(port=0, inputs=8))
            sims.append(sim)
            specs.append((f"box-{i + 1}", sim.port, PLACES[i % len(PLACES)]))
        gate = await stack.enter_async_context(BollardSimulator(units=GATE_UNITS))
        camera = await _camera(stack)
        key = secrets.token_hex(32).encode()
        (Path(tmp) / "police.key").write_bytes(key)
        camera_port = camera.port if camera is not None else None
        cfg = config_mod.parse(
            school_config(
                host, port, boxes=specs, gate_port=gate.port, state_dir=Path(tmp), camera_port=camera_port
            ),
            "demo",
        )
        police = await _police_center(stack, host, port, key)
        _banner(out, f"mqtt://{host}:{port}", len(sims), camera is not None, log_path)
        gw = Gateway(cfg)
        async with asyncio.TaskGroup() as tg:
            views = [
                tg.create_task(police_console(host, port, key, out), name="view:police"),
                tg.create_task(
                    platform_view(host, port, "education", f"edu/{REGION}/#", out), name="view:edu"
                ),
            ]
            gw_task = tg.create_task(gw.run(), name="gateway")
            await gw.ready.wait()
            script = tg.create_task(scenario(sims, gate, camera, police, out), name="scenario")
            try:
                if duration > 0:
                    await asyncio.sleep(duration)
                else:
                    await asyncio.Event().wait()
            finally:
                script.cancel()
                gw.stop()
                await asyncio.wait([gw_task], timeout=6)
                for v in views:
                    v.cancel()
        out("demo stopped")

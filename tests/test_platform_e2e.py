"""End to end: platform presence, re-notification until alarm.ack, delivery supervision.

The real daemon in a subprocess, a private mosquitto without persistence, the alarm-box
simulator, and a platform played with paho (presence retained with a will, as the
reference console does; tests/test_console_e2e.py runs the console itself).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import paho.mqtt.client as mqtt
import paho.mqtt.publish as mqtt_publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.commands.signing import build_command
from gateway.events import schema
from simulators.alarm_box import AlarmBoxSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config
from tests.support.subscriber import Received, Subscriber, await_for, stop_paho
from tests.support.waiting import press_held

VALIDATOR = jsonschema.Draft202012Validator(schema())
BASE = "campus/530102/sch-1/gw-1"
PRESENCE = "campus-platform/police/state"
KEY = b"police-key-0123456789abcdef0123456789"
WAIT = 15.0


class Platform:
    """The platform's presence: retained {"online": ...} with a will, from its own client."""

    def __init__(self, port: int, topic: str = PRESENCE) -> None:
        self.port = port
        self.topic = topic
        self.client: mqtt.Client | None = None

    def online(self) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"platform-{uuid.uuid4().hex[:8]}")
        client.will_set(self.topic, self._payload(False), qos=1, retain=True)
        client.connect("127.0.0.1", self.port, keepalive=5)
        client.loop_start()
        client.publish(self.topic, self._payload(True), qos=1, retain=True).wait_for_publish(5)
        self.client = client

    def offline(self) -> None:
        client, self.client = self.client, None
        assert client is not None
        client.publish(self.topic, self._payload(False), qos=1, retain=True).wait_for_publish(5)
        stop_paho(client)

    @staticmethod
    def _payload(online: bool) -> bytes:
        return json.dumps({"online": online, "timestamp": int(time.time() * 1000)}).encode()


@dataclass
class Site:
    tmp: Path
    broker: Mosquitto
    box: AlarmBoxSimulator

    def config(self, platform: dict[str, Any], *, commands: bool = True) -> dict[str, Any]:
        (self.tmp / "police.key").write_bytes(KEY)
        uplink: dict[str, Any] = {
            "name": "police",
            "endpoints": [self.broker.url],
            "keepalive": 2,
            "reconnect_initial": 0.2,
            "reconnect_max": 1.0,
            "connect_timeout": 2.0,
            "platform": platform,
        }
        if commands:
            uplink["commands"] = {"key_file": str(self.tmp / "police.key"), "allow": ["alarm.ack"]}
        box = {
            "id": "box-gate",
            "driver": "modbus_alarm",
            "host": "127.0.0.1",
            "port": self.box.port,
            "profile": "generic-8di",
            "poll_interval": 0.05,
        }
        cfg = base_config(self.tmp / "state", [uplink], [box])
        cfg["heartbeat_interval"] = 1
        cfg["api"] = {"socket": str(self.socket)}
        return cfg

    @property
    def socket(self) -> Path:
        return self.tmp / "run" / "api.sock"

    async def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway.cli", *args, "--socket", str(self.socket)]
        return await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=30, check=False
        )

    async def metrics(self) -> str:
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://gateway/metrics") as response,
        ):
            return await response.text()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", persistence=False) as b:
        yield b


@pytest.fixture
async def site(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[Site]:
    async with AlarmBoxSimulator(inputs=8) as box:
        yield Site(tmp_path, broker, box)


def heartbeat(msgs: list[Received]) -> dict[str, Any] | None:
    beats = [m for m in msgs if m.topic == f"{BASE}/heartbeat"]
    return beats[-1].json()["uplinks"]["police"] if beats else None


async def wait_heartbeat(sub: Subscriber, check: Any) -> dict[str, Any]:
    """The latest heartbeat's police entry once ``check(entry)`` holds."""

    def find(msgs: list[Received]) -> dict[str, Any] | None:
        entry = heartbeat(msgs)
        return entry if entry is not None and check(entry) else None

    result: dict[str, Any] = await await_for(sub, find, WAIT)
    return result


def events(sub: Subscriber, event_type: str = "") -> list[dict[str, Any]]:
    return list(sub.events(event_type))


def copies(sub: Subscriber, event_id: str) -> list[dict[str, Any]]:
    return [e for e in sub.events("alarm.") if e["id"] == event_id]


async def alarm(sub: Subscriber, zone_name: str, after: int = 0) -> dict[str, Any]:
    """The first copy of the active panic alarm of a zone with seq above ``after``."""

    def find(msgs: list[Received]) -> dict[str, Any] | None:
        for e in sub.events("alarm.panic"):
            if e.get("state") == "active" and e["data"].get("zone_name") == zone_name and e["seq"] > after:
                return e
        return None

    result: dict[str, Any] = await await_for(sub, find, WAIT)
    return result


async def trouble(sub: Subscriber, code: str, state: str, event_id: str | None = None) -> dict[str, Any]:
    def find(msgs: list[Received]) -> dict[str, Any] | None:
        for e in sub.events("uplink.trouble"):
            data = e["data"]
            if data["code"] == code and e["state"] == state and data.get("event_id", event_id) == event_id:
                VALIDATOR.validate(e)
                return e
        return None

    try:
        result: dict[str, Any] = await await_for(sub, find, WAIT)
    except TimeoutError as exc:
        seen = [(e["seq"], e["type"], e.get("state"), e["data"]) for e in sub.events("uplink.")]
        raise AssertionError(f"no uplink.trouble {code} {state} for {event_id}; got {seen}") from exc
    return result


def send_ack(broker: Mosquitto, event_id: str, target: str = "box-gate") -> str:
    cmd = build_command(KEY, "alarm.ack", target, {"event_id": event_id})
    body = json.dumps(cmd).encode()
    mqtt_publish.single(f"{BASE}/cmd/alarm.ack", body, qos=1, hostname="127.0.0.1", port=broker.port)
    return str(cmd["id"])


async def final_reply(sub: Subscriber, command_id: str) -> dict[str, Any]:
    def find(msgs: list[Received]) -> dict[str, Any] | None:
        got = [m.json() for m in msgs if m.topic == f"{BASE}/cmd-result/{command_id}"]
        return got[-1] if got and got[-1]["status"] != "accepted" else None

    result: dict[str, Any] = await await_for(sub, find, WAIT)
    return result


# -- presence ---------------------------------------------------------------------------------


async def test_events_wait_in_the_outbox_while_the_platform_is_away(site: Site) -> None:
    cfg = site.config({"presence_topic": PRESENCE, "ack_types": []}, commands=False)
    platform = Platform(site.broker.port)
    with Subscriber(site.broker.port, f"{BASE}/#") as sub, Daemon(site.tmp / "d", cfg):
        # Connected, but nobody has said the platform is there: nothing is published.
        entry = await wait_heartbeat(sub, lambda u: u["state"] == "connected" and u["depth"] >= 1)
        assert entry["platform"] == "unknown"
        await press_held(site.box, 0)
        # started, the alarm, and the trouble of an alarm held over 2 s (all held)
        await wait_heartbeat(sub, lambda u: u["depth"] >= 3)
        assert events(sub) == []

        await asyncio.to_thread(platform.online)  # the backlog drains, in order
        first = await alarm(sub, "Panic button 1")
        got = events(sub)
        assert got[0]["type"] == "gateway.started"
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
        assert len({e["seq"] for e in got}) == len(got)
        held = await trouble(sub, "broker_deadline", "active")  # the alarm waited more than 2 s
        assert "platform unknown" in held["data"]["reason"]
        await trouble(sub, "broker_deadline", "cleared")
        await wait_heartbeat(sub, lambda u: u["platform"] == "online" and u["depth"] == 0)

        await asyncio.to_thread(platform.offline)  # away again: held again
        await wait_heartbeat(sub, lambda u: u["platform"] == "offline")
        await press_held(site.box, 1)
        await wait_heartbeat(sub, lambda u: u["depth"] >= 1)
        assert [e for e in events(sub, "alarm.panic") if e["data"]["zone_name"] == "Panic button 2"] == []
        # The technician sees why: the API, the CLI and the metrics show the presence.
        shown = await site.ctl("uplinks", "--json")
        assert shown.returncode == 0, shown.stderr
        police = json.loads(shown.stdout)[0]
        assert police["platform"]["presence"] == "offline"
        assert police["platform"]["topic"] == PRESENCE
        assert police["depth"] >= 1
        assert "offline since" in (await site.ctl("uplinks")).stdout
        text = await site.metrics()
        assert 'campus_gateway_platform_presence{presence="offline",uplink="police"} 1.0' in text
        assert 'campus_gateway_platform_presence{presence="online",uplink="police"} 0.0' in text

        await asyncio.to_thread(platform.online)
        second = await alarm(sub, "Panic button 2")
        assert second["seq"] > first["seq"]
        await asyncio.to_thread(platform.offline)


# -- re-notification and acknowledgement --------------------------------------------------------


async def test_unacked_alarm_is_renotified_until_acked_also_across_restarts(site: Site) -> None:
    cfg = site.config({"renotify_interval": 1.0, "renotify_limit": 100, "ack_deadline": 1.5})
    daemon = Daemon(site.tmp / "d", cfg)
    with Subscriber(site.broker.port, f"{BASE}/#") as sub, daemon:
        await press_held(site.box, 0)
        first = await alarm(sub, "Panic button 1")
        assert "repeat" not in first
        await await_for(sub, lambda _m: len(copies(sub, first["id"])) >= 3, WAIT)
        again = copies(sub, first["id"])
        for body in again:
            VALIDATOR.validate(body)
        assert [b.get("repeat") for b in again[:3]] == [None, 1, 2]
        assert {b["seq"] for b in again} == {first["seq"]}
        assert {json.dumps({**b, "repeat": 0}, sort_keys=True) for b in again[1:]} == {
            json.dumps({**first, "repeat": 0}, sort_keys=True)
        }
        await trouble(sub, "ack_deadline", "active", first["id"])  # not acked within 1.5 s
        status = json.loads((await site.ctl("status", "--json")).stdout)
        assert status["uplinks"]["police"]["awaiting_ack"] == 1
        text = await site.metrics()
        assert 'campus_gateway_alarms_awaiting_ack{uplink="police"} 1.0' in text
        assert 'campus_gateway_alarm_renotifications_total{uplink="police"}' in text

        # The platform acknowledges: recorded, the box's ack LED lit, repeats stop.
        reply = await final_reply(sub, await asyncio.to_thread(send_ack, site.broker, first["id"]))
        assert reply["status"] == "done", reply
        assert reply["results"]["gateway"]["ack"] == "acknowledged"
        assert await site.box.coil(0) is True
        await trouble(sub, "ack_deadline", "cleared", first["id"])
        settled = len(copies(sub, first["id"]))
        await asyncio.sleep(2.5)  # 2.5 intervals: a repeat would have come
        assert len(copies(sub, first["id"])) == settled

        # A second alarm, not acked; the daemon is killed and comes back.
        await press_held(site.box, 1)
        second = await alarm(sub, "Panic button 2")
        await await_for(sub, lambda _m: len(copies(sub, second["id"])) >= 2, WAIT)
        before = max(b.get("repeat") or 0 for b in copies(sub, second["id"]))
        await asyncio.to_thread(daemon.kill9)
        sub.messages.clear()
        await asyncio.to_thread(daemon.start)

        def repeated_after_restart(_m: list[Received]) -> bool:
            return any((b.get("repeat") or 0) > before for b in copies(sub, second["id"]))

        await await_for(sub, repeated_after_restart, WAIT)  # the count goes on from the ledger
        await asyncio.sleep(2.5)
        assert copies(sub, first["id"]) == []  # the acknowledged one stays quiet after the restart
        troubles = [e for e in events(sub, "uplink.trouble") if e["data"].get("event_id") == first["id"]]
        assert troubles == []

        reply = await final_reply(sub, await asyncio.to_thread(send_ack, site.broker, second["id"]))
        assert reply["results"]["gateway"]["ack"] == "acknowledged"
        again_reply = await final_reply(sub, await asyncio.to_thread(send_ack, site.broker, second["id"]))
        assert again_reply["results"]["gateway"]["ack"] == "already"


async def test_renotify_limit_raises_trouble_and_stops(site: Site) -> None:
    cfg = site.config({"renotify_interval": 0.5, "renotify_limit": 2, "ack_deadline": 60})
    with Subscriber(site.broker.port, f"{BASE}/#") as sub, Daemon(site.tmp / "d", cfg):
        await press_held(site.box, 0)
        first = await alarm(sub, "Panic button 1")
        gave_up = await trouble(sub, "ack_limit", "active", first["id"])
        assert gave_up["data"]["repeats"] == 2
        assert [b.get("repeat") for b in copies(sub, first["id"])] == [None, 1, 2]
        await asyncio.sleep(1.5)  # three intervals: nothing more
        assert len(copies(sub, first["id"])) == 3
        # Acknowledged late: recorded, and the trouble clears.
        reply = await final_reply(sub, await asyncio.to_thread(send_ack, site.broker, first["id"], "gateway"))
        assert reply["results"]["gateway"]["ack"] == "late"
        await trouble(sub, "ack_limit", "cleared", first["id"])


async def test_bad_acks_are_refused_and_change_nothing(site: Site) -> None:
    cfg = site.config({"renotify_interval": 0.5, "renotify_limit": 100, "ack_deadline": 60})
    with Subscriber(site.broker.port, f"{BASE}/#") as sub, Daemon(site.tmp / "d", cfg):
        await press_held(site.box, 0)
        first = await alarm(sub, "Panic button 1")
        for bad in ("not-an-id", 42, ""):
            cmd = build_command(KEY, "alarm.ack", "gateway", {"event_id": bad})
            body = json.dumps(cmd).encode()
            await asyncio.to_thread(
                mqtt_publish.single,
                f"{BASE}/cmd/alarm.ack",
                body,
                qos=1,
                hostname="127.0.0.1",
                port=site.broker.port,
            )
            reply = await final_reply(sub, str(cmd["id"]))
            assert (reply["status"], reply["reason"]) == ("refused", "bad_args"), reply
        unknown = await final_reply(
            sub,
            await asyncio.to_thread(send_ack, site.broker, "0190b7c2-0000-7000-8000-000000000000", "gateway"),
        )
        assert unknown["results"]["gateway"]["ack"] == "unknown"
        count = len(copies(sub, first["id"]))
        await await_for(sub, lambda _m: len(copies(sub, first["id"])) > count, WAIT)  # still re-notified

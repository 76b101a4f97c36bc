"""End to end: signed platform commands -> real daemon -> bollard and alarm simulators -> replies.

A lockdown from the police uplink raises every bollard of the gate; every refusal is
replied to and audited and moves nothing; a replayed id is refused, also after a restart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.publish as mqtt_publish
import pytest
import yaml

from gateway.commands.signing import build_command
from gateway.events import schema
from simulators.alarm_box import AlarmBoxSimulator
from simulators.bollard import BollardSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config
from tests.support.subscriber import Received, Subscriber, await_for

ROOT = Path(__file__).resolve().parents[1]
VALIDATOR = jsonschema.Draft202012Validator(schema())
BASE = "campus/530102/sch-1/gw-1"
EDU_BASE = "edu/530102/sch-1/gw-1"
POLICE_KEY = b"police-key-0123456789abcdef0123456789"
EDU_KEY = b"education-key-0123456789abcdef01234567"
UNITS = (1, 2, 3)
# Fast bollards, so a lockdown takes well under a second; the test profile says the same.
SPEEDS = {"raise_seconds": 0.8, "lower_seconds": 0.6, "emergency_seconds": 0.4}
WAIT = 15.0


@dataclass
class School:
    tmp: Path
    police: Mosquitto
    edu: Mosquitto
    gate: BollardSimulator
    box: AlarmBoxSimulator
    config: dict[str, Any]


def fast_profile(tmp: Path) -> Path:
    profile = yaml.safe_load((ROOT / "config/profiles/generic-bollard-plc.yaml").read_text())
    profile["travel"] = {"raise": 0.8, "lower": 0.6, "emergency_raise": 0.4}
    out = tmp / "profiles"
    out.mkdir()
    (out / "fast-bollard.yaml").write_text(yaml.safe_dump(profile))
    return out


def school_config(
    tmp: Path, police: Mosquitto, edu: Mosquitto, gate_port: int, box_port: int
) -> dict[str, Any]:
    (tmp / "police.key").write_bytes(POLICE_KEY + b"\n")
    (tmp / "edu.key").write_bytes(EDU_KEY)
    common = {"keepalive": 2, "reconnect_initial": 0.2, "reconnect_max": 1.0, "connect_timeout": 2.0}
    uplinks = [
        {
            "name": "police",
            "endpoints": [police.url],
            "commands": {
                "key_file": str(tmp / "police.key"),
                "allow": [
                    "bollard.raise",
                    "bollard.lower",
                    "bollard.emergency_raise",
                    "alarm.reset",
                    "alarm.ack",
                ],
            },
            **common,
        },
        {
            "name": "education",
            "endpoints": [edu.url],
            "topic_prefix": "edu/{region}",
            "commands": {"key_file": str(tmp / "edu.key"), "allow": ["gateway.self_test"]},
            **common,
        },
    ]
    bollards = [
        {
            "id": f"bollard-{u}",
            "driver": "modbus_bollard",
            "name": f"Gate bollard {u}",
            "location": "main gate",
            "host": "127.0.0.1",
            "port": gate_port,
            "unit": u,
            "gate": "main",
            "profile": "fast-bollard",
            "poll_interval": 0.1,
        }
        for u in UNITS
    ]
    box = {
        "id": "box-gate",
        "driver": "modbus_alarm",
        "host": "127.0.0.1",
        "port": box_port,
        "profile": "generic-8di",
    }
    cfg = base_config(tmp / "state", uplinks, [*bollards, box])
    cfg["profiles_dir"] = str(fast_profile(tmp))
    return cfg


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    police = Mosquitto(tmp_path / "police").start()
    edu = Mosquitto(tmp_path / "edu").start()
    try:
        yield police, edu
    finally:
        police.stop()
        edu.stop()


@pytest.fixture
async def school(tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]) -> AsyncIterator[School]:
    police, edu = brokers
    async with BollardSimulator(units=UNITS, **SPEEDS) as gate, AlarmBoxSimulator(inputs=8) as box:
        yield School(
            tmp_path, police, edu, gate, box, school_config(tmp_path, police, edu, gate.port, box.port)
        )


def send(broker: Mosquitto, base: str, topic_name: str, payload: bytes | dict[str, Any]) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    mqtt_publish.single(f"{base}/cmd/{topic_name}", body, qos=1, hostname="127.0.0.1", port=broker.port)


def replies(messages: list[Received], command_id: str) -> list[dict[str, Any]]:
    return [m.json() for m in messages if m.topic.endswith(f"/cmd-result/{command_id}")]


async def final_reply(sub: Subscriber, command_id: str, timeout: float = WAIT) -> list[dict[str, Any]]:
    """Every reply to ``command_id`` up to and including its final one."""

    def done(msgs: list[Received]) -> list[dict[str, Any]] | None:
        got = replies(msgs, command_id)
        return got if got and got[-1]["status"] != "accepted" else None

    result: list[dict[str, Any]] = await await_for(sub, done, timeout)
    return result


async def audit(sub: Subscriber, command_id: str | None, reason: str | None = None) -> dict[str, Any]:
    """The command.result event of a command (an unreadable one: by its refusal reason)."""

    def find(msgs: list[Received]) -> dict[str, Any] | None:
        for m in msgs:
            if not m.topic.endswith("/events/command/result"):
                continue
            data = m.json()["data"]
            if data["id"] == command_id and (reason is None or data["reason"] == reason):
                body: dict[str, Any] = m.json()
                VALIDATOR.validate(body)
                return body
        return None

    result: dict[str, Any] = await await_for(sub, find, WAIT)
    return result


async def started(sub: Subscriber) -> None:
    def ready(msgs: list[Received]) -> bool:
        states = [m.json() for m in msgs if m.topic.endswith("/events/bollard/state")]
        return len({s["device"]["id"] for s in states}) == len(UNITS)

    await await_for(sub, ready, WAIT)


def online(msgs: list[Received]) -> bool:
    return any(m.topic == f"{BASE}/status" and m.json()["state"] == "online" for m in msgs)


def command(name: str, target: str, key: bytes = POLICE_KEY, **kw: Any) -> dict[str, Any]:
    return build_command(key, name, target, **kw)


async def test_lockdown_raises_every_bollard_of_the_gate(school: School) -> None:
    with (
        Subscriber(school.police.port, f"{BASE}/#") as sub,
        Daemon(school.tmp / "d", school.config),
    ):
        await started(sub)
        writes = [school.gate.command_writes(unit=u) for u in UNITS]
        cmd = command("bollard.emergency_raise", "gate:main")
        sent = time.monotonic()
        await asyncio.to_thread(send, school.police, BASE, "bollard.emergency_raise", cmd)
        got = await final_reply(sub, cmd["id"])
        took = time.monotonic() - sent
        assert [r["status"] for r in got] == ["accepted", "done"], got
        assert took < 0.4 * 1.5 + 1.0 + 2.0  # the travel bound plus generous slack
        final = got[-1]
        assert set(final["results"]) == {f"bollard-{u}" for u in UNITS}
        assert all(r["state"] == "raised" for r in final["results"].values())
        for u in UNITS:
            assert (await school.gate.state(unit=u))["state_name"] == "raised"
            assert school.gate.command_writes(unit=u) == writes[u - 1] + 1
        states = [m.json() for m in sub.messages if m.topic.endswith("/events/bollard/state")]
        for body in states:
            VALIDATOR.validate(body)
        for u in UNITS:
            seen = [s["data"]["state"] for s in states if s["device"]["id"] == f"bollard-{u}"]
            assert seen[0] == "lowered"
            assert seen[-1] == "raised"
            assert "emergency" in seen, seen
        event = await audit(sub, cmd["id"])
        assert event["data"]["status"] == "done"
        assert event["data"]["uplink"] == "police"


async def test_refusals_are_replied_audited_and_move_nothing(school: School) -> None:
    now = datetime.now(UTC)
    raise_ = "bollard.raise"
    good = command(raise_, "bollard-1")
    forged = dict(good, sig="0" * 64)
    cases: list[tuple[str, Mosquitto, str, str, bytes | dict[str, Any], str]] = [
        ("bad signature", school.police, BASE, raise_, forged, "bad_signature"),
        (
            "unknown command",
            school.police,
            BASE,
            "bollard.fly",
            command("bollard.fly", "bollard-1"),
            "unknown_command",
        ),
        (
            "lockdown from education",
            school.edu,
            EDU_BASE,
            "bollard.emergency_raise",
            command("bollard.emergency_raise", "gate:main", key=EDU_KEY),
            "not_allowed",
        ),
        (
            "expired",
            school.police,
            BASE,
            raise_,
            command(raise_, "bollard-1", ttl=5, now=now - timedelta(seconds=10)),
            "expired",
        ),
        (
            "issued 60 s ahead",
            school.police,
            BASE,
            raise_,
            command(raise_, "bollard-1", now=now + timedelta(seconds=60)),
            "not_yet_valid",
        ),
        ("oversized", school.police, BASE, raise_, b"{" + b" " * 10_000 + b"}", "too_large"),
        ("malformed", school.police, BASE, raise_, b'{"id": "x", "name": ', "malformed"),
    ]
    with (
        Subscriber(school.police.port, f"{BASE}/#") as sub,
        Subscriber(school.edu.port, f"{EDU_BASE}/#") as edu_sub,
        Daemon(school.tmp / "d", school.config) as daemon,
    ):
        await started(sub)
        writes = sum(school.gate.command_writes(unit=u) for u in UNITS)
        for what, broker, base, topic_name, payload, reason in cases:
            listener = edu_sub if broker is school.edu else sub
            await asyncio.to_thread(send, broker, base, topic_name, payload)
            command_id = payload["id"] if isinstance(payload, dict) else "_invalid"

            def refused(
                msgs: list[Received], cid: str = command_id, r: str = reason
            ) -> dict[str, Any] | None:
                got = [x for x in replies(msgs, cid) if x["reason"] == r]
                return got[-1] if got else None

            reply = await await_for(listener, refused, WAIT)
            assert reply["status"] == "refused", what
            assert reply["detail"], what
            event = await audit(sub, command_id if isinstance(payload, dict) else None, reason)
            assert event["data"]["status"] == "refused", what  # audited (police routes everything)

        # Device-level refusals: a vehicle on the loop, the controller in local mode.
        await school.gate.set_loop(True, unit=1)
        on_loop = command(raise_, "bollard-1")
        await asyncio.to_thread(send, school.police, BASE, raise_, on_loop)
        got = await final_reply(sub, on_loop["id"])
        assert (got[-1]["status"], got[-1]["reason"]) == ("refused", "interlock"), got
        assert (await audit(sub, on_loop["id"]))["data"]["results"]["bollard-1"]["loop"] is True
        await school.gate.set_loop(False, unit=1)
        await school.gate.set_mode("local", unit=2)
        local = command("bollard.emergency_raise", "bollard-2")
        await asyncio.to_thread(send, school.police, BASE, "bollard.emergency_raise", local)
        got = await final_reply(sub, local["id"])
        assert (got[-1]["status"], got[-1]["reason"]) == ("refused", "local_mode"), got
        assert (await audit(sub, local["id"]))["data"]["reason"] == "local_mode"
        await school.gate.set_mode("remote", unit=2)
        interlock = [m.json() for m in sub.messages if m.topic.endswith("/events/bollard/interlock")]
        assert any(e["state"] == "active" and e["device"]["id"] == "bollard-1" for e in interlock)

        assert sum(school.gate.command_writes(unit=u) for u in UNITS) == writes  # nothing was written
        for u in UNITS:
            assert (await school.gate.state(unit=u))["state_name"] == "lowered"

        # A replayed id: once accepted, a second delivery is refused, also after a restart.
        ack = command("alarm.ack", "box-gate")
        await asyncio.to_thread(send, school.police, BASE, "alarm.ack", ack)
        assert (await final_reply(sub, ack["id"]))[-1]["status"] == "done"
        assert await school.box.coil(0) is True  # the ack LED
        await asyncio.to_thread(send, school.police, BASE, "alarm.ack", ack)
        await await_for(
            sub, lambda msgs: any(r["reason"] == "replayed" for r in replies(msgs, ack["id"])), WAIT
        )
        await asyncio.to_thread(daemon.terminate)
        sub.messages.clear()
        await asyncio.to_thread(daemon.start)
        await await_for(sub, online, WAIT)  # subscribed to its commands again
        await asyncio.to_thread(send, school.police, BASE, "alarm.ack", ack)
        got = await final_reply(sub, ack["id"])
        assert (got[-1]["status"], got[-1]["reason"]) == ("refused", "replayed")

"""The command service with fake drivers (no Modbus, no MQTT): target resolution, fan-out,
aggregation, replies and audit events; and a fuzz test: whatever arrives, no crash and no
device is ever commanded by anything but a validly signed, allowed, fresh command."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.commands.service import MAX_RUNNING, CommandService
from gateway.commands.signing import build_command
from gateway.driver import DeviceStatus, Driver, Outcome, Verdict
from gateway.events import DeviceKind, DeviceRef, EventSink, Observation

KEY = b"k" * 40
OTHER_KEY = b"o" * 40


class FakeBollard(Driver):
    """Records every command it is given; answers with a scripted outcome."""

    commands = frozenset({"bollard.raise", "bollard.lower", "bollard.emergency_raise"})

    def __init__(self, device_id: str, gate: str, outcome: Outcome | None = None) -> None:
        self.device = DeviceRef(device_id, DeviceKind.BOLLARD)
        self.status = DeviceStatus()
        self.groups = (f"gate:{gate}",)
        self.outcome = outcome or Outcome(Verdict.DONE, None, "raised in 0.1 s", {"state": "raised"})
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def run(self, sink: EventSink) -> None:
        await asyncio.Event().wait()

    async def command(self, name: str, args: Mapping[str, Any]) -> Outcome:
        self.calls.append((name, dict(args)))
        return self.outcome


class Sink:
    def __init__(self) -> None:
        self.events: list[Observation] = []
        self.changed = asyncio.Event()

    async def publish(self, obs: Observation) -> None:
        self.events.append(obs)
        self.changed.set()

    async def wait_results(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len([e for e in self.events if e.type == "command.result"]) < n:
                self.changed.clear()
                await self.changed.wait()


class Replies:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    def __call__(self, level: str, payload: bytes) -> None:
        self.got.append((level, json.loads(payload)))
        self.changed.set()

    async def final(self, level: str) -> list[dict[str, Any]]:
        async with asyncio.timeout(5):
            while True:
                mine = [body for lv, body in self.got if lv == level]
                if mine and mine[-1]["status"] != "accepted":
                    return mine
                self.changed.clear()
                await self.changed.wait()


def gateway_config(tmp: Path) -> config.GatewayConfig:
    (tmp / "police.key").write_bytes(KEY)
    (tmp / "edu.key").write_bytes(OTHER_KEY)
    return config.parse(
        {
            "identity": {"school": "s", "gateway": "gw", "region": "530102"},
            "state_dir": str(tmp / "state"),
            "uplinks": [
                {
                    "name": "police",
                    "endpoints": ["mqtt://127.0.0.1:1"],
                    "commands": {
                        "key_file": "police.key",
                        "allow": ["bollard.raise", "bollard.emergency_raise"],
                    },
                },
                {
                    "name": "education",
                    "endpoints": ["mqtt://127.0.0.1:2"],
                    "commands": {"key_file": "edu.key", "allow": ["gateway.self_test"]},
                },
            ],
        },
        "test",
        base_dir=tmp,
    )


async def self_test() -> Outcome:
    return Outcome(Verdict.DONE, None, "all fine", {"uptime": 1.0})


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[CommandService, list[FakeBollard], Sink]]:
    cfg = gateway_config(tmp_path)
    (tmp_path / "state").mkdir()
    drivers = [
        FakeBollard("b1", "main"),
        FakeBollard("b2", "main", Outcome(Verdict.REFUSED, "interlock", "vehicle loop occupied")),
        FakeBollard("b3", "side"),
    ]
    sink = Sink()
    async with CommandService(cfg, drivers, sink, DeviceRef("gw", DeviceKind.GATEWAY), self_test) as svc:
        yield svc, drivers, sink


def send(svc: CommandService, uplink: str, cmd: dict[str, Any] | bytes, name: str | None = None) -> Replies:
    replies = Replies()
    payload = cmd if isinstance(cmd, bytes) else json.dumps(cmd).encode()
    topic = name or (cmd["name"] if isinstance(cmd, dict) else "bollard.raise")
    svc.submit(uplink, topic, payload, replies)
    return replies


async def test_lockdown_fans_out_and_a_partial_result_is_failed_with_each_device(
    service: tuple[CommandService, list[FakeBollard], Sink],
) -> None:
    svc, (b1, b2, b3), sink = service
    cmd = build_command(KEY, "bollard.emergency_raise", "gate:main")
    got = await send(svc, "police", cmd).final(cmd["id"])
    assert [r["status"] for r in got] == ["accepted", "failed"]
    final = got[-1]
    assert final["reason"] == "interlock"
    assert final["detail"].startswith("1 of 2 done")
    assert final["results"]["b1"]["status"] == "done"
    assert final["results"]["b2"] == {
        "status": "refused",
        "reason": "interlock",
        "detail": "vehicle loop occupied",
    }
    assert b1.calls == b2.calls == [("bollard.emergency_raise", {})]
    assert b3.calls == []  # another gate
    (audit,) = [e for e in sink.events if e.type == "command.result"]
    assert audit.data["status"] == "failed"
    assert audit.data["uplink"] == "police"
    assert audit.data["target"] == "gate:main"


async def test_all_refused_is_refused_and_one_device_done_is_done(
    service: tuple[CommandService, list[FakeBollard], Sink],
) -> None:
    svc, (b1, _b2, _b3), _ = service
    refused = build_command(KEY, "bollard.raise", "b2")
    assert (await send(svc, "police", refused).final(refused["id"]))[-1]["status"] == "refused"
    done = build_command(KEY, "bollard.raise", "b1")
    final = (await send(svc, "police", done).final(done["id"]))[-1]
    assert (final["status"], final["detail"]) == ("done", "raised in 0.1 s")
    assert b1.calls == [("bollard.raise", {})]


@pytest.mark.parametrize(
    "case",
    [
        ("police", KEY, "bollard.raise", "nowhere", "unknown_target"),
        ("police", KEY, "bollard.raise", "gateway", "unsupported"),
        ("education", OTHER_KEY, "bollard.raise", "b1", "not_allowed"),
        ("police", OTHER_KEY, "bollard.raise", "b1", "bad_signature"),
    ],
)
async def test_refused_before_anything_moves(
    service: tuple[CommandService, list[FakeBollard], Sink], case: tuple[str, bytes, str, str, str]
) -> None:
    uplink, key, name, target, reason = case
    svc, drivers, sink = service
    cmd = build_command(key, name, target)
    got = await send(svc, uplink, cmd).final(cmd["id"])
    assert [(r["status"], r["reason"]) for r in got] == [("refused", reason)]
    assert all(d.calls == [] for d in drivers)
    assert [e.data["reason"] for e in sink.events if e.type == "command.result"] == [reason]


async def test_self_test_from_education(service: tuple[CommandService, list[FakeBollard], Sink]) -> None:
    svc, _, _ = service
    cmd = build_command(OTHER_KEY, "gateway.self_test", "gateway")
    final = (await send(svc, "education", cmd).final(cmd["id"]))[-1]
    assert final["status"] == "done"
    assert final["results"]["gateway"]["uptime"] == 1.0


async def test_an_uplink_without_a_key_is_ignored(
    service: tuple[CommandService, list[FakeBollard], Sink],
) -> None:
    svc, drivers, _ = service
    replies = send(svc, "fire", build_command(KEY, "bollard.raise", "b1"))
    await asyncio.sleep(0.05)
    assert replies.got == []
    assert all(d.calls == [] for d in drivers)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, str, bool]:
    """(payload, topic name, whether it is a valid command the police uplink may send)."""
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "valid", "wrong_key", "not_allowed"]))
    name = draw(st.sampled_from(["bollard.raise", "bollard.emergency_raise", "bollard.lower", "alarm.reset"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600)), name, False
    if kind == "json":
        return json.dumps(draw(_JSON)).encode(), name, False
    key = OTHER_KEY if kind == "wrong_key" else KEY
    allowed = kind != "not_allowed"
    cmd = build_command(
        key, name if allowed else "bollard.lower", draw(st.sampled_from(["b1", "gate:main", "x"]))
    )
    intact_valid = cmd["name"] in ("bollard.raise", "bollard.emergency_raise") and cmd["target"] != "x"
    if kind == "mutated":
        field = draw(st.sampled_from(sorted(cmd)))
        old, cmd[field] = cmd[field], draw(_JSON)
        topic = cmd["name"] if isinstance(cmd["name"], str) else name
        return json.dumps(cmd).encode(), topic, intact_valid and cmd[field] == old  # unchanged: still valid
    return json.dumps(cmd).encode(), cmd["name"], kind == "valid" and intact_valid


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(payloads(), min_size=1, max_size=5))
def test_fuzz_no_crash_no_unexpected_write(
    tmp_path_factory: pytest.TempPathFactory, cases: list[Any]
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")

    async def run() -> None:
        cfg = gateway_config(tmp)
        (tmp / "state").mkdir()
        drivers = [FakeBollard("b1", "main"), FakeBollard("b2", "main")]
        sink = Sink()
        async with CommandService(cfg, drivers, sink, DeviceRef("gw", DeviceKind.GATEWAY), self_test) as svc:
            replies = Replies()
            expected = 0
            for payload, topic, valid in cases:
                svc.submit("police", topic, payload, replies)
                expected += valid
            await sink.wait_results(len(cases))
            calls = sum(len(d.calls) for d in drivers)
            valid_cmds = [e for e in sink.events if e.data["status"] in ("done", "failed")]
            assert len(valid_cmds) == expected
            assert calls >= expected  # a lockdown calls both bollards
            if expected == 0:
                assert calls == 0
            # exactly one final reply per command, each refused or done
            finals = [body for _, body in replies.got if body["status"] != "accepted"]
            assert len(finals) == len(cases)

    asyncio.run(run())


class SlowBollard(FakeBollard):
    async def command(self, name: str, args: Mapping[str, Any]) -> Outcome:
        self.calls.append((name, dict(args)))
        await asyncio.Event().wait()  # a travel that never ends by itself: the shutdown cuts it
        return self.outcome


async def test_a_command_cut_short_by_shutdown_ends_failed_and_audited(tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path)
    (tmp_path / "state").mkdir()
    slow = SlowBollard("b1", "main")
    sink = Sink()
    replies = Replies()
    async with CommandService(cfg, [slow], sink, DeviceRef("gw", DeviceKind.GATEWAY), self_test) as svc:
        cmd = build_command(KEY, "bollard.raise", "b1")
        svc.submit("police", "bollard.raise", json.dumps(cmd).encode(), replies)
        async with asyncio.timeout(5):
            while not slow.calls:  # noqa: ASYNC110 - the command reached the device
                await asyncio.sleep(0.01)
    statuses = [(body["status"], body["reason"]) for level, body in replies.got if level == cmd["id"]]
    assert statuses == [("accepted", None), ("failed", "shutdown")]
    (audit,) = [e for e in sink.events if e.type == "command.result"]
    assert (audit.data["status"], audit.data["reason"]) == ("failed", "shutdown")


async def test_busy_refusal_names_the_command_and_is_audited(tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path)
    (tmp_path / "state").mkdir()
    slow = [SlowBollard(f"b{i}", "main") for i in range(MAX_RUNNING)]
    sink = Sink()
    async with CommandService(cfg, slow, sink, DeviceRef("gw", DeviceKind.GATEWAY), self_test) as svc:
        for i in range(MAX_RUNNING):
            svc.submit(
                "police",
                "bollard.raise",
                json.dumps(build_command(KEY, "bollard.raise", f"b{i}")).encode(),
                Replies(),
            )
        async with asyncio.timeout(5):
            while sum(len(d.calls) for d in slow) < MAX_RUNNING:  # noqa: ASYNC110 - all running
                await asyncio.sleep(0.01)
        extra = build_command(KEY, "bollard.raise", "b0")
        replies = Replies()
        svc.submit("police", "bollard.raise", json.dumps(extra).encode(), replies)
        await sink.wait_results(1)
        ((level, body),) = replies.got
        assert (level, body["id"], body["status"], body["reason"]) == (
            extra["id"],
            extra["id"],
            "refused",
            "busy",
        )
        (audit,) = [e for e in sink.events if e.type == "command.result"]
        assert (audit.data["id"], audit.data["reason"]) == (extra["id"], "busy")

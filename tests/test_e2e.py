"""End to end: simulator -> real daemon (subprocess) -> two real mosquittos -> platform subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway.events import schema
from simulators.alarm_box import AlarmBoxSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config
from tests.support.subscriber import Received, Subscriber, await_event, await_for
from tests.support.waiting import eventually

VALIDATOR = jsonschema.Draft202012Validator(schema())
POLICE_TOPIC = "campus/530102/sch-1/gw-1/#"
EDU_TOPIC = "edu/530102/sch-1/gw-1/#"
# Persistent brokers keep the platform's session (its subscription) across a kill, saved each second,
# so what the gateway publishes right after a broker restart is queued for the platform, not dropped.
PERSIST = ("autosave_interval 1",)


def uplink(name: str, broker: Mosquitto, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "endpoints": [broker.url],
        "topic_prefix": prefix,
        "keepalive": 2,
        "reconnect_initial": 0.2,
        "reconnect_max": 1.0,
        "connect_timeout": 2.0,
        **extra,
    }


def box(box_id: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": box_id,
        "driver": "modbus_alarm",
        "name": f"Alarm box {box_id}",
        "location": "Main gate",
        "host": "127.0.0.1",
        "port": port,
        "profile": "generic-8di",
        "poll_interval": 0.1,
        "zones": {1: {"type": "intrusion", "name": "Perimeter beam"}},
        **extra,
    }


def events_of(messages: list[Received]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if "/events/" in m.topic:
            body = m.json()
            VALIDATOR.validate(body)
            assert m.topic.endswith("/events/" + body["type"].replace(".", "/")), m.topic
            out.append(body)
    return out


def first_seen_seqs(events: list[dict[str, Any]]) -> list[int]:
    seen: set[str] = set()
    seqs = []
    for e in events:
        if e["id"] not in seen:
            seen.add(e["id"])
            seqs.append(e["seq"])
    return seqs


def committed_seq(state_dir: Path) -> int:
    """The last seq the gateway committed, read from its outbox file (the ground truth)."""
    with contextlib.closing(sqlite3.connect(state_dir / "outbox.db")) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
    return int(row[0])


# The acceptance of a frozen broker: it stays frozen this long while alarms keep happening.
# Time itself is under test here (keepalive, alarm deadline, failover all run out), so no
# condition can stand in for it.
FROZEN_FOR = 20.0


async def committed_more(state_dir: Path, count: int, timeout: float = 10.0) -> int:
    """Wait until the gateway committed ``count`` more events than now; the new last seq."""
    start = committed_seq(state_dir) if (state_dir / "outbox.db").exists() else 0
    for _ in range(int(timeout / 0.05)):  # bounded
        await asyncio.sleep(0.05)
        seq = committed_seq(state_dir)
        if seq >= start + count:
            return seq
    raise AssertionError(f"fewer than {count} events committed within {timeout} s")


async def settled_seq(state_dir: Path) -> int:
    """The committed seq once the last flip's debounce and commit are done: unchanged for 0.3 s."""
    last, same = committed_seq(state_dir), 0
    for _ in range(100):  # bounded: 10 s
        await asyncio.sleep(0.1)
        seq = committed_seq(state_dir)
        same = same + 1 if seq == last else 0
        last = seq
        if same >= 3:
            return seq
    raise AssertionError("the daemon kept committing events")


async def saved(broker: Mosquitto) -> None:
    """Until the broker has autosaved its persistence file (the sessions in it)."""
    path = broker.workdir / "mosquitto.db"
    for _ in range(100):  # bounded: 10 s; autosave_interval is 1 s
        if path.exists() and path.stat().st_size > 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path}: no autosave")


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    police = Mosquitto(tmp_path / "police", persistence=True, extra_conf=PERSIST).start()
    edu = Mosquitto(tmp_path / "edu", persistence=True, extra_conf=PERSIST).start()
    try:
        yield police, edu
    finally:
        police.stop()
        edu.stop()


@pytest.fixture
async def sim() -> AsyncIterator[AlarmBoxSimulator]:
    async with AlarmBoxSimulator(port=0, inputs=8) as s:
        yield s


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])  # the default (auto) is uvloop where installed
async def test_panic_reaches_both_platforms_and_reset_clears(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto], sim: AlarmBoxSimulator, loop: str
) -> None:
    police, edu = brokers
    cfg = base_config(
        tmp_path / "state",
        [
            uplink("police", police, "campus/{region}"),
            uplink("education", edu, "edu/{region}", route={"types": ["alarm.*", "device.*"]}),
        ],
        [box("box-gate", sim.port)],
    )
    with Subscriber(police.port, POLICE_TOPIC) as p_sub, Subscriber(edu.port, EDU_TOPIC) as e_sub:
        daemon = Daemon(tmp_path / "d", cfg, loop=loop)
        await asyncio.to_thread(daemon.start)
        try:
            await await_event(p_sub, "gateway.started")
            await sim.press(0)
            p_alarm = await await_event(p_sub, "alarm.panic", state="active")
            e_alarm = await await_event(e_sub, "alarm.panic", state="active")
            assert p_alarm["id"] == e_alarm["id"]
            assert p_alarm["data"]["contact_id"] == 1120
            assert p_alarm["severity"] == "critical"
            assert p_alarm["device"]["id"] == "box-gate"
            await sim.release(0)
            # The panic alarm latches: releasing the button clears nothing (5 polls later)...
            polls = sim.requests()
            await eventually(lambda: sim.requests() >= polls + 5)
            assert not [
                e for e in events_of(p_sub.messages) if e["type"] == "alarm.panic" and e["state"] == "cleared"
            ]
            # ...until a person resets it with the key switch.
            await sim.press(7)
            cleared = await await_event(p_sub, "alarm.panic", state="cleared")
            await await_event(e_sub, "alarm.panic", state="cleared")
            await sim.release(7)
            assert cleared["data"]["contact_id"] == 3120
            # Education's route leaves out gateway.* events.
            assert all(e["type"].split(".")[0] in ("alarm", "device") for e in events_of(e_sub.messages))
            status = [m for m in p_sub.messages if m.topic.endswith("/status")]
            assert status
            assert status[-1].json()["state"] == "online"
        finally:
            code, took = await asyncio.to_thread(daemon.terminate)
        assert code == 0
        assert took < 5.0, f"shutdown took {took:.1f} s"
        offline = await await_for(
            p_sub,
            lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json()["state"] == "offline"],
        )
        assert offline


async def _burst(sim: AlarmBoxSimulator, stop: asyncio.Event, period: float = 0.35) -> int:
    """Toggle an intrusion input: every flip is an event. Bounded by ``stop`` and a count."""
    flips = 0
    for _ in range(2000):
        if stop.is_set():
            break
        await sim.set_input(1, flips % 2 == 0)
        flips += 1
        await asyncio.sleep(period)
    return flips


async def test_kill9_during_burst_with_one_broker_down_loses_nothing(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto], sim: AlarmBoxSimulator
) -> None:
    police, edu = brokers
    cfg = base_config(
        tmp_path / "state",
        [uplink("police", police, "campus/{region}"), uplink("education", edu, "edu/{region}")],
        [box("box-gate", sim.port)],
    )
    p_sub = Subscriber(police.port, POLICE_TOPIC, client_id="police-platform").start()
    e_sub = Subscriber(edu.port, EDU_TOPIC, client_id="edu-platform").start()
    daemon = Daemon(tmp_path / "d", cfg)
    try:
        # The education broker goes down (its platform session saved) for the whole burst.
        e_sub.stop()
        edu.stop()
        stop = asyncio.Event()
        burst = asyncio.create_task(_burst(sim, stop))
        for _ in range(4):
            await asyncio.to_thread(daemon.start)
            await committed_more(tmp_path / "state", 4)  # killed mid-burst, after it took a few
            await asyncio.to_thread(daemon.kill9)
        await asyncio.to_thread(daemon.start)
        await committed_more(tmp_path / "state", 4)
        stop.set()
        flips = await burst
        edu.start()
        e_sub = Subscriber(edu.port, EDU_TOPIC, client_id="edu-platform").start()

        def restored(msgs: list[Received]) -> bool:
            # The alarms held for education were late: its trouble clears once they are
            # delivered, and that is the last event this run produces.
            return any(
                e["type"] == "uplink.trouble"
                and e.get("state") == "cleared"
                and e["data"]["uplink"] == "education"
                for e in events_of(msgs)
            )

        await await_for(p_sub, restored, timeout=30)
        last_seq = await settled_seq(tmp_path / "state")  # WAL: readable while the daemon runs

        def drained(msgs: list[Received]) -> bool:
            return set(first_seen_seqs(events_of(msgs))) >= set(range(1, last_seq + 1))

        await await_for(p_sub, drained, timeout=30)
        await await_for(e_sub, drained, timeout=30)
        await asyncio.to_thread(daemon.terminate)
        assert committed_seq(tmp_path / "state") == last_seq  # nothing new was produced meanwhile
        for sub in (p_sub, e_sub):
            seqs = first_seen_seqs(events_of(sub.messages))
            # Every event the gateway committed, 1..N without a gap, first seen in seq order.
            assert seqs == list(range(1, last_seq + 1)), seqs
        starts = [e for e in events_of(p_sub.messages) if e["type"] == "gateway.started"]
        assert len({e["id"] for e in starts}) == 5
        intrusions = {e["id"] for e in events_of(e_sub.messages) if e["type"] == "alarm.intrusion"}
        assert flips > 10
        assert len(intrusions) >= 8, "the burst produced too few events to prove anything"
    finally:
        await asyncio.to_thread(daemon.stop)
        p_sub.stop()
        e_sub.stop()


async def test_frozen_broker_then_killed_and_restarted_loses_nothing(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto], sim: AlarmBoxSimulator
) -> None:
    police, _edu = brokers
    cfg = base_config(
        tmp_path / "state", [uplink("police", police, "campus/{region}")], [box("box-gate", sim.port)]
    )
    p_sub = Subscriber(police.port, POLICE_TOPIC, client_id="police-platform").start()
    daemon = Daemon(tmp_path / "d", cfg)
    try:
        await asyncio.to_thread(daemon.start)
        await await_event(p_sub, "gateway.started")
        await saved(police)  # the platform's subscription is on disk (autosave)
        stop = asyncio.Event()
        burst = asyncio.create_task(_burst(sim, stop, period=0.35))
        await await_event(p_sub, "alarm.intrusion")  # the burst is under way
        police.freeze()
        await asyncio.sleep(FROZEN_FOR)
        police.kill()
        police.start()
        stop.set()
        flips = await burst
        last_seq = await settled_seq(tmp_path / "state")

        def drained(msgs: list[Received]) -> bool:
            return set(first_seen_seqs(events_of(msgs))) >= set(range(1, last_seq + 1))

        try:
            await await_for(p_sub, drained, timeout=30)
        finally:
            missing = set(range(1, last_seq + 1)) - set(first_seen_seqs(events_of(p_sub.messages)))
            print("missing seqs", sorted(missing), "of", last_seq)
            print("subscriber connects", p_sub.connects)
            arrivals = [(round(m.at, 2), m.json()["seq"]) for m in p_sub.messages if "/events/" in m.topic]
            print("arrivals", arrivals)
            print(daemon.log_tail(60))
        seqs = first_seen_seqs(events_of(p_sub.messages))
        # Every seq committed by then, in order, no gaps; later events (the trouble's end) may follow.
        assert seqs == list(range(1, max(seqs) + 1))
        assert max(seqs) >= last_seq
        # The burst kept producing alarms while the broker was frozen; every one of them arrived.
        intrusions = {e["id"] for e in events_of(p_sub.messages) if e["type"] == "alarm.intrusion"}
        assert len(intrusions) >= flips // 2, (len(intrusions), flips)
        log = daemon.log_tail(400)
        assert "alarm not acknowledged by broker in time" in log or "uplink down" in log
    finally:
        await asyncio.to_thread(daemon.stop)
        p_sub.stop()


async def test_isolation_hung_garbage_and_closed_boxes_do_not_delay_others(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "b").start()
    try:
        async with (
            AlarmBoxSimulator(port=0, inputs=8) as healthy,
            AlarmBoxSimulator(port=0, inputs=8) as hung,
            AlarmBoxSimulator(port=0, inputs=8) as garbage,
            AlarmBoxSimulator(port=0, inputs=8) as closed,
        ):
            await hung.silent()
            await garbage.garbage()
            await closed.close_port()
            # 2 s timeouts: a healthy box that waited on a hung one would be 2 s late, far
            # beyond the bound below, and the healthy box's own reads have room on a slow box.
            slow = {"timeout": 2.0}
            devices = [box("healthy", healthy.port, **slow), box("hung", hung.port, **slow)]
            devices += [box("garbage", garbage.port, **slow), box("closed", closed.port, **slow)]
            cfg = base_config(tmp_path / "state", [uplink("police", broker, "campus/{region}")], devices)
            with Subscriber(broker.port, POLICE_TOPIC) as sub:
                daemon = Daemon(tmp_path / "d", cfg)
                await asyncio.to_thread(daemon.start)
                try:

                    def three_offline(ms: list[Received]) -> bool:
                        return (
                            len({e["device"]["id"] for e in events_of(ms) if e["type"] == "device.offline"})
                            >= 3
                        )

                    await await_for(sub, three_offline, timeout=20)  # hung: 3 polls of 2 s
                    latencies = []
                    for i in range(5):
                        await healthy.set_input(1, i % 2 == 0)
                        t0 = asyncio.get_running_loop().time()
                        state = "active" if i % 2 == 0 else "cleared"
                        before = len(sub.messages)

                        def arrived(ms: list[Received], state: str = state, before: int = before) -> bool:
                            return any(
                                m.json()["type"] == "alarm.intrusion" and m.json().get("state") == state
                                for m in ms[before:]
                                if "/events/" in m.topic
                            )

                        await await_for(sub, arrived, timeout=5)
                        latencies.append(asyncio.get_running_loop().time() - t0)
                    offline = {
                        e["device"]["id"] for e in events_of(sub.messages) if e["type"] == "device.offline"
                    }
                    assert offline == {"hung", "garbage", "closed"}, offline
                    # 100 ms poll + debounce + commit + publish: well under the 2 s a wait on the
                    # hung box would add.
                    assert max(latencies) < 1.5, latencies
                finally:
                    await asyncio.to_thread(daemon.stop)
    finally:
        broker.stop()

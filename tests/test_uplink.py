"""The uplink in-process: outbox -> MQTT, failover across endpoints, delivery supervision."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import UplinkConfig
from gateway.events import DeviceKind, DeviceRef, EventState, Identity, Observation, Severity
from gateway.outbox import Outbox
from gateway.tasks import cancel_and_wait
from gateway.uplink import Uplink, UplinkState
from tests.support.broker import Mosquitto, free_port
from tests.support.subscriber import Subscriber, await_event, await_for
from tests.support.waiting import eventually

IDENT = Identity("gw-1", "sch-1", "530102")
BOX = DeviceRef("box-1", DeviceKind.ALARM_BOX, "Box", "Gate")
TOPIC = "campus/530102/sch-1/gw-1/#"


def panic() -> Observation:
    return Observation(BOX, "alarm.panic", Severity.CRITICAL, EventState.ACTIVE, data={"contact_id": 1120})


def uplink_config(*ports: int, **extra: Any) -> UplinkConfig:
    return UplinkConfig.model_validate(
        {
            "name": "police",
            "endpoints": [f"mqtt://127.0.0.1:{p}" for p in ports],
            "keepalive": 10,  # long: the alarm deadline, not keepalive, must notice the frozen broker
            # Long: only the tests about the deadline shorten it, so a loaded CI box cannot
            # raise a trouble (and fail over) in a test that did not ask for one.
            "alarm_deadline": 5.0,
            "reconnect_initial": 0.05,
            "reconnect_max": 0.5,
            "connect_timeout": 1.0,
            **extra,
        }
    )


class Harness:
    def __init__(self, outbox: Outbox, cfg: UplinkConfig) -> None:
        self.outbox = outbox
        self.reports: list[Observation] = []
        self.uplink = Uplink(
            cfg,
            IDENT,
            outbox,
            report=self.reports.append,
            birth=lambda: {"devices": []},
            heartbeat=dict,
            heartbeat_interval=30,
        )
        self.task: asyncio.Task[None] | None = None

    async def wait_state(self, state: UplinkState, timeout: float = 10) -> None:
        await eventually(lambda: self.uplink.state is state, timeout)


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox(tmp_path / "outbox.db", IDENT, {"police": 10_000}) as ob:
        yield ob


async def run(h: Harness) -> asyncio.Task[None]:
    h.task = asyncio.create_task(h.uplink.run(), name="uplink")
    return h.task


async def test_delivers_in_order_and_empties_outbox(tmp_path: Path, outbox: Outbox) -> None:
    with Mosquitto(tmp_path / "b") as broker, Subscriber(broker.port, TOPIC) as sub:
        h = Harness(outbox, uplink_config(broker.port))
        task = await run(h)
        try:
            events = [await outbox.append(panic(), ["police"]) for _ in range(200)]
            ids = [e.id for e in events]
            await await_for(sub, lambda ms: len([m for m in ms if "/events/" in m.topic]) >= 200)
            got = [m.json()["id"] for m in sub.messages if "/events/" in m.topic]
            assert got == ids
            await eventually(lambda: outbox.depth("police") == 0, 5)
        finally:
            await cancel_and_wait(task, timeout=5)
            assert task.done(), "the uplink ignored its cancellation"


async def test_primary_down_uses_backup(tmp_path: Path, outbox: Outbox) -> None:
    dead = free_port()  # nothing listens: connection refused
    with Mosquitto(tmp_path / "b") as backup, Subscriber(backup.port, TOPIC) as sub:
        h = Harness(outbox, uplink_config(dead, backup.port))
        task = await run(h)
        try:
            event = await outbox.append(panic(), ["police"])
            body = await await_event(sub, "alarm.panic")
            assert body["id"] == event.id
            assert h.uplink.endpoint is not None
            assert h.uplink.endpoint.port == backup.port
        finally:
            await cancel_and_wait(task, timeout=5)
            assert task.done(), "the uplink ignored its cancellation"


async def test_alarm_not_acked_in_time_raises_trouble_and_fails_over(tmp_path: Path, outbox: Outbox) -> None:
    with (
        Mosquitto(tmp_path / "p") as primary,
        Mosquitto(tmp_path / "b") as backup,
        Subscriber(backup.port, TOPIC) as backup_sub,
    ):
        h = Harness(outbox, uplink_config(primary.port, backup.port, alarm_deadline=0.5))
        task = await run(h)
        try:
            await h.wait_state(UplinkState.CONNECTED)
            assert h.uplink.endpoint is not None
            assert h.uplink.endpoint.port == primary.port
            primary.freeze()
            event = await outbox.append(panic(), ["police"])
            body = await await_event(backup_sub, "alarm.panic", timeout=10)
            assert body["id"] == event.id
            trouble = [r for r in h.reports if r.type == "uplink.trouble"]
            assert trouble
            assert trouble[0].state is EventState.ACTIVE
            assert trouble[0].data["event_id"] == event.id
            assert h.uplink.stats.failovers >= 1
            # Delivery restored on the backup: the trouble clears.
            await eventually(
                lambda: any(r.state is EventState.CLEARED for r in h.reports if r.type == "uplink.trouble"), 5
            )
        finally:
            primary.thaw()
            await cancel_and_wait(task, timeout=5)
            assert task.done(), "the uplink ignored its cancellation"


async def test_clean_stop_publishes_offline_status(tmp_path: Path, outbox: Outbox) -> None:
    with (
        Mosquitto(tmp_path / "b") as broker,
        Subscriber(broker.port, "campus/530102/sch-1/gw-1/status") as sub,
    ):
        h = Harness(outbox, uplink_config(broker.port))
        task = await run(h)
        await await_for(sub, lambda ms: [m for m in ms if m.json()["state"] == "online"])
        h.uplink.stop()
        async with asyncio.timeout(5):
            await task
        assert h.uplink.state is UplinkState.STOPPED
        msgs = await await_for(sub, lambda ms: [m for m in ms if m.json()["state"] == "offline"])
        assert msgs[-1].json()["gateway"] == "gw-1"


async def test_backlog_larger_than_the_window_drains_with_no_new_events(
    tmp_path: Path, outbox: Outbox
) -> None:
    """Regression: once the first window was acked, the rest of a read batch must go out
    even when no new event arrives to wake the uplink."""
    for _ in range(100):
        await outbox.append(panic(), ["police"])
    with Mosquitto(tmp_path / "b") as broker, Subscriber(broker.port, TOPIC) as sub:
        h = Harness(outbox, uplink_config(broker.port, inflight=1))
        task = await run(h)
        try:
            await await_for(sub, lambda ms: len([m for m in ms if "/events/" in m.topic]) >= 100, timeout=10)
            await eventually(lambda: outbox.depth("police") == 0, 5)
        finally:
            await cancel_and_wait(task, timeout=5)
            assert task.done(), "the uplink ignored its cancellation"


def supervision_ticks(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """From now on, the time of each of the uplink's supervision ticks (its held-alarm check)."""
    ticks: list[float] = []
    check = h.uplink._check_held_alarms

    def counted() -> None:
        ticks.append(time.monotonic())
        check()

    monkeypatch.setattr(h.uplink, "_check_held_alarms", counted)
    return ticks


async def test_a_late_alarm_in_a_drained_backlog_raises_trouble_once_and_clears_once(
    tmp_path: Path, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5000 routine events, then an alarm, while the broker is away: the alarm is late. When
    # the broker returns, the trouble must stay active until the alarm itself is at the
    # broker, not flap active/cleared with every PUBACK of the rows before it.
    port = free_port()
    h = Harness(outbox, uplink_config(port, alarm_deadline=0.5))
    task = await run(h)
    try:
        info = Observation(BOX, "device.online", Severity.INFO, EventState.CLEARED, data={"contact_id": 3350})
        for _ in range(50):
            await outbox.append_many([(info, ["police"])] * 100)
        await outbox.append(panic(), ["police"])

        def troubles() -> list[EventState | None]:
            return [r.state for r in h.reports if r.type == "uplink.trouble"]

        await eventually(lambda: troubles() == [EventState.ACTIVE], 5)
        assert h.reports[0].data["code"] == "broker_deadline"
        assert "not connected" in h.reports[0].data["reason"]
        with Mosquitto(tmp_path / "b", port=port):
            await eventually(lambda: outbox.depth("police") == 0, 15)
            assert outbox.oldest_alarm_age("police") is None  # the alarm too is at the broker
            await eventually(lambda: troubles() == [EventState.ACTIVE, EventState.CLEARED], 5)
            ticked = supervision_ticks(h, monkeypatch)
            await eventually(lambda: len(ticked) >= 2, 5)  # two supervision ticks: nothing more raised
            assert troubles() == [EventState.ACTIVE, EventState.CLEARED]
    finally:
        await cancel_and_wait(task, timeout=5)


async def test_a_session_refused_right_after_connack_backs_off_instead_of_spinning(
    outbox: Outbox,
) -> None:
    # A broker that accepts the connection and drops it at the first SUBSCRIBE (an ACL that
    # refuses the presence topic, a second client with our id): the uplink must retry with
    # its backoff, not reconnect in a tight loop.
    accepted = 0

    async def refuse_after_connack(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 0x02, 0x00, 0x00]))  # CONNACK, accepted
        await writer.drain()
        await reader.read(1024)  # SUBSCRIBE: refused by closing
        writer.close()

    server = await asyncio.start_server(refuse_after_connack, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = uplink_config(port, platform={"presence_topic": "platform/police/state", "ack_types": []})
    h = Harness(outbox, cfg)
    async with server:
        task = await run(h)
        try:
            await eventually(lambda: accepted >= 2, 10)
            first, started = accepted, time.monotonic()
            # Six more sessions: with the backoff (0.05 s doubling to the 0.5 s cap, +-50 %)
            # they take at least 1.3 s; a tight loop would take milliseconds.
            await eventually(lambda: accepted >= first + 6, 10)
            took = time.monotonic() - started
            assert (accepted - first) / took <= 15 / 2.0, (accepted, took)  # at most 15 in 2 s
        finally:
            await cancel_and_wait(task, timeout=5)

"""The ack ledger, platform presence and re-notification, in process (the daemon-level
round trips are in tests/test_platform_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from gateway.acks import AckSupervisor, PlatformPresence, Presence, TroubleCode, repeat_payload
from gateway.config import PlatformConfig
from gateway.driver import Verdict
from gateway.events import DeviceKind, DeviceRef, Event, EventState, Identity, Observation, Severity
from gateway.outbox import Awaiting, Outbox, Settled
from gateway.router import ack_filter
from tests.support.waiting import eventually

IDENTITY = Identity("gw-1", "school-1", "530102")
BOX = DeviceRef("box-1", DeviceKind.ALARM_BOX, "Gate box", "gate")
GATEWAY = DeviceRef("gw-1", DeviceKind.GATEWAY, "gateway")


def panic(state: EventState = EventState.ACTIVE, event_type: str = "alarm.panic") -> Observation:
    return Observation(BOX, event_type, Severity.CRITICAL, state=state, data={"contact_id": 1120})


def needs_ack(uplink: str, event_type: str) -> bool:
    return uplink == "police" and event_type == "alarm.panic"


def open_outbox(path: Path) -> Outbox:
    return Outbox(path, IDENTITY, {"police": 1000, "edu": 1000}, ack_filter=needs_ack)


def ledger(path: Path) -> list[tuple[str, str, str, int]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT uplink, event_id, state, repeats FROM awaiting ORDER BY row").fetchall()


async def deliver(outbox: Outbox, uplink: str) -> None:
    """Play the uplink: read every row and ack it (the broker's PUBACK)."""
    rows = await outbox.read(uplink, 0, 1000)
    if rows:
        outbox.ack(uplink, rows[-1].rowid)


# -- the ledger -------------------------------------------------------------------------------


async def test_ledger_entry_is_committed_with_the_event_for_its_uplinks_only(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with open_outbox(path) as outbox:
        active = await outbox.append(panic(), ["police", "edu"])
        await outbox.append(panic(EventState.CLEARED), ["police", "edu"])  # a restore needs no ack
        await outbox.append(panic(event_type="alarm.intrusion"), ["police"])  # not an ack type
        entries = outbox.awaiting("police")
        assert [(e.event_id, e.seq, e.type) for e in entries] == [(active.id, active.seq, "alarm.panic")]
        assert entries[0].payload == active.payload
        assert outbox.awaiting("edu") == []
    assert ledger(path) == [("police", active.id, "awaiting", 0)]


async def test_settle_is_durable_and_answers_repeated_acks(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with open_outbox(path) as outbox:
        first = await outbox.append(panic(), ["police"])
        second = await outbox.append(panic(), ["police"])
        settled = await outbox.settle("police", first.id, Settled.ACKED)
        assert settled.entry is not None
        assert settled.entry.event_id == first.id
        assert settled.previous is None
        again = await outbox.settle("police", first.id, Settled.ACKED)
        assert again.entry is not None
        assert again.previous is Settled.ACKED
        assert not again.closed_now
        unknown = await outbox.settle("police", "0190b7c2-0000-7000-8000-000000000000", Settled.ACKED)
        assert unknown.entry is None
        assert unknown.previous is None
    assert sorted(ledger(path)) == sorted(
        [("police", first.id, "acked", 0), ("police", second.id, "awaiting", 0)]
    )
    async with open_outbox(path) as outbox:  # a restart re-opens only what is still open
        assert [e.event_id for e in outbox.awaiting("police")] == [second.id]
        assert (await outbox.settle("police", first.id, Settled.ACKED)).previous is Settled.ACKED


async def test_an_expired_entry_acknowledged_late_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with open_outbox(path) as outbox:
        event = await outbox.append(panic(), ["police"])
        expired = await outbox.settle("police", event.id, Settled.EXPIRED)
        assert expired.closed_now
        again = await outbox.settle("police", event.id, Settled.EXPIRED)
        assert (again.previous, again.closed_now) == (Settled.EXPIRED, False)
        late = await outbox.settle("police", event.id, Settled.ACKED)
        assert late.entry is not None
        assert late.previous is Settled.EXPIRED
    assert ledger(path) == [("police", event.id, "acked", 0)]


async def test_repeats_and_trouble_flags_are_persisted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with open_outbox(path) as outbox:
        await outbox.append(panic(), ["police"])
        entry = outbox.awaiting("police")[0]
        entry.repeats, entry.troubled = 3, True
        outbox.note(entry)
        await outbox.append(panic(EventState.CLEARED), ["edu"])  # any later commit carries the note
    async with open_outbox(path) as outbox:
        reopened = outbox.awaiting("police")[0]
        assert (reopened.repeats, reopened.troubled) == (3, True)


def test_ack_filter_follows_platform_ack_types() -> None:
    from gateway.config import UplinkConfig

    police = UplinkConfig(
        name="police",
        endpoints=("mqtt://127.0.0.1:1",),  # type: ignore[arg-type]
        commands={"key_file": "/k", "allow": ["alarm.ack"]},  # type: ignore[arg-type]
        platform={"ack_types": ["alarm.panic", "alarm.duress*"]},  # type: ignore[arg-type]
    )
    edu = UplinkConfig(name="edu", endpoints=("mqtt://127.0.0.1:1",))  # type: ignore[arg-type]
    check = ack_filter([police, edu])
    assert check is not None
    assert check("police", "alarm.panic")
    assert check("police", "alarm.duress_code")
    assert not check("police", "alarm.intrusion")
    assert not check("edu", "alarm.panic")
    assert ack_filter([edu]) is None


# -- presence ---------------------------------------------------------------------------------


def presence_msg(online: bool, stamp: int | None = None) -> bytes:
    body: dict[str, object] = {"online": online}
    if stamp is not None:
        body["timestamp"] = stamp
    return json.dumps(body).encode()


def test_presence_follows_the_platform_and_ignores_a_stale_will() -> None:
    p = PlatformPresence("police", "platform/police/state")
    assert p.state is Presence.UNKNOWN
    assert not p.allows_publishing
    assert p.update(presence_msg(True, 2000))
    assert p.allows_publishing
    assert not p.update(presence_msg(False, 1000))  # the will of an older session: ignored
    assert p.state is Presence.ONLINE
    assert p.update(presence_msg(False, 3000))
    assert p.state is Presence.OFFLINE
    assert not p.allows_publishing
    assert p.update(presence_msg(True))  # no timestamp: taken as it comes
    p.reset()
    assert p.state is Presence.UNKNOWN


@pytest.mark.parametrize(
    "payload",
    [
        b"online",
        b"[]",
        b'{"online": "yes"}',
        b'{"online": true, "timestamp": -1}',
        b'{"online": true, "timestamp": 1.5}',
        b"{" * 5000,
    ],
)
def test_a_bad_presence_message_holds_events(payload: bytes) -> None:
    p = PlatformPresence("police", "platform/police/state")
    p.update(presence_msg(True))
    assert p.update(payload)
    assert p.state is Presence.UNKNOWN
    assert p.invalid == 1


def test_an_empty_retained_message_means_unknown() -> None:
    p = PlatformPresence("police", "t")
    p.update(presence_msg(True))
    assert p.update(b"")
    assert p.state is Presence.UNKNOWN


def test_without_a_presence_topic_publishing_is_always_allowed() -> None:
    p = PlatformPresence("police", None)
    p.reset()
    assert p.state is Presence.DISABLED
    assert p.allows_publishing


def test_repeat_payload_adds_the_flag_and_keeps_the_rest() -> None:
    original = json.dumps({"id": "x", "seq": 7, "data": {"a": 1}}, separators=(",", ":")).encode()
    body = json.loads(repeat_payload(original, 2))
    assert body == {"id": "x", "seq": 7, "data": {"a": 1}, "repeat": 2}


# -- the supervisor ---------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.reports: list[Observation] = []
        self.accept = True

    def publish(self, entry: Awaiting, payload: bytes) -> bool:
        if self.accept:
            self.published.append((entry.event_id, payload))
        return self.accept

    def troubles(self, code: TroubleCode) -> list[tuple[str, str]]:
        return [
            (o.state.value if o.state else "", str(o.data["event_id"]))
            for o in self.reports
            if o.type == "uplink.trouble" and o.data["code"] == code.value
        ]


WITHIN = 5.0  # s: the bound on waiting for a tick to do what the test expects


def supervisor(outbox: Outbox, rec: Recorder, **cfg: float) -> AckSupervisor:
    settings = {"renotify_interval": 0.5, "renotify_limit": 2, "ack_deadline": 0.6, **cfg}
    platform = PlatformConfig(**settings)  # type: ignore[arg-type]
    return AckSupervisor("police", platform, outbox, GATEWAY, rec.reports.append)


async def ticks(
    sup: AckSupervisor, rec: Recorder, seconds: float, until: Callable[[], bool] | None = None
) -> None:
    """Tick as the uplink's loop does.

    With ``until``: until it holds, checked after every tick (the test sees the state at the
    first tick that made it true, however slowly a loaded box runs them); failing after
    ``seconds``. Without: for ``seconds``, a window in which something must not happen."""
    end = time.monotonic() + seconds
    for _ in range(10_000):
        due = await sup.tick(rec.publish)
        if until is not None and until():
            return
        left = end - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(left, 0.05 if due is None else max(0.001, min(due, 0.05))))
    if until is not None:
        raise AssertionError(f"not done within {seconds} s: {rec.published=} {rec.reports=}")


async def test_renotifies_after_delivery_until_the_limit_then_raises_trouble(tmp_path: Path) -> None:
    rec = Recorder()
    async with open_outbox(tmp_path / "outbox.db") as outbox:
        sup = supervisor(outbox, rec)
        event = await outbox.append(panic(), ["police"])
        await ticks(sup, rec, WITHIN, until=lambda: bool(rec.troubles(TroubleCode.ACK_DEADLINE)))  # 0.6 s
        assert rec.published == []  # not at the broker yet: the stream's own copy comes first
        assert rec.troubles(TroubleCode.ACK_DEADLINE) == [("active", event.id)]
        await deliver(outbox, "police")
        # repeats at ~0.5 and ~1.0 s, then the limit at ~1.5 s
        await ticks(sup, rec, WITHIN, until=lambda: bool(rec.troubles(TroubleCode.ACK_LIMIT)))
        repeats = [json.loads(p) for _, p in rec.published]
        assert [(r["id"], r["seq"], r["repeat"]) for r in repeats] == [
            (event.id, event.seq, 1),
            (event.id, event.seq, 2),
        ]
        assert rec.troubles(TroubleCode.ACK_LIMIT) == [("active", event.id)]
        assert outbox.awaiting("police") == []
        assert sup.stats.expired == 1
        outcome = await sup.acknowledge(event.id)  # late
        assert outcome.verdict is Verdict.DONE
        assert outcome.data["ack"] == "late"
        assert rec.troubles(TroubleCode.ACK_LIMIT) == [("active", event.id), ("cleared", event.id)]


async def test_an_ack_stops_renotification_and_clears_the_deadline_trouble(tmp_path: Path) -> None:
    rec = Recorder()
    async with open_outbox(tmp_path / "outbox.db") as outbox:
        sup = supervisor(outbox, rec, renotify_limit=100, ack_deadline=0.3)
        event = await outbox.append(panic(), ["police"])
        await deliver(outbox, "police")
        # the deadline (0.3 s) passes before the first repeat (0.5 s)
        await ticks(sup, rec, WITHIN, until=lambda: len(rec.published) >= 1)
        assert len(rec.published) == 1
        outcome = await sup.acknowledge(event.id)
        assert outcome.data["ack"] == "acknowledged"
        assert rec.troubles(TroubleCode.ACK_DEADLINE) == [("active", event.id), ("cleared", event.id)]
        await ticks(sup, rec, 1.2)
        assert len(rec.published) == 1  # nothing after the ack
        assert (await sup.acknowledge(event.id)).data["ack"] == "already"


async def past_deadline(outbox: Outbox, sup: AckSupervisor) -> None:
    """Tick until the first open alarm's ack deadline has passed (bounded: 100 x 10 ms)."""
    for _ in range(100):
        if outbox.awaiting("police")[0].troubled:
            return
        await sup.tick(None)
        await asyncio.sleep(0.01)
    raise AssertionError("the ack deadline did not pass within 1 s")


async def overdue_alarm(outbox: Outbox, rec: Recorder) -> tuple[AckSupervisor, Event, Awaiting]:
    """A delivered panic past its ack deadline, with no repeats left (the next tick gives up)."""
    sup = supervisor(outbox, rec, renotify_limit=0, ack_deadline=0.1)
    event = await outbox.append(panic(), ["police"])
    await deliver(outbox, "police")
    await past_deadline(outbox, sup)
    return sup, event, outbox.awaiting("police")[0]


async def test_an_ack_racing_a_give_up_is_recorded_and_clears_both_troubles(tmp_path: Path) -> None:
    rec = Recorder()
    async with open_outbox(tmp_path / "outbox.db") as outbox:
        sup, event, entry = await overdue_alarm(outbox, rec)
        # The give-up and the platform's ack at the same moment: the ack waits for the
        # give-up's commit, then records the ack (late) instead of answering "unknown".
        give_up = asyncio.create_task(sup._give_up(entry))
        await asyncio.sleep(0)  # the give-up's write is queued first
        outcome = await sup.acknowledge(event.id)
        assert await give_up
        assert outcome.data["ack"] == "late"
        assert rec.troubles(TroubleCode.ACK_LIMIT) == [("active", event.id), ("cleared", event.id)]
        assert rec.troubles(TroubleCode.ACK_DEADLINE) == [("active", event.id), ("cleared", event.id)]
    assert ledger(tmp_path / "outbox.db") == [("police", event.id, "acked", 0)]


async def test_a_cancelled_settle_still_settles_when_its_write_commits(tmp_path: Path) -> None:
    async with open_outbox(tmp_path / "outbox.db") as outbox:
        event = await outbox.append(panic(), ["police"])
        task = asyncio.create_task(outbox.settle("police", event.id, Settled.ACKED))
        await asyncio.sleep(0)  # the write is queued
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: not outbox.is_open("police", event.id))
        assert (await outbox.settle("police", event.id, Settled.ACKED)).previous is Settled.ACKED
    assert ledger(tmp_path / "outbox.db") == [("police", event.id, "acked", 0)]


async def test_a_settle_on_a_closed_outbox_keeps_the_entry_open(tmp_path: Path) -> None:
    from gateway.errors import OutboxError

    outbox = open_outbox(tmp_path / "outbox.db")
    async with outbox:
        event = await outbox.append(panic(), ["police"])
    with pytest.raises(OutboxError):
        await outbox.settle("police", event.id, Settled.ACKED)
    assert outbox.is_open("police", event.id)


async def test_no_repeats_while_the_uplink_cannot_publish(tmp_path: Path) -> None:
    rec = Recorder()
    rec.accept = False
    async with open_outbox(tmp_path / "outbox.db") as outbox:
        sup = supervisor(outbox, rec, renotify_limit=1)
        await outbox.append(panic(), ["police"])
        await deliver(outbox, "police")
        await ticks(sup, rec, 1.3)
        assert rec.published == []
        assert outbox.awaiting("police")[0].repeats == 0
        assert rec.troubles(TroubleCode.ACK_LIMIT) == []  # a repeat never sent is not counted
        rec.accept = True
        await ticks(sup, rec, WITHIN, until=lambda: len(rec.published) >= 1)
        assert len(rec.published) == 1


async def test_a_failed_ledger_commit_keeps_the_entry_open(tmp_path: Path) -> None:
    from gateway.errors import OutboxError

    async with open_outbox(tmp_path / "outbox.db") as outbox:
        event = await outbox.append(panic(), ["police"])

        def fail(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        outbox._on_begin = fail
        with pytest.raises(OutboxError):
            await outbox.settle("police", event.id, Settled.ACKED)
        outbox._on_begin = None
        assert [e.event_id for e in outbox.awaiting("police")] == [event.id]
        await eventually(lambda: outbox.healthy)
        assert (await outbox.settle("police", event.id, Settled.ACKED)).entry is not None


async def test_a_cancelled_ack_still_commits_reports_and_wins_over_a_give_up(tmp_path: Path) -> None:
    # A command cut short (shutdown, its time limit) after the platform's ack was queued:
    # the ack still commits and clears its trouble, and a give-up right after it finds the
    # alarm acknowledged instead of overwriting it with an expiry.
    rec = Recorder()
    async with open_outbox(tmp_path / "outbox.db") as outbox:
        sup, event, entry = await overdue_alarm(outbox, rec)
        ack = asyncio.create_task(sup.acknowledge(event.id))
        for _ in range(3):
            await asyncio.sleep(0)  # the ack's write is queued
        ack.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ack
        assert await sup._give_up(entry)
        await eventually(
            lambda: rec.troubles(TroubleCode.ACK_DEADLINE) == [("active", event.id), ("cleared", event.id)]
        )
        assert rec.troubles(TroubleCode.ACK_LIMIT) == []
        assert sup.stats.acked == 1
        assert sup.stats.expired == 0
    assert ledger(tmp_path / "outbox.db") == [("police", event.id, "acked", 0)]

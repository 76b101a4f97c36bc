"""Acceptance: a broker without persistence restarted while the platform console is away.

The real daemon, the real ``campus-gateway console`` (a subprocess, auto-ack), a police
mosquitto *without* persistence, and an audit uplink to a second broker that sees every
event the gateway produces. While the console is away the gateway holds the police events;
the broker restarts (forgetting every session and retained message); when both are back,
every alarm produced meanwhile reaches the console, and each panic is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulators.alarm_box import AlarmBoxSimulator
from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, base_config
from tests.support.subscriber import Received, Subscriber, await_for
from tests.support.waiting import press_held

KEY = b"police-key-0123456789abcdef0123456789"
PRESENCE = "campus-platform/police/state"
WAIT = 20.0


class ConsoleProcess:
    """``campus-gateway console --json --auto-ack`` in a subprocess; its records in a list."""

    def __init__(self, broker: Mosquitto, key_file: Path, log: Path) -> None:
        self.log = log
        self.args = [
            sys.executable,
            "-m",
            "gateway.cli",
            "console",
            "--broker",
            broker.url,
            "--topic",
            "campus/#",
            "--platform",
            "police",
            "--client-id",
            "police-console-1",
            "--key-file",
            str(key_file),
            "--auto-ack",
            "--json",
        ]
        self.records: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[str] | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    def start(self) -> ConsoleProcess:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=subprocess.PIPE, stderr=log, text=True, stdin=subprocess.DEVNULL
            )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.records.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self.records)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [r["kind"] for r in self.records[-20:]]
                    raise TimeoutError(f"console: condition not met in {timeout} s; last records {kinds}")
                self._cond.wait(min(left, 0.1))

    def stop(self) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        return code

    def events(self, type_prefix: str = "alarm.") -> list[dict[str, Any]]:
        with self._cond:
            return [
                r for r in self.records if r["kind"] == "event" and str(r["type"]).startswith(type_prefix)
            ]

    def acked(self) -> set[str]:
        with self._cond:
            return {
                str(r["event_id"])
                for r in self.records
                if r["kind"] == "ack_result" and r["status"] == "done"
            }


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    police = Mosquitto(tmp_path / "police", persistence=False).start()
    audit = Mosquitto(tmp_path / "audit").start()
    try:
        yield police, audit
    finally:
        police.stop()
        audit.stop()


def config(tmp: Path, police: Mosquitto, audit: Mosquitto, box_port: int) -> dict[str, Any]:
    (tmp / "police.key").write_bytes(KEY)
    common = {"keepalive": 2, "reconnect_initial": 0.2, "reconnect_max": 0.5, "connect_timeout": 2.0}
    uplinks = [
        {
            "name": "police",
            "endpoints": [police.url],
            "commands": {"key_file": str(tmp / "police.key"), "allow": ["alarm.ack"]},
            "platform": {"presence_topic": PRESENCE, "renotify_interval": 5},
            **common,
        },
        {"name": "audit", "endpoints": [audit.url], "topic_prefix": "audit/{region}", **common},
    ]
    box = {
        "id": "box-gate",
        "driver": "modbus_alarm",
        "host": "127.0.0.1",
        "port": box_port,
        "profile": "generic-8di",
        "poll_interval": 0.05,
    }
    cfg = base_config(tmp / "state", uplinks, [box])
    cfg["heartbeat_interval"] = 1
    return cfg


def police_heartbeat(msgs: list[Received]) -> dict[str, Any] | None:
    beats = [m for m in msgs if m.topic.endswith("/heartbeat")]
    return beats[-1].json()["uplinks"]["police"] if beats else None


def alarm_ids(sub: Subscriber, after_seq: int) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in sub.events("alarm.") if e["seq"] > after_seq}


async def test_no_alarm_lost_when_the_broker_restarts_while_the_console_is_away(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    police, audit = brokers
    console = ConsoleProcess(police, tmp_path / "police.key", tmp_path / "console.log")
    async with AlarmBoxSimulator(inputs=8) as box:
        cfg = config(tmp_path, police, audit, box.port)
        with Subscriber(audit.port, "audit/#") as sub, Daemon(tmp_path / "d", cfg):
            try:
                await asyncio.to_thread(console.start)
                # The round trip while everybody is there: alarm, ack, the box's LED.
                await press_held(box, 0)
                first = await asyncio.to_thread(
                    console.wait_for, lambda _r: next(iter(console.events("alarm.panic")), None)
                )
                await asyncio.to_thread(console.wait_for, lambda _r: first["id"] in console.acked())
                assert await box.coil(0) is True

                # The console goes away (its presence says offline); the gateway holds.
                assert await asyncio.to_thread(console.stop) == 0
                await await_for(sub, lambda m: (police_heartbeat(m) or {}).get("platform") == "offline", WAIT)
                seen_before = max(e["seq"] for e in console.events(""))
                await press_held(box, 1)
                await box.tamper(True)  # the lid: alarm.tamper
                # The broker restarts without persistence: sessions and retained messages go.
                await asyncio.to_thread(police.stop)
                await press_held(box, 2)
                await asyncio.to_thread(police.start)
                await press_held(box, 3)
                await box.tamper(False)

                def outage_alarms(_m: list[Received]) -> dict[str, dict[str, Any]] | None:
                    ids = alarm_ids(sub, seen_before)
                    return ids if len(ids) >= 5 else None

                produced = await await_for(sub, outage_alarms, WAIT)
                # Held in the outbox, not published into the void.
                await await_for(sub, lambda m: ((police_heartbeat(m) or {}).get("depth") or 0) >= 5, WAIT)

                # The console comes back: everything produced meanwhile arrives, in seq order.
                await asyncio.to_thread(console.start)

                def all_arrived(_r: list[dict[str, Any]]) -> bool:
                    return set(produced) <= {e["id"] for e in console.events("")}

                await asyncio.to_thread(console.wait_for, all_arrived)
                panics = {
                    i for i, e in produced.items() if e["type"] == "alarm.panic" and e["state"] == "active"
                }
                assert len(panics) == 3
                await asyncio.to_thread(console.wait_for, lambda _r: panics <= console.acked())
                after = [e for e in console.events("") if e["seq"] > seen_before and not e["duplicate"]]
                assert [e["seq"] for e in after] == sorted(e["seq"] for e in after)
                assert not [e for e in after if e.get("gap")]  # the police route takes everything
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(console.stop)

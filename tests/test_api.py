"""The local API and the technician CLI against a running daemon with a simulated alarm box."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulators.alarm_box import AlarmBoxSimulator
from tests.support.broker import Mosquitto, free_port
from tests.support.daemon import Daemon, base_config

TOKEN = "technician-token-0123456789"
BASE = "campus/530102/sch-1/gw-1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
async def daemon(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[tuple[Daemon, AlarmBoxSimulator, int]]:
    async with AlarmBoxSimulator(inputs=8) as box:
        (tmp_path / "api.token").write_text(TOKEN)
        port = free_port()
        cfg = base_config(
            tmp_path / "state",
            [{"name": "police", "endpoints": [broker.url]}],
            [{"id": "box-gate", "driver": "modbus_alarm", "host": "127.0.0.1", "port": box.port,
              "profile": "generic-8di", "poll_interval": 0.1}],
        )  # fmt: skip
        cfg["api"] = {
            "socket": str(tmp_path / "run" / "api.sock"),
            "tcp": f"127.0.0.1:{port}",
            "token_file": str(tmp_path / "api.token"),
        }
        d = Daemon(tmp_path / "d", cfg)
        await asyncio.to_thread(d.start)
        try:
            yield d, box, port
        finally:
            await asyncio.to_thread(d.stop)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=30, check=False
    )


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args)


async def test_cli_commands_as_tables_and_json(
    daemon: tuple[Daemon, AlarmBoxSimulator, int], tmp_path: Path
) -> None:
    _, box, _ = daemon
    sock = ["--socket", str(tmp_path / "run" / "api.sock")]
    status = await acli("status", *sock)
    assert status.returncode == 0, status.stderr
    assert "uplink" in status.stdout
    assert "police" in status.stdout
    data = json.loads((await acli("status", *sock, "--json")).stdout)
    assert data["devices"]["total"] == 1

    for _ in range(50):  # bounded: the box answers within a few polls
        devices = json.loads((await acli("devices", *sock, "--json")).stdout)
        if devices[0]["state"] == "online":
            break
        await asyncio.sleep(0.1)
    assert devices[0]["id"] == "box-gate"
    assert devices[0]["state"] == "online"
    table = await acli("devices", *sock)
    assert "box-gate" in table.stdout
    assert "online" in table.stdout

    uplinks = json.loads((await acli("uplinks", *sock, "--json")).stdout)
    assert uplinks[0]["name"] == "police"
    assert "police" in (await acli("uplinks", *sock)).stdout
    outbox = json.loads((await acli("outbox", *sock, "--json")).stdout)
    assert "police" in outbox["uplinks"]
    assert "last seq" in (await acli("outbox", *sock)).stdout

    follow = asyncio.create_task(acli("events", *sock, "--follow", "--count", "1", "--json"))
    # The follower says nothing until an event comes, so there is no sign that it is
    # listening yet: send test alarms until one reaches it (bounded).
    for _ in range(10):
        sent = await acli("test-alarm", "box-gate", *sock)
        assert sent.returncode == 0, sent.stderr
        assert "test alarm sent from box-gate" in sent.stdout
        await asyncio.wait([follow], timeout=1.0)
        if follow.done():
            break
    streamed = json.loads((await follow).stdout.splitlines()[0])
    assert streamed["type"] == "alarm.test"
    assert streamed["data"]["contact_id"] == 1601
    recent = json.loads((await acli("events", *sock, "--json", "--limit", "5")).stdout)
    assert recent[-1]["type"] == "alarm.test"
    assert "alarm.test" in (await acli("events", *sock)).stdout

    await box.press(0)
    for _ in range(50):
        if (await acli("events", *sock, "--json")).stdout.count("alarm.panic"):
            break
        await asyncio.sleep(0.1)
    held = await acli("reset", "box-gate", *sock, "--json")
    assert held.returncode == 1  # still pressed: refused with 409
    await box.release(0)
    for _ in range(50):  # refused (409) until a poll has seen the release; bounded
        done = await acli("reset", "box-gate", *sock, "--json")
        if done.returncode != 1:
            break
        await asyncio.sleep(0.1)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cleared"] == [0]
    again = await acli("reset", "box-gate", *sock)  # as a table: nothing latched any more
    assert again.returncode == 0, again.stderr
    assert "box-gate: done nothing latched" in again.stdout
    second = json.loads((await acli("test-alarm", "box-gate", *sock, "--json")).stdout)
    assert second == {"sent": True, "device": "box-gate"}

    missing = await acli("status", "--socket", str(tmp_path / "nowhere.sock"))
    assert missing.returncode == 1
    assert "cannot reach the daemon" in missing.stderr


async def test_socket_permissions_and_tcp_writes_need_the_token(
    daemon: tuple[Daemon, AlarmBoxSimulator, int], tmp_path: Path
) -> None:
    _, _, port = daemon
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "api.sock").st_mode)
    assert mode == 0o660
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/health") as r:
            assert r.status == 200
        async with s.post(f"{url}/test-alarm", json={"device": "box-gate"}) as r:
            assert r.status == 401
        async with s.post(
            f"{url}/test-alarm", json={"device": "box-gate"}, headers={"Authorization": "Bearer wrong"}
        ) as r:
            assert r.status == 401
        async with s.post(
            f"{url}/test-alarm", json={"device": "box-gate"}, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            assert r.status == 201
        async with s.get(f"{url}/metrics") as r:
            text = await r.text()
    assert 'campus_gateway_device_online{device="box-gate",kind="alarm_box"} 1.0' in text
    assert "campus_gateway_poll_latency_seconds_bucket" in text
    assert 'campus_gateway_events_total{type="alarm.test"} 1.0' in text
    assert "campus_gateway_outbox_depth" in text
    refused = await acli("test-alarm", "box-gate", "--url", url)
    assert refused.returncode == 1
    assert "401" in refused.stderr
    (tmp_path / "t").write_text(TOKEN)
    ok = await acli("test-alarm", "box-gate", "--url", url, "--token-file", str(tmp_path / "t"))
    assert ok.returncode == 0, ok.stderr


_PATHS = st.sampled_from(
    [
        "/health", "/devices", "/uplinks", "/outbox", "/events", "/config", "/metrics", "/test-alarm",
        "/devices/box-gate/reset", "/devices/x/reset", "/nothing", "/events?limit=0",
        "/events?limit=abc", "/%00",
    ]
)  # fmt: skip
_JSON = st.recursive(
    st.none() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)
_BODIES = st.one_of(st.none(), st.binary(max_size=200), st.builds(lambda v: json.dumps(v).encode(), _JSON))


async def test_fuzzed_requests_get_4xx_and_never_crash_it(
    daemon: tuple[Daemon, AlarmBoxSimulator, int], tmp_path: Path
) -> None:
    d, _, port = daemon
    url = f"http://127.0.0.1:{port}"
    cases: list[tuple[str, str, bytes | None]] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), path=_PATHS, body=_BODIES)
    def collect(method: str, path: str, body: bytes | None) -> None:
        cases.append((method, path, body))

    collect()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    statuses: list[int] = []
    async with aiohttp.ClientSession() as s:
        for method, path, body in cases:
            async with s.request(method, url + path, data=body, headers=headers) as r:
                statuses.append(r.status)
                if r.status >= 400:
                    assert r.headers.get("Content-Type", "").startswith("application/json"), (method, path)
    assert all(st_ < 500 for st_ in statuses), statuses
    assert d.proc is not None
    assert d.proc.poll() is None  # still running
    async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
        assert r.status == 200

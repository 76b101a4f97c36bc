"""``campus-gateway probe`` and ``discover`` against the simulators on loopback: tables and
--json, exit codes (0 answered, 1 no answer, 2 bad usage), one-line errors on stderr.

WS-Discovery is tested with a responder written here on a loopback UDP port and the
unicast ``--target``; the multicast group is pointed at loopback for every test, so no
test can send multicast."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway import cli, diagnose
from simulators.alarm_box import AlarmBoxSimulator
from simulators.bollard import BollardSimulator
from simulators.onvif_camera import OnvifCameraSimulator

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "probe-s3cret"


def _wired_into_cli() -> bool:
    """gateway.cli registers the diagnose parsers (once the line is added there)."""
    parser = cli.build_parser(["probe", "discover"])
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "probe" in action.choices:
            return action.choices["probe"].get_default("func") is diagnose.cmd_probe
    return False


def _main() -> Callable[[Sequence[str]], int]:
    """gateway.cli.main when it has the commands; until then diagnose.main, which builds the
    same ``campus-gateway`` parser with add_diagnose_parsers."""
    return cli.main if _wired_into_cli() else diagnose.main


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.out)
        return doc


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """The command in a worker thread (it runs its own event loop), the simulators in ours."""
    capsys.readouterr()
    code = await asyncio.to_thread(_main(), list(argv))
    out, err = capsys.readouterr()
    return Result(code, out, err)


@pytest.fixture(autouse=True)
def _no_multicast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback only: a probe without --target would go to the discard port on 127.0.0.1."""
    monkeypatch.setattr(diagnose, "WS_DISCOVERY_GROUP", ("127.0.0.1", 9))
    monkeypatch.delenv(diagnose.PASSWORD_ENV, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exit_codes_match_the_cli() -> None:
    assert (diagnose.EXIT_OK, diagnose.EXIT_FAILURE, diagnose.EXIT_USAGE) == (
        cli.EXIT_OK,
        cli.EXIT_FAILURE,
        cli.EXIT_CONFIG,
    )


# ---- probe modbus ---------------------------------------------------------------------------


async def test_probe_alarm_box_table(capsys: pytest.CaptureFixture[str]) -> None:
    async with AlarmBoxSimulator(inputs=8) as sim:
        await sim.press(1)
        port = sim.port
        r = await run(capsys, "probe", f"modbus://127.0.0.1:{port}?unit=1")
    assert r.code == 0, r.err
    assert r.err == ""
    lines = r.out.splitlines()
    assert lines[0] == f"probe tcp://127.0.0.1:{port} unit 1"
    assert lines[1].startswith("connect: ok in ")
    assert lines[2].split() == ["READ", "STATUS", "LATENCY", "RESULT"]
    rows = {line[:22].strip(): line[22:].split() for line in lines[3:7]}
    assert rows["discrete inputs 0+8"][0] == "answered"
    assert rows["discrete inputs 0+8"][-1] == "01000010"  # input 1 pressed, 6 the closed tamper switch
    assert rows["coils 0+8"][0] == "answered"
    assert rows["input registers 0+4"][-4:] == ["4700"] * 4  # loop resistances, normal
    assert lines[-1] == "ok: 4 of 4 reads answered"


async def test_probe_bollard_json_reports_exceptions_as_answers(capsys: pytest.CaptureFixture[str]) -> None:
    async with BollardSimulator() as sim:
        port = sim.port
        r = await run(capsys, "probe", f"modbus://127.0.0.1:{port}?unit=1", "--json")
        assert sim.requests(unit=1) == 4
    assert r.code == 0, r.err
    doc = r.json
    assert doc["probe"] == "modbus"
    assert doc["link"] == f"tcp://127.0.0.1:{port}"
    assert doc["connect"]["ok"] is True
    assert doc["connect"]["ms"] >= 0
    assert doc["reconnects"] == 0
    by_table = {row["table"]: row for row in doc["reads"]}
    assert by_table["discrete_inputs"]["status"] == "answered"
    assert by_table["discrete_inputs"]["values"] == [0] * 8
    assert by_table["coils"]["status"] == "exception"  # the bollard PLC has no coils
    assert by_table["coils"]["exception_code"] == 2
    assert by_table["coils"]["error"] == "illegal data address"
    assert by_table["input_registers"]["values"] == [0, 0, 120, 0]  # lowered, no fault, 12.0 bar
    assert all(isinstance(row["ms"], float) for row in doc["reads"])
    assert doc["ok"] is True
    assert doc["error"] is None


async def test_probe_given_range_only(capsys: pytest.CaptureFixture[str]) -> None:
    async with AlarmBoxSimulator(units=(1, 2), inputs=8) as sim:
        await sim.cut_line(3, unit=2)
        url = f"modbus://127.0.0.1:{sim.port}?unit=2&table=input_registers&address=2&count=3"
        r = await run(capsys, "probe", url, "--only", "--json")
    assert r.code == 0, r.err
    (row,) = r.json["reads"]
    assert (row["table"], row["address"], row["count"]) == ("input_registers", 2, 3)
    assert row["values"] == [4700, 65535, 4700]


async def test_probe_given_range_then_the_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    async with AlarmBoxSimulator(inputs=8) as sim:
        r = await run(capsys, "probe", f"modbus://127.0.0.1:{sim.port}?table=coils&count=4", "--json")
    assert r.code == 0, r.err
    reads = [(row["table"], row["address"], row["count"]) for row in r.json["reads"]]
    assert reads == [
        ("coils", 0, 4),
        ("discrete_inputs", 0, 8),
        ("coils", 0, 8),
        ("holding_registers", 0, 4),
        ("input_registers", 0, 4),
    ]


async def test_probe_closed_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    r = await run(capsys, "probe", f"modbus://127.0.0.1:{port}?unit=1")
    assert r.code == 1
    assert "connect: FAILED" in r.out
    assert r.out.splitlines()[-1] == "FAILED: 0 of 4 reads answered"
    assert r.err.count("\n") == 1
    assert r.err.startswith(f"campus-gateway probe: tcp://127.0.0.1:{port}: cannot connect")

    r = await run(capsys, "probe", f"modbus://127.0.0.1:{port}?unit=1", "--json")
    assert r.code == 1
    doc = r.json
    assert doc["connect"]["ok"] is False
    assert [row["status"] for row in doc["reads"]] == ["skipped"] * 4
    assert doc["ok"] is False


async def test_probe_silent_device_exits_1_within_its_timeouts(capsys: pytest.CaptureFixture[str]) -> None:
    async with AlarmBoxSimulator(inputs=8) as sim:
        await sim.silent()
        started = time.monotonic()
        r = await run(capsys, "probe", f"modbus://127.0.0.1:{sim.port}", "--timeout", "0.2", "--json")
        elapsed = time.monotonic() - started
    assert r.code == 1
    doc = r.json
    assert [row["status"] for row in doc["reads"]] == ["no_answer"] * 4
    assert doc["connect"]["ok"] is True
    assert doc["reconnects"] == 3  # the hub never reuses a connection after a timeout
    assert "no answer within 200 ms" in doc["reads"][0]["error"]
    assert elapsed < 4 * 0.2 + 2.0
    assert "no answer within 200 ms (and 3 more read(s))" in r.err


async def test_probe_rtu_without_the_device_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "ttyNONE"
    r = await run(capsys, "probe", f"rtu://{missing}?baudrate=19200&unit=3&parity=E", "--json")
    assert r.code == 1
    doc = r.json
    assert doc["link"] == f"rtu:{missing}"
    assert doc["unit"] == 3
    assert doc["connect"]["ok"] is False


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("modbus://", "no host"),
        ("modbus://127.0.0.1:99999", "bad URL"),
        ("modbus://127.0.0.1?unit=300", "unit=300 is outside 0..255"),
        ("modbus://127.0.0.1?unit=x", "unit='x' is not an integer"),
        ("modbus://127.0.0.1?table=registers", "table='registers'"),
        ("modbus://127.0.0.1?table=holding_registers&count=126", "count=126 is outside 1..125"),
        ("modbus://127.0.0.1?address=65535&count=8", "goes past 65535"),
        ("modbus://127.0.0.1?unit=1&unit=2", "given 2 times"),
        ("modbus://127.0.0.1?speed=1", "unknown parameter 'speed'"),
        ("modbus://127.0.0.1/unit/1", "unexpected path"),
        ("rtu://host/dev/ttyUSB0", "as a path"),
        ("rtu:///dev/ttyUSB0?parity=X", "parity='X'"),
        ("rtu:///dev/ttyUSB0?unit=0", "unit=0 is outside 1..247"),
        ("http://127.0.0.1", "unknown scheme"),
        ("127.0.0.1:502", "unknown scheme"),
    ],
)
async def test_probe_bad_url_exits_2(capsys: pytest.CaptureFixture[str], url: str, message: str) -> None:
    r = await run(capsys, "probe", url)
    assert r.code == 2
    assert r.out == ""
    assert r.err.count("\n") == 1
    assert r.err.startswith("campus-gateway probe: ")
    assert message in r.err


def test_bad_option_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _main()(["probe", "modbus://127.0.0.1", "--timeout", "-1"])
    assert exc.value.code == 2
    assert "must be more than 0" in capsys.readouterr().err


# ---- probe onvif ----------------------------------------------------------------------------


async def test_probe_camera_table_with_password_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret = tmp_path / "cam.pw"
    secret.write_text(PASSWORD + "\n")
    async with OnvifCameraSimulator(user="tech", password=PASSWORD) as sim:
        r = await run(capsys, "probe", f"onvif://tech@127.0.0.1:{sim.port}", "--password-file", str(secret))
        assert sim.subscriptions() == []  # unsubscribed
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == f"probe onvif http://127.0.0.1:{sim.port} as tech"
    steps = {
        line.split()[0] + (" " + line.split()[1] if line.split()[1] in ("info", "uri") else ""): line
        for line in lines[2:-1]
    }
    assert list(steps) == [
        "connect",
        "device info",
        "profiles",
        "snapshot uri",
        "snapshot",
        "subscribe",
        "pull",
        "unsubscribe",
    ]
    assert all(" ok " in line for line in steps.values())
    assert "clock offset" in steps["connect"]
    assert "CampusSim SimCam 1" in steps["device info"]
    assert "prof1, prof2" in steps["profiles"]
    assert "JPEG 640x360" in steps["snapshot"]
    assert lines[-1] == "ok: every step answered"
    assert PASSWORD not in r.out + r.err


async def test_probe_camera_json_with_env_password_and_clock_skew(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(diagnose.PASSWORD_ENV, PASSWORD)
    async with OnvifCameraSimulator(password=PASSWORD) as sim:
        await sim.set_clock_skew(120)
        await sim.emit("tns1:VideoSource/MotionAlarm", data={"State": True})
        r = await run(capsys, "probe", f"onvif://admin@127.0.0.1:{sim.port}", "--json")
        assert sim.subscriptions() == []
    assert r.code == 0, r.err
    doc = r.json
    assert doc["ok"] is True
    assert [s["status"] for s in doc["steps"]] == ["ok"] * 8
    assert all(s["ms"] >= 0 for s in doc["steps"])
    info = doc["info"]
    assert 115 <= info["clock_offset"] <= 125
    assert info["manufacturer"] == "CampusSim"
    assert info["profiles"] == ["prof1", "prof2"]
    assert info["snapshot_uri"].endswith("/snapshot/prof1.jpg")
    assert info["snapshot_bytes"] > 1000
    assert info["messages"] == 1  # the motion alarm's last state, as a new subscription gets it


async def test_probe_camera_wrong_password_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(diagnose.PASSWORD_ENV, "not-the-password")
    async with OnvifCameraSimulator(password=PASSWORD) as sim:
        r = await run(capsys, "probe", f"onvif://admin@127.0.0.1:{sim.port}", "--json")
    assert r.code == 1
    steps = r.json["steps"]
    assert steps[0]["status"] == "failed"
    assert "authentication refused" in steps[0]["detail"]
    assert {s["status"] for s in steps[1:]} == {"skipped"}
    assert r.err.startswith("campus-gateway probe: connect: ")
    assert r.err.count("\n") == 1


async def test_probe_camera_closed_port_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(diagnose.PASSWORD_ENV, PASSWORD)
    r = await run(capsys, "probe", f"onvif://admin@127.0.0.1:{free_port()}", "--timeout", "2")
    assert r.code == 1
    assert "FAILED: connect, device info" in r.out


async def test_probe_camera_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = await run(capsys, "probe", "onvif://admin@127.0.0.1:8080")
    assert (r.code, r.out) == (2, "")
    assert f"no password: give --password-file FILE or set {diagnose.PASSWORD_ENV}" in r.err

    r = await run(capsys, "probe", "onvif://admin:hunter2@127.0.0.1:8080")
    assert (r.code, r.out) == (2, "")
    assert "never put the password in the URL" in r.err
    assert "hunter2" not in r.err

    r = await run(capsys, "probe", "onvif://admin@127.0.0.1", "--password-file", str(tmp_path / "none"))
    assert r.code == 2
    assert "--password-file" in r.err

    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = await run(capsys, "probe", "onvif://admin@127.0.0.1", "--password-file", str(empty))
    assert r.code == 2
    assert "the file is empty" in r.err

    r = await run(capsys, "probe", "modbus://127.0.0.1", "--password-file", str(empty))
    assert r.code == 2
    assert "--password-file is for onvif:// only" in r.err


# ---- discover onvif ------------------------------------------------------------------------

WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
WSD = "http://schemas.xmlsoap.org/ws/2005/04/discovery"


def probe_matches(relates_to: str, endpoint: str, xaddr: str, name: str, hardware: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="{WSA}" xmlns:d="{WSD}" '
        'xmlns:dn="http://www.onvif.org/ver10/network/wsdl">'
        f"<s:Header><a:MessageID>urn:uuid:{endpoint}-answer</a:MessageID>"
        f"<a:RelatesTo>{relates_to}</a:RelatesTo>"
        f"<a:Action>{WSD}/ProbeMatches</a:Action></s:Header>"
        "<s:Body><d:ProbeMatches><d:ProbeMatch>"
        f"<a:EndpointReference><a:Address>urn:uuid:{endpoint}</a:Address></a:EndpointReference>"
        "<d:Types>dn:NetworkVideoTransmitter</d:Types>"
        f"<d:Scopes>onvif://www.onvif.org/type/video_encoder onvif://www.onvif.org/name/{name} "
        f"onvif://www.onvif.org/hardware/{hardware} onvif://www.onvif.org/location/school</d:Scopes>"
        f"<d:XAddrs>{xaddr}</d:XAddrs><d:MetadataVersion>1</d:MetadataVersion>"
        "</d:ProbeMatch></d:ProbeMatches></s:Body></s:Envelope>"
    ).encode()


HOSTILE = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
    b"<Envelope><Body><ProbeMatches><ProbeMatch><XAddrs>&lol2;</XAddrs></ProbeMatch></ProbeMatches>"
    b"</Body></Envelope>"
)


class Responder(asyncio.DatagramProtocol):
    """A WS-Discovery responder on loopback: two cameras, plus an answer to another probe
    and a hostile datagram, which discover must ignore and refuse."""

    def __init__(self, *, answer: bool = True) -> None:
        self.answer = answer
        self.probes: list[tuple[str, str, str]] = []  # (message id, types, source address)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        root = ET.fromstring(data)
        mid = root.findtext(f".//{{{WSA}}}MessageID") or ""
        types = root.findtext(f".//{{{WSD}}}Types") or ""
        self.probes.append((mid, types, addr[0]))
        if not self.answer or self.transport is None:
            return
        send = self.transport.sendto
        send(HOSTILE, addr)
        send(probe_matches("urn:uuid:someone-else", "cam-x", "http://10.9.9.9/", "Other", "X"), addr)
        send(
            probe_matches(
                mid, "cam-1", "http://127.0.0.1:8001/onvif/device_service", "Main%20Gate", "SimCam-1"
            ),
            addr,
        )
        send(
            probe_matches(mid, "cam-2", "http://127.0.0.1:8002/onvif/device_service", "Gym", "SimCam-2"), addr
        )


async def responder(*, answer: bool = True) -> tuple[asyncio.DatagramTransport, Responder, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Responder(answer=answer), local_addr=("127.0.0.1", 0)
    )
    return transport, proto, int(transport.get_extra_info("sockname")[1])


async def test_discover_onvif_table(capsys: pytest.CaptureFixture[str]) -> None:
    transport, proto, port = await responder()
    try:
        r = await run(capsys, "discover", "onvif", "--target", f"127.0.0.1:{port}", "--timeout", "2")
    finally:
        transport.close()
    assert r.code == 0, r.err
    assert len(proto.probes) == 2  # sent twice, as SOAP-over-UDP repeats a multicast message
    (mid, types, _), again = proto.probes
    assert mid.startswith("urn:uuid:")
    assert again[0] == mid
    assert types == "dn:NetworkVideoTransmitter"
    lines = r.out.splitlines()
    assert lines[0] == f"discover onvif via unicast 127.0.0.1:{port}"
    assert lines[1].split() == ["FROM", "NAME", "HARDWARE", "XADDRS"]
    assert lines[2].split() == [
        "127.0.0.1",
        "Main",
        "Gate",
        "SimCam-1",
        "http://127.0.0.1:8001/onvif/device_service",
    ]
    assert lines[3].split() == ["127.0.0.1", "Gym", "SimCam-2", "http://127.0.0.1:8002/onvif/device_service"]
    assert "refused an answer from 127.0.0.1: unsafe XML (dtd)" in r.out
    assert lines[-1] == "2 camera(s) answered within 2 s"
    assert "Other" not in r.out  # answered someone else's probe


async def test_discover_onvif_json_from_an_interface(capsys: pytest.CaptureFixture[str]) -> None:
    transport, proto, port = await responder()
    try:
        r = await run(
            capsys,
            "discover",
            "onvif",
            "--target",
            f"127.0.0.1:{port}",
            "--interface",
            "127.0.0.1",
            "--timeout",
            "2",
            "--json",
        )
    finally:
        transport.close()
    assert r.code == 0, r.err
    doc = r.json
    assert doc["via"] == f"unicast 127.0.0.1:{port}"
    assert doc["interface"] == "127.0.0.1"
    cams = {c["endpoint"]: c for c in doc["cameras"]}
    assert list(cams) == ["urn:uuid:cam-1", "urn:uuid:cam-2"]  # each once, though answered twice
    cam = cams["urn:uuid:cam-1"]
    assert cam["name"] == "Main Gate"
    assert cam["hardware"] == "SimCam-1"
    assert cam["location"] == "school"
    assert cam["xaddrs"] == ["http://127.0.0.1:8001/onvif/device_service"]
    assert "onvif://www.onvif.org/type/video_encoder" in cam["scopes"]
    assert cam["types"] == ["dn:NetworkVideoTransmitter"]
    assert cam["from"] == "127.0.0.1"
    assert doc["refused"] == [{"from": "127.0.0.1", "reason": "dtd"}] * 2
    assert {src for _, _, src in proto.probes} == {"127.0.0.1"}


async def test_discover_onvif_nobody_answers_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    transport, proto, port = await responder(answer=False)
    try:
        started = time.monotonic()
        r = await run(capsys, "discover", "onvif", "--target", f"127.0.0.1:{port}", "--timeout", "0.3")
        elapsed = time.monotonic() - started
    finally:
        transport.close()
    assert r.code == 1
    assert len(proto.probes) == 2
    assert 0.3 <= elapsed < 2.0
    assert r.out.splitlines()[-1] == "FAILED: no camera answered within 0.3 s"
    assert r.err == "campus-gateway discover onvif: no camera answered within 0.3 s\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "camera.local:3702"], "give an IP address"),
        (["--target", "127.0.0.1"], "HOST:PORT"),
        (["--target", "127.0.0.1:0"], "port 1..65535"),
        (["--interface", "eth0"], "give this machine's IPv4 address"),
        (["--interface", "::1"], "give this machine's IPv4 address"),
        (["--interface", "192.0.2.77", "--target", "127.0.0.1:9"], "cannot send from it"),
    ],
)
async def test_discover_onvif_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    r = await run(capsys, "discover", "onvif", "--timeout", "0.2", *argv)
    assert (r.code, r.out) == (2, "")
    assert r.err.startswith("campus-gateway discover onvif: ")
    assert message in r.err


# ---- discover modbus ------------------------------------------------------------------------


async def test_discover_modbus_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    async with AlarmBoxSimulator(units=(1, 3), inputs=8) as sim, BollardSimulator(units=(4,)) as bollard:
        r = await run(
            capsys, "discover", "modbus", f"127.0.0.1:{sim.port}", "--units", "1-5", "--timeout", "3"
        )
        assert r.code == 0, r.err
        lines = r.out.splitlines()
        assert lines[0] == f"discover modbus tcp://127.0.0.1:{sim.port}: holding registers 0+1 on each unit"
        assert [line.split()[:2] for line in lines[2:4]] == [["1", "data"], ["3", "data"]]
        assert lines[-1].startswith("2 unit(s) answered of 5 scanned in ")
        assert lines[-1].endswith("0 silent, 3 reported absent by the gateway (exception 10/11)")

        r = await run(
            capsys,
            "discover",
            "modbus",
            f"modbus://127.0.0.1:{bollard.port}",
            "--units",
            "2,4",
            "--table",
            "coils",
            "--timeout",
            "3",
            "--json",
        )
    assert r.code == 0, r.err
    doc = r.json
    assert [(u["unit"], u["status"], u.get("exception_code")) for u in doc["answered"]] == [
        (4, "exception", 2)
    ]
    assert doc["gateway_no_target"] == [2]
    assert doc["silent"] == []
    assert doc["units_scanned"] == 2
    assert doc["ok"] is True


async def test_discover_modbus_silent_and_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    async with AlarmBoxSimulator(inputs=8) as sim:
        await sim.silent()
        r = await run(
            capsys,
            "discover",
            "modbus",
            f"127.0.0.1:{sim.port}",
            "--units",
            "1-3",
            "--timeout",
            "0.1",
            "--json",
        )
        assert r.code == 1
        assert r.json["silent"] == [1, 2, 3]
        assert r.err == f"campus-gateway discover modbus: no unit answered on tcp://127.0.0.1:{sim.port}\n"

        started = time.monotonic()
        r = await run(
            capsys,
            "discover",
            "modbus",
            f"127.0.0.1:{sim.port}",
            "--timeout",
            "0.1",
            "--max-time",
            "0.5",
            "--json",
        )
        elapsed = time.monotonic() - started
        requests = sim.requests()
    assert r.code == 1
    doc = r.json
    assert elapsed < 2.5
    assert 1 <= len(doc["silent"]) <= 5
    assert doc["not_scanned"][-1] == 247
    assert len(doc["silent"]) + len(doc["not_scanned"]) == 247
    assert requests == 3 + len(doc["silent"])  # one at a time, one read per unit


async def test_discover_modbus_closed_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    r = await run(capsys, "discover", "modbus", f"127.0.0.1:{port}", "--units", "1-10")
    assert r.code == 1
    assert f"error: cannot connect to tcp://127.0.0.1:{port}" in r.out
    assert "10 not scanned" in r.out
    assert r.err.startswith(f"campus-gateway discover modbus: cannot connect to tcp://127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["127.0.0.1", "--units", "1-300"], "unit ids are 0..255"),
        (["127.0.0.1", "--units", "5-1"], "ranges low-high"),
        (["127.0.0.1", "--units", "a"], "use e.g. 1-247"),
        (["127.0.0.1:70000"], "port 1..65535"),
        (["http://127.0.0.1:502"], "HOST[:PORT] or modbus://"),
        (["127.0.0.1", "--address", "70000"], "--address 70000"),
    ],
)
async def test_discover_modbus_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    r = await run(capsys, "discover", "modbus", *argv)
    assert (r.code, r.out) == (2, "")
    assert r.err.startswith("campus-gateway discover modbus: ")
    assert message in r.err


# ---- the command in a process of its own ----------------------------------------------------


async def test_probe_in_a_subprocess() -> None:
    module = "gateway.cli" if _wired_into_cli() else "gateway.diagnose"
    env = {k: v for k, v in os.environ.items() if k != diagnose.PASSWORD_ENV}
    async with AlarmBoxSimulator(inputs=8) as sim:
        await sim.press(0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "probe",
            f"modbus://127.0.0.1:{sim.port}?unit=1",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        bad = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "probe",
            "modbus://127.0.0.1?unit=999",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        bad_out, bad_err = await asyncio.wait_for(bad.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["reads"][0]["values"][0] == 1
    assert (bad.returncode, bad_out) == (2, b"")
    assert b"unit=999 is outside 0..255" in bad_err


def test_importing_diagnose_loads_no_driver() -> None:
    code = (
        "import sys, gateway.diagnose\n"
        "heavy = ('drivers', 'pymodbus', 'zeep', 'onvif', 'lxml')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in heavy]\n"
        "print(loaded)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

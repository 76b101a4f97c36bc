"""The systemd unit: it verifies, its sandbox scores <= 2.5 in `systemd-analyze security`, its
settings agree with the code (paths, exit codes), and the daemon runs under W^X.

systemd-analyze checks the unit as shipped, with ExecStart= pointing at this checkout's
``campus-gateway`` (verify insists that the executable exists), and with each shipped
drop-in. Skipped where systemd-analyze is missing, or older than 250 for ``--offline``.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gateway.cli import EXIT_CONFIG
from gateway.config import ApiConfig, GatewayConfig
from tests.support.broker import free_port
from tests.support.daemon import base_config

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "campus-gateway.service"
NAME = UNIT.name
INSTALLED_BIN = "/usr/local/bin/campus-gateway"
MAX_EXPOSURE = 2.5
ANALYZE_TIMEOUT = 60.0

# -- helpers -----------------------------------------------------------------------------------


def settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    out = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in settings(UNIT.read_text()) if s == section and k == key]


def value(key: str, section: str = "Service") -> str:
    found = values(key, section)
    assert len(found) == 1, f"{section}.{key}: {found}"
    return found[0]


def systemd_analyze(min_version: int = 0) -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    out = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT, check=False
    )
    match = re.match(r"systemd (\d+)", out.stdout)
    if match is None:
        pytest.skip(f"cannot tell the systemd version from {out.stdout[:80]!r}")
    if int(match.group(1)) < min_version:
        pytest.skip(f"systemd {match.group(1)} is older than {min_version}")
    return exe


def campus_gateway_bin() -> str:
    """An existing campus-gateway executable, for verify's ExecStart= check."""
    beside = Path(sys.executable).parent / "campus-gateway"
    found = str(beside) if beside.exists() else shutil.which("campus-gateway")
    if found is None:
        pytest.skip("no campus-gateway executable installed (pip install -e .)")
    return found


def stage(tmp_path: Path, drop_ins: dict[str, str] | None = None) -> Path:
    """The unit in tmp_path with ExecStart*= at an existing executable, and drop-ins beside it."""
    text = UNIT.read_text()
    assert INSTALLED_BIN in text
    unit = tmp_path / NAME
    unit.write_text(text.replace(INSTALLED_BIN, campus_gateway_bin()))
    if drop_ins:
        d = tmp_path / f"{NAME}.d"
        d.mkdir()
        for name, body in drop_ins.items():
            (d / name).write_text(body)
    return unit


def verify(unit: Path) -> list[str]:
    """Problems systemd-analyze verify reports about the staged files (warnings included:
    an unknown key is only a warning, and it still exits 0)."""
    exe = systemd_analyze()
    proc = subprocess.run(
        [exe, "verify", str(unit)], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT, check=False
    )
    output = (proc.stdout + proc.stderr).splitlines()
    ours = [line for line in output if str(unit.parent) in line or NAME in line]
    if proc.returncode != 0:
        ours.append(f"exit {proc.returncode}: {output}")
    return ours


def exposure(unit: Path) -> float:
    exe = systemd_analyze(min_version=250)  # --offline is new in 250
    proc = subprocess.run(
        [exe, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no overall exposure in:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


def serial_drop_in() -> dict[str, str]:
    return {"serial-ports.conf": (SYSTEMD / "serial-ports.conf").read_text()}


def credentials_drop_in() -> dict[str, str]:
    return {"credentials.conf": (SYSTEMD / "credentials.conf.example").read_text()}


# -- systemd-analyze ---------------------------------------------------------------------------


def test_unit_verifies(tmp_path: Path) -> None:
    assert verify(stage(tmp_path)) == []


@pytest.mark.parametrize("drop_in", [serial_drop_in, credentials_drop_in], ids=["serial", "credentials"])
def test_unit_verifies_with_each_shipped_drop_in(tmp_path: Path, drop_in: object) -> None:
    assert callable(drop_in)
    assert verify(stage(tmp_path, drop_in())) == []


def test_verify_would_catch_a_misspelt_setting(tmp_path: Path) -> None:
    # The check above means something: a typo in the sandbox is reported, not ignored.
    unit = stage(tmp_path, {"typo.conf": "[Service]\nPrivateDevice=yes\n"})
    problems = verify(unit)
    assert any("PrivateDevice" in p for p in problems), problems


def test_security_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    level = exposure(stage(tmp_path))
    print(f"systemd-analyze security --offline: overall exposure {level}")
    assert level <= MAX_EXPOSURE


def test_security_exposure_with_serial_ports_is_at_most_2_5(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "serial").mkdir()
    plain = exposure(stage(tmp_path / "plain"))
    serial = exposure(stage(tmp_path / "serial", serial_drop_in()))
    print(f"overall exposure {plain}, with serial ports {serial}")
    assert plain < serial <= MAX_EXPOSURE  # the drop-in is applied, and widens the sandbox a little


# -- what the unit says agrees with the code -----------------------------------------------------


def test_unit_runs_the_checked_config_as_a_notify_service_with_a_watchdog() -> None:
    start = value("ExecStart").split()
    pre = value("ExecStartPre").split()
    assert start[:2] == [INSTALLED_BIN, "run"]
    assert pre[:2] == [INSTALLED_BIN, "check-config"]
    assert pre[2] == start[start.index("--config") + 1]  # checks the file it runs
    assert start[start.index("--log-format") + 1] == "json"
    assert value("Type") == "notify"
    assert 10 <= int(value("WatchdogSec")) <= 120
    assert value("Restart") == "on-failure"
    assert value("RestartPreventExitStatus") == str(EXIT_CONFIG)
    assert int(value("StartLimitBurst", "Unit")) >= 3
    assert int(value("StartLimitIntervalSec", "Unit")) >= 10 * int(value("RestartSec"))


def test_unit_directories_match_the_config_defaults() -> None:
    api_socket = ApiConfig().socket
    assert api_socket is not None
    assert api_socket.parent == Path("/run") / value("RuntimeDirectory")
    state_dir = GatewayConfig.model_fields["state_dir"].default
    assert state_dir == Path("/var/lib") / value("StateDirectory")


def test_unit_sandbox_settings() -> None:
    expected = {
        "DynamicUser": "yes",
        "UMask": "0077",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    assert {k: value(k) for k in expected} == expected
    assert values("SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    assert value("SystemCallErrorNumber") == "EPERM"  # a filtered call fails; the daemon is not killed
    assert values("SupplementaryGroups") == []  # dialout only with the serial drop-in
    assert values("LoadCredential") == []  # site-specific: the credentials drop-in


# -- W^X: MemoryDenyWriteExecute=yes does not break the daemon ---------------------------------

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1

# Sets the kernel's MemoryDenyWriteExecute (Linux >= 6.3; inherited across fork and exec,
# and it refuses what systemd's seccomp filter refuses: W+X mappings, making memory
# executable later), then runs argv.
MDWE_EXEC = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""

# What the daemon loads that could want W+X memory: uvloop (libuv), OpenCV and numpy (the
# video checks), lxml and zeep (ONVIF), sqlite3 in WAL mode, OpenSSL.
EXERCISE = r"""
import asyncio, mmap, sqlite3, ssl, sys, tempfile
import numpy as np
import uvloop
import cv2
from drivers.onvif import video, xmlsafe
from lxml import etree

try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit("W+X memory was allowed: MDWE is not in force")

async def main():
    await asyncio.sleep(0.01)
    return asyncio.get_running_loop().__class__.__module__

assert uvloop.run(main()).startswith("uvloop")
frames = [np.random.default_rng(i).integers(0, 255, (480, 640, 3), dtype=np.uint8) for i in range(2)]
cfg = video.VideoCheckConfig()
prev = None
for f in frames:
    ok, jpeg = cv2.imencode(".jpg", f)
    assert ok
    prev = video.analyze(jpeg.tobytes(), prev, cfg)
xmlsafe.import_onvif()
etree.fromstring(b"<a><b>1</b></a>", etree.XMLParser(resolve_entities=False))
with tempfile.TemporaryDirectory() as d:
    db = sqlite3.connect(d + "/x.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
ssl.create_default_context()
print("exercised")
"""


def mdwe_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0)) >= 0  # -1 EINVAL before Linux 6.3


def under_mdwe(*argv: str) -> list[str]:
    if not mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux >= 6.3)")
    return [sys.executable, "-c", MDWE_EXEC, *argv]


def test_libraries_work_without_writable_executable_memory() -> None:
    pytest.importorskip("cv2")
    proc = subprocess.run(
        under_mdwe(sys.executable, "-c", EXERCISE),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("exercised")


@pytest.mark.slow
def test_daemon_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    uplink = {"name": "police", "endpoints": [f"mqtt://127.0.0.1:{free_port()}"]}
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path / "state", [uplink], [])))
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    log = (tmp_path / "daemon.log").open("wb")
    argv = under_mdwe(sys.executable, "-m", "gateway.cli", "run", "--config", str(cfg), "--loop", "uvloop")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        got: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(m.count("WATCHDOG=1") for m in got) < 3:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            sock.settimeout(0.2)
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
        assert any("READY=1" in m for m in got), got
        assert sum(m.count("WATCHDOG=1") for m in got) >= 3, got
        proc.terminate()
        assert proc.wait(timeout=15) == 0, (tmp_path / "daemon.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sock.close()
        log.close()

"""Log hygiene: one JSON object per line for every logger, and no secret in any line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from gateway import config, logs

POLICE_KEY = "k3y-" + "0123456789abcdef" * 3  # 52 characters, as `openssl rand -hex` would give
UPLINK_PASSWORD = "Br0ker-pa55word!"
CAMERA_PASSWORD = "cam-Gate-9931"


@contextlib.contextmanager
def configured(level: str = "info") -> Iterator[io.StringIO]:
    """logs.configure() into a buffer; the root logger, library levels and structlog restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_libs = {
        name: (lg.level, lg.handlers[:], lg.propagate)
        for name in logs.LIBRARY_LEVELS
        for lg in [logging.getLogger(name)]
    }
    saved_structlog = structlog.get_config()
    buf = io.StringIO()
    try:
        logs.configure(level, "json", buf)
        yield buf
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, (lvl, handlers, propagate) in saved_libs.items():
            lg = logging.getLogger(name)
            lg.setLevel(lvl)
            lg.handlers[:] = handlers
            lg.propagate = propagate
        structlog.configure(**saved_structlog)
        logs.clear_secrets()


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    """Every line parsed as JSON: a line that is not one JSON object fails the test."""
    out = []
    for line in buf.getvalue().splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        out.append(obj)
    return out


def fail_auth(password: str) -> None:
    raise ValueError(f"auth failed for {password}")


@pytest.fixture
def secret_config(tmp_path: Path) -> config.GatewayConfig:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "police.pw").write_text(UPLINK_PASSWORD + "\n")
    (tmp_path / "keys" / "police.key").write_text(POLICE_KEY + "\n")
    (tmp_path / "keys" / "cam.pw").write_text(CAMERA_PASSWORD + "\n")
    data = {
        "identity": {"school": "s1", "gateway": "g1", "region": "530102"},
        "state_dir": "state",
        "api": {"socket": None},
        "uplinks": [
            {
                "name": "police",
                "endpoints": ["mqtt://127.0.0.1:1883"],
                "username": "gw-1",
                "password_file": "keys/police.pw",
                "commands": {"key_file": "keys/police.key", "allow": ["gateway.self_test"]},
            }
        ],
        "devices": [
            {
                "id": "cam-gate",
                "driver": "onvif_camera",
                "host": "127.0.0.1",
                "port": 8080,
                "password_file": "keys/cam.pw",
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load(path)


def test_secret_files_named_by_the_config_are_all_found(secret_config: config.GatewayConfig) -> None:
    names = sorted(p.name for p in logs.secret_files(secret_config))
    assert names == ["cam.pw", "police.key", "police.pw"]


def test_secrets_logged_by_mistake_never_reach_the_json_output(secret_config: config.GatewayConfig) -> None:
    uplink = secret_config.uplinks[0]
    password = uplink.read_password()
    key = uplink.commands.read_key()
    assert password is not None
    assert key is not None
    pw = password.get_secret_value()
    assert pw == UPLINK_PASSWORD  # what the daemon really uses, read from the password_file
    assert key.decode() == POLICE_KEY

    with configured() as buf:
        assert logs.register_config_secrets(secret_config) == 3
        log = structlog.get_logger("gateway.test")
        # The mistakes: a secret under a secret-looking key, inside strings, nested, as
        # bytes, in the message itself, in an exception (traceback), and from a library.
        log.info("connecting", password=pw, username="gw-1")
        log.info("x", detail=f"user gw-1 password {pw} rejected by broker")
        log.warning("bad command", note=f"verified with {key.decode()}", raw=key, key_file="keys/police.key")
        log.info(f"camera login {CAMERA_PASSWORD} failed")  # noqa: G004 - the mistake under test
        log.info("nested", data={"cfg": {"passphrase": "whatever", "url": f"rtsp://admin:{pw}@cam"}})
        log.info("listed", items=[f"a {key.decode()} b", ("t", pw)])
        try:
            fail_auth(pw)
        except ValueError:
            log.exception("boom")
        logging.getLogger("paho.mqtt.client").warning("CONNECT with password %s", pw)
        log.info("headers", Authorization="Bearer abc.def", apiKey="unregistered-value", sig="c2ln")

    text = buf.getvalue()
    records = lines(buf)
    assert len(records) == 9  # nothing was dropped on the way
    for secret in (UPLINK_PASSWORD, POLICE_KEY, CAMERA_PASSWORD, "abc.def", "unregistered-value", "c2ln"):
        assert secret not in text
    by_event = {r["event"]: r for r in records}
    assert by_event["connecting"]["password"] == logs.REDACTED
    assert by_event["connecting"]["username"] == "gw-1"  # context that is no secret stays
    assert by_event["x"]["detail"] == "user gw-1 password [redacted] rejected by broker"
    assert by_event["bad command"]["note"] == "verified with [redacted]"
    assert by_event["bad command"]["raw"] == logs.REDACTED
    assert by_event["bad command"]["key_file"] == "keys/police.key"  # a path, not the key
    assert "camera login [redacted] failed" in by_event
    assert by_event["nested"]["data"]["cfg"]["url"] == "rtsp://admin:[redacted]@cam"
    assert by_event["nested"]["data"]["cfg"]["passphrase"] == logs.REDACTED
    assert by_event["listed"]["items"] == ["a [redacted] b", ["t", "[redacted]"]]
    assert "ValueError: auth failed for [redacted]" in by_event["boom"]["exception"]
    assert by_event["CONNECT with password [redacted]"]["logger"] == "paho.mqtt.client"
    assert by_event["headers"]["Authorization"] == logs.REDACTED
    assert by_event["headers"]["apiKey"] == logs.REDACTED
    assert by_event["headers"]["sig"] == logs.REDACTED


def test_library_warnings_are_json_lines_with_logger_and_level() -> None:
    with configured() as buf:
        logging.getLogger("aiohttp.client").warning("Unclosed connection to %s", "10.0.0.5")
        logging.getLogger("aiohttp.access").info("GET /onvif/device_service 200")  # below WARNING
        logging.getLogger("zeep.wsdl").info("loading WSDL")
        logging.getLogger("pymodbus.logging").warning("reconnect attempt 7")  # pymodbus: ERROR only
        logging.getLogger("pymodbus.logging").error("Modbus frame garbled")
        logging.getLogger("onvif").error("subscription renew failed")
    records = lines(buf)
    assert [(r["logger"], r["level"], r["event"]) for r in records] == [
        ("aiohttp.client", "warning", "Unclosed connection to 10.0.0.5"),
        ("pymodbus.logging", "error", "Modbus frame garbled"),
        ("onvif", "error", "subscription renew failed"),
    ]
    for r in records:
        assert r["timestamp"].endswith("Z")


def test_a_handler_a_library_installed_is_removed() -> None:
    stray = io.StringIO()
    logging.getLogger("zeep").addHandler(logging.StreamHandler(stray))
    with configured() as buf:
        logging.getLogger("zeep.transports").warning("plain text line")
    assert stray.getvalue() == ""
    assert [r["event"] for r in lines(buf)] == ["plain text line"]


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("db_password", True),
        ("passwd", True),
        ("api_key", True),
        ("apiKey", True),
        ("X-Auth-Token", True),
        ("authorization", True),
        ("sig", True),
        ("signature", True),
        ("credentials", True),
        ("client_secret", True),
        ("key_file", False),
        ("password_file", False),
        ("token_len", False),
        ("key_id", False),
        ("signal", False),
        ("keepalive", False),
        ("monkey", False),
        ("design", False),
        ("event", False),
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    assert logs.is_secret_key(key) is secret


def test_short_values_are_not_masked_inside_strings() -> None:
    with configured() as buf:
        logs.register_secret("ab")  # would mask every "ab" in every line
        logs.register_secret(b"\xff\xfe-not-utf8")  # not text: cannot appear in a str
        structlog.get_logger("t").info("about tabs", n=1)
    assert lines(buf)[0]["event"] == "about tabs"


def test_multi_line_secrets_are_masked_line_by_line(tmp_path: Path) -> None:
    pem = (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
        "BKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n"
    )
    (tmp_path / "tls.key").write_text(pem)
    with configured() as buf:
        logs.register_secret_file(tmp_path / "tls.key")
        logs.register_secret_file(tmp_path / "missing.key")  # skipped, not raised
        structlog.get_logger("t").warning("ssl", detail="bad line MIIEvQIBADANBgkqhkiG9w0BAQEFAASC here")
    assert lines(buf)[0]["detail"] == "bad line [redacted] here"

"""Config loading: the example passes; a dozen broken configs each give one located error, exit 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from gateway import config
from gateway.cli import main
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "example.yaml"


def test_example_config_passes_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out
    assert "2 uplink(s)" in out


def test_example_parses_into_frozen_models() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.identity.region == "530102"
    assert [u.name for u in cfg.uplinks] == ["police", "education"]
    assert cfg.uplinks[0].endpoints[0].port == 1883
    with pytest.raises(Exception, match="frozen"):
        cfg.identity.school = "x"  # type: ignore[misc]


BASE = {
    "identity": {"school": "s1", "gateway": "g1", "region": "530102"},
    "state_dir": "state",
    "uplinks": [{"name": "police", "endpoints": ["mqtt://127.0.0.1:1883"]}],
    "devices": [
        {"id": "box1", "driver": "modbus_alarm", "host": "127.0.0.1", "port": 1502, "profile": "generic-8di"}
    ],
}


def _mutate(path: str, value: object) -> dict[str, object]:
    """Copy BASE and set ``path`` (dotted, [i] for list items) to ``value``; None as value deletes."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    parts = path.replace("[", ".").replace("]", "").split(".")
    node = data
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last = parts[-1]
    key: int | str = int(last) if last.isdigit() else last
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value
    return data  # type: ignore[no-any-return]


_DELETE = object()

BROKEN = [
    ("identity.schol", "x", "identity.schol: unknown key"),
    ("identity.school", _DELETE, "identity.school: required"),
    ("identity.region", "5301", "identity.region: Value error, must be a 6-digit"),
    ("identity.gateway", "gw/1", "identity.gateway: String should match pattern"),
    (
        "uplinks[0].endpoints",
        ["http://x:1"],
        "uplinks[0].endpoints: Value error, 'http://x:1': scheme must be",
    ),
    ("uplinks[0].endpoints", ["mqtt://h:99999"], "uplinks[0].endpoints: Value error, 'mqtt://h:99999'"),
    ("uplinks[0].keepalive", 0, "uplinks[0].keepalive: Input should be greater than or equal to 1"),
    ("uplinks[0].route", {"min_severity": "loud"}, "uplinks[0].route.min_severity: Input should be"),
    ("uplinks[0].topic_prefix", "campus/#", "uplinks[0].topic_prefix: Value error, no wildcards"),
    ("uplinks[0].password_file", "nope.txt", "uplinks[0].password_file: no such file"),
    ("uplinks", [], "uplinks: Tuple should have at least 1 item"),
    ("devices[0].driver", "teleporter", "devices[0].driver: unknown driver 'teleporter'"),
    ("devices[0].port", "http", "devices[0].port: Input should be a valid integer"),
    ("devices[0].colour", "red", "devices[0].colour: unknown key"),
    ("devices[0].profile", "no-such-profile", "devices[0].profile:"),
    (
        "devices[0].poll_interval",
        0.001,
        "devices[0].poll_interval: Input should be greater than or equal to 0.05",
    ),
    (
        "uplinks[0].commands",
        {"allow": ["bollard.raise"]},
        "uplinks[0].commands: Value error, allow needs key_file",
    ),
    (
        "uplinks[0].commands",
        {"allow": ["bollard.fly"]},
        "uplinks[0].commands.allow: Value error, unknown command 'bollard.fly'; known: alarm.ack, alarm.",
    ),
    ("uplinks[0].commands", {"key_file": "nope.key"}, "uplinks[0].commands.key_file: no such file"),
    (
        "uplinks[0].commands",
        {"skew_past": -1},
        "uplinks[0].commands.skew_past: Input should be greater than or equal to 0",
    ),
    ("uplinks[0].commands", {"max_bytes": 100}, "uplinks[0].commands.max_bytes: Input should be greater"),
    ("uplinks[0].commands", {"secret": "x"}, "uplinks[0].commands.secret: unknown key"),
    (
        "uplinks[0].platform",
        {"presence_topic": "platform/police/state"},
        "uplinks[0]: Value error, platform.ack_types needs commands.allow to include alarm.ack",
    ),
    (
        "uplinks[0].platform",
        {"presence_topic": "platform/+/state", "ack_types": []},
        "uplinks[0].platform.presence_topic: Value error, a topic name without wildcards",
    ),
    (
        "uplinks[0].platform",
        {"ack_types": ["camera.motion"]},
        "uplinks[0].platform.ack_types: Value error, 'camera.motion': ack_types are alarm types",
    ),
    (
        "uplinks[0].platform",
        {"ack_types": [], "renotify_interval": 0.1},
        "uplinks[0].platform.renotify_interval: Input should be greater than or equal to 0.5",
    ),
    ("uplinks[0].platform", {"ack_types": [], "presence": "x"}, "uplinks[0].platform.presence: unknown key"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BROKEN, ids=[b[0] + "=" + repr(b[1]) for b in BROKEN])
def test_broken_config_gives_located_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, value: object, expected: str
) -> None:
    file = tmp_path / "gw.yaml"
    file.write_text(yaml.safe_dump(_mutate(path, value)))
    assert main(["check-config", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"{file}: {expected}" in err, err


def test_duplicate_device_ids_and_uplink_names(tmp_path: Path) -> None:
    data = _mutate("devices", [BASE["devices"][0], {**BASE["devices"][0], "port": 1503}])  # type: ignore[index]
    data["uplinks"] = [BASE["uplinks"][0], BASE["uplinks"][0]]  # type: ignore[index]
    file = tmp_path / "gw.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        config.load(file)
    text = info.value.render()
    assert "devices[1].id: duplicate device id 'box1' (also devices[0])" in text
    assert "uplinks[1].name: duplicate uplink name 'police'" in text


def test_region_placeholder_needs_region(tmp_path: Path) -> None:
    file = tmp_path / "gw.yaml"
    file.write_text(yaml.safe_dump(_mutate("identity.region", _DELETE)))
    with pytest.raises(ConfigError, match=r"uplinks\[0\]\.topic_prefix: uses \{region\}"):
        config.load(file)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("identity: [unclosed\n", "line 2 column 1: invalid YAML"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("", "the top level must be a mapping"),
    ],
)
def test_unparseable_files(tmp_path: Path, text: str, expected: str) -> None:
    file = tmp_path / "gw.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        config.load(file)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.yaml")


def test_cli_exit_code_2_in_a_subprocess(tmp_path: Path) -> None:
    file = tmp_path / "gw.yaml"
    file.write_text(textwrap.dedent("identity: {school: s}\n"))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert f"{file}: identity.gateway: required" in proc.stderr
    assert f"{file}: uplinks: required" in proc.stderr


def test_short_command_key_is_a_located_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "police.key").write_text("  short-key \n")
    file = tmp_path / "gw.yaml"
    file.write_text(yaml.safe_dump(_mutate("uplinks[0].commands", {"key_file": "police.key"})))
    assert main(["check-config", str(file)]) == 2
    err = capsys.readouterr().err
    expected = (
        f"{file}: uplinks[0].commands.key_file: {tmp_path / 'police.key'}: the command key is 9 bytes "
        "after stripping whitespace; at least 32 are needed"
    )
    assert expected in err, err


def test_example_police_commands_with_a_key(tmp_path: Path) -> None:
    """The police block the example's comments describe is valid once its key file exists."""
    key = tmp_path / "police-commands.key"
    key.write_text("0123456789abcdef" * 4 + "\n")
    data = yaml.safe_load(EXAMPLE.read_text())
    assert data["uplinks"][0]["commands"]["key_file"] is None  # the example ships without a key
    data["uplinks"][0]["commands"]["key_file"] = str(key)
    data["uplinks"][0]["commands"]["allow"] = [
        "bollard.raise",
        "bollard.emergency_raise",
        "bollard.lower",
        "alarm.reset",
        "alarm.ack",
    ]
    cfg = config.parse(data, str(EXAMPLE), base_dir=EXAMPLE.parent)
    police, education = cfg.uplinks
    assert police.commands.read_key() == b"0123456789abcdef" * 4
    assert "bollard.emergency_raise" in police.commands.allow
    assert (police.commands.skew_past, police.commands.skew_future, police.commands.max_ttl) == (40, 20, 300)
    assert education.commands.key_file is None
    assert education.commands.allow == ()

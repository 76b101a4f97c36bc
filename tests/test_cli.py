"""The CLI's own surface: every subcommand has --help, and bash completion knows them all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser, main

COMMANDS = [
    "run", "check-config", "sign-command", "status", "devices", "uplinks", "outbox", "events",
    "test-alarm", "reset", "completion", "probe", "discover", "demo", "sim",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: campus-gateway" in capsys.readouterr().out


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["devices", "--no-such-option"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completion_completes_commands_and_options() -> None:
    script = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "completion", "bash"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    probe = (
        script
        + '\nCOMP_WORDS=(campus-gateway dev); COMP_CWORD=1; _campus_gateway; echo "${COMPREPLY[@]}"'
        + '\nCOMP_WORDS=(campus-gateway events --fo); COMP_CWORD=2; _campus_gateway; echo "${COMPREPLY[@]}"'
        + '\nCOMP_WORDS=(campus-gateway sim bo); COMP_CWORD=2; _campus_gateway; echo "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        ["bash", "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["devices", "--follow", "bollard"]
    parser = build_parser(["demo", "sim"])
    assert "demo" in parser.format_help()


def test_a_bad_config_for_the_socket_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.yaml").write_text("identity: [")
    assert main(["status", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML" in err
    assert "Traceback" not in err
    assert main(["devices", "--config", str(tmp_path / "missing.yaml")]) == 2

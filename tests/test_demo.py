"""``campus-gateway demo``: a newcomer sees the whole alarm round trip with nothing set up.

The demo runs its embedded broker, the simulated school, the gateway and the reference
console as the police platform (auto-ack): the button, the alarm at the police, the
signed acknowledgement, and the box's ack output lit.
"""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_shows_button_alarm_ack_and_the_lit_led() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "9", "--boxes", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    def first(pattern: str) -> int:
        for i, line in enumerate(lines):
            if re.search(pattern, line):
                return i
        raise AssertionError(f"no line matching {pattern!r} in:\n{done.stdout}")

    pressed = first(r">>> Panic button pressed")
    alarm = first(r"police .*ALARM .*box-1 .*alarm\.panic active")
    ack_sent = first(r"police .*ack sent for")
    ack_done = first(r"police .*ack DONE for")
    lit = first(r">>> box-1's ack LED is lit")
    assert pressed < alarm < ack_sent < ack_done < lit
    assert re.search(r"education\s+alarm\.panic\s+active", done.stdout)  # the other platform too
    assert "stopped:" in done.stdout
    assert "demo stopped" in done.stdout

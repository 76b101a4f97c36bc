"""The one backoff policy shared by MQTT, Modbus and ONVIF reconnects: capped, jittered."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff with "full jitter" around the midpoint, capped.

    ``initial``: first delay; short, because most outages on a school LAN are a
    switch port flapping or a PLC rebooting. ``cap``: the longest wait; an alarm
    box must be re-reached within seconds, not pymodbus' default 300 s.
    """

    initial: float = 0.2
    cap: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5  # +-50 %: spreads reconnect storms after a switch reboot
    _attempt: int = field(default=0, init=False)
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; grows with every call until :meth:`reset`."""
        base = min(self.cap, self.initial * (self.factor**self._attempt))
        self._attempt = min(self._attempt + 1, 64)
        spread = base * self.jitter
        return max(0.0, min(self.cap, base + self._rng.uniform(-spread, spread)))

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt

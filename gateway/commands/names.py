"""The command names the gateway knows, defined once (config validation, verifier, CLI)."""

from __future__ import annotations

from typing import Final

KNOWN_COMMANDS: Final[frozenset[str]] = frozenset(
    {
        "bollard.raise",  # raise the anti-ram bollards / road blocker at a gate
        "bollard.lower",  # lower them (let a vehicle through)
        "bollard.emergency_raise",  # lockdown: the controller's fast emergency raise
        "alarm.reset",  # reset a latched alarm (the rules: latched until reset by a person)
        "alarm.ack",  # the platform has seen a critical alarm; stops its re-publication
        "gateway.self_test",  # run the gateway's self test and report
    }
)

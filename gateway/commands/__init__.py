"""The platform command channel, MQTT-free: signing, verification, the replay cache, replies.

``names`` and ``signing`` are stdlib-only leaves (config and the CLI import them);
``verify``, ``replay`` and ``reply`` are imported where the channel is wired.
"""

from gateway.commands.names import KNOWN_COMMANDS

__all__ = ["KNOWN_COMMANDS"]

"""The console's options: what a :class:`~gateway.console.core.Console` is built from.

:class:`ConsoleOptions` (validated on construction), the broker URL it names
(:class:`BrokerUrl`), the MQTT topic checks behind them, the TLS context for ``mqtts://``,
:class:`UsageError` for anything bad in them (the CLI exits 2 on it), and the record and
sink types every outcome of a console goes to.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

DEFAULT_TOPICS: Final = ("campus/#",)
DEFAULT_PLATFORM: Final = "police"

# Timing. A repeat of an alarm we acknowledged less than 5 s ago may have crossed our ack
# on the wire (published before the gateway processed it): no sign of a lost ack. Later
# than that, the ack or its effect got lost, so a fresh one is sent.
ACK_RETRY_AFTER: Final = 5.0
# 10 s keepalive: a silently lost broker is noticed within 15 s (1.5 x keepalive, gateway.mqtt),
# a killed one at once (EOF); a ping every 10 s costs nothing.
KEEPALIVE: Final = 10.0
# TCP + TLS + CONNACK within 5 s on any working link; SUBACK gets the same budget.
CONNECT_TIMEOUT: Final = 5.0

_PLATFORM = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")

Record = dict[str, Any]
Sink = Callable[[Record], None]


class UsageError(ValueError):
    """A bad option, URL or file: the CLI prints it and exits 2."""


@dataclass(frozen=True)
class BrokerUrl:
    """``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883, TLS)."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        """Strict: scheme, host and port only. Raises :class:`UsageError` saying what is wrong."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"--broker {url!r}: {exc}") from exc
        if parts.username is not None or parts.password is not None:
            # The URL is not echoed: it holds a password.
            raise UsageError("--broker: no credentials in the URL; use --username and --password-file")
        if parts.scheme not in ("mqtt", "mqtts"):
            raise UsageError(f"--broker {url!r}: the scheme must be mqtt:// or mqtts://")
        if not parts.hostname or not _HOST.fullmatch(parts.hostname):
            raise UsageError(f"--broker {url!r}: no valid host (e.g. mqtt://127.0.0.1:1883)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise UsageError(f"--broker {url!r}: nothing may follow host:port")
        if port == 0:
            raise UsageError(f"--broker {url!r}: port 0")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def valid_filter(topic_filter: str) -> bool:
    """An MQTT topic filter: ``+`` and ``#`` only as whole levels, ``#`` only last."""
    if not topic_filter or "\x00" in topic_filter or len(topic_filter.encode()) > 65_535:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return False
        elif level != "+" and ("#" in level or "+" in level):
            return False
    return True


def valid_topic_name(topic: str) -> bool:
    """A topic to publish on: non-empty, no wildcards, no NUL."""
    return bool(topic) and not any(c in topic for c in "#+\x00") and len(topic.encode()) <= 65_535


@dataclass(frozen=True)
class ConsoleOptions:
    """Everything a :class:`Console` needs; files are already read (``password``, ``key``).

    ``presence_topic`` and ``client_id`` default (empty) to ``campus-platform/{platform}/state``
    and ``campus-console-{platform}``. ``key``: the uplink's command key; None shows alarms
    without acknowledging them. ``input_fd``: where the operator types (a tty or a pipe);
    None reads nothing. ``duration``: stop after that many seconds. Raises
    :class:`UsageError` when a value is invalid.
    """

    broker: BrokerUrl
    topics: tuple[str, ...] = DEFAULT_TOPICS
    platform: str = DEFAULT_PLATFORM
    presence_topic: str = ""
    client_id: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    key: bytes | None = field(default=None, repr=False)
    auto_ack: bool = False
    input_fd: int | None = None
    duration: float | None = None
    ack_retry_after: float = ACK_RETRY_AFTER
    keepalive: float = KEEPALIVE
    connect_timeout: float = CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        if not _PLATFORM.fullmatch(self.platform):
            raise UsageError(f"--platform {self.platform!r}: 1-64 of [A-Za-z0-9_.-]")
        if not self.presence_topic:
            object.__setattr__(self, "presence_topic", f"campus-platform/{self.platform}/state")
        if not self.client_id:
            object.__setattr__(self, "client_id", f"campus-console-{self.platform}")
        if not self.topics:
            raise UsageError("at least one --topic is needed")
        for topic in self.topics:
            if not valid_filter(topic):
                raise UsageError(f"--topic {topic!r}: not a topic filter (+ and # only as whole levels)")
        if not valid_topic_name(self.presence_topic):
            raise UsageError(f"--presence-topic {self.presence_topic!r}: a topic name without + # NUL")
        if len(self.client_id) > 256 or "\x00" in self.client_id:
            raise UsageError("--client-id: 1-256 characters")
        self._check_numbers()
        if self.password is not None and self.username is None:
            raise UsageError("--password-file needs --username")
        if self.ca_file is not None and not self.broker.tls:
            raise UsageError("--ca-file needs an mqtts:// broker URL")
        if self.auto_ack and self.key is None:
            raise UsageError("--auto-ack needs --key-file (acknowledgements are signed)")

    def _check_numbers(self) -> None:
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise UsageError(f"--duration {self.duration}: a positive number of seconds")
        if not (math.isfinite(self.ack_retry_after) and self.ack_retry_after >= 0):
            raise UsageError("ack_retry_after: a number of seconds, not negative")
        if not (self.keepalive >= 1 and self.connect_timeout > 0):
            raise UsageError("keepalive (>= 1 s) and connect_timeout (> 0 s) must be positive")


def tls_context(options: ConsoleOptions) -> ssl.SSLContext | None:
    """The default TLS context (system CAs, or ``ca_file``) for mqtts://, else None."""
    if not options.broker.tls:
        return None
    cafile = str(options.ca_file) if options.ca_file is not None else None
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # a missing or unreadable file, or not PEM (ssl.SSLError)
        raise UsageError(f"--ca-file {options.ca_file}: {exc.strerror or exc}") from exc

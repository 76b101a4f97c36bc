"""structlog configured in one place: JSON lines for journald, a console renderer on a TTY.

Standard-library loggers (pymodbus, paho, amqtt, asyncio) are routed through the
same processors so every line has one shape.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import structlog

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Configure structlog and the stdlib root logger. ``fmt``: json, console or auto (TTY)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True) if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or (sys.stderr if use_console else sys.stdout))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries are chatty at INFO (amqtt logs every client). pymodbus warns on every
    # reconnect attempt to a dead box; the hub already logs each outage once, so ERROR.
    for noisy in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pymodbus").setLevel(logging.ERROR)


class RateLimited:
    """Log a repeated condition once, then at most once per ``interval`` with a count."""

    # 60 s: a persistent fault shows in the journal once a minute, not ten times a second.
    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def should_log(self, key: str) -> int | None:
        """None: stay quiet. Otherwise the number of occurrences suppressed since the last line."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)

    def clear(self, key: str) -> None:
        self._last.pop(key, None)
        self._suppressed.pop(key, None)

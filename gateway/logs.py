"""structlog configured in one place: JSON lines for journald, a console renderer on a TTY.

Standard-library loggers (pymodbus, paho, zeep, onvif, aiohttp, amqtt, asyncio) go through
one root handler with structlog's formatter, so every line on stdout is one JSON object
of the same shape (``event``, ``level``, ``logger``, ``timestamp``).

Secrets never reach the output (docs/THREAT-MODEL.md, "Redaction"): the last processor
before rendering, :func:`redact`, replaces

* the value of any key named like a secret (``password``, ``api_key``, ``token``,
  ``sig``, ``authorization``...; see :func:`is_secret_key`) with ``[redacted]``, and
* every occurrence of a registered secret value (:func:`register_secret`; the daemon
  registers the contents of every secret file its config names with
  :func:`register_config_secrets`) inside any string, also in messages, nested
  values, exception text and tracebacks.

It runs for structlog and stdlib records alike, after tracebacks are formatted.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Final

import structlog

REDACTED: Final = "[redacted]"
# A registered secret shorter than this is not masked inside strings (it would mask
# ordinary words and numbers everywhere); key-based redaction still applies. Command keys
# are at least 32 bytes and tokens 16 characters; passwords this short are refused by no
# one, so the operator guide asks for longer ones.
MIN_SECRET_LEN: Final = 4
# Nested values (dicts of dicts in a log call) are walked this deep; deeper ones are
# rendered as a placeholder rather than walked without bound.
MAX_DEPTH: Final = 8

# Words that make a key secret, matched against the key's words (split on anything that is
# not a letter or digit, and on camelCase humps): "password", "db_password", "apiKey",
# "X-Auth-Token", "sig".
_SECRET_WORDS: Final = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "tokens",
        "key",
        "keys",
        "apikey",
        "sig",
        "signature",
        "authorization",
        "auth",
        "credential",
        "credentials",
        "cookie",
    }
)
# ...unless the key's last word says the value is about the secret, not the secret:
# "key_file" is a path an operator needs to see, "token_len" a number.
_ABOUT_WORDS: Final = frozenset(
    {"file", "path", "dir", "id", "len", "length", "bytes", "count", "age", "name"}
)
_WORD_SPLIT: Final = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")

# stdlib loggers of the libraries: chatty at INFO (amqtt logs every client, zeep every
# WSDL load, aiohttp every access); their warnings and errors still come through.
# pymodbus warns on every reconnect attempt to a dead box; the hub already logs each
# outage once (drivers/errorlog.py), so ERROR.
LIBRARY_LEVELS: Final[Mapping[str, int]] = {
    "amqtt": logging.WARNING,
    "transitions": logging.WARNING,
    "asyncio": logging.WARNING,
    "paho": logging.WARNING,
    "zeep": logging.WARNING,
    "onvif": logging.WARNING,
    "aiohttp": logging.WARNING,
    "urllib3": logging.WARNING,
    "httpx": logging.WARNING,
    "pymodbus": logging.ERROR,
}


class _Secrets:
    """The registered secret values, as one regex (longest first), swapped atomically."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        value = value.strip()
        if len(value) < MIN_SECRET_LEN:
            return
        with self._lock:
            if value in self._values:
                return
            self._values.add(value)
            ordered = sorted(self._values, key=len, reverse=True)
            self.pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self.pattern = None


_secrets = _Secrets()


def register_secret(value: str | bytes | None) -> None:
    """Mask ``value`` wherever it appears in a log line from now on (process-wide).

    Surrounding whitespace is stripped (secret files end with a newline); bytes are
    decoded as UTF-8 (undecodable bytes are not masked inside strings).
    """
    if value is None:
        return
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return
    _secrets.add(value)
    # A multi-line secret (a PEM key) is also masked line by line: a traceback or a
    # library message may quote one line of it.
    if "\n" in value.strip():
        for line in value.splitlines():
            _secrets.add(line)


def register_secret_file(path: Path | None) -> None:
    """Register the contents of a secret file; an unreadable file is skipped silently
    (the config check reports it, and what cannot be read cannot be logged)."""
    if path is None:
        return
    try:
        data = Path(path).read_bytes()
    except OSError:
        return
    register_secret(data)


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    _secrets.clear()


def secret_files(cfg: Any) -> list[Path]:
    """Every secret file a gateway config names: uplink ``password_file``,
    ``commands.key_file`` and ``tls.key_file``, ``api.token_file``, and every device field
    named like a secret file (``password_file``, ``*_key_file``, ``token_file``...)."""
    out: list[Path] = []

    def add(value: Any) -> None:
        if isinstance(value, Path):
            out.append(value)

    for up in getattr(cfg, "uplinks", ()):
        add(getattr(up, "password_file", None))
        add(getattr(getattr(up, "commands", None), "key_file", None))
        add(getattr(getattr(up, "tls", None), "key_file", None))
    add(getattr(getattr(cfg, "api", None), "token_file", None))
    for dev in getattr(cfg, "devices", ()):
        fields = getattr(type(dev), "model_fields", {})
        for name in fields:
            if name.endswith("_file") and is_secret_key(name.removesuffix("_file")):
                add(getattr(dev, name, None))
    return out


def register_config_secrets(cfg: Any) -> int:
    """Register the contents of every secret file ``cfg`` names (:func:`secret_files`).

    Call it right after the config is loaded, before anything logs. Returns the number
    of files named.
    """
    files = secret_files(cfg)
    for path in files:
        register_secret_file(path)
    return len(files)


def is_secret_key(key: str) -> bool:
    """Whether an event-dict key names a secret value (see the module docstring)."""
    words = [w.lower() for w in _WORD_SPLIT.split(key) if w]
    if not words or (len(words) > 1 and words[-1] in _ABOUT_WORDS):
        return False
    return any(w in _SECRET_WORDS or w.endswith(("password", "passwd", "secret", "token")) for w in words)


def _mask(value: Any, pattern: re.Pattern[str] | None, depth: int) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value) if pattern is not None else value
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        return _mask_container(value, pattern, depth)
    if pattern is None or value is None or isinstance(value, bool | int | float):
        return value
    # bytes and anything else are printed by the renderer: mask what it would print.
    text = bytes(value).decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
    masked = pattern.sub(REDACTED, text)
    return value if masked == text else masked


def _mask_container(value: Any, pattern: re.Pattern[str] | None, depth: int) -> Any:
    if depth >= MAX_DEPTH:
        return "[nested too deep]"
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_key(k) else _mask(v, pattern, depth + 1)
            for k, v in value.items()
        }
    return [_mask(v, pattern, depth + 1) for v in value]


def redact(_logger: Any, _method: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """structlog processor: secret keys and registered secret values become ``[redacted]``."""
    pattern = _secrets.pattern
    for key, value in list(event_dict.items()):
        if key != "event" and is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _mask(value, pattern, 0)
    return event_dict


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
            # Last before rendering: after tracebacks became text, for both kinds of records.
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or (sys.stderr if use_console else sys.stdout))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, lib_level in LIBRARY_LEVELS.items():
        lib = logging.getLogger(name)
        lib.setLevel(lib_level)
        # A library that installed a handler of its own would print a second, non-JSON line.
        lib.handlers.clear()
        lib.propagate = True


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

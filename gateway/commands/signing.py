"""Signing platform commands: canonical JSON and HMAC-SHA256. Stdlib only, no I/O but the key file.

A command is one JSON object::

    {"id": "...", "name": "bollard.raise", "target": "bollard-gate", "args": {},
     "issued_at": "2026-11-22T06:45:01.123Z", "expires_at": "2026-11-22T06:45:31.123Z",
     "sig": "<64 lower-case hex digits>"}

``sig`` is the lower-case hex HMAC-SHA256, keyed with the uplink's key, of the
*canonical* JSON of every other field: ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8. The receiver
recomputes the canonical bytes from what it parsed, so the key order and the
whitespace of the JSON as sent do not matter; the values do, byte for byte
(timestamps are signed as the strings sent).

So that every language produces the same canonical bytes, values are restricted
(anywhere in the command, in practice in ``args``):

* no floats at all (nor NaN / Infinity): decimal formatting differs between
  languages. Send a scaled integer or a string instead;
* integers within +-(2**53 - 1), the range a JavaScript number holds exactly;
* object keys in ``args`` are 1-64 ASCII characters of ``[A-Za-z0-9_.:-]``, the first a
  letter or ``_``: sorting by code point (Python), by UTF-16 unit (JavaScript) and by byte
  (Go) then agree, and no key is integer-like (JavaScript puts those first, in numeric order);
* strings are valid Unicode (no lone surrogates); nesting at most :data:`MAX_DEPTH` deep.

Everything else (``null``, booleans, strings, lists, objects) is allowed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

from gateway.errors import CommandError
from gateway.events import uuid7

# The fields of a command, in documentation order; all are required, no others are allowed.
FIELDS: Final = ("id", "name", "target", "args", "issued_at", "expires_at", "sig")
SIGNED_FIELDS: Final = tuple(f for f in FIELDS if f != "sig")

# A command id is a single MQTT topic level of the reply topic (cmd-result/{id}).
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
# Dotted lower-case: one to four segments, e.g. bollard.emergency_raise.
NAME_PATTERN: Final = r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,3}$"
# A device id (or "gateway"), optionally qualified (zone, unit): 1-128 characters.
TARGET_PATTERN: Final = r"^[A-Za-z0-9_.:/-]{1,128}$"
# Keys inside args: ASCII, so every language sorts them alike, and not starting with a digit,
# because JavaScript orders integer-like keys ("9", "10") numerically, whatever the insertion.
ARG_KEY_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$"
# RFC 3339 date-time with a mandatory offset (Z or +hh:mm); ASCII digits only ([0-9], not \d).
TIMESTAMP_PATTERN: Final = (
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)

# Nesting of values below the command object (args = 1): deep enough for any real
# argument, and it keeps every recursive walk far from the interpreter's limit.
MAX_DEPTH: Final = 8
# The integers a JavaScript number (IEEE double) represents exactly.
MAX_SAFE_INT: Final = 2**53 - 1
# HMAC-SHA256 keys shorter than the hash output weaken it (RFC 2104 s3); 32 bytes is
# what `openssl rand -hex 16` gives, `openssl rand -hex 32` (64 characters) is better.
MIN_KEY_BYTES: Final = 32

_ID = re.compile(ID_PATTERN)
_NAME = re.compile(NAME_PATTERN)
_TARGET = re.compile(TARGET_PATTERN)
_ARG_KEY = re.compile(ARG_KEY_PATTERN)
_TIMESTAMP = re.compile(TIMESTAMP_PATTERN)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def valid_target(value: object) -> bool:
    return isinstance(value, str) and _TARGET.fullmatch(value) is not None


def check_value(value: object, where: str = "args", depth: int = 1) -> None:
    """Raise :class:`CommandError` unless ``value`` may appear in a command (module doc)."""
    if depth > MAX_DEPTH:
        raise CommandError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return
        raise CommandError(f"{where}: integer out of range +-(2**53 - 1)")
    if isinstance(value, float):
        raise CommandError(f"{where}: floats are not allowed (send a scaled integer or a string)")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or _ARG_KEY.fullmatch(key) is None:
                raise CommandError(
                    f"{where}: object key {_short(key)} is not 1-64 of [A-Za-z0-9_.:-], "
                    "starting with a letter or _"
                )
            check_value(item, f"{where}.{key}", depth + 1)
        return
    raise CommandError(f"{where}: {type(value).__name__} is not a JSON value")


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of every field except ``sig``: what the signature covers.

    Raises :class:`CommandError` if a value is not allowed (floats, huge integers, odd keys,
    lone surrogates, too deep): such a command has no unambiguous canonical form.
    """
    body: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "sig":
            continue
        if not isinstance(key, str):
            raise CommandError(f"field name {_short(key)} is not a string")
        check_value(value, key)
        body[key] = value
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CommandError(f"a string is not valid Unicode ({exc.reason})") from exc


def signature(key: bytes, fields: Mapping[str, Any]) -> str:
    """Lower-case hex HMAC-SHA256 of :func:`canonical` ``(fields)`` with ``key``."""
    return hmac.new(key, canonical(fields), hashlib.sha256).hexdigest()


def signature_matches(key: bytes, canonical_bytes: bytes, sig: str) -> bool:
    """Constant-time comparison of ``sig`` with the expected signature of ``canonical_bytes``."""
    expected = hmac.new(key, canonical_bytes, hashlib.sha256).hexdigest().encode("ascii")
    return hmac.compare_digest(expected, sig.encode("utf-8", "surrogatepass"))


def format_timestamp(dt: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-22T06:45:01.123Z`` (truncated, not rounded).

    The same format as events' ``occurred_at`` (:func:`gateway.events.format_time`), but from
    a datetime: going through float epoch seconds could shift a millisecond and make
    ``expires_at - issued_at`` exceed the ttl asked for.
    """
    if dt.tzinfo is None:
        raise CommandError("a command timestamp needs a timezone (got a naive datetime)")
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 date-time with an offset, as an aware UTC datetime (digits past us dropped).

    Raises :class:`CommandError` on anything else (no offset, a space for T, a leap second).
    """
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        raise CommandError(f"{_short(text)} is not an RFC 3339 date-time with a timezone")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
    offset = m.group(8)
    tz = UTC
    if offset not in ("Z", "z"):
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise CommandError(f"{_short(text)}: the UTC offset is out of range")
        sign = 1 if offset[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise CommandError(f"{_short(text)} is not a valid date-time: {exc}") from exc


def build_command(
    key: bytes,
    name: str,
    target: str,
    args: Mapping[str, Any] | None = None,
    *,
    command_id: str | None = None,
    ttl: float = 30.0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A signed command, ready to ``json.dumps`` and publish on ``.../cmd/{name}``.

    ``command_id`` defaults to a fresh UUIDv7; ``issued_at`` is ``now`` (default: the
    current time) truncated to milliseconds, ``expires_at`` is ``ttl`` seconds later
    (truncated too, so ``expires_at - issued_at <= ttl``). ``name`` must be well formed
    but need not be a known command (tests build unknown ones). Raises
    :class:`CommandError` on malformed input.
    """
    if not key:
        raise CommandError("the signing key is empty")
    cid = uuid7() if command_id is None else command_id
    if not valid_id(cid):
        raise CommandError(f"command id {_short(cid)} does not match {ID_PATTERN}")
    if not valid_name(name):
        raise CommandError(f"command name {_short(name)} is not dotted lower-case (e.g. bollard.raise)")
    if not valid_target(target):
        raise CommandError(f"target {_short(target)} is not 1-128 characters of [A-Za-z0-9_.:/-]")
    if not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise CommandError(f"ttl must be a positive number of seconds, not {ttl!r}")
    body_args: dict[str, Any] = {} if args is None else dict(args)
    check_value(body_args)
    issued = datetime.now(UTC) if now is None else now
    if issued.tzinfo is None:
        raise CommandError("now must be an aware datetime")
    issued = issued.astimezone(UTC)
    issued = issued.replace(microsecond=issued.microsecond // 1000 * 1000)
    try:
        expires = issued + timedelta(seconds=ttl)
    except OverflowError as exc:
        raise CommandError(f"ttl {ttl!r} is out of range") from exc
    expires = expires.replace(microsecond=expires.microsecond // 1000 * 1000)
    if expires <= issued:
        raise CommandError(f"ttl {ttl!r} is shorter than the 1 ms timestamp resolution")
    fields: dict[str, Any] = {
        "id": cid,
        "name": name,
        "target": target,
        "args": body_args,
        "issued_at": format_timestamp(issued),
        "expires_at": format_timestamp(expires),
    }
    fields["sig"] = signature(key, fields)
    return fields


def load_key(path: Path) -> bytes:
    """The HMAC key in ``path``: its bytes with surrounding whitespace stripped.

    Raises :class:`CommandError` if the file cannot be read or the key is shorter than
    :data:`MIN_KEY_BYTES`.
    """
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise CommandError(f"{path}: cannot read the command key: {exc.strerror or exc}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise CommandError(
            f"{path}: the command key is {len(key)} bytes after stripping whitespace; "
            f"at least {MIN_KEY_BYTES} are needed (create one with: openssl rand -hex 32 > FILE)"
        )
    return key


def _short(value: object, limit: int = 64) -> str:
    """A repr for messages, cut so an attacker's megabyte string is not echoed into logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

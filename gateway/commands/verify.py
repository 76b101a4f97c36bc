"""Verifying a platform command before anything moves. Pure but for the replay cache.

:meth:`Verifier.verify` takes the MQTT payload and topic and returns a :class:`Command`
or a :class:`Refusal`; it never raises on any input. The checks run in this order and
the first that fails gives the refusal's reason:

1. ``too_large``: more than ``max_bytes`` bytes (nothing is parsed).
2. ``malformed``: not UTF-8 JSON, not an object, a duplicate key, a missing field, a field
   of the wrong type or pattern, a value without a canonical form (float, NaN, an integer
   beyond +-(2**53 - 1), an odd ``args`` key, too deep), a timestamp that is not RFC 3339
   with an offset, ``expires_at <= issued_at``, ``expires_at - issued_at > max_ttl``, a
   topic whose last level is not ``name``, an unknown field.
3. ``bad_signature``: ``sig`` is not the HMAC-SHA256 of the canonical JSON with this
   uplink's key.
4. ``unknown_command``: ``name`` is not a command this gateway knows.
5. ``not_allowed``: this uplink may not send ``name`` (``commands.allow``).
6. ``not_yet_valid``: ``issued_at`` is more than ``skew_future`` s ahead of the gateway clock;
   ``expired``: it is more than ``skew_past`` s behind it (a stale command).
7. ``expired``: the gateway clock has reached ``expires_at``.
8. ``replayed``: this uplink already sent a command with this id.
   ``unavailable``: the replay cache cannot record the id (full, disk error); the command
   is refused because accepting it unrecorded would let it be replayed.

Replay rule: an id is recorded only when the command passed every other check, in the
same step that accepts it. A refused command (bad signature, expired, ...) does not use
up its id, so a forged or stale copy cannot block the genuine command.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from gateway.commands.names import KNOWN_COMMANDS
from gateway.commands.replay import ReplayCache
from gateway.commands.signing import (
    FIELDS,
    ID_PATTERN,
    canonical,
    load_key,
    parse_timestamp,
    signature_matches,
    valid_id,
    valid_name,
    valid_target,
)
from gateway.errors import CommandError

if TYPE_CHECKING:
    from gateway.config import UplinkConfig

# Defaults of the timing rules; the config (CommandsConfig) carries the reasons and overrides.
DEFAULT_MAX_BYTES: Final = 4096
DEFAULT_SKEW_PAST: Final = 40.0
DEFAULT_SKEW_FUTURE: Final = 20.0
DEFAULT_MAX_TTL: Final = 300.0


class Reason(enum.StrEnum):
    """Why a command was refused; in the order the checks run."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_COMMAND = "unknown_command"
    NOT_ALLOWED = "not_allowed"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    UNAVAILABLE = "unavailable"  # the replay cache could not record the id (full, disk)


@dataclass(frozen=True, slots=True)
class Command:
    """A verified command: signed with the uplink's key, allowed, fresh, never seen before.

    ``args`` is a read-only deep copy (mappings are ``MappingProxyType``, lists tuples).
    """

    id: str
    name: str
    target: str
    args: Mapping[str, Any]
    issued_at: datetime  # aware, UTC
    expires_at: datetime  # aware, UTC
    uplink: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused command. ``command_id`` and ``name`` are set when they could be read and are
    well formed (the id names the reply topic ``cmd-result/{id}``), else None."""

    reason: Reason
    detail: str
    command_id: str | None
    name: str | None
    uplink: str


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a repeated key are refused: parsers disagree on which value wins."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class Verifier:
    """Verifies the commands of one uplink (module doc). One per uplink that takes commands."""

    def __init__(
        self,
        uplink: str,
        key: bytes,
        allow: frozenset[str],
        known: frozenset[str] = KNOWN_COMMANDS,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        skew_past: float = DEFAULT_SKEW_PAST,
        skew_future: float = DEFAULT_SKEW_FUTURE,
        max_ttl: float = DEFAULT_MAX_TTL,
        replay: ReplayCache,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if not key:
            raise ValueError("the command key is empty")
        if max_bytes < 1 or skew_past < 0 or skew_future < 0 or max_ttl <= 0:
            raise ValueError("max_bytes and max_ttl must be positive, the skews not negative")
        self.uplink = uplink
        self._key = key
        self.allow = frozenset(allow)
        self.known = frozenset(known)
        self.max_bytes = max_bytes
        self.skew_past = skew_past
        self.skew_future = skew_future
        self.max_ttl = max_ttl
        self._replay = replay
        self._clock = clock

    @classmethod
    def from_config(
        cls,
        uplink: UplinkConfig,
        replay: ReplayCache,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> Verifier | None:
        """The verifier of a configured uplink; None if it takes no commands (no key_file).

        Reads the key file: raises :class:`CommandError` if it is unreadable or too short.
        """
        cmds = uplink.commands
        if cmds.key_file is None:
            return None
        return cls(
            uplink.name,
            load_key(cmds.key_file),
            frozenset(cmds.allow),
            max_bytes=cmds.max_bytes,
            skew_past=cmds.skew_past,
            skew_future=cmds.skew_future,
            max_ttl=cmds.max_ttl,
            replay=replay,
            clock=clock,
        )

    async def verify(self, payload: bytes, topic_name: str) -> Command | Refusal:
        """Check ``payload`` received on ``topic_name`` (module doc for the checks and order)."""
        try:
            return await self._check(bytes(payload), topic_name)
        except _Refused as refused:
            return Refusal(refused.reason, refused.detail, refused.command_id, refused.name, self.uplink)

    async def _check(self, payload: bytes, topic_name: str) -> Command:
        if len(payload) > self.max_bytes:
            raise _Refused(Reason.TOO_LARGE, f"{len(payload)} bytes, over the limit of {self.max_bytes}")
        obj = _decode(payload)
        shape = self._shape(obj, topic_name)
        cid, name = shape.command_id, shape.name

        def refuse(reason: Reason, detail: str) -> _Refused:
            return _Refused(reason, detail, cid, name)

        if not signature_matches(self._key, shape.canonical, obj["sig"]):
            raise refuse(Reason.BAD_SIGNATURE, "sig does not match this uplink's key")
        if name not in self.known:
            raise refuse(Reason.UNKNOWN_COMMAND, f"no command {name!r} on this gateway")
        if name not in self.allow:
            raise refuse(Reason.NOT_ALLOWED, f"uplink {self.uplink!r} may not send {name!r}")
        now = self._clock()
        ahead = (shape.issued_at - now).total_seconds()
        if ahead > self.skew_future:
            raise refuse(
                Reason.NOT_YET_VALID,
                f"issued_at is {ahead:.3f} s ahead of the gateway clock (allowed {self.skew_future:g} s)",
            )
        if -ahead > self.skew_past:
            raise refuse(
                Reason.EXPIRED,
                f"issued_at is {-ahead:.3f} s behind the gateway clock (allowed {self.skew_past:g} s)",
            )
        if now >= shape.expires_at:
            raise refuse(Reason.EXPIRED, f"expired {(now - shape.expires_at).total_seconds():.3f} s ago")
        keep_until = shape.expires_at + timedelta(seconds=self.skew_past)
        try:
            fresh = await self._replay.add(cid, keep_until, uplink=self.uplink, now=now)
        except CommandError as exc:
            raise refuse(Reason.UNAVAILABLE, f"cannot record the command id: {exc}") from exc
        if not fresh:
            raise refuse(Reason.REPLAYED, f"command id {cid!r} was already accepted")
        return Command(
            id=cid,
            name=name,
            target=obj["target"],
            args=_freeze(obj["args"]),
            issued_at=shape.issued_at,
            expires_at=shape.expires_at,
            uplink=self.uplink,
        )

    def _shape(self, obj: dict[str, Any], topic_name: str) -> _Shape:
        """Check 2 after decoding: fields, types, patterns, canonical form, timestamps, topic."""
        cid = obj["id"] if valid_id(obj.get("id")) else None
        name = obj["name"] if valid_name(obj.get("name")) else None

        def bad(detail: str) -> _Refused:
            return _Refused(Reason.MALFORMED, detail, cid, name)

        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise bad(f"missing field(s): {', '.join(missing)}")
        if cid is None:
            raise bad(f"id must be a string matching {ID_PATTERN}")
        if name is None:
            raise bad("name must be dotted lower-case, e.g. bollard.raise")
        if not valid_target(obj["target"]):
            raise bad("target must be 1-128 characters of [A-Za-z0-9_.:/-]")
        if not isinstance(obj["args"], dict):
            raise bad("args must be a JSON object")
        for field in ("issued_at", "expires_at", "sig"):
            if not isinstance(obj[field], str):
                raise bad(f"{field} must be a string")
        try:
            issued_at = parse_timestamp(obj["issued_at"])
            expires_at = parse_timestamp(obj["expires_at"])
            body = canonical(obj)
        except CommandError as exc:
            raise bad(str(exc)) from exc
        if expires_at <= issued_at:
            raise bad("expires_at must be after issued_at")
        ttl = (expires_at - issued_at).total_seconds()
        if ttl > self.max_ttl:
            raise bad(f"expires_at - issued_at is {ttl:.3f} s, over the limit of {self.max_ttl:g} s")
        level = topic_name.rsplit("/", 1)[-1]
        if level != name:
            raise bad(f"topic level {level[:64]!r} does not match name {name!r}")
        unknown = sorted(k for k in obj if k not in FIELDS)
        if unknown:
            raise bad(f"unknown field(s): {', '.join(repr(k[:64]) for k in unknown[:5])}")
        return _Shape(cid, name, body, issued_at, expires_at)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What check 2 established about a well-formed command."""

    command_id: str
    name: str
    canonical: bytes
    issued_at: datetime
    expires_at: datetime


class _Refused(Exception):
    """Raised inside the checks; :meth:`Verifier.verify` turns it into a :class:`Refusal`."""

    def __init__(self, reason: Reason, detail: str, command_id: str | None = None, name: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.command_id = command_id
        self.name = name


def _decode(payload: bytes) -> dict[str, Any]:
    """Check 2, first part: UTF-8 JSON, an object, no duplicate keys."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(Reason.MALFORMED, f"not UTF-8 (byte {exc.start})") from exc
    try:
        obj: Any = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise _Refused(Reason.MALFORMED, f"not a valid command: {exc}") from exc
    except RecursionError as exc:
        raise _Refused(Reason.MALFORMED, "JSON nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and int() of a number with too many digits
        raise _Refused(Reason.MALFORMED, f"not JSON: {str(exc)[:120]}") from exc
    if not isinstance(obj, dict):
        raise _Refused(Reason.MALFORMED, f"a command is a JSON object, not {type(obj).__name__}")
    return obj

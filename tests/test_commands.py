"""The platform command channel without MQTT: signing, verification in order, replay cache, CLI, docs."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.cli import main
from gateway.commands import KNOWN_COMMANDS
from gateway.commands.replay import ReplayCache
from gateway.commands.reply import (
    INVALID_ID_LEVEL,
    Status,
    refusal_payload,
    result_payload,
    result_topic_level,
)
from gateway.commands.signing import (
    build_command,
    canonical,
    format_timestamp,
    load_key,
    parse_timestamp,
    signature,
)
from gateway.commands.verify import Command, Reason, Refusal, Verifier
from gateway.errors import CommandError, ReplayCacheFull

ROOT = Path(__file__).resolve().parents[1]
KEY = b"0123456789abcdef0123456789abcdef-police-test-key"
OTHER_KEY = b"fedcba9876543210fedcba9876543210-not-the-key"
NOW = datetime(2026, 11, 22, 6, 45, 1, 123000, tzinfo=UTC)
ALLOW = frozenset({"bollard.raise", "bollard.emergency_raise", "alarm.reset"})
PREFIX = "campus/530102/km-wuhua-no1-primary/gw-01/cmd/"


class Clock:
    """A settable gateway clock."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[ReplayCache]:
    async with ReplayCache(tmp_path / "commands.sqlite3") as c:
        yield c


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(cache: ReplayCache, clock: Clock) -> Verifier:
    return Verifier("police", KEY, ALLOW, replay=cache, clock=clock)


def command(
    name: str = "bollard.raise",
    *,
    key: bytes = KEY,
    issued: datetime = NOW,
    ttl: float = 30.0,
    command_id: str = "cmd-1",
    args: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A signed command; ``overrides`` replace fields and the command is signed again after."""
    cmd = build_command(key, name, "bollard-gate", args, command_id=command_id, ttl=ttl, now=issued)
    if overrides:
        cmd.update(overrides)
        cmd.pop("sig")
        cmd["sig"] = hmac.new(key, _oracle_canonical(cmd), hashlib.sha256).hexdigest()
    return cmd


def _oracle_canonical(fields: dict[str, Any]) -> bytes:
    """The spec, written independently of gateway.commands.signing."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def raw(cmd: dict[str, Any]) -> bytes:
    return json.dumps(cmd).encode()


def topic(cmd: dict[str, Any]) -> str:
    return PREFIX + str(cmd["name"])


async def check(v: Verifier, cmd: dict[str, Any] | bytes, topic_name: str | None = None) -> Command | Refusal:
    if topic_name is None:
        topic_name = PREFIX + "bollard.raise" if isinstance(cmd, bytes) else topic(cmd)
    return await v.verify(cmd if isinstance(cmd, bytes) else raw(cmd), topic_name)


def refused(result: Command | Refusal, reason: Reason) -> Refusal:
    assert isinstance(result, Refusal), result
    assert result.reason is reason, result
    return result


# --------------------------------------------------------------------------- accepting


async def test_a_valid_command_is_accepted_with_frozen_fields(verifier: Verifier) -> None:
    cmd = command(args={"zone": 3, "who": {"name": "王警官", "ids": [1, 2]}})
    result = await check(verifier, cmd)
    assert isinstance(result, Command), result
    assert (result.id, result.name, result.target, result.uplink) == (
        "cmd-1",
        "bollard.raise",
        "bollard-gate",
        "police",
    )
    assert result.issued_at == NOW
    assert result.expires_at == NOW + timedelta(seconds=30)
    assert result.args["who"]["ids"] == (1, 2)
    with pytest.raises(TypeError):
        result.args["zone"] = 4  # type: ignore[index]
    with pytest.raises(TypeError):
        result.args["who"]["name"] = "x"


async def test_signature_is_over_canonical_json_not_the_bytes_sent(verifier: Verifier) -> None:
    cmd = command(args={"b": [1, {"y": None, "x": True}], "a": '锁定 "quoted" \\ \n'})
    # Reversed key order, indentation and \u escapes: the same values, other bytes.
    reordered = dict(reversed(list(cmd.items())))
    payload = json.dumps(reordered, indent=4, ensure_ascii=True).encode()
    assert payload != raw(cmd)
    assert isinstance(await check(verifier, payload, topic(cmd)), Command)


def test_canonical_matches_the_written_rule_and_skips_sig() -> None:
    cmd = command(args={"z": 1, "a": ["é", None, False]})
    assert canonical(cmd) == _oracle_canonical(cmd)
    assert b'"sig"' not in canonical(cmd)
    assert canonical(cmd).startswith(b'{"args":{"a":["\xc3\xa9",null,false],"z":1},"expires_at":')
    assert signature(KEY, cmd) == cmd["sig"]
    assert re.fullmatch(r"[0-9a-f]{64}", cmd["sig"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "floats are not allowed"),
        (float("nan"), "floats are not allowed"),
        (2**53, "integer out of range"),
        ({"bad key": 1}, "object key"),
        ({"": 1}, "object key"),
        ({"10": 1}, "object key"),  # integer-like: JavaScript would sort it first
        ([[[[[[[[[1]]]]]]]]], "nested deeper"),
        ("\ud800", "not valid Unicode"),
        (b"bytes", "not a JSON value"),
    ],
)
def test_values_without_a_canonical_form_are_refused_when_signing(value: object, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        build_command(KEY, "bollard.raise", "bollard-gate", {"v": value}, now=NOW)


def test_build_command_timestamps_and_defaults() -> None:
    now = datetime(2026, 11, 22, 14, 45, 1, 123999, tzinfo=UTC).astimezone()  # any zone
    cmd = build_command(KEY, "alarm.reset", "box-gate", ttl=0.0015, now=now)
    assert cmd["issued_at"] == "2026-11-22T14:45:01.123Z"
    assert cmd["expires_at"] == "2026-11-22T14:45:01.124Z"  # .123 + 1.5 ms, truncated
    assert cmd["args"] == {}
    assert list(cmd) == ["id", "name", "target", "args", "issued_at", "expires_at", "sig"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", cmd["id"])
    assert build_command(KEY, "alarm.reset", "box-gate")["id"] != cmd["id"]
    # ttl is kept exactly (truncation never makes expires_at - issued_at exceed it)
    cmd = build_command(KEY, "alarm.reset", "box-gate", ttl=300, now=now)
    span = parse_timestamp(cmd["expires_at"]) - parse_timestamp(cmd["issued_at"])
    assert span == timedelta(seconds=300)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bollard.Raise"}, "dotted lower-case"),
        ({"target": ""}, "target"),
        ({"target": "a" * 129}, "target"),
        ({"command_id": "-starts-with-dash"}, "command id"),
        ({"command_id": "has/slash"}, "command id"),
        ({"ttl": 0}, "ttl must be"),
        ({"ttl": float("inf")}, "ttl must be"),
        ({"ttl": 0.0001}, "shorter than the 1 ms"),
        ({"now": datetime(2026, 1, 1)}, "aware"),
    ],
)
def test_build_command_rejects_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"key": KEY, "name": "bollard.raise", "target": "bollard-gate", **kwargs}
    with pytest.raises(CommandError, match=message):
        build_command(**args)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T06:45:01.123Z", NOW),
        ("2026-11-22t14:45:01.123+08:00", NOW),
        ("2026-11-22T06:45:01.123456789z", NOW.replace(microsecond=123456)),
        ("2026-11-21T23:45:01.123-07:00", NOW),
        ("2026-11-22T06:45:01Z", NOW.replace(microsecond=0)),
    ],
)
def test_parse_timestamp(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-22T06:45:01.123",  # no offset
        "2026-11-22 06:45:01Z",  # space
        "2026-11-22T06:45:60Z",  # leap second
        "2026-02-30T06:45:01Z",
        "2026-11-22T06:45:01+24:00",
        "٢٠٢٦-11-22T06:45:01Z",  # non-ASCII digits
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "",
    ],
)
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(CommandError):
        parse_timestamp(text)


def test_format_timestamp_truncates_to_milliseconds() -> None:
    assert format_timestamp(NOW.replace(microsecond=999999)) == "2026-11-22T06:45:01.999Z"
    with pytest.raises(CommandError, match="timezone"):
        format_timestamp(datetime(2026, 1, 1))


# --------------------------------------------------------------------------- refusals, in order


def _with(**fields: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda cmd: {**cmd, **fields}


def _without(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda cmd: {k: v for k, v in cmd.items() if k != field}


# Each mutation is applied to a valid command, which is then signed again with the right key:
# only the shape is wrong.
MALFORMED_FIELDS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    *[(f"missing {f}", _without(f), f"missing field(s): {f}") for f in ("id", "name", "target", "args")],
    *[(f"missing {f}", _without(f), f"missing field(s): {f}") for f in ("issued_at", "expires_at")],
    ("id not a string", _with(id=7), "id must be"),
    ("id with slash", _with(id="a/b"), "id must be"),
    ("id too long", _with(id="a" * 65), "id must be"),
    ("id with wildcard", _with(id="a#"), "id must be"),
    ("name upper-case", _with(name="Bollard.raise"), "name must be"),
    ("name with slash", _with(name="bollard/raise"), "name must be"),
    ("target empty", _with(target=""), "target must be"),
    ("target too long", _with(target="t" * 129), "target must be"),
    ("target with space", _with(target="gate 1"), "target must be"),
    ("args a list", _with(args=[]), "args must be a JSON object"),
    ("args null", _with(args=None), "args must be a JSON object"),
    ("float arg", _with(args={"x": 1.0}), "floats are not allowed"),
    ("big int arg", _with(args={"x": -(2**53)}), "integer out of range"),
    ("odd arg key", _with(args={"x y": 1}), "object key"),
    ("deep args", _with(args={"a": [[[[[[[[1]]]]]]]]}), "nested deeper"),
    ("issued_at a number", _with(issued_at=1763793901), "issued_at must be a string"),
    ("expires_at null", _with(expires_at=None), "expires_at must be a string"),
    ("issued_at without zone", _with(issued_at="2026-11-22T06:45:01.123"), "timezone"),
    ("expires_at garbage", _with(expires_at="tomorrow"), "timezone"),
    ("expires_at == issued_at", _with(expires_at="2026-11-22T06:45:01.123Z"), "expires_at must be after"),
    ("expires before issued", _with(expires_at="2026-11-22T06:45:00Z"), "expires_at must be after"),
    ("ttl over max", _with(expires_at="2026-11-22T06:50:01.124Z"), "over the limit of 300 s"),
    ("unknown field", _with(extra=1), "unknown field(s): 'extra'"),
]


@pytest.mark.parametrize(
    ("mutate", "detail"), [m[1:] for m in MALFORMED_FIELDS], ids=[m[0] for m in MALFORMED_FIELDS]
)
async def test_malformed_fields(
    verifier: Verifier, mutate: Callable[[dict[str, Any]], dict[str, Any]], detail: str
) -> None:
    cmd = mutate(command())
    cmd.pop("sig", None)
    cmd["sig"] = hmac.new(KEY, _oracle_canonical(cmd), hashlib.sha256).hexdigest()
    result = refused(await check(verifier, cmd, PREFIX + "bollard.raise"), Reason.MALFORMED)
    assert detail in result.detail


async def test_ttl_of_exactly_max_ttl_is_accepted(verifier: Verifier) -> None:
    assert isinstance(await check(verifier, command(ttl=300)), Command)


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"\xff{}", "not UTF-8"),
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xef\xbb\xbf{}", "not JSON"),  # a UTF-8 BOM
        (b"[]", "not list"),
        (b'"cmd"', "not str"),
        (b"null", "not NoneType"),
        (b"1" * 4400, "not JSON"),  # too many digits for an int
        (b"[" * 3000 + b"]" * 3000, "JSON nested too deeply"),
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b'{"args":{"x":NaN}}', "missing field(s)"),
    ],
)
async def test_malformed_payloads(verifier: Verifier, payload: bytes, detail: str) -> None:
    verifier.max_bytes = 8192
    result = refused(await check(verifier, payload), Reason.MALFORMED)
    assert detail in result.detail
    assert result.command_id is None


async def test_nan_and_lone_surrogates_in_the_json_sent_are_malformed(verifier: Verifier) -> None:
    good = raw(command())
    nan = good.replace(b'"args": {}', b'"args": {"x": NaN}')
    assert nan != good
    assert "floats" in refused(await check(verifier, nan), Reason.MALFORMED).detail
    surrogate = good.replace(b'"args": {}', b'"args": {"x": "\\ud800"}')
    assert "not valid Unicode" in refused(await check(verifier, surrogate), Reason.MALFORMED).detail


async def test_topic_level_must_equal_name(verifier: Verifier) -> None:
    cmd = command()
    for wrong in (PREFIX + "bollard.lower", PREFIX + "bollard.raise/extra", "bollard.raisex", ""):
        result = refused(await check(verifier, cmd, wrong), Reason.MALFORMED)
        assert "does not match name" in result.detail
        assert (result.command_id, result.name) == ("cmd-1", "bollard.raise")
    assert isinstance(await check(verifier, cmd, "bollard.raise"), Command)


async def test_refusal_carries_id_and_name_only_when_readable(verifier: Verifier) -> None:
    cmd = command()
    cmd["id"] = "not/a/level"
    result = refused(await check(verifier, cmd), Reason.MALFORMED)
    assert (result.command_id, result.name, result.uplink) == (None, "bollard.raise", "police")
    result = refused(await check(verifier, _without("target")(command())), Reason.MALFORMED)
    assert (result.command_id, result.name) == ("cmd-1", "bollard.raise")


async def test_too_large_is_checked_before_anything_else(verifier: Verifier) -> None:
    verifier.max_bytes = 300
    cmd = command(args={"pad": ""})
    size = len(raw(cmd))
    exact = command(args={"pad": "x" * (300 - size)})
    assert len(raw(exact)) == 300
    assert isinstance(await check(verifier, exact), Command)
    over = command(args={"pad": "x" * (301 - size)}, command_id="cmd-2")
    result = refused(await check(verifier, over), Reason.TOO_LARGE)
    assert result.command_id is None
    assert "301 bytes" in result.detail
    refused(await check(verifier, b"\xff" * 301), Reason.TOO_LARGE)  # also malformed: too_large wins


async def test_bad_signature(verifier: Verifier) -> None:
    refused(await check(verifier, command(key=OTHER_KEY)), Reason.BAD_SIGNATURE)
    tampered = {**command(), "target": "bollard-back"}
    refused(await check(verifier, tampered), Reason.BAD_SIGNATURE)
    upper = command()
    upper["sig"] = upper["sig"].upper()
    refused(await check(verifier, upper), Reason.BAD_SIGNATURE)
    for sig in ("", "00", "é" * 64, "\ud800"):
        refused(await check(verifier, {**command(), "sig": sig}), Reason.BAD_SIGNATURE)
    result = refused(await check(verifier, {**command(), "sig": 1}), Reason.MALFORMED)
    assert "sig must be a string" in result.detail


async def test_unknown_then_not_allowed(verifier: Verifier) -> None:
    result = refused(await check(verifier, command("bollard.fly")), Reason.UNKNOWN_COMMAND)
    assert result.name == "bollard.fly"
    assert "gateway.self_test" in KNOWN_COMMANDS
    result = refused(await check(verifier, command("gateway.self_test")), Reason.NOT_ALLOWED)
    assert "'police' may not send 'gateway.self_test'" in result.detail


# Later checks that would also fail must not be what the refusal says.
FIRST_WINS = [
    ("too_large over malformed", Reason.TOO_LARGE),
    ("malformed over bad_signature", Reason.MALFORMED),
    ("bad_signature over unknown_command", Reason.BAD_SIGNATURE),
    ("unknown_command over not_allowed", Reason.UNKNOWN_COMMAND),
    ("not_allowed over not_yet_valid", Reason.NOT_ALLOWED),
    ("not_yet_valid over replayed", Reason.NOT_YET_VALID),
    ("stale (expired) over replayed", Reason.EXPIRED),
    ("expired over replayed", Reason.EXPIRED),
]


@pytest.mark.parametrize(("case", "reason"), FIRST_WINS, ids=[c[0] for c in FIRST_WINS])
async def test_a_payload_failing_two_checks_gets_the_first_reason(
    verifier: Verifier, clock: Clock, case: str, reason: Reason
) -> None:
    topic_name = PREFIX + "bollard.raise"
    match case:
        case "too_large over malformed":
            payload = b"[" + b" " * 5000
        case "malformed over bad_signature":
            payload = raw({**command(key=OTHER_KEY), "extra": 1})
        case "bad_signature over unknown_command":
            payload, topic_name = raw(command("bollard.fly", key=OTHER_KEY)), PREFIX + "bollard.fly"
        case "unknown_command over not_allowed":  # unknown, and so not allowed either
            payload, topic_name = raw(command("bollard.fly")), PREFIX + "bollard.fly"
        case "not_allowed over not_yet_valid":
            cmd = command("gateway.self_test", issued=NOW + timedelta(minutes=5))
            payload, topic_name = raw(cmd), PREFIX + "gateway.self_test"
        case "not_yet_valid over replayed":
            payload = raw(command())
            assert isinstance(await verifier.verify(payload, topic_name), Command)
            clock.now = NOW - timedelta(seconds=21)  # the gateway clock stepped back
        case "stale (expired) over replayed":
            payload = raw(command(ttl=300))
            assert isinstance(await verifier.verify(payload, topic_name), Command)
            clock.now = NOW + timedelta(seconds=50)  # before expires_at, but issued 50 s ago
        case "expired over replayed":
            payload = raw(command(ttl=10))
            assert isinstance(await verifier.verify(payload, topic_name), Command)
            clock.now = NOW + timedelta(seconds=10)
    result = refused(await verifier.verify(payload, topic_name), reason)
    assert result.uplink == "police"


# --------------------------------------------------------------------------- clock window


@pytest.mark.parametrize(
    ("issued_offset", "now_offset", "ttl", "outcome"),
    [
        (0.0, 0.0, 30, None),
        (20.0, 0.0, 30, None),  # issued skew_future ahead: the edge is inside
        (20.001, 0.0, 30, Reason.NOT_YET_VALID),
        (-40.0, 0.0, 60, None),  # issued skew_past ago: inside
        (-40.001, 0.0, 60, Reason.EXPIRED),
        (0.0, 29.999, 30, None),  # 1 ms before expires_at
        (0.0, 30.0, 30, Reason.EXPIRED),  # at expires_at: expired
        (0.0, 31.0, 30, Reason.EXPIRED),
        (-10.0, 0.0, 5, Reason.EXPIRED),  # issued recently enough, but already expired
    ],
)
async def test_clock_window_edges(
    *,
    verifier: Verifier,
    clock: Clock,
    issued_offset: float,
    now_offset: float,
    ttl: float,
    outcome: Reason | None,
) -> None:
    cmd = command(issued=NOW + timedelta(seconds=issued_offset), ttl=ttl)
    clock.now = NOW + timedelta(seconds=now_offset)
    result = await check(verifier, cmd)
    if outcome is None:
        assert isinstance(result, Command), result
    else:
        refused(result, outcome)


async def test_custom_skews(cache: ReplayCache, clock: Clock) -> None:
    strict = Verifier("police", KEY, ALLOW, replay=cache, clock=clock, skew_past=5, skew_future=0)
    refused(await check(strict, command(issued=NOW + timedelta(milliseconds=1))), Reason.NOT_YET_VALID)
    refused(await check(strict, command(issued=NOW - timedelta(seconds=5.001))), Reason.EXPIRED)
    assert isinstance(await check(strict, command(issued=NOW - timedelta(seconds=5))), Command)


# --------------------------------------------------------------------------- replay


async def test_replay_is_refused_and_refusals_do_not_use_up_the_id(verifier: Verifier, clock: Clock) -> None:
    forged = command(key=OTHER_KEY, command_id="cmd-7")
    refused(await check(verifier, forged), Reason.BAD_SIGNATURE)
    early = command(command_id="cmd-7", issued=NOW + timedelta(minutes=1))
    refused(await check(verifier, early), Reason.NOT_YET_VALID)
    genuine = command(command_id="cmd-7")
    assert isinstance(await check(verifier, genuine), Command)
    result = refused(await check(verifier, genuine), Reason.REPLAYED)
    assert result.command_id == "cmd-7"
    # A different command under the same id is a replay too (ids are unique per uplink).
    refused(await check(verifier, command("alarm.reset", command_id="cmd-7")), Reason.REPLAYED)


async def test_ids_are_per_uplink(cache: ReplayCache, clock: Clock) -> None:
    police = Verifier("police", KEY, ALLOW, replay=cache, clock=clock)
    fire = Verifier("fire", OTHER_KEY, ALLOW, replay=cache, clock=clock)
    assert isinstance(await check(police, command()), Command)
    assert isinstance(await check(fire, command(key=OTHER_KEY)), Command)
    refused(await check(fire, command(key=OTHER_KEY)), Reason.REPLAYED)


async def test_concurrent_deliveries_accept_once(verifier: Verifier) -> None:
    payload = raw(command())
    results = await asyncio.gather(*(verifier.verify(payload, PREFIX + "bollard.raise") for _ in range(8)))
    assert sum(isinstance(r, Command) for r in results) == 1
    assert all(r.reason is Reason.REPLAYED for r in results if isinstance(r, Refusal))


async def test_replay_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "commands.sqlite3"
    cmd = command(ttl=60)
    async with ReplayCache(path) as first:
        assert isinstance(
            await check(Verifier("police", KEY, ALLOW, replay=first, clock=clock), cmd), Command
        )
    clock.now = NOW + timedelta(seconds=30)
    async with ReplayCache(path) as second:
        again = Verifier("police", KEY, ALLOW, replay=second, clock=clock)
        refused(await check(again, cmd), Reason.REPLAYED)
        assert await second.count() == 1


async def test_purge_drops_entries_past_keep_until(cache: ReplayCache) -> None:
    for i in range(5):
        assert await cache.add(
            f"c{i}", NOW + timedelta(seconds=10 * i), uplink="u", now=NOW - timedelta(hours=1)
        )
    assert await cache.count() == 5
    assert await cache.purge(NOW + timedelta(seconds=20)) == 3  # keep_until 0, 10, 20 <= now
    assert await cache.count() == 2
    assert await cache.purge(NOW + timedelta(seconds=20)) == 0
    # A purged id can be recorded again (the clock rules refuse its command by then).
    assert await cache.add("c0", NOW + timedelta(seconds=100), uplink="u", now=NOW + timedelta(seconds=20))
    assert not await cache.add(
        "c4", NOW + timedelta(seconds=100), uplink="u", now=NOW + timedelta(seconds=20)
    )
    # add purges on its own too
    assert await cache.add("new", NOW + timedelta(days=1), uplink="u", now=NOW + timedelta(seconds=41))
    assert await cache.count() == 2  # c0 (100 s) and new; c3 (30 s) and c4 (40 s) went


async def test_verifier_keeps_ids_until_expiry_plus_skew_past(verifier: Verifier, cache: ReplayCache) -> None:
    assert isinstance(await check(verifier, command(ttl=30)), Command)
    keep_until = NOW + timedelta(seconds=30 + 40)
    assert await cache.purge(keep_until - timedelta(milliseconds=1)) == 0
    assert await cache.purge(keep_until) == 1


async def test_full_cache_refuses_new_commands_rather_than_forget(tmp_path: Path, clock: Clock) -> None:
    async with ReplayCache(tmp_path / "c.sqlite3", max_entries=2) as small:
        v = Verifier("police", KEY, ALLOW, replay=small, clock=clock)
        for cid in ("a", "b"):
            assert isinstance(await check(v, command(command_id=cid, ttl=10)), Command)
        result = refused(await check(v, command(command_id="c", ttl=10)), Reason.UNAVAILABLE)
        assert "holds 2 unexpired command ids (max 2)" in result.detail
        refused(await check(v, command(command_id="a", ttl=10)), Reason.REPLAYED)  # still remembered
        with pytest.raises(ReplayCacheFull):
            await small.add("d", NOW + timedelta(days=1), now=NOW)
        clock.now = NOW + timedelta(seconds=10 + 40)  # a and b may go now
        late = command(command_id="c", issued=clock.now, ttl=10)
        assert isinstance(await check(v, late), Command)


async def test_cache_failures_become_refusals_not_exceptions(tmp_path: Path, clock: Clock) -> None:
    cache = ReplayCache(tmp_path / "c.sqlite3")
    v = Verifier("police", KEY, ALLOW, replay=cache, clock=clock)
    result = refused(await check(v, command()), Reason.UNAVAILABLE)  # never opened
    assert "not open" in result.detail
    async with cache:
        pass
    refused(await check(v, command()), Reason.UNAVAILABLE)  # closed


@pytest.mark.parametrize("kind", ["garbage", "foreign", "newer"])
async def test_cache_refuses_a_file_that_is_not_its_own(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "c.sqlite3"
    if kind == "garbage":
        path.write_bytes(b"not a database at all" * 100)
    else:
        with sqlite3.connect(path) as conn:
            if kind == "foreign":
                conn.execute("CREATE TABLE outbox (id INTEGER)")
            else:
                conn.execute("PRAGMA application_id = 1128747587")  # ours
                conn.execute("PRAGMA user_version = 99")
        conn.close()
    expected = {"garbage": "cannot open", "foreign": "not a command replay cache", "newer": "newer"}[kind]
    with pytest.raises(CommandError, match=expected):
        async with ReplayCache(path):
            pass


async def test_cache_file_settings(cache: ReplayCache) -> None:
    conn = sqlite3.connect(cache.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()
    with pytest.raises(CommandError, match="entered only once"):
        await cache.__aenter__()


# --------------------------------------------------------------------------- fuzz

_ARG_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:-]{0,7}", fullmatch=True)
_SAFE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_ARG_KEYS, children, max_size=3),
    max_leaves=10,
)
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
_FIELDS = ["id", "name", "target", "args", "issued_at", "expires_at", "sig"]


def _validly_signed(payload: bytes) -> bool:
    """The oracle: is ``payload`` a JSON object whose sig is the HMAC of its canonical form under KEY?"""
    try:
        obj = json.loads(payload)
        body = _oracle_canonical(obj)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return False
    return obj.get("sig") == hmac.new(KEY, body, hashlib.sha256).hexdigest()


@st.composite
def _payloads(draw: st.DrawFn, ids: itertools.count[int]) -> tuple[bytes, str, bool]:
    """(payload, topic, fresh_and_valid): random bytes, random JSON, or a (mutated) command.

    Ids are fresh from ``ids`` on every draw (fixed width, so a re-run draws the same shapes).
    """
    kind = draw(st.sampled_from(["bytes", "json", "valid", "mutated", "bytes-mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300)), PREFIX + "bollard.raise", False
    if kind == "json":
        return json.dumps(draw(_ANY_JSON)).encode(), PREFIX + draw(st.sampled_from(sorted(ALLOW))), False
    name = draw(st.sampled_from(sorted(ALLOW)))
    issued = NOW - timedelta(milliseconds=draw(st.integers(0, 30_000)))
    ttl = draw(st.integers(31_000, 300_000)) / 1000
    args = draw(st.dictionaries(_ARG_KEYS, _SAFE_JSON, max_size=3))
    cmd = build_command(KEY, name, "bollard-gate", args, command_id=f"f-{next(ids):09d}", ttl=ttl, now=issued)
    if kind == "valid":
        return raw(cmd), PREFIX + name, True
    if kind == "bytes-mutated":
        data = bytearray(raw(cmd))
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return bytes(data), PREFIX + name, False
    field = draw(st.sampled_from([*_FIELDS, "extra"]))
    action = draw(st.sampled_from(["set", "delete"]))
    if action == "delete":
        cmd.pop(field, None)
    else:
        cmd[field] = draw(_ANY_JSON | _SAFE_JSON)
    resign = draw(st.sampled_from([None, KEY, OTHER_KEY]))
    if resign is not None and field != "sig":
        cmd.pop("sig", None)
        try:
            cmd["sig"] = hmac.new(resign, _oracle_canonical(cmd), hashlib.sha256).hexdigest()
        except (ValueError, TypeError):
            cmd["sig"] = "0" * 64
    return json.dumps(cmd, sort_keys=draw(st.booleans())).encode(), PREFIX + name, False


def test_fuzz_verify_never_raises_and_accepts_only_validly_signed(tmp_path: Path) -> None:
    ids = itertools.count()
    seen: dict[str, int] = {}
    with asyncio.Runner() as runner:
        cache = ReplayCache(tmp_path / "fuzz.sqlite3")
        runner.run(cache.__aenter__())
        try:
            v = Verifier("police", KEY, ALLOW, replay=cache, clock=lambda: NOW)

            @settings(
                max_examples=500,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None,
            )
            @given(_payloads(ids))
            def run(example: tuple[bytes, str, bool]) -> None:
                payload, topic_name, fresh_and_valid = example
                result = runner.run(v.verify(payload, topic_name))
                assert isinstance(result, Command | Refusal)
                if isinstance(result, Command):
                    assert _validly_signed(payload), payload
                    seen["accepted"] = seen.get("accepted", 0) + 1
                else:
                    assert isinstance(result.reason, Reason)
                    assert isinstance(result.detail, str)
                    seen[result.reason.value] = seen.get(result.reason.value, 0) + 1
                if fresh_and_valid:
                    assert isinstance(result, Command), result

            run()
        finally:
            runner.run(cache.__aexit__(None, None, None))
    # The generator reached both sides of the property.
    assert seen.get("accepted", 0) > 0
    assert seen.get("malformed", 0) > 0
    assert seen.get("bad_signature", 0) > 0


# --------------------------------------------------------------------------- replies


def test_reply_payloads() -> None:
    refusal = Refusal(Reason.EXPIRED, "expired 3.201 s ago", "cmd-1", "bollard.raise", "police")
    body = json.loads(refusal_payload(refusal, at=NOW))
    assert body == {
        "id": "cmd-1",
        "name": "bollard.raise",
        "status": "refused",
        "reason": "expired",
        "detail": "expired 3.201 s ago",
        "at": "2026-11-22T06:45:01.123Z",
    }
    done = json.loads(result_payload("cmd-1", "bollard.raise", Status.DONE, at=NOW))
    assert (done["status"], done["reason"], done["detail"]) == ("done", None, "")
    assert result_topic_level("cmd-1") == "cmd-1"
    assert result_topic_level(None) == INVALID_ID_LEVEL == "_invalid"
    assert result_topic_level("a/b") == "_invalid"


# --------------------------------------------------------------------------- config wiring


def _write_config(tmp_path: Path, commands: dict[str, Any]) -> Path:
    file = tmp_path / "gw.yaml"
    data = {
        "identity": {"school": "s1", "gateway": "g1", "region": "530102"},
        "state_dir": "state",
        "uplinks": [
            {"name": "police", "endpoints": ["mqtt://127.0.0.1:1883"], "commands": commands},
            {"name": "education", "endpoints": ["mqtt://127.0.0.1:1883"]},
        ],
    }
    file.write_text(json.dumps(data))  # JSON is YAML
    return file


async def test_verifier_from_config(tmp_path: Path, cache: ReplayCache, clock: Clock) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "police.key").write_bytes(b"  \n" + KEY + b"\n\n")
    file = _write_config(
        tmp_path, {"key_file": "keys/police.key", "allow": ["bollard.raise"], "skew_future": 0, "max_ttl": 60}
    )
    cfg = config.load(file)
    police, education = cfg.uplinks
    assert police.commands.key_file == tmp_path / "keys" / "police.key"
    assert police.commands.read_key() == KEY
    assert education.commands.read_key() is None
    assert Verifier.from_config(education, cache) is None
    v = Verifier.from_config(police, cache, clock=clock)
    assert v is not None
    assert (v.uplink, v.allow, v.skew_future, v.max_ttl, v.skew_past) == (
        "police",
        {"bollard.raise"},
        0,
        60,
        40,
    )
    assert isinstance(await check(v, command()), Command)
    refused(await check(v, command("bollard.emergency_raise", command_id="x")), Reason.NOT_ALLOWED)


def test_load_key(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(CommandError, match="31 bytes after stripping whitespace; at least 32"):
        load_key(key_file)
    with pytest.raises(CommandError, match="cannot read"):
        load_key(tmp_path / "absent")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "police.key"
    path.write_bytes(KEY + b"\n")
    return path


async def test_cli_sign_command_output_verifies(
    key_file: Path, capsys: pytest.CaptureFixture[str], verifier: Verifier, clock: Clock
) -> None:
    argv = ["sign-command", "--key-file", str(key_file), "--name", "bollard.emergency_raise"]
    argv += ["--target", "bollard-gate", "--args", '{"reason": "lockdown"}', "--ttl", "60"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cmd = json.loads(out)
    assert out.endswith("\n")
    assert cmd["args"] == {"reason": "lockdown"}
    clock.now = parse_timestamp(cmd["issued_at"])
    result = await check(verifier, out.encode(), PREFIX + "bollard.emergency_raise")
    assert isinstance(result, Command), result
    assert result.expires_at - result.issued_at == timedelta(seconds=60)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "bollard.fly"], "unknown command 'bollard.fly'; known: alarm.ack"),
        (["--args", "{"], "--args is not JSON"),
        (["--args", "[1]"], "--args must be a JSON object"),
        (["--args", '{"x": 1.5}'], "floats are not allowed"),
        (["--id", "bad id"], "command id 'bad id'"),
        (["--ttl", "0"], "ttl must be a positive"),
        (["--target", "gate 1"], "target 'gate 1'"),
        (["--issued-at", "yesterday"], "is not an RFC 3339"),
        (["--key-file", "/nonexistent/k"], "cannot read the command key"),
    ],
)
def test_cli_sign_command_bad_input_exits_2(
    key_file: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = [
        "sign-command",
        "--key-file",
        str(key_file),
        "--name",
        "bollard.raise",
        "--target",
        "bollard-gate",
    ]
    assert main([*argv, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err, captured.err


def test_cli_sign_command_short_key_in_a_subprocess(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("too short\n")
    argv = ["sign-command", "--key-file", str(short), "--name", "alarm.ack", "--target", "box-gate"]
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert f"{short}: the command key is 9 bytes after stripping whitespace" in proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------- the documented example

DOC = ROOT / "docs" / "INTEGRATION.md"


def _doc_example() -> tuple[str, dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### Worked example") :]
    blocks = dict.fromkeys(("json", "text", "python", "sh"), "")
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL):
        if lang in blocks and not blocks[lang]:
            blocks[lang] = body
    key = re.search(r"Key file content \(stripped\): `([^`]+)`", section)
    sig = re.search(r"^sig: `([0-9a-f]{64})`$", section, flags=re.MULTILINE)
    assert key is not None, "the worked example's key line changed"
    assert sig is not None, "the worked example's sig line changed"
    assert all(blocks.values()), f"the worked example lost a code block: {blocks.keys()}"
    return section, {"key": key.group(1).encode(), "sig": sig.group(1), **blocks}


async def test_documented_signing_example_is_right(tmp_path: Path, cache: ReplayCache) -> None:
    _, ex = _doc_example()
    command_sent = json.loads(ex["json"])
    assert command_sent["sig"] == ex["sig"]
    assert canonical(command_sent) == ex["text"].strip("\n").encode("utf-8")
    assert signature(ex["key"], command_sent) == ex["sig"]
    # The gateway accepts it, on the documented topic, at a time inside its window.
    clock = Clock(parse_timestamp(command_sent["issued_at"]))
    v = Verifier("police", ex["key"], frozenset({"bollard.emergency_raise"}), replay=cache, clock=clock)
    topic_name = "campus/530102/km-wuhua-no1-primary/gw-01/cmd/bollard.emergency_raise"
    assert isinstance(await v.verify(ex["json"].encode(), topic_name), Command)


def test_documented_python_snippet_prints_the_sig(tmp_path: Path) -> None:
    _, ex = _doc_example()
    proc = subprocess.run(
        [sys.executable, "-I", "-c", ex["python"]], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ex["sig"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_documented_openssl_one_liner_prints_the_sig() -> None:
    _, ex = _doc_example()
    proc = subprocess.run(["bash", "-c", ex["sh"]], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ex["sig"]


def test_documented_cli_invocation_prints_the_documented_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    section, ex = _doc_example()
    invocation = re.search(r"campus-gateway sign-command (.*?)\n```", section, flags=re.DOTALL)
    assert invocation is not None
    argv = shlex.split(invocation.group(1).replace("\\\n", " "))
    key_path = tmp_path / "police-commands.key"
    key_path.write_bytes(ex["key"] + b"\n")
    argv[argv.index("--key-file") + 1] = str(key_path)
    assert main(["sign-command", *argv]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(ex["json"])

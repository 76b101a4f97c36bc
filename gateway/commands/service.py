"""The command channel wired up: verify what an uplink received, hand it to the devices it
targets, reply on ``cmd-result/{id}`` and audit every command as a ``command.result`` event.

An async context manager (it owns the replay cache and the command tasks). Uplinks call
:meth:`CommandService.submit` from their MQTT message callback; each command runs in a
task of its own, tracked here and cancelled at shutdown, so a slow bollard never holds up
the MQTT loop or another command.

Targets: a device id; ``gate:NAME`` (every device whose driver lists that group, e.g.
every bollard of a gate: a lockdown); ``gateway`` or the gateway id (gateway.self_test,
alarm.ack with an event_id). A command some target cannot take is refused before anything
moves.

``alarm.ack`` with ``args.event_id`` is the platform acknowledging that alarm: it is
recorded durably for the uplink it came on (re-notification stops; DESIGN.md, Guarantees)
before the target device (if any) lights its acknowledgement output.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import structlog

from gateway.commands.replay import ReplayCache
from gateway.commands.reply import Status, refusal_payload, result_payload, result_topic_level
from gateway.commands.signing import valid_id, valid_name
from gateway.commands.verify import Command, Refusal, Verifier
from gateway.config import GatewayConfig
from gateway.driver import Driver, Outcome, Verdict
from gateway.errors import OutboxError
from gateway.events import DeviceRef, EventSink, Observation, Severity
from gateway.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

Reply = Callable[[str, bytes], None]  # (topic level under cmd-result/, payload): the uplink publishes
SelfTest = Callable[[], Awaitable[Outcome]]
Acknowledge = Callable[[str, str], Awaitable[Outcome]]  # (uplink, event id): record the platform's ack

# At most this many commands in progress: a lockdown is one command however many bollards
# it moves; a platform flooding the gateway gets 'busy' refusals instead of unbounded tasks.
MAX_RUNNING = 32
# Audits of 'busy' refusals in flight at most: beyond, a flood is only counted and logged.
MAX_AUDITS = 256
# Every command ends within this: the longest device bound (a bollard's travel x 1.5 + 1 s,
# at most 181 s for a 120 s travel) plus margin. A device that overruns it gets 'failed'.
COMMAND_LIMIT = 200.0
GATEWAY_TARGET = "gateway"
PEEK_MAX = 65536  # a busy refusal reads no bigger payload (the verifier would refuse it anyway)
# The audit of a command cut short by shutdown gets 1 s to commit: the stop is bounded (5 s).
AUDIT_ON_SHUTDOWN = 1.0


class CommandService:
    def __init__(
        self,
        cfg: GatewayConfig,
        drivers: Sequence[Driver],
        sink: EventSink,
        gateway_ref: DeviceRef,
        self_test: SelfTest,
        *,
        acknowledge: Acknowledge | None = None,
    ) -> None:
        self.cfg = cfg
        self.drivers = tuple(drivers)
        self.sink = sink
        self.gateway_ref = gateway_ref
        self.self_test = self_test
        self.acknowledge = acknowledge
        self.verifiers: dict[str, Verifier] = {}
        self._cache: ReplayCache | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._by_id = {d.device.id: d for d in self.drivers}
        self.results: Counter[str] = Counter()  # final statuses, for /metrics
        self._audits: set[asyncio.Task[None]] = set()  # audits of 'busy' refusals

    @property
    def uplinks(self) -> frozenset[str]:
        """Uplinks that take commands (those with a key file)."""
        return frozenset(self.verifiers)

    async def __aenter__(self) -> Self:
        if not any(u.commands.key_file for u in self.cfg.uplinks):
            return self
        cache = ReplayCache(self.cfg.state_dir / "commands.sqlite3")
        await cache.__aenter__()
        self._cache = cache
        try:
            for u in self.cfg.uplinks:
                verifier = Verifier.from_config(u, cache)
                if verifier is not None:
                    self.verifiers[u.name] = verifier
        except BaseException:
            await cache.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await cancel_and_wait(*self._tasks, *self._audits)
        if self._cache is not None:
            await self._cache.__aexit__(exc_type, exc, tb)
            self._cache = None

    def submit(self, uplink: str, topic_name: str, payload: bytes, reply: Reply) -> None:
        """Take one message from ``{base}/cmd/{topic_name}``; never raises."""
        verifier = self.verifiers.get(uplink)
        if verifier is None:
            return  # not subscribed for this uplink; a stray message is not a command
        if len(self._tasks) >= MAX_RUNNING:
            self._busy(uplink, payload, reply)
            return
        task = asyncio.get_running_loop().create_task(
            self._handle(verifier, topic_name, payload, reply), name=f"command:{uplink}:{topic_name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _busy(self, uplink: str, payload: bytes, reply: Reply) -> None:
        """Refuse without verifying (too many running); reply under the command's id if it has one."""
        command_id, name = _peek(payload)
        log.warning("command refused: busy", uplink=uplink, id=command_id, running=len(self._tasks))
        detail = f"{len(self._tasks)} commands in progress; send it again later"
        reply(
            result_topic_level(command_id),
            result_payload(command_id, name, Status.REFUSED, reason="busy", detail=detail),
        )
        if len(self._audits) >= MAX_AUDITS:
            self.results["refused"] += 1  # counted in /metrics; too many to audit one by one
            return
        who = {"id": command_id, "name": name, "target": None, "uplink": uplink}
        audit = asyncio.get_running_loop().create_task(
            self._audit(who, Status.REFUSED, "busy", detail, {}), name=f"command-audit:{uplink}"
        )
        self._audits.add(audit)
        audit.add_done_callback(self._audits.discard)

    async def _handle(self, verifier: Verifier, topic_name: str, payload: bytes, reply: Reply) -> None:
        checked = await verifier.verify(payload, topic_name)
        if isinstance(checked, Refusal):
            log.warning(
                "command refused", uplink=checked.uplink, id=checked.command_id, reason=checked.reason.value
            )
            reply(result_topic_level(checked.command_id), refusal_payload(checked))
            await self._audit(
                {"id": checked.command_id, "name": checked.name, "target": None, "uplink": checked.uplink},
                Status.REFUSED,
                checked.reason.value,
                checked.detail,
                {},
            )
            return
        await self._run(checked, reply)

    async def _run(self, cmd: Command, reply: Reply) -> None:
        level = result_topic_level(cmd.id)
        bad = _bad_args(cmd)
        targets = bad if bad is not None else self._resolve(cmd)
        if isinstance(targets, Outcome):  # refused before anything was tried
            status, reason, detail, results = Status.REFUSED, targets.reason, targets.detail, {}
        else:
            log.info("command accepted", uplink=cmd.uplink, id=cmd.id, name=cmd.name, target=cmd.target)
            reply(level, result_payload(cmd.id, cmd.name, Status.ACCEPTED))
            try:
                outcomes = await self._execute(cmd, targets)
            except asyncio.CancelledError:  # the gateway is stopping: the final word is 'failed'
                await self._interrupted(cmd, reply)
                raise
            status, reason, detail = _aggregate(outcomes)
            results = {dev: _result(o) for dev, o in outcomes.items()}
        log.info(
            "command result", id=cmd.id, name=cmd.name, status=status.value, reason=reason, detail=detail
        )
        reply(level, result_payload(cmd.id, cmd.name, status, reason=reason, detail=detail, results=results))
        who = {"id": cmd.id, "name": cmd.name, "target": cmd.target, "uplink": cmd.uplink}
        await self._audit(who, status, reason, detail, results)

    async def _interrupted(self, cmd: Command, reply: Reply) -> None:
        """A command cut short by shutdown: reply (if the uplink still can) and audit it durably."""
        detail = "the gateway stopped before the command ended; check the devices' state"
        reply(
            result_topic_level(cmd.id),
            result_payload(cmd.id, cmd.name, Status.FAILED, reason="shutdown", detail=detail),
        )
        who = {"id": cmd.id, "name": cmd.name, "target": cmd.target, "uplink": cmd.uplink}
        try:
            async with asyncio.timeout(AUDIT_ON_SHUTDOWN):
                await self._audit(who, Status.FAILED, "shutdown", detail, {})
        except (TimeoutError, OutboxError) as exc:
            log.exception("command audit lost at shutdown", id=cmd.id, error=str(exc) or "timeout")

    def _resolve(self, cmd: Command) -> list[Driver] | Outcome | None:
        """The drivers a command addresses (None: the gateway itself), or why it is refused."""
        if cmd.target in (GATEWAY_TARGET, self.cfg.identity.gateway):
            # gateway.self_test, or an acknowledgement alone (no output to light)
            if cmd.name != "gateway.self_test" and not _is_event_ack(cmd):
                return Outcome(Verdict.REFUSED, "unsupported", f"the gateway itself does not take {cmd.name}")
            return None
        if cmd.target in self._by_id:
            targets = [self._by_id[cmd.target]]
        else:
            targets = [d for d in self.drivers if cmd.target in d.groups]
        if not targets:
            return Outcome(Verdict.REFUSED, "unknown_target", f"no device or group {cmd.target!r}")
        unable = [d.device.id for d in targets if cmd.name not in d.commands]
        if unable:
            return Outcome(Verdict.REFUSED, "unsupported", f"{', '.join(unable)} cannot take {cmd.name}")
        return targets

    async def _execute(self, cmd: Command, targets: list[Driver] | None) -> dict[str, Outcome]:
        """Run the command on every target at once (a lockdown raises all bollards together)."""
        outcomes: dict[str, Outcome] = {}
        if _is_event_ack(cmd):  # recorded before any output moves
            outcomes[GATEWAY_TARGET] = await _bounded(
                self._acknowledge(cmd.uplink, str(cmd.args["event_id"]))
            )
        if targets is None:
            if not outcomes:
                outcomes[GATEWAY_TARGET] = await _bounded(self.self_test())
            return outcomes
        names = [d.device.id for d in targets]
        results = await asyncio.gather(*(_bounded(d.command(cmd.name, cmd.args)) for d in targets))
        outcomes.update(zip(names, results, strict=True))
        return outcomes

    async def _acknowledge(self, uplink: str, event_id: str) -> Outcome:
        if self.acknowledge is None:
            return Outcome(Verdict.DONE, None, "acknowledgements are not tracked", {"ack": "untracked"})
        try:
            return await self.acknowledge(uplink, event_id)
        except OutboxError as exc:
            log.exception("acknowledgement not recorded", uplink=uplink, event_id=event_id)
            return Outcome(Verdict.FAILED, "storage", f"the acknowledgement could not be recorded: {exc}")

    async def _audit(
        self,
        who: Mapping[str, str | None],
        status: Status,
        reason: str | None,
        detail: str,
        results: Mapping[str, Any],
    ) -> None:
        """The command.result event: ``who`` is the command's id, name, target and uplink."""
        data = {
            **who,
            "status": status.value,
            "reason": reason,
            "detail": detail,
            "results": dict(results),
        }
        self.results[status.value] += 1
        severity = Severity.INFO if status is Status.DONE else Severity.MINOR
        await self.sink.publish(Observation(self.gateway_ref, "command.result", severity, data=data))


_EVENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _is_event_ack(cmd: Command) -> bool:
    return cmd.name == "alarm.ack" and "event_id" in cmd.args


def _bad_args(cmd: Command) -> Outcome | None:
    """Arguments the gateway itself reads, checked before anything moves."""
    if _is_event_ack(cmd):
        event_id = cmd.args["event_id"]
        if not isinstance(event_id, str) or _EVENT_ID.fullmatch(event_id) is None:
            return Outcome(Verdict.REFUSED, "bad_args", "args.event_id must be an event id (a UUID)")
    return None


def _peek(payload: bytes) -> tuple[str | None, str | None]:
    """The id and name of a command not verified yet, if they are well formed (for the reply only)."""
    try:
        body = json.loads(payload) if len(payload) <= PEEK_MAX else None
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(body, dict):
        return None, None
    command_id, name = body.get("id"), body.get("name")
    return (
        command_id if isinstance(command_id, str) and valid_id(command_id) else None,
        name if isinstance(name, str) and valid_name(name) else None,
    )


async def _bounded(aw: Awaitable[Outcome]) -> Outcome:
    try:
        async with asyncio.timeout(COMMAND_LIMIT):
            return await aw
    except TimeoutError:
        return Outcome(Verdict.FAILED, "timeout", f"no result within {COMMAND_LIMIT:g} s")


def _result(o: Outcome) -> dict[str, Any]:
    return {"status": o.verdict.value, "reason": o.reason, "detail": o.detail, **o.data}


def _aggregate(outcomes: Mapping[str, Outcome]) -> tuple[Status, str | None, str]:
    """One status for all targets: done if all are, refused if all refused, else failed."""
    verdicts = [o.verdict for o in outcomes.values()]
    if all(v is Verdict.DONE for v in verdicts):
        details = [o.detail for o in outcomes.values()]
        return (
            Status.DONE,
            None,
            details[0] if len(details) == 1 else f"{len(details)} of {len(details)} done",
        )
    bad = [(dev, o) for dev, o in outcomes.items() if o.verdict is not Verdict.DONE]
    first = bad[0][1]
    detail = "; ".join(f"{dev}: {o.reason} ({o.detail})" for dev, o in bad)
    if len(outcomes) > 1:
        done = len(outcomes) - len(bad)
        detail = f"{done} of {len(outcomes)} done; {detail}"
    elif first.detail:
        detail = first.detail
    if all(v is Verdict.REFUSED for v in verdicts):
        return Status.REFUSED, first.reason, detail
    return Status.FAILED, first.reason, detail

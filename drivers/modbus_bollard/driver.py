"""One bollard controller: poll its state, publish transitions, faults and interlocks, and
carry out raise / lower / emergency raise, each confirmed by reading the state back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from drivers.liveness import Liveness, Presence
from drivers.modbus.pdu import (
    READ_COILS,
    READ_DISCRETE_INPUTS,
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
    Request,
)
from drivers.modbus.ticker import Ticker
from drivers.modbus.unit import UnitClient
from drivers.modbus_bollard.config import BollardConfig
from drivers.modbus_bollard.profile import Action, BollardProfile, BollardState, Mode
from gateway.driver import DeviceStatus, Driver, Outcome, Verdict
from gateway.errors import DeviceRejected, DeviceUnavailable, DriverError
from gateway.events import DeviceKind, DeviceRef, EventSink, EventState, Observation, Severity

# 0.1 s between reads while a command is followed: ten reads a second for the few seconds
# of a travel, so the reply and the bollard.state events trail the bollard by < 0.1 s.
CONFIRM_POLL = 0.1
# A controller that took a command shows motion within 1 s (a PLC scan is <= 100 ms, a
# hydraulic valve opens in a few hundred): no motion by then is a failed command.
START_WITHIN = 1.0
# The end of travel is awaited for 1.5 x the profile's travel time plus 1 s: a cold
# hydraulic unit in winter is slower than its data sheet, and motion starts late by up to 1 s.
TRAVEL_MARGIN = 1.5
TRAVEL_START = 1.0

ACTIONS: Mapping[str, Action] = {
    "bollard.raise": Action.RAISE,
    "bollard.lower": Action.LOWER,
    "bollard.emergency_raise": Action.EMERGENCY_RAISE,
}
_MOVING: Mapping[Action, frozenset[BollardState]] = {
    Action.RAISE: frozenset({BollardState.RAISING, BollardState.EMERGENCY}),
    Action.EMERGENCY_RAISE: frozenset({BollardState.EMERGENCY, BollardState.RAISING}),
    Action.LOWER: frozenset({BollardState.LOWERING}),
}
_RISING = frozenset({BollardState.RAISING, BollardState.EMERGENCY})
_STATE_SEVERITY = {BollardState.EMERGENCY: Severity.MAJOR, BollardState.FAULT: Severity.MAJOR}
_READS = {
    "input_registers": READ_INPUT_REGISTERS,
    "holding_registers": READ_HOLDING_REGISTERS,
    "discrete_inputs": READ_DISCRETE_INPUTS,
    "coils": READ_COILS,
}


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of the controller, decoded through the profile."""

    state: BollardState
    fault: int
    fault_text: str | None
    pressure_bar: float | None
    position_pct: float | None
    mode: Mode
    loop: bool
    photocell: bool

    @property
    def occupied(self) -> bool:
        """Something is in the bollard's way: a vehicle on the loop or the photocell blocked."""
        return self.loop or self.photocell

    def data(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "mode": self.mode.value,
            "position_pct": self.position_pct,
            "pressure_bar": self.pressure_bar,
            "loop": self.loop,
            "photocell": self.photocell,
            "fault_code": self.fault,
        }


class BollardDriver(Driver):
    """Polls one controller and takes the bollard commands."""

    commands: ClassVar[frozenset[str]] = frozenset(ACTIONS)

    def __init__(self, config: BollardConfig, profile: BollardProfile, unit: UnitClient) -> None:
        self.config = config
        self.profile = profile
        self.unit = unit
        self.device = DeviceRef(config.id, DeviceKind.BOLLARD, config.name, config.location)
        self.groups = (f"gate:{config.gate}",) if config.gate else ()
        self.status = DeviceStatus()
        self.last: Reading | None = None
        s, p = profile.status, profile.presence
        self._status_read = Request(_READS[s.table], s.address, s.count)
        self._presence_read = Request(_READS[p.table], p.address, p.count)
        self._lock = asyncio.Lock()  # one read and the events it causes at a time: poll vs. command
        self._sink: EventSink | None = None
        self._interlock = False  # a bollard.interlock is active (presence blocked a rise)
        self._generation = 0  # bumped by every command: a newer command supersedes one in progress
        self._log = structlog.get_logger(__name__).bind(device=config.id)
        self._liveness = Liveness(self.device, self.status, unit.where, config.offline_after, self._log)

    @property
    def presence(self) -> Presence:
        return self._liveness.presence

    async def run(self, sink: EventSink) -> None:
        """Poll at the configured interval until cancelled."""
        self._sink = sink
        ticker = Ticker(self.config.poll_interval)
        self._log.info("polling", **self.unit.where, gate=self.config.gate)
        try:
            while True:
                await ticker.wait()
                await self.refresh(sink)
        finally:
            self._sink = None

    async def refresh(self, sink: EventSink) -> Reading | None:
        """Read the controller now and publish what changed; None if it did not answer."""
        async with self._lock:
            self.status.polls += 1
            started = time.perf_counter()
            try:
                reading = await self._read()
            except DriverError as exc:
                await self._liveness.failed(exc, sink)
                return None
            self.status.poll_latency.observe(time.perf_counter() - started)
            await self._liveness.ok(sink)
            if reading != self.last:
                await self._publish_changes(sink, self.last, reading)
                self.last = reading
                self.status.detail.update(reading.data())
            return reading

    async def command(self, name: str, args: Mapping[str, Any]) -> Outcome:
        action = ACTIONS.get(name)
        if action is None:
            return await super().command(name, args)
        if args:
            return Outcome(Verdict.REFUSED, "bad_args", f"{name} takes no args")
        sink = self._sink
        if sink is None:
            return Outcome(Verdict.FAILED, "not_running", f"{self.device.id} is not running")
        self._generation += 1
        generation = self._generation
        reading = await self.refresh(sink)
        if reading is None:
            return Outcome(Verdict.FAILED, "unavailable", self.status.last_error or "no answer")
        refusal = await self._refusal(sink, action, reading)
        if refusal is not None:
            return refusal
        return await self._move(sink, action, reading, generation)

    async def _move(self, sink: EventSink, action: Action, reading: Reading, generation: int) -> Outcome:
        """Write the command, then follow the bollard to the end of its travel."""
        target = BollardState.LOWERED if action is Action.LOWER else BollardState.RAISED
        if reading.state is target:
            return Outcome(Verdict.DONE, None, f"already {target.value}", reading.data())
        try:
            await self.unit.write_register(self.profile.command.address, self.profile.command.values[action])
        except DeviceRejected as exc:  # the read-back differs: ignored (local mode) or refused (presence)
            after = await self.refresh(sink)
            why = await self._refusal(sink, action, after) if after is not None else None
            return why or Outcome(Verdict.FAILED, "rejected", str(exc), after.data() if after else {})
        except DeviceUnavailable as exc:
            return Outcome(Verdict.FAILED, "unavailable", str(exc))
        except DriverError as exc:
            return Outcome(Verdict.FAILED, "device_error", str(exc))
        self._log.info("command written", action=action.value)
        return await self._follow(sink, action, target, generation)

    async def _refusal(self, sink: EventSink, action: Action, r: Reading) -> Outcome | None:
        """Why the controller's state forbids ``action`` now; None if nothing does."""
        if r.mode is Mode.LOCAL or r.state is BollardState.MANUAL:
            return Outcome(Verdict.REFUSED, "local_mode", "the controller is in local/manual mode", r.data())
        if r.fault:
            return Outcome(Verdict.REFUSED, "fault", f"fault {r.fault}: {r.fault_text}", r.data())
        if action is not Action.LOWER and r.occupied and r.state is not BollardState.RAISED:
            await self._interlocked(sink, r, action, "refused")
            what = " and ".join(n for n, on in (("vehicle loop", r.loop), ("photocell", r.photocell)) if on)
            return Outcome(Verdict.REFUSED, "interlock", f"{what} occupied: will not rise", r.data())
        return None

    async def _follow(
        self, sink: EventSink, action: Action, target: BollardState, generation: int
    ) -> Outcome:
        """Read the state until it reaches ``target``, within the travel bound."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        bound = self.profile.travel.seconds(action) * TRAVEL_MARGIN + TRAVEL_START
        reading, started = self.last, False
        for _ in range(int(bound / CONFIRM_POLL) + 2):  # bounded; the time checks end it first
            await asyncio.sleep(CONFIRM_POLL)
            if self._generation != generation:
                return Outcome(Verdict.FAILED, "superseded", "a newer command took over this bollard")
            fresh = await self.refresh(sink)
            elapsed = loop.time() - start
            if fresh is not None:
                reading = fresh
                if fresh.state is target:
                    return Outcome(Verdict.DONE, None, f"{target.value} in {elapsed:.1f} s", fresh.data())
                ended = await self._ended(action, fresh)
                if ended is not None:
                    if ended.reason == "interlock" and not self._interlock:
                        # reversed and back down between two reads: no event from the poll
                        await self._interlocked(sink, fresh, action, "reversed")
                    return ended
                started = started or fresh.state in _MOVING[action]
            if not started and elapsed >= START_WITHIN:
                return self._not_confirmed(f"no motion within {START_WITHIN:g} s", reading)
            if elapsed >= bound:
                break
        return self._not_confirmed(f"not {target.value} within {bound:.1f} s", reading)

    async def _ended(self, action: Action, r: Reading) -> Outcome | None:
        """A reading that ends a command in progress short of its target."""
        if r.fault:
            return Outcome(Verdict.FAILED, "fault", f"fault {r.fault}: {r.fault_text}", r.data())
        if r.mode is Mode.LOCAL or r.state is BollardState.MANUAL:
            return Outcome(Verdict.FAILED, "local_mode", "switched to local/manual mode", r.data())
        # Presence turns a rise back: seen lowering, or already back down if the rise had
        # barely started (lowering from a few % is over before the next read).
        back = r.state is BollardState.LOWERING or (r.occupied and r.state is BollardState.LOWERED)
        if action is not Action.LOWER and back:
            reason = "interlock" if r.occupied else "reversed"
            return Outcome(Verdict.FAILED, reason, "the controller reversed the rise", r.data())
        return None

    def _not_confirmed(self, what: str, r: Reading | None) -> Outcome:
        if r is None:
            return Outcome(Verdict.FAILED, "not_confirmed", f"{what}; no reading")
        pos = "?" if r.position_pct is None else f"{r.position_pct:g} %"
        return Outcome(
            Verdict.FAILED, "not_confirmed", f"{what}: state {r.state.value}, position {pos}", r.data()
        )

    async def _read(self) -> Reading:
        regs = (await self.unit.read(self._status_read)).registers
        bits = (await self.unit.read(self._presence_read)).bits
        p = self.profile
        s, pr = p.status, p.presence
        fault = regs[s.fault] if s.fault is not None else 0
        return Reading(
            state=p.state_of(regs[s.state]),
            fault=fault,
            fault_text=p.fault_text(fault) if fault else None,
            pressure_bar=None if s.pressure is None else round(regs[s.pressure] * p.pressure_scale, 2),
            position_pct=None if s.position is None else round(regs[s.position] * p.position_scale, 1),
            mode=p.modes.get(regs[s.mode], Mode.LOCAL) if s.mode is not None else Mode.REMOTE,
            loop=bits[pr.loop] if pr.loop is not None else False,
            photocell=bits[pr.photocell] if pr.photocell is not None else False,
        )

    async def _publish_changes(self, sink: EventSink, old: Reading | None, new: Reading) -> None:
        if old is None or new.state is not old.state or new.mode is not old.mode:
            data = {**new.data(), "previous": old.state.value if old else None}
            self._log.info("bollard.state", state=new.state.value, previous=data["previous"])
            severity = _STATE_SEVERITY.get(new.state, Severity.INFO)
            await sink.publish(Observation(self.device, "bollard.state", severity, data=data))
        if old is not None and old.fault and old.fault != new.fault:
            await self._fault_event(sink, old, EventState.CLEARED)
        if new.fault and (old is None or old.fault != new.fault):
            await self._fault_event(sink, new, EventState.ACTIVE)
        if old is not None and old.state in _RISING and new.state is BollardState.LOWERING and new.occupied:
            await self._interlocked(sink, new, None, "reversed")
        if self._interlock and not new.occupied:
            self._interlock = False
            data = {"loop": new.loop, "photocell": new.photocell}
            await sink.publish(
                Observation(self.device, "bollard.interlock", Severity.INFO, EventState.CLEARED, data=data)
            )

    async def _fault_event(self, sink: EventSink, r: Reading, state: EventState) -> None:
        self._log.warning("bollard.fault", code=r.fault, text=r.fault_text, state=state.value)
        data = {"code": r.fault, "text": r.fault_text, "state_of_bollard": r.state.value}
        severity = Severity.MAJOR if state is EventState.ACTIVE else Severity.INFO
        await sink.publish(Observation(self.device, "bollard.fault", severity, state, data=data))

    async def _interlocked(self, sink: EventSink, r: Reading, action: Action | None, how: str) -> None:
        """Presence blocked a rise (``refused``) or turned one back (``reversed``)."""
        self._interlock = True
        self._log.warning("bollard.interlock", how=how, loop=r.loop, photocell=r.photocell)
        data = {
            "how": how,
            "action": action.value if action else None,
            "loop": r.loop,
            "photocell": r.photocell,
            "state_of_bollard": r.state.value,
        }
        await sink.publish(
            Observation(self.device, "bollard.interlock", Severity.MAJOR, EventState.ACTIVE, data=data)
        )

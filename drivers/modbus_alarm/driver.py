"""One alarm box: poll it, run its zones, publish what changed, report when it goes silent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
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
from drivers.modbus_alarm.config import AlarmBoxConfig, ZoneOverride
from drivers.modbus_alarm.latches import LatchStore
from drivers.modbus_alarm.profile import Profile, Table, ZoneModel
from drivers.modbus_alarm.zones import Band, Debounce, Eol, ZoneEvent, ZoneSet, ZoneSpec
from gateway.driver import DeviceStatus, Driver, Outcome, Verdict
from gateway.errors import DeviceUnavailable, DriverError
from gateway.events import DeviceKind, DeviceRef, EventSink, Observation

# 3 ms between the reads that confirm a change: an induced spike on a long cable run lasts
# microseconds (and I/O modules filter their inputs over 1-3 ms themselves), so two reads
# 3 ms apart still reject it, while a press (held for hundreds of ms) is accepted 3 ms after
# it is first seen instead of a whole poll interval later. Contact bounce (1-10 ms) can at
# worst defer a press to the next regular poll.
CONFIRM_DELAY = 0.003
# At most this many confirming reads in a row, then the regular grid again: an input
# that flaps faster than the debounce never turns polling into a 200 Hz loop.
MAX_CONFIRMS = 4


def zone_specs(profile: Profile, overrides: Mapping[int, ZoneOverride]) -> list[ZoneSpec]:
    """The profile's zones with the site's overrides; an override with a type on an input
    the profile leaves unused makes it a zone (normally open, no supervision)."""
    analog = profile.analog
    bands = tuple(Band(b.band, b.below) for b in analog.bands) if analog else ()
    models = {z.input: z for z in profile.zones}
    for n, o in overrides.items():
        if n not in models and o.type is not None and n < profile.inputs.count:
            models[n] = ZoneModel(input=n, type=o.type)
    specs = []
    for n, z in sorted(models.items()):
        o = overrides.get(n, ZoneOverride())
        eol = Eol(z.eol_register, bands, analog.scale) if analog and z.eol_register is not None else None
        name = o.name if o.name is not None else z.name
        specs.append(ZoneSpec(n, o.type or z.type, name, o.location or "", z.normally_closed, eol))
    return specs


def debounce_rule(profile: Profile, cfg: AlarmBoxConfig) -> Debounce:
    if cfg.debounce_ms is not None:
        return Debounce(seconds=cfg.debounce_ms / 1000)
    if cfg.debounce_samples is not None:
        return Debounce(samples=cfg.debounce_samples)
    ms = profile.debounce.ms
    return Debounce(samples=profile.debounce.samples, seconds=None if ms is None else ms / 1000)


class AlarmBoxDriver(Driver):
    """Polls one box through its hub and publishes zone changes and presence changes."""

    commands: ClassVar[frozenset[str]] = frozenset({"alarm.reset", "alarm.ack"})

    def __init__(
        self, config: AlarmBoxConfig, profile: Profile, unit: UnitClient, latches: LatchStore | None = None
    ) -> None:
        self.config = config
        self.profile = profile
        self.unit = unit
        self.device = DeviceRef(config.id, DeviceKind.ALARM_BOX, config.name, config.location)
        self.status = DeviceStatus()
        self._reader = BoxReader(profile)
        rule = debounce_rule(profile, config)
        self._zones = ZoneSet(zone_specs(profile, config.zones), rule)
        # A time-based debounce is confirmed once its time has passed (within one interval).
        hold = rule.seconds if rule.seconds is not None else 0.0
        self._confirm_delay = min(max(CONFIRM_DELAY, hold), config.poll_interval)
        self._latches = latches or LatchStore(None, config.id)
        self.status.detail["latched"] = []
        self._sink: EventSink | None = None
        self._lock = asyncio.Lock()  # zone state and its publishing: poll loop vs. reset()
        self._log = structlog.get_logger(__name__).bind(device=config.id)
        self._liveness = Liveness(self.device, self.status, unit.where, config.offline_after, self._log)
        self._ack_until: float | None = None  # loop time at which the lit ack output goes off

    async def run(self, sink: EventSink) -> None:
        """Poll at the configured interval until cancelled."""
        self._sink = sink
        restored = self._zones.restore_latched(self._latches.load())
        if restored:
            self.status.detail["latched"] = self._zones.latched
            self._log.info("latched panic zones restored", zones=restored)
        ticker = Ticker(self.config.poll_interval)
        self._log.info("polling", **self.unit.where, profile=self.config.profile)
        confirms = 0
        try:
            while True:
                if self._zones.pending and confirms < MAX_CONFIRMS:
                    confirms += 1
                    await asyncio.sleep(self._confirm_delay)  # off the grid: the grid stays put
                else:
                    confirms = 0
                    await ticker.wait()
                await self.poll(sink)
        finally:
            self._sink = None

    async def poll(self, sink: EventSink) -> None:
        """One poll: read, update zones, publish. Device errors are handled here."""
        self.status.polls += 1
        started = time.perf_counter()
        try:
            inputs, analog = await self._read()
        except DriverError as exc:
            await self._liveness.failed(exc, sink)
            return
        self.status.poll_latency.observe(time.perf_counter() - started)
        await self._liveness.ok(sink)
        if self._ack_until is not None:
            await self._ack_expiry()
        if self._zones.unchanged(inputs, analog):  # most polls: nothing to do
            return
        async with self._lock:
            events = self._zones.update(inputs, analog, time.monotonic())
            if events:  # the latched set changes only with an event (or a reset): skip the scan
                await self._publish_all(sink, events)
                latched = self._zones.latched
                self.status.detail["latched"] = latched
                await self._latches.save(latched)

    async def reset(self, zone: int | None = None) -> list[int]:
        """Clear released latched panic zones (all, or one); returns the cleared zone numbers.

        A zone whose button is still held stays latched and is not in the result.
        Raises ValueError for an unknown zone, RuntimeError when not running.
        """
        sink = self._sink
        if sink is None:
            raise RuntimeError(f"{self.device.id}: not running")
        async with self._lock:
            cleared, events = self._zones.reset(zone, cleared_by="command")
            await self._publish_all(sink, events)
            self.status.detail["latched"] = self._zones.latched
            await self._latches.save(self._zones.latched)
        self._log.info("reset", zone=zone, cleared=cleared)
        return cleared

    async def set_output(self, name: str, on: bool) -> None:
        """Switch a named output of the profile (ack_led, siren), verified by reading back.

        Raises ValueError for a name the profile does not have, and the hub's
        DeviceUnavailable / DeviceProtocolError / DeviceRejected on failure.
        """
        out = self.profile.outputs.get(name)
        if out is None:
            raise ValueError(
                f"{self.device.id}: no output {name!r}; profile has {sorted(self.profile.outputs)}"
            )
        if out.table is Table.COILS:
            await self.unit.write_coil(out.address, on)
        else:
            await self.unit.write_register(out.address, int(on))
        self._log.info("output set", output=name, on=on)

    async def _read(self) -> tuple[Sequence[bool], Sequence[int] | None]:
        return await self._reader.read(self.unit)

    @property
    def presence(self) -> Presence:
        return self._liveness.presence

    async def command(self, name: str, args: Mapping[str, Any]) -> Outcome:
        """alarm.reset (args: optional ``zone``) and alarm.ack (lights ``ack_led``)."""
        if self._sink is None:
            return Outcome(Verdict.FAILED, "not_running", f"{self.device.id} is not running")
        try:
            if name == "alarm.reset":
                return await self._reset_command(args)
            if name == "alarm.ack":
                return await self._ack_command(args)
        except DeviceUnavailable as exc:
            return Outcome(Verdict.FAILED, "unavailable", str(exc))
        except DriverError as exc:  # protocol error or rejected write: the box did not do it
            return Outcome(Verdict.FAILED, "device_error", str(exc))
        return await super().command(name, args)

    async def _reset_command(self, args: Mapping[str, Any]) -> Outcome:
        zone = args.get("zone")
        zones = self._zones.zones
        if set(args) - {"zone"} or (zone is not None and (type(zone) is not int or zone not in zones)):
            return Outcome(Verdict.REFUSED, "bad_args", f"args: optional 'zone', one of {sorted(zones)}")
        cleared = await self.reset(zone)
        held = [z for z in self._zones.latched if zone is None or z == zone]
        data = {"cleared": cleared, "latched": self._zones.latched}
        if held:
            return Outcome(Verdict.REFUSED, "held", f"zones {held} still pressed: reset after release", data)
        return Outcome(Verdict.DONE, None, f"cleared zones {cleared}" if cleared else "nothing latched", data)

    async def _ack_command(self, args: Mapping[str, Any]) -> Outcome:
        if set(args) - {"event_id"}:  # the gateway records the event's acknowledgement itself
            return Outcome(Verdict.REFUSED, "bad_args", "alarm.ack takes only an optional event_id")
        if "ack_led" not in self.profile.outputs:
            return Outcome(Verdict.REFUSED, "unsupported", f"profile {self.config.profile!r} has no ack_led")
        await self.set_output("ack_led", True)
        self._ack_until = asyncio.get_running_loop().time() + self.config.ack_seconds
        return Outcome(Verdict.DONE, None, f"ack_led on for {self.config.ack_seconds:g} s")

    async def _ack_expiry(self) -> None:
        """Switch the ack output off once its time is up; retried at the next poll on failure."""
        assert self._ack_until is not None
        if asyncio.get_running_loop().time() < self._ack_until:
            return
        try:
            await self.set_output("ack_led", False)
        except DriverError as exc:
            self._log.warning("ack_led off failed; retrying", error=str(exc))
            return
        self._ack_until = None

    async def _publish_all(self, sink: EventSink, events: Sequence[ZoneEvent]) -> None:
        now = time.time()
        for e in events:
            self._log.info(e.type, state=e.state.value, zone=e.data["zone"], contact_id=e.contact_id)
            await sink.publish(Observation(self.device, e.type, e.severity, e.state, now, dict(e.data)))


_TABLE_READS = {
    Table.DISCRETE_INPUTS: READ_DISCRETE_INPUTS,
    Table.COILS: READ_COILS,
    Table.INPUT_REGISTERS: READ_INPUT_REGISTERS,
    Table.HOLDING_REGISTERS: READ_HOLDING_REGISTERS,
}


class BoxReader:
    """The one or two requests a poll makes, built once from the profile."""

    def __init__(self, profile: Profile) -> None:
        block = profile.inputs
        self.count = block.count
        self.packed = block.is_packed
        self.inputs = Request(_TABLE_READS[block.table], block.address, block.request_count)
        a = profile.analog
        self.analog = Request(_TABLE_READS[a.table], a.address, a.count) if a is not None else None

    async def read(self, unit: UnitClient) -> tuple[Sequence[bool], Sequence[int] | None]:
        reply = await unit.read(self.inputs)
        inputs: Sequence[bool] = unpack_bits(reply.registers, self.count) if self.packed else reply.bits
        if self.analog is None:
            return inputs, None
        return inputs, (await unit.read(self.analog)).registers


def unpack_bits(registers: Sequence[int], count: int) -> list[bool]:
    """16 inputs per register, lowest bit first."""
    return [bool(registers[i // 16] >> (i % 16) & 1) for i in range(count)]

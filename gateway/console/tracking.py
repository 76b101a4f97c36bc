"""Dedupe and sequence tracking for the console, in bounded memory.

:class:`RecentIds` remembers the last event ids (an LRU set) so a duplicate is counted,
not shown as new; :class:`SeqTracker` follows each gateway's ``seq`` and says, as a
:class:`SeqVerdict`, whether an event reveals a gap, fills one (late) or is out of order.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

DEDUP_CAPACITY: Final = 100_000  # event ids remembered for dedupe (the contract)
MAX_GATEWAYS: Final = 10_000  # gateways whose seq is tracked (least recently seen dropped)
MAX_MISSING_RANGES: Final = 1_000  # missing seq ranges per gateway (oldest dropped)


class RecentIds:
    """The last ``capacity`` ids seen (an LRU set): dedupe in bounded memory."""

    def __init__(self, capacity: int = DEDUP_CAPACITY) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, item: str) -> bool:
        """True if ``item`` is new (and now remembered), False if it was seen."""
        if item in self._ids:
            self._ids.move_to_end(item)
            return False
        self._ids[item] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(frozen=True, slots=True)
class SeqVerdict:
    """What an event's seq says: the gap it reveals, whether it fills one, or neither."""

    gap: tuple[int, int] | None = None  # seqs first..last missing before this one
    late: bool = False  # it fills a gap flagged earlier
    unexpected: bool = False  # at or below the last seq without filling a gap


class SeqTracker:
    """Per gateway: the highest ``seq`` seen and the ranges missing below it (bounded).

    A re-notification (``repeat``) carries its first copy's seq: it may fill a gap, or be
    the newest seq seen, but an old one is no anomaly. A gateway whose seq restarts at 1
    (its state was wiped) starts over.

    The missing ranges of a gateway are disjoint and kept in seq order (a new gap is always
    above every earlier one; a fill splits a range in place), so an event finds its range
    by bisection. At most ``max_ranges`` are kept, whether a gap added one or a fill split
    one: the oldest (lowest) go first, and a seq of theirs arriving later is only "out of
    order". Per event: a bisection and a list edit of at most ``max_ranges`` entries.
    """

    def __init__(self, max_gateways: int = MAX_GATEWAYS, max_ranges: int = MAX_MISSING_RANGES) -> None:
        if max_ranges < 1:
            raise ValueError("max_ranges must be at least 1")
        self.max_gateways = max_gateways
        self.max_ranges = max_ranges
        self._last: OrderedDict[str, int] = OrderedDict()
        # Per gateway, the first and the last seq of each missing range, both ascending.
        self._missing: dict[str, tuple[list[int], list[int]]] = {}

    def see(self, gateway: str, seq: int, *, repeat: bool = False) -> SeqVerdict:
        last = self._last.get(gateway)
        if self._fill(gateway, seq):
            return SeqVerdict(late=True)
        if last is None:
            if not repeat:  # a repeat's seq may be old: it is no baseline
                self._remember(gateway, seq)
            return SeqVerdict()
        if seq > last:
            self._remember(gateway, seq)
            if seq == last + 1:
                return SeqVerdict()
            gap = (last + 1, seq - 1)
            firsts, lasts = self._missing.setdefault(gateway, ([], []))
            firsts.append(gap[0])
            lasts.append(gap[1])
            self._cap(firsts, lasts)
            return SeqVerdict(gap=gap)
        if repeat:
            return SeqVerdict()
        if seq == 1:  # the gateway lost its state and counts from 1 again
            self._missing.pop(gateway, None)
            self._remember(gateway, seq)
        return SeqVerdict(unexpected=True)

    def missing(self, gateway: str) -> int:
        """How many seqs of this gateway are still missing."""
        firsts, lasts = self._missing.get(gateway, ((), ()))
        return sum(b - a + 1 for a, b in zip(firsts, lasts, strict=True))

    def missing_ranges(self, gateway: str) -> list[tuple[int, int]]:
        """The ranges of this gateway's missing seqs (first, last), oldest first."""
        firsts, lasts = self._missing.get(gateway, ((), ()))
        return list(zip(firsts, lasts, strict=True))

    def _remember(self, gateway: str, seq: int) -> None:
        self._last[gateway] = seq
        self._last.move_to_end(gateway)
        if len(self._last) > self.max_gateways:
            old, _ = self._last.popitem(last=False)
            self._missing.pop(old, None)

    def _fill(self, gateway: str, seq: int) -> bool:
        ranges = self._missing.get(gateway)
        if ranges is None:
            return False
        firsts, lasts = ranges
        i = bisect_right(firsts, seq) - 1  # the last range starting at or below seq
        if i < 0 or seq > lasts[i]:
            return False
        first, last = firsts[i], lasts[i]
        if first == last:  # its only seq: the range is gone
            del firsts[i], lasts[i]
        elif seq == first:
            firsts[i] = seq + 1
        elif seq == last:
            lasts[i] = seq - 1
        else:  # from the middle: two ranges, one more to keep within the bound
            lasts[i] = seq - 1
            firsts.insert(i + 1, seq + 1)
            lasts.insert(i + 1, last)
            self._cap(firsts, lasts)
        return True

    def _cap(self, firsts: list[int], lasts: list[int]) -> None:
        excess = len(firsts) - self.max_ranges
        if excess > 0:  # the oldest ranges go
            del firsts[:excess], lasts[:excess]

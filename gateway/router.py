"""Per-uplink routing: which uplinks get an event, by type pattern and minimum severity."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.config import RouteConfig, UplinkConfig
from gateway.events import Observation, Severity


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [re.escape(p).replace(r"\*", ".*") for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


@dataclass(frozen=True)
class Route:
    uplink: str
    include: re.Pattern[str] | None
    exclude: re.Pattern[str] | None
    min_rank: int

    @classmethod
    def from_config(cls, uplink: str, cfg: RouteConfig) -> Route:
        return cls(uplink, _compile(cfg.types), _compile(cfg.exclude), cfg.min_severity.rank)

    def accepts(self, event_type: str, severity: Severity) -> bool:
        if severity.rank < self.min_rank:
            return False
        if self.include is None or not self.include.fullmatch(event_type):
            return False
        return not (self.exclude is not None and self.exclude.fullmatch(event_type))


class Router:
    """Maps an observation to the uplinks that get it. Results are cached per (type, severity)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)
        self._cache: dict[tuple[str, Severity], tuple[str, ...]] = {}

    @classmethod
    def from_uplinks(cls, uplinks: Iterable[UplinkConfig]) -> Router:
        return cls([Route.from_config(u.name, u.route) for u in uplinks])

    def targets(self, obs: Observation) -> tuple[str, ...]:
        key = (obs.type, obs.severity)
        hit = self._cache.get(key)
        if hit is None:
            hit = tuple(r.uplink for r in self._routes if r.accepts(obs.type, obs.severity))
            if len(self._cache) < 4096:  # bound: event types are a small closed set in practice
                self._cache[key] = hit
        return hit


def ack_filter(uplinks: Iterable[UplinkConfig]) -> Callable[[str, str], bool] | None:
    """(uplink, event type) -> its platform must acknowledge such alarms (``platform.ack_types``)."""
    patterns = {
        u.name: pattern
        for u in uplinks
        if u.platform is not None and (pattern := _compile(u.platform.ack_types)) is not None
    }
    if not patterns:
        return None

    def needs_ack(uplink: str, event_type: str) -> bool:
        pattern = patterns.get(uplink)
        return pattern is not None and pattern.fullmatch(event_type) is not None

    return needs_ack

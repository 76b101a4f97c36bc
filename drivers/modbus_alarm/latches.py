"""Latched panic zones persisted per box, so a restart neither forgets nor repeats a latch.

GB 50394 wants a panic alarm to stay latched until a person resets it. Without this
file a gateway restart would forget the latch: the platform would keep an active alarm
that no reset could ever clear. The file is tiny and written only when the set of
latched zones changes (a person pressed or reset something), atomically.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class LatchStore:
    def __init__(self, state_dir: Path | None, device_id: str) -> None:
        self.path = state_dir / f"{device_id}.latched.json" if state_dir is not None else None
        self._saved: tuple[int, ...] = ()

    def load(self) -> list[int]:
        """The zones latched when the gateway stopped; [] if none, or if the file is unusable."""
        if self.path is None or not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            zones = [int(z) for z in data["latched"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("latch file unusable; starting unlatched", path=str(self.path), error=str(exc))
            return []
        self._saved = tuple(sorted(zones))
        return zones

    async def save(self, latched: list[int]) -> None:
        """Persist ``latched`` if it changed; durable (fsync) before it returns."""
        zones = tuple(sorted(latched))
        if self.path is None or zones == self._saved:
            return
        await asyncio.to_thread(_write_atomic, self.path, json.dumps({"latched": list(zones)}))
        self._saved = zones


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

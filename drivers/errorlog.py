"""Log a failing streak once, then count; summarise now and then; say when it ends."""

from __future__ import annotations

import time
from typing import Any

# A still-failing streak is summarised at most once a minute: enough for a technician
# reading the journal, far from the 5 lines a second a 0.2 s poll would otherwise write.
SUMMARY_EVERY = 60.0


class RepeatedError:
    """One streak of the same kind of failure (a device not answering, a link down)."""

    def __init__(self, log: Any, event: str, every: float = SUMMARY_EVERY) -> None:
        self._log = log
        self._event = event
        self._every = every
        self._count = 0
        self._last_kind = ""
        self._last_logged = 0.0

    @property
    def count(self) -> int:
        return self._count

    def failed(self, kind: str, **context: Any) -> None:
        """Record a failure; log the first of a streak, a change of ``kind``, or a periodic summary.

        ``kind`` is a stable name for the failure (an exception class name), not its
        message: messages carry changing detail that must not defeat the rate limit.
        """
        self._count += 1
        now = time.monotonic()
        if self._count == 1 or kind != self._last_kind:
            self._log.warning(self._event, kind=kind, failures=self._count, **context)
            self._last_logged = now
        elif now - self._last_logged >= self._every:
            self._log.warning(f"{self._event} (still)", kind=kind, failures=self._count, **context)
            self._last_logged = now
        self._last_kind = kind

    def recovered(self, **context: Any) -> None:
        """End the streak; log once if there was one."""
        if self._count:
            self._log.info(f"{self._event}: recovered", failures=self._count, **context)
        self._count = 0
        self._last_kind = ""

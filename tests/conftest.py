"""Suite-wide fixtures: nothing a test started outlives it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import daemon


@pytest.fixture(autouse=True)
def _stop_daemons() -> Iterator[None]:
    yield
    while daemon.STARTED:
        daemon.STARTED.pop().stop()

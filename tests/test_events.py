"""Event stamping helpers: the fast paths give exactly what the obvious code gives."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from gateway.events import format_time, uuid7


def reference_time(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_format_time_matches_datetime(ts: float) -> None:
    assert format_time(ts) == reference_time(ts)


def test_format_time_edges_and_cache_bound() -> None:
    for ts in (0.0, 0.9995, 0.9999996, 1.0, 1e9 + 0.0005, 1e9 + 0.9999995, 1_790_000_000.087):
        assert format_time(ts) == reference_time(ts)
    for i in range(100):  # more distinct seconds than the cache holds
        assert format_time(1e9 + i + 0.25) == reference_time(1e9 + i + 0.25)


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_uuid7_is_a_canonical_version_7_uuid_in_time_order(ts: float) -> None:
    text = uuid7(ts)
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 7
    assert parsed.int >> 80 == int(ts * 1000) & ((1 << 48) - 1)
    assert uuid7(ts + 0.002) > text

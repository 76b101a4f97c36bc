"""The reply to a command, published on ``{prefix}/{school}/{gateway}/cmd-result/{id}``.

The payload is one JSON object (docs/INTEGRATION.md, "Commands", is the contract)::

    {"id": "...", "name": "bollard.raise", "status": "refused", "reason": "expired",
     "detail": "expired 3.201 s ago", "at": "2026-11-22T06:45:35.324Z"}

``status``: ``accepted`` (passed every check, handed to the device layer; ``done`` or
``failed`` follows), ``done``, ``failed`` (the device layer could not do it or would not:
``reason`` says why) or ``refused`` (the verifier refused it; nothing was attempted;
``reason`` is a :class:`~gateway.commands.verify.Reason`). ``reason`` is null for
``accepted`` and ``done``. ``id`` and ``name`` are null when they could not be read, and
such a reply goes to ``cmd-result/_invalid`` (no valid id starts with ``_``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from gateway.commands.signing import format_timestamp, valid_id
from gateway.commands.verify import Refusal

# The reply topic level for a command whose id could not be read; the id pattern
# (first character a letter or digit) keeps it from clashing with a real id.
INVALID_ID_LEVEL: Final = "_invalid"


class Status(enum.StrEnum):
    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"


def result_topic_level(command_id: str | None) -> str:
    """The last level of the reply topic: the id, or :data:`INVALID_ID_LEVEL`."""
    return command_id if command_id is not None and valid_id(command_id) else INVALID_ID_LEVEL


def result_payload(
    command_id: str | None,
    name: str | None,
    status: Status,
    *,
    reason: str | None = None,
    detail: str = "",
    at: datetime | None = None,
    results: Mapping[str, Any] | None = None,
) -> bytes:
    """The reply's JSON bytes (compact, UTF-8). ``at`` defaults to now. ``results``: per
    target device, its own status, reason, detail and final state (final replies only)."""
    body: dict[str, Any] = {
        "id": command_id,
        "name": name,
        "status": status.value,
        "reason": reason,
        "detail": detail,
        "at": format_timestamp(datetime.now(UTC) if at is None else at),
    }
    if results:
        body["results"] = dict(results)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def refusal_payload(refusal: Refusal, at: datetime | None = None) -> bytes:
    """The ``refused`` reply to a :class:`~gateway.commands.verify.Refusal`."""
    return result_payload(
        refusal.command_id,
        refusal.name,
        Status.REFUSED,
        reason=refusal.reason.value,
        detail=refusal.detail,
        at=at,
    )

"""``campus-gateway console``: a reference platform console (alarm-center staff, integrators).

It connects to a broker as a *platform* (e.g. the police alarm center), shows the
``campus-event/1`` events of every gateway live, alarms standing out, and acknowledges
alarms with a signed ``alarm.ack`` command. It does what a platform should do:

* Presence, like a Sparkplug B primary host's STATE: a retained will
  ``{"online": false, "timestamp": ms}`` on the presence topic, a retained
  ``{"online": true, ...}`` after every (re)connect and subscribe, and on a clean exit a
  retained ``{"online": false, ...}`` whose PUBACK it waits for (at most 2 s).
* A persistent session (``clean_session=False``, a stable client id) whose QoS 1
  subscriptions are renewed after every connect (a broker restarted without persistence
  has forgotten them): what the gateways publish while the console is away arrives when
  it comes back. Reconnects forever with capped, jittered backoff.
* Dedupe on the event id (the last 100 000 ids): a duplicate or a re-notification
  (``repeat``) is counted, not shown as a new alarm. Per gateway, a ``seq`` gap is flagged
  and an event filling it later is marked late. Bad payloads are counted and reported once
  per topic.
* Acknowledgement of active alarms: at once (``--auto-ack``) or when the operator types
  the alarm's number (or just Enter for the oldest). Replies (``cmd-result/{id}``) are
  matched to the alarm; their ``results.gateway.ack`` decides: an ack the gateway recorded
  is done even if the box's LED failed (shown as a note), and only one it did not record
  is offered to the operator again.
* Payload text is shown escaped: no control character from a broker reaches the terminal.

:class:`Console` turns all of it into records (dicts with a ``kind``) for a sink:
:class:`JsonLines` writes one JSON object per line, :class:`HumanView` one readable line.
The demo runs a :class:`Console` in-process with a sink of its own; the CLI is a thin
wrapper (:func:`add_console_parser`).

Modules: :mod:`.options` (options, broker URL, TLS), :mod:`.messages` (payload parsing),
:mod:`.tracking` (dedupe, seq gaps), :mod:`.desk` (alarms, acks, operator input),
:mod:`.core` (:class:`Console`: connection, presence, dispatch), :mod:`.view` (sinks),
:mod:`.cli` (the subcommand).
"""

from gateway.console.cli import add_console_parser, options_from_args, run_until_signalled
from gateway.console.core import Console
from gateway.console.messages import ConsoleEvent, InvalidPayload, classify, parse_event, presence_payload
from gateway.console.options import (
    DEFAULT_PLATFORM,
    DEFAULT_TOPICS,
    BrokerUrl,
    ConsoleOptions,
    Record,
    Sink,
    UsageError,
)
from gateway.console.tracking import RecentIds, SeqTracker, SeqVerdict
from gateway.console.view import HumanView, JsonLines

__all__ = [
    "DEFAULT_PLATFORM",
    "DEFAULT_TOPICS",
    "BrokerUrl",
    "Console",
    "ConsoleEvent",
    "ConsoleOptions",
    "HumanView",
    "InvalidPayload",
    "JsonLines",
    "RecentIds",
    "Record",
    "SeqTracker",
    "SeqVerdict",
    "Sink",
    "UsageError",
    "add_console_parser",
    "classify",
    "options_from_args",
    "parse_event",
    "presence_payload",
    "run_until_signalled",
]

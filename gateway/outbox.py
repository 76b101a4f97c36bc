"""The durable outbox: one SQLite file holding every uplink's queue of events to publish.

What it guarantees (DESIGN.md, Guarantees):

* An event is taken only once the transaction holding it has committed (WAL,
  ``synchronous=FULL``): :meth:`Outbox.append` returns after the commit, never before.
  The gateway ``seq`` is written in the same transaction, so it survives kill -9 and
  power loss with no reuse, and committed events have no gaps between them. If the
  commit fails, every append of that transaction gets :class:`OutboxError` and nothing
  of it is kept (its seqs are handed out again by the next transaction).
* Rows are append-only. Each uplink has an acked cursor: :meth:`Outbox.ack` moves it
  in memory at once; the writer persists it and deletes the rows with its next commit
  or within :data:`ACK_FLUSH_DELAY`. After a crash, rows acked but not yet persisted
  are delivered again: delivery is at least once and consumers dedupe on the event id.
* Per uplink, rows are delivered in ``rowid`` order, which is the order of the appends.
  Rowids are never reused (the last one handed out is kept in ``meta``), so a reader's
  ``after_rowid`` mark stays valid across deletes and restarts.
* Each uplink is bounded to ``max_rows`` un-acked rows. Shedding rule: when a commit
  would leave an uplink above its bound, the same transaction deletes rows of that
  uplink, lowest severity rank first (info, minor, major, critical) and oldest first
  within a rank (this batch's own rows being the newest of their rank). Never shed:
  rows of an ``alarm.*`` type (whatever their severity), and rows already handed out by
  :meth:`Outbox.read` (rowid at or below the uplink's read mark: they may be in flight).
  A lock makes a read and a shedding decision exclusive, so a row is never both handed
  out and shed. If only such rows remain, the bound is exceeded rather than lose an
  alarm (logged once per episode). Each shedding is reported once per batch and uplink
  through ``on_shed(uplink, rows, count_by_type)`` on the event loop.

Threads: one writer thread owns the write connection and runs adaptive group commit:
it takes everything queued (appends and acks), commits it in one transaction, then
takes whatever queued while that commit ran. Results go back to the loop with one
``call_soon_threadsafe`` per transaction. Reads run on a one-thread executor with a
connection of their own. The event loop never touches the disk.

Schema: ``PRAGMA user_version`` with :data:`MIGRATIONS` applied in order, one
transaction each. A file from a newer gateway is refused, as is a file that is not
an outbox. The file is also ``flock``-ed so two daemons never share one outbox (two
writers would hand out the same seqs).
"""

from __future__ import annotations

import array
import asyncio
import bisect
import enum
import fcntl
import functools
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeAlias

import structlog

from gateway.errors import OutboxError
from gateway.events import Blob, Event, EventState, Identity, Observation, Severity, is_alarm_type, stamp
from gateway.tasks import consume_outcome

log = structlog.get_logger(__name__)

# Acks are persisted with the next commit, or at the latest this long after the first
# pending one. At-least-once delivery lets a crash re-send what was acked in that
# window, while an fsync per PUBACK would cap draining at the disk's fsync rate.
ACK_FLUSH_DELAY: Final = 0.05
# Events per transaction at most: bounds the transaction's memory and the latency of
# its first waiter; past a few thousand rows the per-commit cost is fully amortised.
MAX_BATCH_EVENTS: Final = 2048
# Opening loads the index of un-acked rows; a full backlog of a million rows takes a
# few seconds on an SD card. Past this the disk is hung and the gateway must say so.
OPEN_TIMEOUT: Final = 60.0
# Closing flushes what is queued (one commit, milliseconds); this bounds a hung disk
# well under systemd's TimeoutStopSec.
CLOSE_TIMEOUT: Final = 10.0
# A read of one batch takes milliseconds; one that takes this long means a hung disk,
# and the uplink should back off rather than wait forever.
READ_TIMEOUT: Final = 10.0
# SQLite busy timeout: nothing else writes (flock), but a diagnostics reader can hold
# the WAL index lock for a moment during recovery.
BUSY_TIMEOUT: Final = 5.0
# The idle writer re-checks its stop flag this often even if a notify were lost.
WRITER_IDLE_WAKE: Final = 1.0
# Repeated errors (failed commits, shedding) are logged once, then at most this often.
LOG_REPEAT_INTERVAL: Final = 60.0
# Age resolution of the in-memory time index rebuilt at open: ages are reported in
# seconds, and coarser entries keep the index small for a large backlog.
TIME_INDEX_RESOLUTION: Final = 0.01
# Stamping a large batch is pure-Python work on the writer thread; when it drops and
# retakes the GIL in a tight loop (os.urandom per id did), CPython's forced switch is
# defeated and the event loop starved for 50-100 ms. A real sleep after this much
# stamping hands the loop the GIL (measured: worst loop lag 85 ms -> under 3 ms).
# Every 5 ms, CPython's own switch interval: stamping no longer drops the GIL per id, so
# the forced switch works again, and a sleep every 2 ms (as before) made a 50-event batch
# wait for a busy loop once per batch: stamping 50 events took 5.0 ms instead of 3.7 ms
# in the pipeline benchmark, while the loop's worst lag under 2000-event batches stayed
# the same (44-52 ms with 2 ms or 20 ms; the loop's own work on such batches dominates it).
GIL_YIELD_EVERY: Final = 0.005
GIL_YIELD: Final = 0.0001
# The WAL file shrinks back to this after a checkpoint (it otherwise keeps its peak size).
JOURNAL_SIZE_LIMIT: Final = 16 * 1024 * 1024
# Committed rows an uplink has not acked yet are also kept in memory, up to this many rows
# and payload bytes per uplink, so that read() hands them out without a SELECT and a thread
# hop. A connected uplink holds at most its window (32 by default) plus one read batch (256)
# un-acked, so it always reads from memory; a backlog beyond this (an outage) is read from
# SQLite as before. About 1 KiB per row in Python objects: 1 MiB per uplink at most.
FRESH_MAX_ROWS: Final = 1024
FRESH_MAX_BYTES: Final = 512 * 1024
# Rows per INSERT statement. Each statement step releases and retakes the GIL, and retaking
# it while the event loop is busy waits up to the switch interval (5 ms): executemany with
# one step per row made a 50-row commit wait far longer than its fsync. 100 rows x 9 columns
# stays under 999 parameters, SQLite's limit before 3.32.
INSERT_CHUNK: Final = 100

# Shedding classes: a non-alarm row's class is its severity rank (0 info .. 3 critical);
# alarms have a class of their own and are never shed.
ALARM_CLASS: Final = 4
_CLASSES: Final = ALARM_CLASS + 1

_V1: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('seq', 0)",
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        uplink TEXT NOT NULL,
        event_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        severity TEXT NOT NULL,
        created REAL NOT NULL,
        payload BLOB NOT NULL
    )""",
    "CREATE INDEX outbox_uplink_id ON outbox (uplink, id)",
)
# v2: the shedding class as a column, per-uplink acked cursors (v1 deleted each acked
# row on its own), and the last rowid handed out, so deletes never let a rowid be reused.
_V2: Final = (
    "ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
    """UPDATE outbox SET priority = CASE
        WHEN type = 'alarm' OR substr(type, 1, 6) = 'alarm.' THEN 4
        WHEN severity = 'critical' THEN 3
        WHEN severity = 'major' THEN 2
        WHEN severity = 'minor' THEN 1
        ELSE 0 END""",
    "CREATE TABLE cursor (uplink TEXT PRIMARY KEY, acked INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO meta (key, value) SELECT 'rowid', coalesce(max(id), 0) FROM outbox",
)
# Ordered: MIGRATIONS[n - 1] takes a database from user_version n - 1 to n. Never edit a
# shipped entry; add one.
# v3: the ledger of critical alarms awaiting the platform's alarm.ack (DESIGN.md, Guarantees),
# written in the transaction of the event itself, so an alarm is never delivered without it.
_V3: Final = (
    """CREATE TABLE awaiting (
        uplink TEXT NOT NULL,
        event_id TEXT NOT NULL,
        row INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        created REAL NOT NULL,
        payload BLOB NOT NULL,
        repeats INTEGER NOT NULL DEFAULT 0,
        troubled INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'awaiting',
        settled REAL,
        PRIMARY KEY (uplink, event_id)
    ) WITHOUT ROWID""",
)
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1, _V2, _V3)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_INSERT: Final = (
    "INSERT INTO outbox (id, uplink, event_id, seq, type, severity, priority, created, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT: Final = (
    "SELECT id, event_id, seq, type, severity, payload FROM outbox"
    " WHERE uplink = ? AND id > ? ORDER BY id LIMIT ?"
)
_UPSERT_CURSOR: Final = (
    "INSERT INTO cursor (uplink, acked) VALUES (?, ?)"
    " ON CONFLICT (uplink) DO UPDATE SET acked = max(acked, excluded.acked)"
)
_INSERT_AWAITING: Final = (
    "INSERT OR IGNORE INTO awaiting (uplink, event_id, row, seq, type, created, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SEVERITIES: Final = {s.value: s for s in Severity}
_INSERT_VALUES: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPDATE_META: Final = (
    "UPDATE meta SET value = CASE key WHEN 'seq' THEN ?1 ELSE ?2 END WHERE key IN ('seq', 'rowid')"
)

ShedCallback: TypeAlias = Callable[[str, int, Mapping[str, int]], None]
AckFilter: TypeAlias = Callable[[str, str], bool]
"""(uplink, event type) -> the uplink's platform must acknowledge such an alarm."""
_InsertRow: TypeAlias = tuple[int, str, str, int, str, str, int, float, bytes]


@functools.cache
def _insert_statement(rows: int) -> str:
    """An INSERT of ``rows`` rows (1..INSERT_CHUNK) in one statement; sqlite3 caches each size."""
    return _INSERT + (", " + _INSERT_VALUES) * (rows - 1)


def shed_class(event_type: str, severity: Severity) -> int:
    """The shedding class of a row: its severity rank, or :data:`ALARM_CLASS` for alarms."""
    return ALARM_CLASS if is_alarm_type(event_type) else severity.rank


class Settled(enum.StrEnum):
    """How a ledger entry ended: the platform acknowledged it, or re-notification gave up."""

    ACKED = "acked"
    EXPIRED = "expired"


@dataclass(slots=True)
class Awaiting:
    """A critical alarm its uplink's platform has not acknowledged yet (the ack ledger).

    ``rowid`` is the event's outbox row for the uplink: the broker has it once the uplink's
    cursor passed it. ``repeats`` counts re-notifications sent; ``troubled`` says the ack
    deadline's trouble event was raised for it.
    """

    uplink: str
    event_id: str
    rowid: int
    seq: int
    type: str
    created: float
    payload: bytes
    repeats: int = 0
    troubled: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    """What :meth:`Outbox.settle` found. ``entry``: the event's ledger entry (None: it was
    never in this uplink's ledger; a settled one has an empty payload); ``previous``: how it
    had been settled before this call (None: it was open, and this call closed it)."""

    entry: Awaiting | None
    previous: Settled | None

    @property
    def closed_now(self) -> bool:
        return self.entry is not None and self.previous is None


# Settled ledger entries are kept this long (an ack for them is then answered "already")
# and at most this many per uplink in memory: an alarm center acks within minutes.
SETTLED_KEEP: Final = 7 * 86400.0
SETTLED_MEMORY: Final = 10_000


@dataclass(frozen=True, slots=True)
class Row:
    """One event queued for one uplink."""

    rowid: int  # increasing per file; per uplink, rows are delivered in rowid order
    uplink: str
    event_id: str
    seq: int
    type: str
    severity: Severity
    payload: bytes  # the exact bytes to publish, identical on every retry


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counters since open, for /metrics and benchmarks."""

    commits: int  # transactions committed (appends, acks or both)
    event_commits: int  # of those, transactions holding at least one event
    events: int  # events committed
    rows: int  # rows inserted (one per event and uplink, after shedding)
    shed: int  # rows shed
    failures: int  # transactions that failed
    commit_seconds: float  # total time spent in committed transactions
    commit_seconds_max: float
    last_seq: int

    @property
    def mean_batch(self) -> float:
        """Events per transaction that held events: how well group commit batches."""
        return self.events / self.event_commits if self.event_commits else 0.0

    @property
    def mean_commit_seconds(self) -> float:
        return self.commit_seconds / self.commits if self.commits else 0.0


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(slots=True, eq=False)
class _Lane:
    """In-memory state of one uplink. Guarded by ``Outbox._lock``."""

    name: str
    max_rows: int
    wake: asyncio.Event
    # un-acked rowids per shedding class, ascending (acks pop from the left)
    classes: tuple[deque[int], ...] = field(default_factory=lambda: tuple(deque() for _ in range(_CLASSES)))
    depth: int = 0  # un-acked rows, exact
    acked: int = 0  # highest acked rowid (in memory; persisted lazily)
    handed: int = 0  # highest rowid handed out by read(): rows at or below may be in flight
    over_bound: bool = False  # "bound exceeded" logged for the current episode
    # Committed rows kept in memory for read(), ascending: every committed, un-shed row of
    # this uplink with rowid > fresh_from is in ``fresh`` (rows at or below it are read from
    # SQLite). Trimming from the left (bounds, acks) raises fresh_from.
    fresh: deque[Row] = field(default_factory=deque)
    fresh_from: int = 0
    fresh_bytes: int = 0
    on_wake: Callable[[], object] | None = None  # see Outbox.set_wake_callback
    awaiting: dict[str, Awaiting] = field(default_factory=dict)  # the ack ledger, in rowid order
    settled: dict[str, tuple[Settled, Awaiting]] = field(default_factory=dict)  # id -> how, entry
    settling: dict[str, asyncio.Future[None]] = field(default_factory=dict)  # settles in progress

    def trim_fresh(self, upto: int) -> None:
        """Drop rows at or below ``upto`` from ``fresh`` (acked or trimmed)."""
        fresh = self.fresh
        while fresh and fresh[0].rowid <= upto:
            self.fresh_bytes -= len(fresh.popleft().payload)
        self.fresh_from = max(self.fresh_from, upto)

    def oldest(self) -> int | None:
        heads = [d[0] for d in self.classes if d]
        return min(heads) if heads else None


@dataclass(slots=True, eq=False)
class _Request:
    items: list[tuple[Observation | Blob, tuple[str, ...], float]]  # observation, uplinks, received_at
    future: asyncio.Future[list[Event]]


@dataclass(slots=True)
class _Shed:
    """What one batch sheds from one uplink."""

    old: dict[int, list[int]] = field(default_factory=dict)  # class -> committed rowids, ascending
    new: set[int] = field(default_factory=set)  # this batch's rowids that are not inserted
    by_type: Counter[str] = field(default_factory=Counter)
    short: int = 0  # rows over the bound that nothing could be shed for

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.old.values()) + len(self.new)


@dataclass(slots=True)
class _Write:
    """A ledger update for the next transaction; ``future`` (if any) learns its commit."""

    sql: str
    params: tuple[Any, ...]
    future: asyncio.Future[None] | None


@dataclass(slots=True)
class _Batch:
    """One transaction's worth of work, prepared by the writer."""

    requests: list[_Request]
    acks: dict[str, int]
    results: list[list[Event] | BaseException] = field(default_factory=list)
    inserts: list[_InsertRow] = field(default_factory=list)
    new_rows: dict[str, list[tuple[int, int, str, Row]]] = field(default_factory=dict)  # rowid, class, type
    shed: dict[str, _Shed] = field(default_factory=dict)
    seq: int = 0
    last_rowid: int = 0
    events: int = 0
    first_rowid: int = 0
    first_time: float = 0.0
    awaiting: list[Awaiting] = field(default_factory=list)
    writes: list[_Write] = field(default_factory=list)
    write_error: OutboxError | None = None


class _Throttle:
    """Log a key's first occurrence, then at most once per interval with a suppressed count.

    Each instance is used from one thread only.
    """

    def __init__(self, interval: float = LOG_REPEAT_INTERVAL) -> None:
        self._interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str) -> int | None:
        """None to stay quiet; else the number of occurrences suppressed since the last log."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] += 1
            return None
        self._next[key] = now + self._interval
        return self._suppressed.pop(key, 0)

    def reset(self, key: str) -> int:
        """Forget the key; returns how many occurrences were suppressed and never logged."""
        self._next.pop(key, None)
        return self._suppressed.pop(key, 0)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _chained(message: str, cause: BaseException) -> OutboxError:
    """An OutboxError caused by ``cause``, as ``raise ... from cause`` makes it (built in a thread)."""
    err = OutboxError(message)
    err.__cause__ = cause
    return err


# An expiry never overwrites an acknowledgement, whatever the order of commits.
_SETTLE_SQL: Final = {
    Settled.ACKED: "UPDATE awaiting SET state = ?, settled = ? WHERE uplink = ? AND event_id = ?",
    Settled.EXPIRED: (
        "UPDATE awaiting SET state = ?, settled = ? WHERE uplink = ? AND event_id = ? AND state = 'awaiting'"
    ),
}


def _settled_record(entry: Awaiting) -> Awaiting:
    """A settled entry as kept in memory: everything but the payload."""
    return Awaiting(
        entry.uplink,
        entry.event_id,
        entry.rowid,
        entry.seq,
        entry.type,
        entry.created,
        b"",
        entry.repeats,
        entry.troubled,
    )


def _fail_writes(writes: list[_Write], exc: BaseException) -> None:
    for write in writes:
        if write.future is not None and not write.future.done():
            write.future.set_exception(exc)


def _remove_rows(rows: deque[int], victims: list[int]) -> int:
    """Remove ``victims`` (ascending) from ``rows``; returns how many were still there.

    Victims sit just above the uplink's read mark, so the walk from the left is short.
    """
    wanted = set(victims)
    last = victims[-1]
    keep: list[int] = []
    removed = 0
    while rows and rows[0] <= last:
        rowid = rows.popleft()
        if rowid in wanted:
            removed += 1
        else:
            keep.append(rowid)
    rows.extendleft(reversed(keep))
    return removed


class Outbox:
    """Per-uplink durable queues in one SQLite file. An async context manager.

    ``uplinks`` maps each uplink name to its bound (``max_rows`` un-acked rows).
    ``on_shed(uplink, rows, count_by_type)`` is called on the event loop, once per
    batch and uplink that shed rows.

    An uplink consumes its queue like this::

        after = 0                                  # and again after every reconnect
        while True:
            outbox.wakeup(name).clear()
            rows = await outbox.read(name, after, limit)
            if not rows:
                await outbox.wakeup(name).wait()
                continue
            ...publish rows in order; after = rows[-1].rowid
            ...as PUBACKs arrive: outbox.ack(name, highest rowid acked contiguously)

    ``read`` never returns acked rows, whatever ``after`` says, so re-reading from 0
    after a reconnect re-publishes exactly the rows still unacknowledged.
    """

    def __init__(
        self,
        path: Path,
        identity: Identity,
        uplinks: Mapping[str, int],
        *,
        on_shed: ShedCallback | None = None,
        ack_filter: AckFilter | None = None,
    ) -> None:
        for name, bound in uplinks.items():
            if bound < 1:
                raise ValueError(f"outbox bound of uplink {name!r} must be at least 1, not {bound}")
        self._path = Path(path)
        self._identity = identity
        self._on_shed = on_shed
        self._ack_filter = ack_filter
        self._lanes = {name: _Lane(name, bound, asyncio.Event()) for name, bound in uplinks.items()}
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None

        # Lane state and the time index; taken by the loop, the writer and the reader, briefly.
        self._lock = threading.Lock()
        # Held by a read around its SELECT and by the writer from a shedding decision to its
        # commit, so that no row is both handed out and shed.
        self._mark_lock = threading.Lock()
        # The writer's work queue.
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Request] = deque()
        self._acks: dict[str, int] = {}
        self._ack_since: float | None = None
        self._stopping = False
        self._broken: str | None = None  # why the writer is gone, if it is
        # Set (under _lock) from a shedding decision until its transaction ended: reads then
        # take the reader thread's path, which waits for the decision's commit.
        self._shedding = False
        self._ack_warned = False
        self._writes: list[_Write] = []  # ledger updates for the next transaction (under _cond)
        self._settles: set[asyncio.Task[Settlement]] = set()  # settles in progress (strong refs)

        # Writer-thread state.
        self._seq = 0
        self._last_rowid = 0
        self._conn: sqlite3.Connection | None = None
        self._conn_broken = False
        self._throttle = _Throttle()
        self._failures_in_row = 0
        # Time index: (first rowid, append time) per commit, for oldest_age().
        self._t_ids = array.array("q")
        self._t_at = array.array("d")

        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._lock_fd: int | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None

        # Counters (written by the writer thread only).
        self._commits = 0
        self._event_commits = 0
        self._events = 0
        self._rows = 0
        self._shed_rows = 0
        self._failures = 0
        self._commit_seconds = 0.0
        self._commit_seconds_max = 0.0

        # Test hook: called at the start of every write transaction. A test raises
        # sqlite3.OperationalError from it, or lowers max_page_count, to play a failing disk.
        self._on_begin: Callable[[sqlite3.Connection], object] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise OutboxError(f"{self._path}: an Outbox is entered only once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ready = loop.create_future()
        self._done = loop.create_future()
        self._state = _State.CLOSING  # until open; a failed enter closes
        try:
            self._thread = threading.Thread(
                target=self._writer_main,
                name=f"outbox-writer:{self._path.name}",
                # A writer hung in fsync on a dying disk must not keep the process alive
                # after close timed out.
                daemon=True,
            )
            self._thread.start()
            try:
                async with asyncio.timeout(OPEN_TIMEOUT):
                    await asyncio.shield(self._ready)
            except TimeoutError as exc:
                self._ready.cancel()
                raise OutboxError(f"{self._path}: opening the outbox took over {OPEN_TIMEOUT} s") from exc
            self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"outbox-reader:{self._path.name}")
            await loop.run_in_executor(self._reader, self._open_reader)
        except BaseException:
            await self._close()
            raise
        self._state = _State.OPEN
        for lane in self._lanes.values():
            if lane.depth:
                lane.wake.set()
        log.info(
            "outbox.opened",
            path=str(self._path),
            last_seq=self._seq,
            depth={name: lane.depth for name, lane in self._lanes.items()},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        """Flush what is queued, stop the writer, close both connections. Bounded time."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSING
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        # The file lock is released only once the writer has closed its connection
        # (see _release_file_lock); a writer that did not stop keeps it to process exit.
        writer_done = self._thread is None or self._done is None
        try:
            if self._done is not None and self._thread is not None:
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await asyncio.shield(self._done)
                except TimeoutError:
                    log.error("outbox.close_timeout", path=str(self._path), timeout=CLOSE_TIMEOUT)  # noqa: TRY400 - no traceback to show
                else:
                    writer_done = True
                    self._thread.join(1.0)  # it said it is done: it returns at once
        finally:
            self._fail_queued("the outbox is closed")
            await self._close_reader()
            if writer_done:
                self._release_file_lock()
            self._state = _State.CLOSED

    async def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            return
        try:
            await asyncio.wrap_future(reader.submit(self._close_reader_conn))
        finally:
            reader.shutdown(wait=True)  # the one worker is idle now: this returns at once

    def _close_reader_conn(self) -> None:
        conn, self._rconn = self._rconn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.warning("outbox.reader_close_failed", path=str(self._path), error=str(exc))

    def _fail_queued(self, why: str) -> None:
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
            writes, self._writes = self._writes, []
        for req in pending:
            if not req.future.done():
                req.future.set_exception(OutboxError(f"{self._path}: {why}"))
        _fail_writes(writes, OutboxError(f"{self._path}: {why}"))

    # ------------------------------------------------------------------ public API

    @property
    def path(self) -> Path:
        return self._path

    @property
    def healthy(self) -> bool:
        """Open, and its writer thread is alive (not crashed, not stopped): the gateway's
        watchdog pings systemd only while this holds. Failed commits (a full disk) do not
        make it unhealthy: the writer retries, and a restart would not free the disk."""
        thread = self._thread
        return (
            self._state is _State.OPEN and self._broken is None and thread is not None and thread.is_alive()
        )

    @property
    def uplinks(self) -> tuple[str, ...]:
        return tuple(self._lanes)

    @property
    def last_seq(self) -> int:
        """The seq of the last committed event (0 before the first)."""
        return self._seq

    @property
    def stats(self) -> OutboxStats:
        return OutboxStats(
            commits=self._commits,
            event_commits=self._event_commits,
            events=self._events,
            rows=self._rows,
            shed=self._shed_rows,
            failures=self._failures,
            commit_seconds=self._commit_seconds,
            commit_seconds_max=self._commit_seconds_max,
            last_seq=self._seq,
        )

    async def append(self, obs: Observation, uplinks: Sequence[str]) -> Event:
        """Stamp ``obs`` with the next seq and queue it for ``uplinks``; returns once committed.

        An event with no uplink still takes a seq and is committed (nothing to deliver).
        Raises :class:`OutboxError` if the commit failed (nothing of it is kept), and
        ValueError for an unknown uplink. If the caller is cancelled after the writer took
        the event, the event is committed all the same (it cannot be withdrawn).
        """
        events = await self._submit([(obs, uplinks)])
        return events[0]

    async def append_many(self, items: Sequence[tuple[Observation | Blob, Sequence[str]]]) -> list[Event]:
        """Like :meth:`append` for several observations, committed in one transaction, all or none.

        A :class:`~gateway.events.Blob` among them is queued too (no seq; its Event has seq 0
        and type ``blob.kind``): a snapshot and the event that references it commit together.
        """
        if not items:
            return []
        return await self._submit(items)

    def wakeup(self, uplink: str) -> asyncio.Event:
        """Set whenever rows for ``uplink`` were committed (and at open if rows wait).

        The consumer clears it before reading, and waits on it when a read came back empty.
        """
        return self._lane(uplink).wake

    async def read(self, uplink: str, after_rowid: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows of ``uplink`` not yet acked with rowid > ``after_rowid``, in order."""
        lane = self._lane(uplink)
        if self._state is not _State.OPEN or self._reader is None or self._loop is None:
            raise OutboxError(f"{self._path}: the outbox is not open")
        if limit <= 0:
            return []
        with self._lock:
            # From memory when every row asked for is there, and no shedding decision is
            # waiting for its commit (then the reader thread's path waits for it: a row is
            # never both handed out and shed).
            after = max(after_rowid, lane.acked)
            if after >= lane.fresh_from and not self._shedding:
                rows: list[Row] = []
                for row in lane.fresh:
                    if row.rowid > after:
                        rows.append(row)
                        if len(rows) >= limit:
                            break
                if rows:
                    lane.handed = max(lane.handed, rows[-1].rowid)
                return rows
        job = self._loop.run_in_executor(self._reader, self._read_rows, lane, after_rowid, limit)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                return await job
        except TimeoutError as exc:
            raise OutboxError(f"{self._path}: reading uplink {uplink} took over {READ_TIMEOUT} s") from exc
        except (sqlite3.Error, KeyError) as exc:  # KeyError: a row with an unknown severity
            raise OutboxError(f"{self._path}: reading uplink {uplink} failed: {exc!r}") from exc

    def ack(self, uplink: str, upto_rowid: int) -> None:
        """The uplink got PUBACKs for every one of its rows with rowid <= ``upto_rowid``.

        Cheap and non-blocking: the rows leave :meth:`depth` and :meth:`read` at once;
        the cursor is persisted and the rows deleted by the writer with its next commit
        or within :data:`ACK_FLUSH_DELAY`.
        """
        lane = self._lane(uplink)
        with self._lock:
            if upto_rowid > lane.handed:
                # Acking what read() never handed out is a bug of the caller; taken as is,
                # it would hide rows committed later. Clamp, and say so once.
                beyond, upto_rowid = upto_rowid, lane.handed
                if not self._ack_warned:
                    self._ack_warned = True
                    log.warning("outbox.ack_beyond_read", uplink=uplink, ack=beyond, read_mark=upto_rowid)
            if upto_rowid <= lane.acked:
                return
            lane.acked = upto_rowid
            popped = 0
            for rows in lane.classes:
                while rows and rows[0] <= upto_rowid:
                    rows.popleft()
                    popped += 1
            lane.depth -= popped
            lane.trim_fresh(upto_rowid)
        with self._cond:
            if upto_rowid > self._acks.get(uplink, 0):
                self._acks[uplink] = upto_rowid
            if self._ack_since is None:
                self._ack_since = time.monotonic()
                self._cond.notify()

    def set_wake_callback(self, uplink: str, callback: Callable[[], object] | None) -> None:
        """Also call ``callback()`` on the loop whenever :meth:`wakeup` is set by a commit.

        One per uplink (None removes it): a consumer that waits for several things at once
        can then wait on one future of its own instead of a task per event.
        """
        self._lane(uplink).on_wake = callback

    def depth(self, uplink: str) -> int:
        """Rows of ``uplink`` not acked (exact)."""
        return self._lane(uplink).depth

    def oldest_age(self, uplink: str) -> float | None:
        """Seconds since the oldest un-acked row of ``uplink`` was appended; None if none."""
        lane = self._lane(uplink)
        with self._lock:
            oldest = lane.oldest()
            if oldest is None or not self._t_ids:
                return None
            i = bisect.bisect_right(self._t_ids, oldest) - 1
            appended = self._t_at[max(i, 0)]
        return max(0.0, time.time() - appended)

    def oldest_alarm_age(self, uplink: str) -> float | None:
        """Seconds since the oldest alarm of ``uplink`` without a PUBACK was appended; None if none."""
        lane = self._lane(uplink)
        with self._lock:
            alarms = lane.classes[ALARM_CLASS]
            if not alarms or not self._t_ids:
                return None
            i = bisect.bisect_right(self._t_ids, alarms[0]) - 1
            appended = self._t_at[max(i, 0)]
        return max(0.0, time.time() - appended)

    # ------------------------------------------------------------------ the ack ledger

    def awaiting(self, uplink: str) -> list[Awaiting]:
        """The critical alarms of ``uplink`` its platform has not acknowledged, oldest first.

        The entries are live: the uplink's supervisor updates ``repeats`` and ``troubled``
        on them and persists that with :meth:`note`.
        """
        lane = self._lane(uplink)
        with self._lock:
            return list(lane.awaiting.values())

    def acked_upto(self, uplink: str) -> int:
        """The uplink's acked cursor: rows at or below it have the broker's PUBACK."""
        return self._lane(uplink).acked

    def note(self, entry: Awaiting) -> None:
        """Persist ``entry.repeats`` and ``entry.troubled`` with the next commit (best effort)."""
        self._queue_write(
            "UPDATE awaiting SET repeats = ?, troubled = ? WHERE uplink = ? AND event_id = ?",
            (entry.repeats, int(entry.troubled), entry.uplink, entry.event_id),
            wait=False,
        )

    def is_open(self, uplink: str, event_id: str) -> bool:
        """The event is in the uplink's ledger and not settled."""
        lane = self._lane(uplink)
        with self._lock:
            return event_id in lane.awaiting

    async def settle(self, uplink: str, event_id: str, how: Settled) -> Settlement:
        """Settle the ledger entry of ``event_id`` durably (returns after the commit).

        One settle per event at a time: a second one (an ack racing a give-up, a repeated
        ack) waits for the first, then decides on what it left. An acknowledgement of an
        entry that expired earlier is recorded too (the platform did answer, late). Raises
        :class:`OutboxError` if the commit failed; the entry then stays open. The settle
        runs in a task of its own: a caller cancelled meanwhile does not cut it in half.
        """
        lane = self._lane(uplink)
        assert self._loop is not None
        task = self._loop.create_task(
            self._settle_in_turn(lane, event_id, how), name=f"outbox:settle:{uplink}"
        )
        self._settles.add(task)
        task.add_done_callback(self._settles.discard)
        task.add_done_callback(consume_outcome)  # a cancelled caller no longer reads it
        return await asyncio.shield(task)

    async def _settle_in_turn(self, lane: _Lane, event_id: str, how: Settled) -> Settlement:
        while (busy := lane.settling.get(event_id)) is not None:
            await busy  # resolved (never failed) when that settle is over
        assert self._loop is not None
        mine = lane.settling[event_id] = self._loop.create_future()
        try:
            return await self._settle(lane, event_id, how)
        finally:
            del lane.settling[event_id]
            mine.set_result(None)

    async def _settle(self, lane: _Lane, event_id: str, how: Settled) -> Settlement:
        with self._lock:
            entry = lane.awaiting.get(event_id)
            before = lane.settled.get(event_id)
        if entry is None:
            if before is None:
                return Settlement(None, None)
            if before[0] is how or how is Settled.EXPIRED:
                return Settlement(before[1], before[0])
        fut = self._queue_write(_SETTLE_SQL[how], (how.value, time.time(), lane.name, event_id), wait=True)
        assert fut is not None
        await fut
        record = self._settled(lane, event_id, how)
        if entry is not None:
            return Settlement(entry, None)
        return Settlement(record, before[0] if before else None)

    def _settled(self, lane: _Lane, event_id: str, how: Settled) -> Awaiting | None:
        """After the commit: move the entry from open to settled (in memory)."""
        with self._lock:
            entry = lane.awaiting.pop(event_id, None)
            before = lane.settled.pop(event_id, None)
            record = entry if entry is not None else before[1] if before is not None else None
            if record is None:
                return None
            lane.settled[event_id] = (how, _settled_record(record))
            while len(lane.settled) > SETTLED_MEMORY:
                del lane.settled[next(iter(lane.settled))]
        return record

    def _queue_write(self, sql: str, params: tuple[Any, ...], *, wait: bool) -> asyncio.Future[None] | None:
        if self._state is not _State.OPEN or self._loop is None:
            raise OutboxError(f"{self._path}: the outbox is not open")
        fut = self._loop.create_future() if wait else None
        with self._cond:
            if self._broken is not None:
                raise OutboxError(f"{self._path}: {self._broken}")
            self._writes.append(_Write(sql, params, fut))
            self._cond.notify()
        return fut

    # ------------------------------------------------------------------ loop side

    def _lane(self, uplink: str) -> _Lane:
        try:
            return self._lanes[uplink]
        except KeyError:
            raise ValueError(f"unknown uplink {uplink!r}") from None

    async def _submit(self, items: Sequence[tuple[Observation | Blob, Sequence[str]]]) -> list[Event]:
        if self._state is not _State.OPEN or self._loop is None:
            raise OutboxError(f"{self._path}: the outbox is not open")
        now = time.time()
        prepared: list[tuple[Observation | Blob, tuple[str, ...], float]] = []
        for obs, uplinks in items:
            names = tuple(dict.fromkeys(uplinks))
            for name in names:
                self._lane(name)
            prepared.append((obs, names, now))
        fut: asyncio.Future[list[Event]] = self._loop.create_future()
        with self._cond:
            if self._broken is not None:
                raise OutboxError(f"{self._path}: {self._broken}")
            self._queue.append(_Request(prepared, fut))
            self._cond.notify()
        return await fut

    def _call_loop(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            log.warning("outbox.loop_closed", path=str(self._path))

    def _deliver(self, batch: _Batch, wake: list[_Lane], shed: list[tuple[str, int, dict[str, int]]]) -> None:
        """On the loop: resolve the batch's appends, wake its uplinks, report shedding."""
        for req, result in zip(batch.requests, batch.results, strict=True):
            if req.future.done():
                continue
            if isinstance(result, BaseException):
                req.future.set_exception(result)
            else:
                req.future.set_result(result)
        for write in batch.writes:
            fut = write.future
            if fut is not None and not fut.done():
                if batch.write_error is not None:
                    fut.set_exception(batch.write_error)
                else:
                    fut.set_result(None)
        for lane in wake:
            lane.wake.set()
            if lane.on_wake is not None:
                lane.on_wake()
        if self._on_shed is not None:
            for uplink, count, by_type in shed:
                self._on_shed(uplink, count, by_type)

    # ------------------------------------------------------------------ reader thread

    def _open_reader(self) -> None:
        try:
            self._rconn = self._connect(readonly=True)
        except sqlite3.Error as exc:
            raise OutboxError(f"{self._path}: cannot open the outbox for reading: {exc}") from exc

    def _read_rows(self, lane: _Lane, after_rowid: int, limit: int) -> list[Row]:
        conn = self._rconn
        if conn is None:
            raise OutboxError(f"{self._path}: the outbox is closed")
        with self._mark_lock:
            with self._lock:
                after = max(after_rowid, lane.acked)
            rows = conn.execute(_SELECT, (lane.name, after, limit)).fetchall()
            if rows:
                with self._lock:
                    lane.handed = max(lane.handed, rows[-1][0])
        name = lane.name
        return [Row(r[0], name, r[1], r[2], r[3], _SEVERITIES[r[4]], r[5]) for r in rows]

    # ------------------------------------------------------------------ writer thread

    def _writer_main(self) -> None:
        assert self._ready is not None
        assert self._done is not None
        try:
            try:
                self._acquire_file_lock()
                self._conn = self._open_writer()
            except OutboxError as exc:
                self._call_loop(_set_exception, self._ready, exc)
                return
            except (sqlite3.Error, OSError) as exc:
                error = _chained(f"{self._path}: not a usable outbox database: {exc}", exc)
                self._call_loop(_set_exception, self._ready, error)
                return
            self._call_loop(_set_result, self._ready)
            self._run()
        except BaseException:
            log.exception("outbox.writer_crashed", path=str(self._path))
            raise
        finally:
            with self._cond:
                self._broken = "the outbox writer has stopped"
            self._close_writer_conn()
            self._call_loop(self._fail_queued, "the outbox writer has stopped")
            self._call_loop(_set_result, self._done)

    def _run(self) -> None:
        while True:  # until stopped: _take returns None once stopping and drained
            work = self._take()
            if work is None:
                return
            try:
                self._commit(work)
            except BaseException as exc:
                self._call_loop(self._fail_requests, work.requests, "the outbox writer failed", exc)
                failure = _chained(f"{self._path}: the outbox writer failed", exc)
                self._call_loop(_fail_writes, work.writes, failure)
                raise

    def _take(self) -> _Batch | None:
        """Wait for work; take every queued request (up to the batch cap) and every ack."""
        with self._cond:
            while not self._queue and not self._writes and not self._stopping:
                if self._ack_since is None:
                    self._cond.wait(WRITER_IDLE_WAKE)
                    continue
                remaining = self._ack_since + ACK_FLUSH_DELAY - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            requests: list[_Request] = []
            events = 0
            while self._queue and (not requests or events + len(self._queue[0].items) <= MAX_BATCH_EVENTS):
                req = self._queue.popleft()
                if req.future.cancelled():  # withdrawn before the writer took it: takes no seq
                    continue
                requests.append(req)
                events += len(req.items)
            acks, self._acks, self._ack_since = self._acks, {}, None
            writes, self._writes = self._writes, []
        if not requests and not acks and not writes:
            return None if self._stopping else _Batch([], {})
        return _Batch(requests, acks, writes=writes)

    def _commit(self, batch: _Batch) -> None:
        if not batch.requests and not batch.acks and not batch.writes:
            return
        started = time.perf_counter()
        self._stamp(batch)
        over = any(
            self._lanes[name].depth + len(rows) > self._lanes[name].max_rows
            for name, rows in batch.new_rows.items()
        )
        if over:
            with self._mark_lock:
                with self._lock:
                    self._plan_shedding(batch)
                    self._shedding = True
                try:
                    ok = self._transaction(batch)
                    if ok:
                        self._apply(batch, time.perf_counter() - started)
                finally:
                    with self._lock:
                        self._shedding = False
            return
        if self._transaction(batch):
            self._apply(batch, time.perf_counter() - started)

    def _stamp(self, batch: _Batch) -> None:
        """Give each event its seq and rowids; an observation that cannot be serialised fails alone."""
        seq = self._seq
        rowid = self._last_rowid
        identity = self._identity
        yield_at = time.perf_counter() + GIL_YIELD_EVERY
        stamped = 0
        new_rows = batch.new_rows
        for req in batch.requests:
            events: list[Event] = []
            try:
                n = 0
                for obs, _, received in req.items:
                    if isinstance(obs, Blob):  # no seq: not an event
                        events.append(Event(obs.id, 0, obs.kind, Severity.INFO, None, obs.content))
                        continue
                    n += 1
                    events.append(stamp(obs, identity, seq + n, received))
                    stamped += 1
                    if not stamped % 32 and time.perf_counter() > yield_at:
                        time.sleep(GIL_YIELD)
                        yield_at = time.perf_counter() + GIL_YIELD_EVERY
            except (TypeError, ValueError) as exc:
                batch.results.append(exc)
                continue
            seq += n
            batch.results.append(events)
            for event, (_, uplinks, received) in zip(events, req.items, strict=True):
                cls = shed_class(event.type, event.severity)
                ledger = cls == ALARM_CLASS and event.state is EventState.ACTIVE and self._ack_filter
                for uplink in uplinks:
                    rowid += 1
                    if ledger and self._ack_filter is not None and self._ack_filter(uplink, event.type):
                        batch.awaiting.append(
                            Awaiting(uplink, event.id, rowid, event.seq, event.type, received, event.payload)
                        )
                    if not batch.first_rowid:
                        batch.first_rowid = rowid
                        batch.first_time = received
                    batch.inserts.append(
                        (
                            rowid,
                            uplink,
                            event.id,
                            event.seq,
                            event.type,
                            event.severity.value,
                            cls,
                            received,
                            event.payload,
                        )
                    )
                    row = Row(rowid, uplink, event.id, event.seq, event.type, event.severity, event.payload)
                    lane_rows = new_rows.get(uplink)
                    if lane_rows is None:
                        lane_rows = new_rows[uplink] = []
                    lane_rows.append((rowid, cls, event.type, row))
        batch.events = seq - self._seq
        batch.seq = seq
        batch.last_rowid = rowid

    def _plan_shedding(self, batch: _Batch) -> None:
        """Choose what each uplink over its bound sheds (under both locks)."""
        for name, new in batch.new_rows.items():
            lane = self._lanes[name]
            excess = lane.depth + len(new) - lane.max_rows
            if excess <= 0:
                continue
            shed = _Shed()
            for cls in range(ALARM_CLASS):
                if excess <= 0:
                    break
                old: list[int] = []
                for rowid in lane.classes[cls]:  # ascending; rows in flight come first
                    if excess <= 0:
                        break
                    if rowid > lane.handed:
                        old.append(rowid)
                        excess -= 1
                if old:
                    shed.old[cls] = old
                for rowid, row_cls, event_type, _ in new:
                    if excess <= 0:
                        break
                    if row_cls == cls:
                        shed.new.add(rowid)
                        shed.by_type[event_type] += 1
                        excess -= 1
            shed.short = excess
            batch.shed[name] = shed

    def _transaction(self, batch: _Batch) -> bool:
        """Write the batch in one transaction. On failure, fail its appends and keep nothing."""
        try:
            conn = self._writer_conn()
            conn.execute("BEGIN IMMEDIATE")
            if self._on_begin is not None:
                self._on_begin(conn)
            rows = batch.inserts
            if batch.shed:
                dropped = {rowid for shed in batch.shed.values() for rowid in shed.new}
                rows = [row for row in rows if row[0] not in dropped]
                for shed in batch.shed.values():
                    victims = [(rowid,) for old in shed.old.values() for rowid in old]
                    for (rowid,) in victims:
                        for (event_type,) in conn.execute("SELECT type FROM outbox WHERE id = ?", (rowid,)):
                            shed.by_type[event_type] += 1
                    conn.executemany("DELETE FROM outbox WHERE id = ?", victims)
            for start in range(0, len(rows), INSERT_CHUNK):
                chunk = rows[start : start + INSERT_CHUNK]
                conn.execute(_insert_statement(len(chunk)), [value for row in chunk for value in row])
            if batch.awaiting:
                conn.executemany(
                    _INSERT_AWAITING,
                    [
                        (a.uplink, a.event_id, a.rowid, a.seq, a.type, a.created, a.payload)
                        for a in batch.awaiting
                    ],
                )
            for write in batch.writes:
                conn.execute(write.sql, write.params)
            for uplink, upto in batch.acks.items():
                conn.execute(_UPSERT_CURSOR, (uplink, upto))
                conn.execute("DELETE FROM outbox WHERE uplink = ? AND id <= ?", (uplink, upto))
            if batch.seq != self._seq or batch.last_rowid != self._last_rowid:
                conn.execute(_UPDATE_META, (batch.seq, batch.last_rowid))  # one statement: one GIL round trip
            conn.execute("COMMIT")
        except (sqlite3.Error, OutboxError) as exc:  # OutboxError: reopening the connection failed
            self._rollback()
            self._failed(batch, exc)
            return False
        return True

    def _writer_conn(self) -> sqlite3.Connection:
        if self._conn is not None and not self._conn_broken:
            return self._conn
        self._close_writer_conn()
        self._conn = self._connect(readonly=False)
        self._conn_broken = False
        return self._conn

    def _rollback(self) -> None:
        conn = self._conn
        if conn is None or not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("outbox.rollback_failed", path=str(self._path), error=str(exc))
            self._conn_broken = True  # reopened before the next transaction

    def _failed(self, batch: _Batch, exc: Exception) -> None:
        self._failures += 1
        self._failures_in_row += 1
        suppressed = self._throttle.allow("commit")
        if suppressed is not None:
            log.error(
                "outbox.commit_failed",
                path=str(self._path),
                error=str(exc),
                events=sum(len(req.items) for req in batch.requests),
                suppressed=suppressed,
            )
        if batch.acks:
            with self._cond:
                if self._stopping:
                    log.warning("outbox.acks_not_persisted", path=str(self._path), acks=batch.acks)
                else:
                    for uplink, upto in batch.acks.items():
                        self._acks[uplink] = max(self._acks.get(uplink, 0), upto)
                    if self._ack_since is None:
                        self._ack_since = time.monotonic()
        message = f"{self._path}: the outbox could not commit: {exc}"
        batch.write_error = _chained(message, exc)
        for i, result in enumerate(batch.results):
            if not isinstance(result, BaseException):
                batch.results[i] = _chained(message, exc)
        self._call_loop(self._deliver, batch, [], [])

    def _fail_requests(self, requests: list[_Request], why: str, exc: BaseException) -> None:
        for req in requests:
            if not req.future.done():
                req.future.set_exception(_chained(f"{self._path}: {why}: {exc!r}", exc))

    def _apply(self, batch: _Batch, seconds: float) -> None:
        """After a commit: update lanes, counters and the time index, and tell the loop."""
        wake: list[_Lane] = []
        shed_reports: list[tuple[str, int, dict[str, int]]] = []
        with self._lock:
            self._seq = batch.seq
            self._last_rowid = batch.last_rowid
            for name, new in batch.new_rows.items():
                lane = self._lanes[name]
                shed = batch.shed.get(name)
                if self._apply_lane(lane, new, shed):
                    wake.append(lane)
                if shed is not None:
                    self._note_shed(lane, shed, shed_reports)
                if lane.over_bound and lane.depth <= lane.max_rows:
                    lane.over_bound = False
            for entry in batch.awaiting:
                self._lanes[entry.uplink].awaiting[entry.event_id] = entry
            if wake:
                self._t_ids.append(batch.first_rowid)
                self._t_at.append(batch.first_time)
                self._prune_time_index()
        self._commits += 1
        if batch.events:
            self._event_commits += 1
        self._events += batch.events
        self._rows += len(batch.inserts) - sum(len(s.new) for s in batch.shed.values())
        self._commit_seconds += seconds
        self._commit_seconds_max = max(self._commit_seconds_max, seconds)
        if self._failures_in_row:
            log.warning("outbox.commit_recovered", path=str(self._path), failures=self._failures_in_row)
            self._failures_in_row = 0
            self._throttle.reset("commit")
        self._call_loop(self._deliver, batch, wake, shed_reports)

    @staticmethod
    def _apply_lane(lane: _Lane, new: list[tuple[int, int, str, Row]], shed: _Shed | None) -> bool:
        """One uplink's part of a commit (under _lock); True if rows were added."""
        dropped: set[int] = set()
        if shed is not None:
            dropped = shed.new
            for cls, old in shed.old.items():
                lane.depth -= _remove_rows(lane.classes[cls], old)
            if shed.old:
                victims = {rowid for old in shed.old.values() for rowid in old}
                kept = [row for row in lane.fresh if row.rowid not in victims]
                lane.fresh = deque(kept)
                lane.fresh_bytes = sum(len(row.payload) for row in kept)
        added = 0
        fresh = lane.fresh
        for rowid, cls, _, row in new:
            if rowid not in dropped and rowid > lane.acked:
                lane.classes[cls].append(rowid)
                fresh.append(row)
                lane.fresh_bytes += len(row.payload)
                added += 1
        lane.depth += added
        while fresh and (len(fresh) > FRESH_MAX_ROWS or lane.fresh_bytes > FRESH_MAX_BYTES):
            lane.trim_fresh(fresh[0].rowid)
        return added > 0

    def _note_shed(self, lane: _Lane, shed: _Shed, reports: list[tuple[str, int, dict[str, int]]]) -> None:
        count = shed.count
        if count:
            self._shed_rows += count
            reports.append((lane.name, count, dict(shed.by_type)))
            suppressed = self._throttle.allow(f"shed:{lane.name}")
            if suppressed is not None:
                log.warning(
                    "outbox.shed",
                    uplink=lane.name,
                    rows=count,
                    by_type=dict(shed.by_type),
                    max_rows=lane.max_rows,
                    suppressed_reports=suppressed,
                )
        if shed.short > 0 and not lane.over_bound:
            lane.over_bound = True
            log.warning(
                "outbox.bound_exceeded",
                uplink=lane.name,
                depth=lane.depth,
                max_rows=lane.max_rows,
                reason="only alarms and rows in flight remain; an alarm is never shed",
            )

    def _prune_time_index(self) -> None:
        """Drop time-index entries below every uplink's oldest un-acked row (under _lock)."""
        heads = [head for lane in self._lanes.values() if (head := lane.oldest()) is not None]
        if not heads:
            del self._t_ids[:-1]
            del self._t_at[:-1]
            return
        keep_from = bisect.bisect_right(self._t_ids, min(heads)) - 1
        if keep_from > 64:  # amortise the memmove
            del self._t_ids[:keep_from]
            del self._t_at[:keep_from]

    # ------------------------------------------------------------------ opening

    def _acquire_file_lock(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise OutboxError(f"{self._path}: the outbox is in use by another process") from exc
        self._lock_fd = fd

    def _release_file_lock(self) -> None:
        # Only after both connections are closed: closing any descriptor of the file drops
        # this process's POSIX locks on it, SQLite's included.
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            if readonly:
                conn.execute("PRAGMA query_only = 1")
            else:
                self._check_wal(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_wal(self, mode: object) -> None:
        if str(mode).lower() != "wal":
            raise OutboxError(f"{self._path}: the outbox needs WAL mode, the file is in {mode}")

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect(readonly=False)
        try:
            self._migrate(conn)
            self._load(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"{self._path}: outbox schema version {version} is newer than this gateway's "
                f"({SCHEMA_VERSION}); refusing to open it (upgrade the gateway or move the file away)"
            )
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise OutboxError(f"{self._path}: not a campus-gateway outbox (tables but no schema version)")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if version:
                log.info("outbox.migrated", path=str(self._path), version=target)

    def _load(self, conn: sqlite3.Connection) -> None:
        """Read seq, rowid and cursors, and index the un-acked rows of each uplink."""
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "seq" not in meta or "rowid" not in meta:
            raise OutboxError(f"{self._path}: outbox meta table lacks seq or rowid")
        cursors: dict[str, int] = dict(conn.execute("SELECT uplink, acked FROM cursor").fetchall())
        max_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])
        self._seq = int(meta["seq"])
        self._last_rowid = max(int(meta["rowid"]), max_id, max(cursors.values(), default=0))
        for lane in self._lanes.values():
            lane.acked = lane.handed = cursors.get(lane.name, 0)
            lane.fresh_from = self._last_rowid  # rows on disk are read from SQLite
        unknown: Counter[str] = Counter()
        rows = conn.execute("SELECT id, uplink, priority, created FROM outbox ORDER BY id")
        for rowid, uplink, cls, created in rows:
            owner = self._lanes.get(uplink)
            if owner is None:
                unknown[uplink] += 1
                continue
            if rowid <= owner.acked:
                continue
            owner.classes[min(max(int(cls), 0), ALARM_CLASS)].append(rowid)
            owner.depth += 1
            if not self._t_at or abs(created - self._t_at[-1]) > TIME_INDEX_RESOLUTION:
                self._t_ids.append(rowid)
                self._t_at.append(created)
        self._load_ledger(conn)
        if unknown:
            log.warning(
                "outbox.unconfigured_uplinks",
                path=str(self._path),
                rows=dict(unknown),
                action="kept, not delivered, until the uplink is configured again",
            )

    def _load_ledger(self, conn: sqlite3.Connection) -> None:
        """The open ack-ledger entries, and the recently settled ones; older ones are dropped."""
        horizon = time.time() - SETTLED_KEEP
        conn.execute("DELETE FROM awaiting WHERE state != 'awaiting' AND settled < ?", (horizon,))
        rows = conn.execute(
            # A settled entry's payload is not needed again: not read.
            "SELECT uplink, event_id, row, seq, type, created,"
            " CASE state WHEN 'awaiting' THEN payload ELSE x'' END, repeats, troubled, state"
            " FROM awaiting ORDER BY coalesce(settled, 0), row"
        )
        for uplink, event_id, rowid, seq, type_, created, payload, repeats, troubled, state in rows:
            lane = self._lanes.get(uplink)
            if lane is None:
                continue
            if state == "awaiting":
                lane.awaiting[event_id] = Awaiting(
                    uplink, event_id, rowid, seq, type_, created, bytes(payload), repeats, bool(troubled)
                )
            elif state in Settled.__members__.values():
                record = Awaiting(uplink, event_id, rowid, seq, type_, created, b"", repeats, bool(troubled))
                lane.settled[event_id] = (Settled(state), record)
                while len(lane.settled) > SETTLED_MEMORY:
                    del lane.settled[next(iter(lane.settled))]

    def _close_writer_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except sqlite3.Error as exc:
            log.warning("outbox.close_failed", path=str(self._path), error=str(exc))

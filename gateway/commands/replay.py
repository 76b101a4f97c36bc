"""The replay cache: every accepted command id, kept in SQLite until it could no longer pass.

What it guarantees:

* :meth:`ReplayCache.add` records ``(uplink, command id)`` and returns True only if it was
  not there; the check and the insert are one transaction on one thread, so two
  concurrent deliveries of one command cannot both be accepted. It returns after the
  commit (WAL, ``synchronous=FULL``), so an accepted id survives kill -9 and power loss:
  a command replayed after a restart is still refused.
* An entry is kept until its ``keep_until`` (the verifier uses ``expires_at + skew_past``,
  past the last moment its clock checks could accept the command), then purged by the
  next :meth:`add` or by :meth:`purge`. Live entries are therefore bounded by the
  command rate times ``max_ttl + skew_past``.
* The cache is bounded to ``max_entries`` live ids. When full, :meth:`add` raises
  :class:`~gateway.errors.ReplayCacheFull` (the verifier refuses the command) rather than
  forget an id that could then be replayed.

Threads: one worker thread owns the connection; the event loop never touches the disk.
Every sqlite3 error becomes a :class:`~gateway.errors.CommandError`. The file is marked
with ``PRAGMA application_id`` and versioned with ``PRAGMA user_version``; a foreign
file or one from a newer gateway is refused.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from gateway.errors import CommandError, ReplayCacheFull

# Commands are human-initiated: a few per minute. An entry lives at most max_ttl +
# skew_past (340 s by default), so 100k live entries would take ~300 commands/s for
# minutes on end: only a flood or a bug gets there, and then refusing is the safe side.
MAX_ENTRIES: Final = 100_000
# One add is one small transaction with an fsync (milliseconds, ~20 ms on an SD card).
# Past this the disk is hung: refuse the command rather than keep the platform waiting.
OP_TIMEOUT: Final = 10.0
# Opening may run WAL recovery after a crash; a small file recovers in milliseconds.
OPEN_TIMEOUT: Final = 30.0
# Nothing else writes the file; a technician's sqlite3 shell may hold a lock briefly.
BUSY_TIMEOUT: Final = 5.0
# "CGRC": campus-gateway replay cache.
APPLICATION_ID: Final = 0x43475243

_V1: Final = (
    """CREATE TABLE seen (
        uplink TEXT NOT NULL,
        id TEXT NOT NULL,
        keep_until REAL NOT NULL,
        PRIMARY KEY (uplink, id)
    ) WITHOUT ROWID""",
    "CREATE INDEX seen_keep_until ON seen (keep_until)",
)
# Ordered: MIGRATIONS[n - 1] takes the file from user_version n - 1 to n. Never edit a
# shipped entry; add one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1,)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_T = TypeVar("_T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ReplayCache:
    """Seen command ids in one SQLite file (e.g. ``state_dir/commands.sqlite3``).

    An async context manager: entering opens (and creates or migrates) the file on the
    worker thread, leaving closes it. Usage::

        async with ReplayCache(state_dir / "commands.sqlite3") as cache:
            fresh = await cache.add("cmd-1", keep_until, uplink="police")
    """

    def __init__(
        self,
        path: Path,
        *,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self._path = Path(path)
        self._max = max_entries
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the worker thread only

    @property
    def path(self) -> Path:
        return self._path

    async def __aenter__(self) -> Self:
        if self._executor is not None:
            raise CommandError(f"{self._path}: a ReplayCache is entered only once")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"replay-cache:{self._path.name}")
        try:
            await self._run(self._open, OPEN_TIMEOUT, "opening")
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def add(
        self,
        command_id: str,
        keep_until: datetime,
        *,
        uplink: str = "",
        now: datetime | None = None,
    ) -> bool:
        """Record ``command_id`` (per ``uplink``) until ``keep_until``; False if already there.

        Raises :class:`~gateway.errors.ReplayCacheFull` when ``max_entries`` live ids are
        held, :class:`~gateway.errors.CommandError` on a disk error or timeout.
        """
        at = (self._clock() if now is None else now).timestamp()
        until = keep_until.timestamp()
        return await self._run(lambda: self._add(uplink, command_id, until, at), OP_TIMEOUT, "recording")

    async def purge(self, now: datetime | None = None) -> int:
        """Delete the entries whose ``keep_until`` has passed; returns how many went."""
        at = (self._clock() if now is None else now).timestamp()
        return await self._run(lambda: self._purge(at), OP_TIMEOUT, "purging")

    async def count(self) -> int:
        """Entries held, expired ones not yet purged included."""
        return await self._run(self._count, OP_TIMEOUT, "counting")

    # ------------------------------------------------------------------ loop side

    async def _run(self, func: Callable[[], _T], timeout: float, what: str) -> _T:
        if self._executor is None:
            raise CommandError(f"{self._path}: the replay cache is not open")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                return await loop.run_in_executor(self._executor, func)
        except TimeoutError as exc:
            raise CommandError(f"{self._path}: {what} took over {timeout} s (disk hung?)") from exc

    async def _shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                await asyncio.get_running_loop().run_in_executor(executor, self._close)
        except TimeoutError:
            # A hung disk: the worker thread keeps the connection; do not wait for it.
            executor.shutdown(wait=False, cancel_futures=True)
        else:
            executor.shutdown(wait=True)  # the one worker is idle now: this returns at once

    # ------------------------------------------------------------------ worker thread

    def _open(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self._path,
                isolation_level=None,  # explicit BEGIN / COMMIT
                timeout=BUSY_TIMEOUT,
                check_same_thread=False,  # created and used by the one worker thread
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._migrate(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise CommandError(f"{self._path}: cannot open the replay cache: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        app_id = _scalar(conn, "PRAGMA application_id")
        version = _scalar(conn, "PRAGMA user_version")
        tables = _scalar(conn, "SELECT count(*) FROM sqlite_master")
        if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or tables != 0):
            raise CommandError(f"{self._path}: not a command replay cache (another file at this path?)")
        if version > SCHEMA_VERSION:
            raise CommandError(
                f"{self._path}: replay cache schema {version} is newer than this gateway's {SCHEMA_VERSION}"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise CommandError(f"{self._path}: closing the replay cache failed: {exc}") from exc

    def _transaction(self, body: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        conn = self._conn
        if conn is None:
            raise CommandError(f"{self._path}: the replay cache is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    raise CommandError(
                        f"{self._path}: {what} failed: {exc}; rollback failed too: {rollback_exc}"
                    ) from exc
            raise CommandError(f"{self._path}: {what} failed: {exc}") from exc
        return result

    def _add(self, uplink: str, command_id: str, until: float, now: float) -> bool:
        full: list[int] = []

        def body(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM seen WHERE keep_until <= ?", (now,))
            seen = conn.execute("SELECT 1 FROM seen WHERE uplink = ? AND id = ?", (uplink, command_id))
            if seen.fetchone() is not None:
                return False
            held = _scalar(conn, "SELECT count(*) FROM seen")
            if held >= self._max:
                full.append(held)
                return False
            conn.execute(
                "INSERT INTO seen (uplink, id, keep_until) VALUES (?, ?, ?)", (uplink, command_id, until)
            )
            return True

        fresh = self._transaction(body, "recording a command id")
        if full:  # raised after the commit, so the purge above is kept
            raise ReplayCacheFull(
                f"{self._path}: the replay cache holds {full[0]} unexpired command ids "
                f"(max {self._max}); refusing new commands until some expire"
            )
        return fresh

    def _purge(self, now: float) -> int:
        def body(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM seen WHERE keep_until <= ?", (now,)).rowcount

        return self._transaction(body, "purging")

    def _count(self) -> int:
        return self._transaction(lambda conn: _scalar(conn, "SELECT count(*) FROM seen"), "counting")


def _scalar(conn: sqlite3.Connection, sql: str) -> int:
    row: Any = conn.execute(sql).fetchone()
    return int(row[0])

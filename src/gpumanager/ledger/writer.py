"""The batched ledger writer: rows in on the request path, transactions out in a worker thread."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from gpumanager.ledger.postgres import PgConnection, database_errors, integrity_errors, is_url
from gpumanager.ledger.rows import IntervalRow, JobRow, RequestRow
from gpumanager.ledger.schema import DAY, Connection, LedgerError, Location, open_database, prune, shown, transaction

Row = RequestRow | IntervalRow | JobRow

MAX_BUFFERED = 100_000  # rows held while the database cannot take them; past it, new rows are dropped
FLUSH_ROWS = 10_000  # a buffer this full is written at once rather than at the next tick
WARN_SECONDS = 60.0  # at most one warning of each kind a minute


def _insert(table: str, fields: tuple[str, ...]) -> str:
    """One statement for a whole batch, its rows one JSON array parameter: SQLite unpacks it in C.
    Row by row (`executemany`), the sqlite3 module takes and drops the GIL for every row, and
    against a busy event loop that handover cost more than the proxy's whole request path."""
    columns = ", ".join(f'"{name}"' for name in fields)
    values = ", ".join(f"value ->> '$.{name}'" for name in fields)
    return f"INSERT INTO {table} ({columns}) SELECT {values} FROM json_each(?)"


_INSERT_REQUEST = _insert("requests", RequestRow.__struct_fields__)
# An interval still open is recorded again as it grows: the newest record of a host's interval
# (the same host and start) replaces the row. (`WHERE true` lets SQLite parse the upsert after a SELECT.)
_INSERT_INTERVAL = (
    _insert("intervals", IntervalRow.__struct_fields__)
    + ' WHERE true ON CONFLICT (host, "start") DO UPDATE SET "end" = excluded."end", reason = excluded.reason,'
    + " key_id = excluded.key_id, cost_micro = excluded.cost_micro, gpu_seconds = excluded.gpu_seconds"
)

# A job is recorded when submitted and again as it changes: the newest record is its row.
_INSERT_JOB = (
    _insert("jobs", JobRow.__struct_fields__)
    + " WHERE true ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in JobRow.__struct_fields__ if name != "id")
)


def _statements(batch: list[Row]) -> list[tuple[str, tuple[bytes]]]:
    """The inserts of `batch`: per table, one statement and the rows as one JSON array."""
    requests = [row for row in batch if isinstance(row, RequestRow)]
    intervals = [row for row in batch if isinstance(row, IntervalRow)]
    jobs = [row for row in batch if isinstance(row, JobRow)]
    return [
        (sql, (_encode(rows),))
        for sql, rows in ((_INSERT_REQUEST, requests), (_INSERT_INTERVAL, intervals), (_INSERT_JOB, jobs))
        if rows
    ]


_encode = msgspec.json.Encoder().encode


# What makes a flush fail and its rows wait for the next: the database, the disk, or the schema.
_FAILURES: tuple[type[BaseException], ...] = (*database_errors(), OSError, LedgerError)


def _write(conn: Connection, rows: list[Row]) -> None:
    """Insert rows inside the caller's transaction: SQLite's batch statements, or PostgreSQL's."""
    if isinstance(conn, PgConnection):
        conn.write(rows)
        return
    for statement, params in _statements(rows):
        conn.execute(statement, params)


class WriterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a `LedgerWriter` (for metrics and the admin API)."""

    buffered: int  # rows waiting to be written
    written: int  # rows committed since start
    dropped: int  # rows lost because the buffer was full
    transactions: int  # commits that wrote rows


class LedgerWriter:
    """Writes `RequestRow`s, `IntervalRow`s and `JobRow`s to the ledger in batches, off the request path.

    Owns a bounded buffer of rows and the one SQLite connection that writes the ledger file.

    - `add(row)` runs on the event loop's thread, on any task (the request path): it appends to the
      buffer and returns; it never blocks, never does I/O and never raises. When `max_buffered` rows
      are waiting, a new row is dropped and counted in `dropped`.
    - `run()` is one task of the app's task group (start it with `tg.start(writer.run)`: it reports
      started once it has tried to open the file). It commits what is buffered at least every
      `flush_seconds`, sooner when `FLUSH_ROWS` are waiting, in a worker thread
      (`anyio.to_thread.run_sync`); the connection is only ever used by one such call at a time. It
      opens the file (creating, migrating and pruning it), prunes rows older than `retention_days`
      at most once a day by `clock`, and on cancellation makes a last, shielded flush bounded by
      `final_flush_seconds` before it closes the file: an orderly shutdown loses nothing, a killed
      process what came in since the last flush.
    - While the file cannot be opened or written, rows stay buffered and every tick tries again
      with a fresh connection; failures and drops are each logged as a warning at most once a
      minute.

    `clock` (Unix seconds) decides pruning and the warnings' pace; the flush tick is real time.
    """

    def __init__(
        self,
        path: Location,
        *,
        retention_days: float = 400,
        flush_seconds: float = 1.0,
        max_buffered: int = MAX_BUFFERED,
        final_flush_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path: Location = path if isinstance(path, str) and is_url(path) else Path(path)
        self.dropped = 0
        self._retention = retention_days * DAY
        self._flush_seconds = flush_seconds
        self._max_buffered = max_buffered
        self._final_flush_seconds = final_flush_seconds
        self._clock = clock
        self._buffer: deque[Row] = deque()
        self._conn: Connection | None = None
        self._next_prune = 0.0
        self._written = 0
        self._transactions = 0
        # Set by the worker thread after a commit, read back on the loop once the thread is done:
        # even a flush whose caller was cancelled meanwhile has its rows taken off the buffer.
        self._committed = 0
        self._rejected = 0  # rows of the last flush the database refused (a bug in whoever made them)
        self._error: str | None = None
        self._healthy = True
        self._kick: anyio.Event | None = None
        self._failure_warned = float("-inf")
        self._drops_warned = float("-inf")
        # Called just before each flush, the last one included, to hand over the rows still being
        # built (the billing meter's open intervals): a killed process loses at most one interval.
        self.before_flush: Callable[[], None] | None = None
        self._overflowed = 0  # of `dropped`, the rows that found the buffer full
        self._overflow_reported = 0

    def add(self, row: Row) -> None:
        """Buffer `row` for the next flush. Never blocks, never raises."""
        if len(self._buffer) >= self._max_buffered:
            self.dropped += 1
            self._overflowed += 1
            return
        self._buffer.append(row)
        if len(self._buffer) >= FLUSH_ROWS and self._healthy and self._kick is not None:
            self._kick.set()

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            buffered=len(self._buffer), written=self._written, dropped=self.dropped, transactions=self._transactions
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            self._kick = anyio.Event()
            await self._flush()
            task_status.started()
            while True:
                with anyio.move_on_after(self._flush_seconds):
                    await self._kick.wait()
                self._kick = anyio.Event()
                await self._flush()
                if self._healthy and len(self._buffer) >= FLUSH_ROWS:
                    self._kick.set()
        finally:
            with anyio.move_on_after(self._final_flush_seconds, shield=True):
                await self._flush(final=True)
            if self._buffer:
                logger.warning(
                    "usage ledger: {} rows not written to {} at shutdown", len(self._buffer), shown(self.path)
                )

    async def _flush(self, *, final: bool = False) -> None:
        if self.before_flush is not None:
            self.before_flush()
        batch = list(self._buffer)
        if not (batch or final or self._conn is None or self._clock() >= self._next_prune):
            return
        try:
            # The last flush may be abandoned at its deadline: its thread then finishes (and
            # closes the connection) on its own, and nothing else touches the connection again.
            await anyio.to_thread.run_sync(self._write, batch, final, abandon_on_cancel=final)
        finally:
            self._settle()
        self._report()

    def _settle(self) -> None:
        """Take what the last flush committed off the buffer. `add()` only appends and only this
        removes, so the committed rows are still the buffer's first ones."""
        committed, self._committed = self._committed, 0
        rejected, self._rejected = self._rejected, 0
        for _ in range(committed):
            self._buffer.popleft()
        self._written += committed - rejected
        self.dropped += rejected

    # -- in the worker thread ----------------------------------------------------------------------

    def _write(self, batch: list[Row], final: bool) -> None:
        try:
            conn = self._connection()
            if batch:
                self._commit(conn, batch)
            if self._clock() >= self._next_prune:
                prune(conn, before=self._clock() - self._retention)
                self._next_prune = self._clock() + DAY
            self._error = None
        except _FAILURES as exc:
            self._error = str(exc) or type(exc).__name__
            self._close()
        finally:
            if final:
                self._close()

    def _connection(self) -> Connection:
        if self._conn is None:
            now = self._clock()
            self._conn = open_database(self.path, retention_days=self._retention / DAY, now=now)
            self._next_prune = now + DAY
        return self._conn

    def _commit(self, conn: Connection, batch: list[Row]) -> None:
        try:
            with transaction(conn):
                _write(conn, batch)
        except integrity_errors():
            self._commit_each(conn, batch)
        else:
            self._committed = len(batch)
        self._transactions += 1

    def _commit_each(self, conn: Connection, batch: list[Row]) -> None:
        """A batch with a row the database refuses: write the others, drop that one, and say so,
        rather than retry the same batch forever."""
        rejected = 0
        with transaction(conn):
            for row in batch:
                try:
                    with contextlib.ExitStack() as one:
                        if isinstance(conn, PgConnection):  # a savepoint: a refused row spoils nothing else
                            one.enter_context(conn.transaction())
                        _write(conn, [row])
                except integrity_errors() as exc:
                    rejected += 1
                    logger.error("usage ledger: dropped a row the database refused ({}): {!r}", exc, row)
        self._committed, self._rejected = len(batch), rejected

    def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(*database_errors()):
                conn.close()

    # -- back on the loop --------------------------------------------------------------------------

    def _report(self) -> None:
        now = self._clock()
        was_healthy, self._healthy = self._healthy, self._error is None
        if self._error is not None and now - self._failure_warned >= WARN_SECONDS:
            self._failure_warned = now
            logger.warning(
                "usage ledger: cannot write {}: {}; {} rows buffered, retrying every {:g} s",
                shown(self.path),
                self._error,
                len(self._buffer),
                self._flush_seconds,
            )
        elif self._healthy and not was_healthy:
            logger.info("usage ledger: writing {} again", shown(self.path))
        new_drops = self._overflowed - self._overflow_reported
        if new_drops and now - self._drops_warned >= WARN_SECONDS:
            self._drops_warned, self._overflow_reported = now, self._overflowed
            logger.warning(
                "usage ledger: dropped {} rows ({} in all): {} were already waiting to be written",
                new_drops,
                self._overflowed,
                self._max_buffered,
            )

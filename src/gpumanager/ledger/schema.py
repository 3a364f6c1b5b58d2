"""The ledger's database: where it is (a SQLite file, or PostgreSQL: `postgres.py`), its tables,
their migrations, and pruning.

The schema's version is `PRAGMA user_version`: 0 for an empty file, else the number of entries of
`MIGRATIONS` applied. Opening for writing applies the missing ones in order, each in its own
transaction together with the new version number, so a file is never left half-migrated. A file
from a newer gpumanager is refused rather than guessed at. Journal mode is WAL: readers (the
`usage` command, `/usage`) never block the writer, and a killed process loses only what it had not
committed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from gpumanager.errors import GpuManagerError
from gpumanager.ledger.postgres import PgConnection, ddl, is_url
from gpumanager.ledger.postgres import shown as pg_shown

if TYPE_CHECKING:
    from gpumanager.config import Config

DAY = 86_400.0
SQLITE_PREFIX = "sqlite:///"
BUSY_SECONDS = 5.0  # how long a statement waits for another connection's lock
MIGRATION_LOCK = 0x676D6C6564676572  # PostgreSQL's advisory lock of the ledger's migrations ("gmledger")

Migration = tuple[str, ...]

MIGRATIONS: tuple[Migration, ...] = (
    # 1: one row per request, one per non-serving billed interval (rows.py), found by time.
    (
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            key_id TEXT NOT NULL,
            route TEXT NOT NULL,
            model TEXT NOT NULL,
            host TEXT NOT NULL,
            status INTEGER NOT NULL,
            wait_ms REAL NOT NULL,
            ttfb_ms REAL,
            duration_ms REAL NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            gpu_seconds REAL NOT NULL,
            cost_micro INTEGER NOT NULL
        )""",
        """CREATE TABLE intervals (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            "start" REAL NOT NULL,
            "end" REAL NOT NULL,
            reason TEXT NOT NULL,
            key_id TEXT,
            cost_micro INTEGER NOT NULL,
            gpu_seconds REAL NOT NULL
        )""",
        "CREATE INDEX requests_ts ON requests (ts)",
        'CREATE INDEX intervals_start ON intervals ("start")',
    ),
    # 2: one key's or one host's rows of a period (`usage --key`, `--by host`, `/usage/me`,
    # budgets seeded at start) without scanning the period's every row; intervals by their end,
    # since a period's reads want those that end after it starts.
    (
        "CREATE INDEX requests_key ON requests (key_id, ts)",
        "CREATE INDEX requests_host ON requests (host, ts)",
        'CREATE INDEX intervals_key ON intervals (key_id, "start")',
        'CREATE INDEX intervals_host ON intervals (host, "start")',
        'CREATE INDEX intervals_end ON intervals ("end")',
    ),
    # 3: an interval is recorded again as it grows (so a killed process loses at most its last
    # second): each record of it is written over the one row of its host and start.
    ('CREATE UNIQUE INDEX intervals_open ON intervals (host, "start")',),
    # 4: RunPod jobs: who owns each (it survives a restart) and what it used; recorded when
    # submitted and again when it ends, each record over the job's one row.
    (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            key_id TEXT NOT NULL,
            host TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            route TEXT NOT NULL,
            status TEXT NOT NULL,
            ended REAL,
            delay_ms INTEGER,
            execution_ms INTEGER,
            gpu_seconds REAL NOT NULL,
            cost_micro INTEGER NOT NULL
        )""",
        "CREATE INDEX jobs_ts ON jobs (ts)",
        "CREATE INDEX jobs_key ON jobs (key_id, ts)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class LedgerError(GpuManagerError):
    """The usage ledger cannot be read: none yet, a newer schema, a database that is not one."""


# Where the ledger is: a SQLite file, or a PostgreSQL URL (`postgres.is_url`).
Location = Path | str
Connection = sqlite3.Connection | PgConnection


def database_path(config: Config) -> Location:
    """The ledger of `config` (`[usage] database_url`, resolved by `config.load`): its SQLite file,
    or its PostgreSQL URL."""
    return sqlite_path(config.usage.database_url, config.paths.state_dir)


def sqlite_path(database_url: str, state_dir: str) -> Location:
    """The file a `sqlite:///path` URL names ("" is `<state_dir>/usage.db`), or a PostgreSQL URL as it is."""
    if not database_url:
        return Path(state_dir) / "usage.db"
    if database_url.startswith(SQLITE_PREFIX) and len(database_url) > len(SQLITE_PREFIX):
        return Path(database_url.removeprefix(SQLITE_PREFIX))
    if is_url(database_url):
        return database_url
    scheme = database_url.partition(":")[0]  # never the rest: it may hold a password
    raise LedgerError(f"[usage] database_url: sqlite:///PATH or postgresql://USER@HOST/DATABASE, not a {scheme!r} URL")


def shown(location: Location) -> str:
    """The ledger's location for messages and logs: never a password."""
    return pg_shown(location) if isinstance(location, str) and is_url(location) else str(location)


def open_database(path: Location, *, retention_days: float, now: float) -> Connection:
    """Open (creating it and its folder if need be) the ledger for writing, migrated to
    `SCHEMA_VERSION` and pruned of rows older than `retention_days` before `now`. Raises a database
    error (`postgres.database_errors()`), `OSError` or `LedgerError` when it cannot. The
    connection is in autocommit mode (callers write their own transactions) and may be used from
    any one thread at a time."""
    conn: Connection
    if isinstance(path, str) and is_url(path):
        conn = connect_postgres(path, read_only=False)
    else:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
    try:
        if isinstance(conn, sqlite3.Connection):
            conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode a commit survives a killed process without waiting for the disk; only a
            # power cut can undo the last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
        migrate(conn)
        prune(conn, before=now - retention_days * DAY)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_postgres(url: str, *, read_only: bool) -> PgConnection:
    """A connection to the ledger in PostgreSQL; `LedgerError` when psycopg is missing."""
    try:
        return PgConnection(url, read_only=read_only)
    except ModuleNotFoundError as exc:
        raise LedgerError(str(exc)) from None


def version(conn: Connection) -> int:
    if isinstance(conn, PgConnection):
        return conn.version()
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Apply the migrations `conn`'s database lacks, in order; return the version it is at now.
    On PostgreSQL, replicas starting together take turns (an advisory lock): one migrates, the
    others find it done."""
    if isinstance(conn, PgConnection):
        with transaction(conn):
            conn.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            _check_version(version(conn), migrations)
            for number, statements in enumerate(migrations[version(conn) :], start=version(conn) + 1):
                for statement in statements:
                    conn.conn.execute(ddl(statement))
                conn.set_version(number)
        return version(conn)
    current = version(conn)
    _check_version(current, migrations)
    for number, statements in enumerate(migrations[current:], start=current + 1):
        with transaction(conn):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number:d}")
    return version(conn)


def _check_version(current: int, migrations: tuple[Migration, ...]) -> None:
    if current > len(migrations):
        raise LedgerError(
            f"the usage ledger has schema version {current}, newer than this gpumanager's {len(migrations)}: "
            "upgrade gpumanager"
        )


def prune(conn: Connection, *, before: float) -> int:
    """Delete the requests that finished, the intervals and the jobs that ended, before `before`
    (Unix seconds). Returns how many rows went."""
    with transaction(conn):
        gone = conn.execute("DELETE FROM requests WHERE ts < ?", (before,)).rowcount
        gone += conn.execute('DELETE FROM intervals WHERE "end" < ?', (before,)).rowcount
        gone += conn.execute("DELETE FROM jobs WHERE ts < ? AND ended IS NOT NULL", (before,)).rowcount
    return gone


@contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    """One write transaction on an autocommit connection: committed, or rolled back on any error."""
    if isinstance(conn, PgConnection):
        with conn.transaction():
            yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (a full disk, say)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")

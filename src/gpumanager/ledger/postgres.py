"""The ledger in PostgreSQL (`[usage] database_url = "postgresql://..."`), through psycopg 3.

The ledger's SQL is written once, in SQLite's words (the default backend's); `translate()` turns it
into PostgreSQL's: `?` placeholders, `TOTAL()`, scalar `max()`/`min()`, `strftime(..., 'unixepoch')`
and `CAST(... AS INTEGER)` (which PostgreSQL rounds where SQLite truncates). The tables are the
migrations of `schema.py` with PostgreSQL's types (`DOUBLE PRECISION` for times and seconds, `BIGINT`
for money and counts), and the schema's version is a row of `gm_schema` instead of SQLite's
`PRAGMA user_version`. Rows are written in one transaction per flush with `executemany`, an open
interval's and a job's records over their one row (`ON CONFLICT ... DO UPDATE`).

psycopg is an optional dependency: `pip install 'gpumanager[postgres]'`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gpumanager.ledger.rows import IntervalRow, JobRow, RequestRow

PREFIXES = ("postgresql://", "postgres://")
MISSING = "[usage] database_url names PostgreSQL, and psycopg is not installed: pip install 'gpumanager[postgres]'"
VERSION_TABLE = "gm_schema"


def is_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(PREFIXES)


def shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def _psycopg() -> ModuleType | None:
    try:
        import psycopg
    except ImportError:
        return None
    return psycopg


def database_errors() -> tuple[type[Exception], ...]:
    """What a failing database call raises, SQLite's and (when installed) psycopg's."""
    found = _psycopg()
    return (sqlite3.Error,) if found is None else (sqlite3.Error, found.Error)


def integrity_errors() -> tuple[type[Exception], ...]:
    """What a row the database refuses raises (a bug in whoever made it, not a database down)."""
    found = _psycopg()
    base: tuple[type[Exception], ...] = (sqlite3.IntegrityError, sqlite3.InterfaceError)
    return base if found is None else (*base, found.IntegrityError, found.DataError)


# -- SQL ---------------------------------------------------------------------------------------------

_STRFTIME = re.compile(r"strftime\('([^']*)', (\w+), 'unixepoch'\)")
_TOTAL = re.compile(r"\bTOTAL\(([^()]*)\)", re.IGNORECASE)
_CAST_INT = re.compile(r"CAST\(([^()]*(?:\([^()]*\)[^()]*)*) AS INTEGER\)")  # one level of parentheses inside
_MIN_MAX = re.compile(r"\b(max|min)\(", re.IGNORECASE)
_FORMATS = {"%Y": "YYYY", "%m": "MM", "%d": "DD", "%H": "HH24", "%M": "MI"}


def translate(sql: str) -> str:
    """The ledger's SQLite SQL in PostgreSQL's words (see the module's docstring)."""
    sql = _STRFTIME.sub(lambda m: f"to_char(to_timestamp({m[2]}) AT TIME ZONE 'UTC', '{_format(m[1])}')", sql)
    sql = _CAST_INT.sub(r"CAST(FLOOR(\1) AS BIGINT)", sql)  # before TOTAL's own CAST is written
    sql = _TOTAL.sub(r"CAST(COALESCE(SUM(\1), 0) AS DOUBLE PRECISION)", sql)
    sql = _scalar_min_max(sql)
    return sql.replace("%", "%%").replace("?", "%s")


def _format(strftime: str) -> str:
    for theirs, ours in _FORMATS.items():
        strftime = strftime.replace(theirs, ours)
    return strftime


def _scalar_min_max(sql: str) -> str:
    """SQLite's max(a, b) and min(a, b) of several arguments are PostgreSQL's GREATEST and LEAST;
    with one argument they are the aggregates, the same in both."""
    renames: list[tuple[int, int, str]] = []
    for match in _MIN_MAX.finditer(sql):
        depth, top_comma, i = 0, False, match.end()
        while i < len(sql):
            char = sql[i]
            if char == "(":
                depth += 1
            elif char == ")":
                if depth == 0:
                    break
                depth -= 1
            elif char == "," and depth == 0:
                top_comma = True
            i += 1
        if top_comma:
            renames.append((match.start(1), match.end(1), "GREATEST" if match[1].lower() == "max" else "LEAST"))
    for start, end, name in reversed(renames):
        sql = sql[:start] + name + sql[end:]
    return sql


def ddl(statement: str) -> str:
    """A migration's statement with PostgreSQL's types."""
    statement = statement.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
    statement = re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)
    return re.sub(r"\bINTEGER\b(?! PRIMARY)", "BIGINT", statement)


# -- the connection ------------------------------------------------------------------------------------


class PgConnection:
    """A psycopg connection that takes the ledger's SQLite SQL (the readers' `execute` and the
    writer's batches); autocommit outside `transaction()`."""

    def __init__(self, url: str, *, read_only: bool) -> None:
        psycopg = _psycopg()
        if psycopg is None:
            raise ModuleNotFoundError(MISSING)
        self.url = url
        self.conn: Any = psycopg.connect(url, autocommit=True, connect_timeout=10)
        if read_only:
            self.conn.execute("SET default_transaction_read_only = on")

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self.conn.execute(translate(sql), tuple(params))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()

    # -- the schema's version ----------------------------------------------------------------------

    def version(self) -> int:
        found = self.conn.execute("SELECT to_regclass(%s)", (VERSION_TABLE,)).fetchone()
        if found is None or found[0] is None:
            return 0
        row = self.conn.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
        return int(row[0]) if row else 0

    def set_version(self, number: int) -> None:
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)")
        self.conn.execute(f"DELETE FROM {VERSION_TABLE}")
        self.conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (%s)", (number,))

    # -- the writer's batches ----------------------------------------------------------------------

    def write(self, batch: Sequence[RequestRow | IntervalRow | JobRow]) -> None:
        """Insert a batch (inside the caller's transaction): per table, one `executemany`."""
        for kind, (sql, fields) in _INSERTS.items():
            rows = [tuple(_value(getattr(row, f)) for f in fields) for row in batch if isinstance(row, kind)]
            if rows:
                with self.conn.cursor() as cursor:
                    cursor.executemany(sql, rows)


def _value(value: object) -> object:
    return str(value) if isinstance(value, str) else value  # a StrEnum (Reason) as its plain text


def _insert(table: str, fields: tuple[str, ...], conflict: str = "") -> tuple[str, tuple[str, ...]]:
    columns = ", ".join(f'"{name}"' for name in fields)
    values = ", ".join("%s" for _ in fields)
    return f"INSERT INTO {table} ({columns}) VALUES ({values}){conflict}", fields


def _update(fields: tuple[str, ...], key: tuple[str, ...]) -> str:
    return ", ".join(f'"{name}" = excluded."{name}"' for name in fields if name not in key)


_INSERTS: dict[type, tuple[str, tuple[str, ...]]] = {
    RequestRow: _insert("requests", RequestRow.__struct_fields__),
    IntervalRow: _insert(
        "intervals",
        IntervalRow.__struct_fields__,
        ' ON CONFLICT (host, "start") DO UPDATE SET ' + _update(IntervalRow.__struct_fields__, ("host", "start")),
    ),
    JobRow: _insert(
        "jobs",
        JobRow.__struct_fields__,
        " ON CONFLICT (id) DO UPDATE SET " + _update(JobRow.__struct_fields__, ("id",)),
    ),
}

"""The usage ledger: its schema and migrations, the batched writer (batching, its deadline, shutdown,
a killed process, a database it cannot write, retention) and the readers' sums."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import pytest
from loguru import logger

from gpumanager.ledger import reader
from gpumanager.ledger.reader import NO_HOST, NOT_SERVING, UNATTRIBUTED, Report, Totals
from gpumanager.ledger.rows import IntervalRow, Reason, RequestRow
from gpumanager.ledger.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    LedgerError,
    migrate,
    open_database,
    shown,
    sqlite_path,
    version,
)
from gpumanager.ledger.writer import FLUSH_ROWS, LedgerWriter
from tests.harness import async_wait_until, wait_until

H = 3_600.0
T0 = datetime(2026, 5, 1, tzinfo=UTC).timestamp()  # the fixture's period is [T0, T0 + 48 h)


def request(ts: float, key: str = "k", **fields: object) -> RequestRow:
    values: dict[str, object] = {
        "route": "/api/chat",
        "model": "m1",
        "host": "h1",
        "status": 200,
        "wait_ms": 1.0,
        "ttfb_ms": 2.0,
        "duration_ms": 3.0,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "gpu_seconds": 1.0,
        "cost_micro": 1,
    }
    values.update(fields)
    return RequestRow(ts=ts, key_id=key, **values)  # type: ignore[arg-type]


def interval(host: str, start: float, end: float, reason: Reason, key: str | None, cost: int) -> IntervalRow:
    return IntervalRow(
        host=host, start=start, end=end, reason=reason, key_id=key, cost_micro=cost, gpu_seconds=end - start
    )


def served(
    ts: float, key: str, model: str, host: str, tokens: tuple[int | None, int | None], gpu: float, cost: int
) -> RequestRow:
    prompt, completion = tokens
    status = 200 if host else 503
    return request(ts, key, model=model, host=host, status=status, prompt_tokens=prompt, completion_tokens=completion,
                   gpu_seconds=gpu, cost_micro=cost)  # fmt: skip


# A small ledger with hand-computed sums: tokens missing, an interval straddling the period's start,
# one straddling midnight, unattributed time, a refused request, rows outside the period.
FIXTURE_REQUESTS = [
    served(T0 + 1 * H, "a", "m1", "h1", (10, 5), 100.0, 100_000),
    served(T0 + 1.5 * H, "a", "m2", "h1", (None, None), 50.0, 50_000),
    served(T0 + 2 * H, "b", "m1", "h2", (20, 7), 200.0, 300_000),
    served(T0 + 25 * H, "b", "m1", "h1", (30, None), 10.0, 10_000),
    served(T0 - 1 * H, "a", "m1", "h1", (1, 1), 1000.0, 1_000_000),  # before the period
    served(T0 + 26 * H, "a", "m1", "", (None, None), 0.0, 0),  # refused: no host took it
]
FIXTURE_INTERVALS = [
    interval("h1", T0 + 3300, T0 + 3600, Reason.WAKE, "a", 30_000),
    interval("h1", T0 + 5400, T0 + 6000, Reason.RESERVE, "a", 60_000),
    interval("h2", T0 - 600, T0 + 600, Reason.FOUND, None, 120_000),
    interval("h2", T0 + 23.5 * H, T0 + 24.5 * H, Reason.PROTECTED, None, 360_000),
    interval("h1", T0 + 25 * H, T0 + 25 * H + 600, Reason.DRAIN, "b", 60_000),
    interval("h1", T0 + 50 * H, T0 + 51 * H, Reason.RESERVE, "a", 360_000),
]
FIXTURE_PRICES = {"h1": 1.0, "h2": 0.5, "h3": 2.0}


def write_rows(path: Path, rows: list[RequestRow | IntervalRow]) -> None:
    """Rows straight into a ledger file, as the writer would store them."""
    conn = open_database(path, retention_days=10_000, now=T0)
    with conn:
        for row in rows:
            table = "requests" if isinstance(row, RequestRow) else "intervals"
            fields = ", ".join(f'"{f}"' for f in type(row).__struct_fields__)
            marks = ", ".join("?" for _ in type(row).__struct_fields__)
            conn.execute(f"INSERT INTO {table} ({fields}) VALUES ({marks})", msgspec.structs.astuple(row))
    conn.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "usage.db"
    write_rows(path, [*FIXTURE_REQUESTS, *FIXTURE_INTERVALS])
    return path


def count(path: Path, table: str = "requests") -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def totals(**fields: object) -> Totals:
    """Expected sums: money and GPU-seconds filled in from their parts."""
    t = Totals(**fields)  # type: ignore[arg-type]
    return msgspec.structs.replace(
        t,
        gpu_seconds=t.serving_gpu_seconds + t.interval_gpu_seconds,
        cost_micro=t.serving_cost_micro + t.interval_cost_micro,
    )


# -- schema ----------------------------------------------------------------------------------------


def names(conn: sqlite3.Connection, kind: str) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = ?", (kind,))}


def test_an_empty_file_is_migrated_to_the_current_version_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "usage.db"
    path.parent.mkdir()
    path.touch()  # version 0: a file with nothing in it
    conn = open_database(path, retention_days=400, now=T0)
    assert version(conn) == SCHEMA_VERSION == len(MIGRATIONS) >= 2
    assert {"requests", "intervals"} <= names(conn, "table")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"requests_ts", "intervals_start", "requests_key", "intervals_host"} <= names(conn, "index")
    conn.close()


def test_a_file_of_the_previous_version_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    old = sqlite3.connect(path, isolation_level=None)
    assert migrate(old, MIGRATIONS[:-1]) == SCHEMA_VERSION - 1
    assert "jobs" not in names(old, "table")
    old.execute("INSERT INTO requests (ts, key_id, route, model, host, status, wait_ms, duration_ms, gpu_seconds, "
                "cost_micro) VALUES (?, 'k', '/api/chat', 'm', 'h', 200, 0, 0, 1.5, 7)", (T0,))  # fmt: skip
    old.close()
    conn = open_database(path, retention_days=10_000, now=T0)
    assert version(conn) == SCHEMA_VERSION
    assert "jobs" in names(conn, "table") and "jobs_key" in names(conn, "index")
    assert conn.execute("SELECT key_id, gpu_seconds, cost_micro FROM requests").fetchall() == [("k", 1.5, 7)]
    conn.close()


def test_a_file_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match="newer"):
        open_database(path, retention_days=400, now=T0)
    with pytest.raises(LedgerError, match="newer gpumanager"):
        reader.usage(path, T0, T0 + H, "key")


def test_database_urls() -> None:
    assert sqlite_path("", "/srv/state") == Path("/srv/state/usage.db")
    assert sqlite_path("sqlite:////var/lib/gm/u.db", "/srv/state") == Path("/var/lib/gm/u.db")
    url = "postgresql://gm:secret@db.example.org/gm"
    assert sqlite_path(url, "/srv/state") == url  # PostgreSQL: the URL itself
    assert shown(url) == "postgresql://gm:***@db.example.org/gm" and "secret" not in shown(url)
    with pytest.raises(LedgerError, match="sqlite:///PATH or postgresql://") as caught:
        sqlite_path("mysql://user:secret@db/gm", "/srv/state")
    assert "secret" not in str(caught.value)


# -- the writer ------------------------------------------------------------------------------------


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


@pytest.mark.anyio
async def test_many_rows_go_in_one_transaction_within_the_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "state" / "usage.db"
    writer = LedgerWriter(path, flush_seconds=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        assert path.exists() and writer.statistics().transactions == 0
        started = time.monotonic()
        for i in range(1000):
            writer.add(request(time.time(), route=f"/r/{i}"))
            if i % 100 == 0:
                writer.add(interval("h1", T0 + i, T0 + i + 1, Reason.WAKE, "k", 1))
        assert writer.statistics().buffered == 1010  # add() wrote nothing itself
        # Written by the worker thread, then settled on the loop: wait for the writer's own word.
        await async_wait_until(lambda: writer.statistics().written == 1010, timeout=5)
        assert count(path) == 1000 and time.monotonic() - started < 5
        stats = writer.statistics()
        assert (stats.written, stats.buffered, stats.dropped, stats.transactions) == (1010, 0, 0, 1)
        assert count(path, "intervals") == 10
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_interval_recorded_again_as_it_grows_keeps_one_row(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    writer = LedgerWriter(path, flush_seconds=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        writer.add(interval("h1", T0, T0 + 1, Reason.RESERVE, "k", 10))
        writer.add(interval("h1", T0, T0 + 2, Reason.RESERVE, "k", 20))  # the same flush: the last one wins
        await async_wait_until(lambda: writer.statistics().written == 2, timeout=5)
        writer.add(interval("h1", T0, T0 + 3, Reason.RESERVE, "k", 30))  # a later flush
        writer.add(interval("h2", T0, T0 + 1, Reason.FOUND, None, 5))  # another host, the same start
        await async_wait_until(lambda: writer.statistics().written == 4, timeout=5)
        tg.cancel_scope.cancel()
    conn = sqlite3.connect(path)
    rows = conn.execute('SELECT host, "start", "end", cost_micro, key_id FROM intervals ORDER BY host').fetchall()
    conn.close()
    assert rows == [("h1", T0, T0 + 3, 30, "k"), ("h2", T0, T0 + 1, 5, None)]


@pytest.mark.anyio
async def test_a_full_batch_is_written_before_the_tick(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "usage.db", flush_seconds=60)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for _ in range(FLUSH_ROWS):
            writer.add(request(time.time()))
        await async_wait_until(lambda: writer.statistics().written == FLUSH_ROWS, timeout=3)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_orderly_shutdown_writes_everything(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    writer = LedgerWriter(path, flush_seconds=60)  # no tick before the end: only the last flush writes
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for i in range(500):
            writer.add(request(T0 + i))
        writer.add(interval("h1", T0, T0 + 10, Reason.DRAIN, None, 10))
        tg.cancel_scope.cancel()
    assert sorted(os.listdir(tmp_path)) == ["usage.db"]  # closed cleanly: the WAL checkpointed away
    assert (count(path), count(path, "intervals")) == (500, 1)
    assert writer.statistics().buffered == 0 and writer.statistics().written == 501


@pytest.mark.anyio
async def test_the_last_flush_is_bounded_when_the_database_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    writer = LedgerWriter(path, flush_seconds=60, final_flush_seconds=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the deadline
        writer.add(request(T0))
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 5  # bounded by final_flush_seconds, not by the lock (held on)
    other.execute("ROLLBACK")  # the abandoned flush, still waiting for the lock, now gets it
    other.close()
    await async_wait_until(lambda: count(path) == 1, timeout=3)


CHILD = textwrap.dedent(
    """
    import sys, time, anyio
    from gpumanager.ledger.rows import RequestRow
    from gpumanager.ledger.writer import LedgerWriter

    async def main():
        writer = LedgerWriter(sys.argv[1], flush_seconds=float(sys.argv[2]))
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            i = 0
            while True:
                writer.add(RequestRow(ts=time.time(), key_id="k", route=str(i), model="m", host="h", status=200,
                    wait_ms=0, ttfb_ms=None, duration_ms=0, prompt_tokens=None, completion_tokens=None,
                    gpu_seconds=0, cost_micro=0))
                i += 1
                await anyio.sleep(0.001)

    anyio.run(main)
    """
)


def test_a_killed_process_loses_at_most_its_last_flush_interval(tmp_path: Path) -> None:
    path, flush = tmp_path / "usage.db", 0.1
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(flush)])
    try:

        def steady() -> bool:  # writing for half a second: several flushes behind it
            if not path.exists():
                return False
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                first, last = conn.execute("SELECT MIN(ts), MAX(ts) FROM requests").fetchone()
            except sqlite3.OperationalError:  # no table yet
                return False
            finally:
                conn.close()
            return first is not None and last - first > 0.5

        wait_until(steady, timeout=10)
        killed_at = time.time()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
    conn = open_database(path, retention_days=400, now=time.time())
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = conn.execute("SELECT route, ts FROM requests ORDER BY id").fetchall()
    conn.close()
    assert [int(route) for route, _ in rows] == list(range(len(rows)))  # no gaps: a prefix of what was added
    # The child added rows until it was killed, so the rows it added before the last flush interval
    # (and a whole second's margin) are all in the prefix.
    assert rows[-1][1] >= killed_at - flush - 1


@pytest.mark.anyio
async def test_an_unwritable_database_keeps_rows_retries_and_counts_what_overflows(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the ledger's folder should be")  # unwritable even for root
    path = blocker / "usage.db"
    ticks = 0

    def clock() -> float:  # counts the writer's flushes; time stands still, so warnings come once
        nonlocal ticks
        ticks += 1
        return T0

    writer = LedgerWriter(path, flush_seconds=0.01, max_buffered=50, clock=clock)
    with captured_warnings() as lines:
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)  # starts anyway: the server must not wait for its ledger
            for i in range(80):
                writer.add(request(T0 + i, route=str(i)))
            stats = writer.statistics()
            assert (stats.buffered, stats.dropped, stats.written) == (50, 30, 0)
            assert writer.dropped == 30
            seen = ticks
            await async_wait_until(lambda: ticks > seen + 20, timeout=5)  # many retries, all failed
            assert writer.statistics().written == 0
            failures = [line for line in lines if "cannot write" in line]
            drops = [line for line in lines if "dropped 30 rows" in line]
            assert len(failures) == 1 and str(path) in failures[0]
            assert len(drops) == 1
            blocker.unlink()
            blocker.mkdir()
            await async_wait_until(lambda: writer.statistics().written == 50, timeout=3)
            tg.cancel_scope.cancel()
    conn = sqlite3.connect(path)
    assert [int(r) for (r,) in conn.execute("SELECT route FROM requests ORDER BY id")] == list(range(50))
    conn.close()
    assert writer.statistics().dropped == 30


@pytest.mark.anyio
async def test_rows_still_unwritable_at_shutdown_are_reported(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    writer = LedgerWriter(tmp_path / "state" / "usage.db", flush_seconds=60)
    with captured_warnings() as lines:
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            writer.add(request(T0))
            writer.add(request(T0))
            tg.cancel_scope.cancel()
    assert any("2 rows not written to" in line and "at shutdown" in line for line in lines)


@pytest.mark.anyio
async def test_a_row_the_database_refuses_is_dropped_and_the_others_written(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "usage.db", flush_seconds=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        writer.add(request(T0, route="first"))
        writer.add(request(T0, key=None))  # type: ignore[arg-type]  # a bug elsewhere: NOT NULL refuses it
        writer.add(request(T0, route="last"))
        await async_wait_until(lambda: writer.statistics().buffered == 0, timeout=3)
        tg.cancel_scope.cancel()
    assert (writer.statistics().written, writer.statistics().dropped) == (2, 1)
    assert count(tmp_path / "usage.db") == 2


@pytest.mark.anyio
async def test_rows_past_retention_are_pruned_at_open_and_then_daily(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    now = T0 + 30 * 86_400
    write_rows(
        path, [request(now - 3 * 86_400), request(now - 0.5 * 86_400), interval("h", 0, 1, Reason.FOUND, None, 1)]
    )
    clock_now = now
    writer = LedgerWriter(path, retention_days=1, flush_seconds=0.01, clock=lambda: clock_now)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        assert (count(path), count(path, "intervals")) == (1, 0)  # at open
        writer.add(request(now - 2 * 86_400))  # already past retention: written, kept till the next day's pruning
        await async_wait_until(lambda: writer.statistics().written == 1, timeout=3)
        assert count(path) == 2
        clock_now = now + 86_400 + 1
        await async_wait_until(lambda: count(path) == 0, timeout=3)
        tg.cancel_scope.cancel()


# -- the readers -----------------------------------------------------------------------------------


def report(ledger: Path, by: str, key: str | None = None) -> Report:
    return reader.usage(ledger, T0, T0 + 48 * H, by, key, prices=FIXTURE_PRICES)  # type: ignore[arg-type]


def by_group(result: Report) -> dict[str, Totals]:
    return {g.group: g.totals for g in result.groups}


TOTAL = totals(
    requests=5, prompt_tokens=60, completion_tokens=12, without_counts=3, serving_gpu_seconds=360.0,
    serving_cost_micro=460_000, interval_gpu_seconds=5700.0, interval_cost_micro=570_000,
    interval_cost_by_reason={"drain": 60_000, "found": 60_000, "protected": 360_000, "reserve": 60_000, "wake": 30_000},
)  # fmt: skip


def test_usage_by_key_charges_intervals_to_their_key_or_unattributed(ledger: Path) -> None:
    result = report(ledger, "key")
    assert [g.group for g in result.groups] == ["b", "a", UNATTRIBUTED]  # by cost, the catch-all last
    assert by_group(result) == {
        "a": totals(
            requests=3, prompt_tokens=10, completion_tokens=5, without_counts=2, serving_gpu_seconds=150.0,
            serving_cost_micro=150_000, interval_gpu_seconds=900.0, interval_cost_micro=90_000,
            interval_cost_by_reason={"reserve": 60_000, "wake": 30_000},
        ),
        "b": totals(
            requests=2, prompt_tokens=50, completion_tokens=7, without_counts=1, serving_gpu_seconds=210.0,
            serving_cost_micro=310_000, interval_gpu_seconds=600.0, interval_cost_micro=60_000,
            interval_cost_by_reason={"drain": 60_000},
        ),
        UNATTRIBUTED: totals(
            interval_gpu_seconds=4200.0, interval_cost_micro=420_000,
            interval_cost_by_reason={"found": 60_000, "protected": 360_000},
        ),
    }  # fmt: skip
    assert result.total == TOTAL and result.total.cost_micro == 1_030_000


def test_usage_by_model_puts_billed_time_without_requests_in_one_row(ledger: Path) -> None:
    result = report(ledger, "model")
    assert [g.group for g in result.groups] == ["m1", "m2", NOT_SERVING]
    groups = by_group(result)
    assert groups["m1"] == totals(
        requests=4, prompt_tokens=60, completion_tokens=12, without_counts=2,
        serving_gpu_seconds=310.0, serving_cost_micro=410_000,
    )  # fmt: skip
    assert groups["m2"] == totals(requests=1, without_counts=1, serving_gpu_seconds=50.0, serving_cost_micro=50_000)
    assert groups[NOT_SERVING] == totals(
        interval_gpu_seconds=5700.0, interval_cost_micro=570_000, interval_cost_by_reason=TOTAL.interval_cost_by_reason
    )
    assert result.total == TOTAL


def test_usage_by_host_and_the_savings_against_always_on(ledger: Path) -> None:
    result = report(ledger, "host")
    assert [g.group for g in result.groups] == ["h2", "h1", NO_HOST]
    groups = by_group(result)
    assert groups["h1"] == totals(
        requests=3, prompt_tokens=40, completion_tokens=5, without_counts=2, serving_gpu_seconds=160.0,
        serving_cost_micro=160_000, interval_gpu_seconds=1500.0, interval_cost_micro=150_000,
        interval_cost_by_reason={"drain": 60_000, "reserve": 60_000, "wake": 30_000},
    )  # fmt: skip
    assert groups["h2"].cost_micro == 300_000 + 60_000 + 360_000 and groups["h2"].interval_gpu_seconds == 4200.0
    assert groups[NO_HOST] == totals(requests=1, without_counts=1)
    savings = {s.host: (s.price_per_hour, s.always_on_micro, s.billed_micro, s.saved_micro) for s in result.savings}
    assert savings == {
        "h1": (1.0, 48_000_000, 310_000, 47_690_000),
        "h2": (0.5, 24_000_000, 720_000, 23_280_000),
        "h3": (2.0, 96_000_000, 0, 96_000_000),  # priced, never woken
    }
    assert result.unpriced_hosts == []
    assert reader.usage(ledger, T0, T0 + 48 * H, "host", prices={"h1": 1.0}).unpriced_hosts == ["h2"]


def test_usage_by_day_cuts_intervals_at_midnight_utc(ledger: Path) -> None:
    result = report(ledger, "day")
    assert [g.group for g in result.groups] == ["2026-05-01", "2026-05-02"]
    first, second = (g.totals for g in result.groups)
    assert first == totals(
        requests=3, prompt_tokens=30, completion_tokens=12, without_counts=1, serving_gpu_seconds=350.0,
        serving_cost_micro=450_000, interval_gpu_seconds=3300.0, interval_cost_micro=330_000,
        interval_cost_by_reason={"found": 60_000, "protected": 180_000, "reserve": 60_000, "wake": 30_000},
    )  # fmt: skip
    assert second == totals(
        requests=2, prompt_tokens=30, without_counts=2, serving_gpu_seconds=10.0, serving_cost_micro=10_000,
        interval_gpu_seconds=2400.0, interval_cost_micro=240_000,
        interval_cost_by_reason={"drain": 60_000, "protected": 180_000},
    )  # fmt: skip
    assert result.total == TOTAL


def test_usage_by_hour(ledger: Path) -> None:
    result = report(ledger, "hour")
    cost = {
        g.group: (g.totals.requests, g.totals.serving_cost_micro, g.totals.interval_cost_micro) for g in result.groups
    }
    assert cost == {
        "2026-05-01 00:00": (0, 0, 90_000),  # the wake, and the found interval from the period's start
        "2026-05-01 01:00": (2, 150_000, 60_000),
        "2026-05-01 02:00": (1, 300_000, 0),
        "2026-05-01 23:00": (0, 0, 180_000),
        "2026-05-02 00:00": (0, 0, 180_000),
        "2026-05-02 01:00": (1, 10_000, 60_000),
        "2026-05-02 02:00": (1, 0, 0),
    }
    assert result.total == TOTAL


def test_usage_of_one_key_has_only_its_rows_and_no_savings(ledger: Path) -> None:
    result = report(ledger, "model", key="a")
    assert by_group(result) == {
        "m1": totals(requests=2, prompt_tokens=10, completion_tokens=5, without_counts=1,
                     serving_gpu_seconds=100.0, serving_cost_micro=100_000),
        "m2": totals(requests=1, without_counts=1, serving_gpu_seconds=50.0, serving_cost_micro=50_000),
        NOT_SERVING: totals(interval_gpu_seconds=900.0, interval_cost_micro=90_000,
                            interval_cost_by_reason={"reserve": 60_000, "wake": 30_000}),
    }  # fmt: skip
    assert result.total.cost_micro == 240_000 and result.savings == [] and result.unpriced_hosts == []


def test_me_shows_only_that_key_today_this_month_and_since(ledger: Path) -> None:
    now = T0 + 26 * H + 60  # 2026-05-02 02:01 UTC
    mine = reader.me(ledger, "a", now, since=T0 - 2 * H)
    assert mine.today.since == T0 + 24 * H and mine.month.since == T0
    assert (mine.today.totals.requests, mine.today.totals.cost_micro) == (1, 0)
    assert (mine.month.totals.requests, mine.month.totals.cost_micro) == (3, 240_000)
    assert mine.month.totals.interval_cost_by_reason == {"reserve": 60_000, "wake": 30_000}
    assert mine.since is not None and (mine.since.totals.requests, mine.since.totals.cost_micro) == (4, 1_240_000)
    theirs = reader.me(ledger, "b", now)
    assert (theirs.month.totals.requests, theirs.month.totals.cost_micro, theirs.since) == (2, 370_000, None)
    # Amsterdam is UTC+2 in May: its 1 May began at 22:00 UTC on 30 April, before the request at 23:00.
    local = reader.me(ledger, "a", now, tz="Europe/Amsterdam")
    assert local.month.since == T0 - 2 * H and local.today.since == T0 + 22 * H
    assert (local.month.totals.requests, local.month.totals.cost_micro) == (4, 1_240_000)
    with pytest.raises(LedgerError, match="unknown time zone"):
        reader.me(ledger, "a", now, tz="Mars/Olympus")


def test_readers_need_a_ledger_and_leave_it_unchanged(tmp_path: Path, ledger: Path) -> None:
    with pytest.raises(LedgerError, match=r"no usage recorded yet at .*: the server writes it"):
        reader.usage(tmp_path / "nothing.db", T0, T0 + H, "key")
    (tmp_path / "empty.db").touch()
    with pytest.raises(LedgerError, match="no usage recorded yet"):
        reader.usage(tmp_path / "empty.db", T0, T0 + H, "key")
    before = ledger.read_bytes()
    report(ledger, "key")
    assert ledger.read_bytes() == before


def test_a_reader_works_beside_a_writer(ledger: Path) -> None:
    writer_conn = open_database(ledger, retention_days=10_000, now=T0)
    writer_conn.execute("BEGIN IMMEDIATE")  # the writer mid-transaction: readers see the last commit
    writer_conn.execute("DELETE FROM requests")
    assert report(ledger, "key").total == TOTAL
    writer_conn.execute("ROLLBACK")
    writer_conn.close()

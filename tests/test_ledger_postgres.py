"""The ledger in a real PostgreSQL (`[usage] database_url = "postgresql://..."`): the same rows give
the same answers as in SQLite, and the server writes and reads it end to end."""

from __future__ import annotations

import concurrent.futures
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import msgspec
import openai
import psycopg
import pytest

from gpumanager.ledger import reader
from gpumanager.ledger.postgres import translate
from gpumanager.ledger.rows import IntervalRow, JobRow, Reason, RequestRow
from gpumanager.ledger.schema import SCHEMA_VERSION, open_database, version
from gpumanager.ledger.writer import LedgerWriter
from tests.harness import SimHost, running_stack
from tests.postgres import Postgres, running_postgres

T0 = 1_780_000_000.0  # a Unix time; the rows below fall in the 24 h after it
_names = (f"ledger_{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def database(postgres: Postgres) -> str:
    return postgres.new_database(next(_names))


def rows() -> list[RequestRow | IntervalRow | JobRow]:
    """A day of a small fleet: requests with and without counts, intervals (one recorded twice as
    it grew), a refused request, jobs (one recorded as it ran, then ended)."""
    found: list[RequestRow | IntervalRow | JobRow] = []
    for i in range(60):
        ts = T0 + 600 * i + 17.5
        counted = i % 7 != 0
        found.append(
            RequestRow(
                ts=ts,
                key_id=("k1", "k2", "k3")[i % 3],
                route="/v1/chat/completions" if i % 2 else "/api/chat",
                model=("llama3.2:latest", "qwen2.5:7b")[i % 2],
                host=("gpu-a", "gpu-b", "")[i % 3] if i % 11 else "",
                status=200 if i % 13 else 503,
                wait_ms=120.0 * (i % 4),
                ttfb_ms=None if i % 5 == 0 else 80.0,
                duration_ms=1500.0 + 10 * i,
                prompt_tokens=10 + i if counted else None,
                completion_tokens=40 + i if counted else None,
                gpu_seconds=1.25 + i / 10,
                cost_micro=1000 + 37 * i,
            )
        )
    for i in range(12):
        start = T0 + 7200 * i + 30
        for end in (start + 50, start + 3700.5):  # recorded twice while open: the second replaces the first
            found.append(
                IntervalRow(
                    host=("gpu-a", "gpu-b")[i % 2],
                    start=start,
                    end=end,
                    reason=(Reason.WAKE, Reason.RESERVE, Reason.FOUND, Reason.DRAIN)[i % 4],
                    key_id=None if i % 4 == 2 else ("k1", "k2")[i % 2],
                    cost_micro=round((end - start) * 333),
                    gpu_seconds=end - start,
                )
            )
    running = JobRow(
        id="job-1-e1", ts=T0 + 100, key_id="k1", host="gpu-jobs", endpoint="ep1", route="run", status="IN_PROGRESS"
    )
    found += [
        running,
        msgspec.structs.replace(running, status="COMPLETED", ended=T0 + 400, delay_ms=900, execution_ms=290_000),
        JobRow(
            id="job-2-e1", ts=T0 + 200, key_id="k2", host="gpu-jobs", endpoint="ep1", route="run", status="IN_QUEUE"
        ),
    ]
    return found


async def write(location: str | Path, batch: list[Any]) -> None:
    writer = LedgerWriter(location, retention_days=100_000, flush_seconds=0.05, clock=lambda: T0 + 86_400)
    for row in batch:
        writer.add(row)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        with anyio.fail_after(10):
            while writer.statistics().buffered:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert writer.statistics().written == len(batch) and writer.statistics().dropped == 0


def same(ours: Any, theirs: Any) -> None:
    """Equal answers, but for the last bits of float sums (the two databases add in their own order)."""
    assert _same(msgspec.to_builtins(ours), msgspec.to_builtins(theirs))


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), (left, right)
        return all(_same(left[k], right[k]) for k in left)
    if isinstance(left, (list, tuple)):
        assert isinstance(right, (list, tuple)) and len(left) == len(right), (left, right)
        return all(_same(a, b) for a, b in zip(left, right, strict=True))
    assert left == pytest.approx(right, rel=1e-9) if isinstance(left, float) else left == right, (left, right)
    return True


def test_the_same_rows_give_the_same_answers_in_both_backends(database: str, tmp_path: Path) -> None:
    sqlite = tmp_path / "usage.db"
    batch = rows()
    anyio.run(write, sqlite, batch)
    anyio.run(write, database, batch)
    since, until = T0, T0 + 86_400
    prices = {"gpu-a": 1.2, "gpu-b": 2.5}
    for by in ("key", "model", "host", "day", "hour"):
        same(
            reader.usage(database, since, until, by, prices=prices),
            reader.usage(sqlite, since, until, by, prices=prices),
        )
        same(reader.usage(database, since, until, by, "k2"), reader.usage(sqlite, since, until, by, "k2"))
    for both in (
        lambda where: reader.hosts(where, since, until),
        lambda where: reader.recent_timings(where),
        lambda where: reader.served(where, since, until),
        lambda where: reader.requests_per_minute(where, since, until),
        lambda where: reader.awake_periods(where, since, until),
        lambda where: reader.jobs_since(where, since),
        lambda where: reader.me(where, "k1", until - 1),
    ):
        same(both(database), both(sqlite))
    assert reader.models_by_host(database, since, until) == reader.models_by_host(sqlite, since, until)  # sets
    report = reader.usage(database, since, until, "key")
    assert report.total.requests == 60 and report.total.without_counts > 0  # the rows are all there
    assert [j.status for j in reader.jobs_since(database, since)] == ["COMPLETED", "IN_QUEUE"]  # upserted
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM intervals").fetchone() == (12,)  # one row per interval
        kinds = dict(
            conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'requests'")
        )
    assert kinds["ts"] == "double precision" and kinds["cost_micro"] == "bigint"  # no float4, no int4 overflow


def test_migrations_and_pruning(database: str) -> None:
    conn = open_database(database, retention_days=100_000, now=T0)
    try:
        assert version(conn) == SCHEMA_VERSION
    finally:
        conn.close()
    anyio.run(write, database, rows())
    conn = open_database(database, retention_days=0.8, now=T0 + 86_400)  # keeps the rows since T0 + 17,280 s
    try:
        left, count = conn.execute("SELECT min(ts), count(*) FROM requests").fetchone()
        assert left >= T0 + 17_280 and 0 < count < 60
        assert conn.execute("SELECT count(*) FROM jobs WHERE ended IS NULL").fetchone()[0] == 1  # running: kept
    finally:
        conn.close()


def test_replicas_starting_together_migrate_once(database: str) -> None:
    """Several processes opening a new database at once: one migrates, the others wait and find it done."""

    def start() -> int:
        conn = open_database(database, retention_days=400, now=T0)
        try:
            return version(conn)
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: start(), range(4))) == [SCHEMA_VERSION] * 4
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM gm_schema").fetchone() == (1,)


def test_sql_in_postgresqls_words() -> None:
    assert translate("SELECT max(0, a - b), max(c) FROM t WHERE x = ? AND r LIKE '/v2/%'") == (
        "SELECT GREATEST(0, a - b), max(c) FROM t WHERE x = %s AND r LIKE '/v2/%%'"
    )
    assert translate("SELECT TOTAL(x), CAST((ts - ?) / 60 AS INTEGER)") == (
        "SELECT CAST(COALESCE(SUM(x), 0) AS DOUBLE PRECISION), CAST(FLOOR((ts - %s) / 60) AS BIGINT)"
    )
    assert translate("strftime('%Y-%m-%d %H:00', ts, 'unixepoch')") == (
        "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00')"
    )
    assert translate('SELECT host, min("end", ?), max(min(a, b), c)') == (
        'SELECT host, LEAST("end", %s), GREATEST(LEAST(a, b), c)'
    )


def test_the_server_keeps_its_ledger_in_postgresql(database: str, tmp_path: Path) -> None:
    extra = f"""
[timing]
queue_timeout_seconds = 5
shutdown_grace_seconds = 1

[usage]
database_url = "{database}"
"""
    with running_stack(tmp_path, [SimHost("gpu-a", token_delay=0.001)], extra=extra) as stack:
        with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client:
            for _ in range(3):
                client.chat.completions.create(
                    model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=5
                )
        user = stack.keys.authenticate(stack.user_key)
        assert user is not None
        deadline = time.monotonic() + 10
        while True:
            with psycopg.connect(database) as conn:
                found = conn.execute(
                    "SELECT count(*), sum(completion_tokens) FROM requests WHERE key_id = %s AND status = 200",
                    (user.id,),
                ).fetchone()
            if found == (3, 15) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert found == (3, 15)  # the ledger matches the requests made
        mine = httpx.get(f"{stack.url}/usage/me", headers=stack.headers(), timeout=10).json()
        assert mine["today"]["totals"]["requests"] == 3
        config = stack.config_path
    # `gpumanager usage` reads the same database.
    shown = subprocess.run(
        [sys.executable, "-m", "gpumanager", "usage", "--config", str(config), "--format", "json", "--since", "1h"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    report = msgspec.json.decode(shown.stdout)
    assert report["total"]["requests"] == 3 and report["total"]["completion_tokens"] == 15


def test_an_unreachable_database_keeps_rows_waiting(tmp_path: Path) -> None:
    """Nothing listens there: the rows wait in the bounded buffer, the writer says so and retries."""
    url = "postgresql://gm:secret@127.0.0.1:9/nowhere"

    async def main() -> None:
        writer = LedgerWriter(url, flush_seconds=0.05)
        writer.add(rows()[0])
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            await anyio.lowlevel.checkpoint()  # one failed flush has run at start
            assert writer.statistics().buffered == 1 and writer.statistics().written == 0
            tg.cancel_scope.cancel()

    anyio.run(main)
    with pytest.raises(reader.LedgerError) as caught:
        reader.usage(url, T0, T0 + 1, "key")
    assert "secret" not in str(caught.value) and "***" in str(caught.value)

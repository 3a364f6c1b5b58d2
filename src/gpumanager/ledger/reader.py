"""Reading the ledger: a period's usage by key, model, host, day or hour, and one key's own use.

Readers open the file read-only, never migrate it and work while the server is down (or running:
WAL lets them read beside the writer). A request counts wholly in the period, day or hour in which
it finished; an interval counts pro rata for the part of it inside the period (and, by day or hour,
inside each day or hour), so the sums of a period are what the hosts were billed in it. Days and
hours are UTC. Money is integer micro-dollars, rounded once per sum.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from gpumanager.ledger.postgres import database_errors, is_url
from gpumanager.ledger.rows import MICRO
from gpumanager.ledger.rows import JobRow as JobRecord
from gpumanager.ledger.schema import SCHEMA_VERSION, Connection, LedgerError, Location, connect_postgres, shown, version
from gpumanager.models import model_names

By = Literal["key", "model", "host", "day", "hour"]
BY: tuple[str, ...] = get_args(By)
UNATTRIBUTED = "unattributed"  # the owner of intervals no key pays for (`key_id` NULL)
NOT_SERVING = "(not serving)"  # by model: billed time of hosts serving no request
NO_HOST = "(no host)"  # by host: requests refused before any host took them
# RunPod jobs' rows (route /v2/...) are no model's service times and no replay's requests.
NOT_JOBS = "route NOT LIKE '/v2/%'"

_DAY_FORMAT = "%Y-%m-%d"
_HOUR_FORMAT = "%Y-%m-%d %H:00"
_SQL_GROUP = {
    "key": "key_id",
    "model": "model",
    "host": "host",
    "day": f"strftime('{_DAY_FORMAT}', ts, 'unixepoch')",
    "hour": f"strftime('{_HOUR_FORMAT}', ts, 'unixepoch')",
}


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Sums over some requests and intervals. Token sums are of the requests whose host sent
    counts; `without_counts` requests lack one or both (unknown, never guessed)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    without_counts: int = 0
    serving_gpu_seconds: float = 0.0
    serving_cost_micro: int = 0
    interval_gpu_seconds: float = 0.0  # billed time serving no request (waking, reserved, ...)
    interval_cost_micro: int = 0
    interval_cost_by_reason: dict[str, int] = {}
    gpu_seconds: float = 0.0  # serving + intervals
    cost_micro: int = 0


class Group(msgspec.Struct, frozen=True, kw_only=True):
    group: str  # a key id (or "unattributed"), a model, a host, a day "2026-05-01", an hour "2026-05-01 13:00"
    name: str = ""  # by key: the key's name, when the caller knows it
    totals: Totals


class HostSavings(msgspec.Struct, frozen=True, kw_only=True):
    """A host's price for running the whole period, against what it was billed in it."""

    host: str
    price_per_hour: float  # dollars
    always_on_micro: int
    billed_micro: int
    saved_micro: int
    # What the host's answered requests of the period would have cost under a policy that knows
    # the future (`oracle_seconds`), at its measured cold start; None before any wake was recorded.
    oracle_micro: int | None = None


class Report(msgspec.Struct, frozen=True, kw_only=True):
    since: float
    until: float
    by: str
    key: str | None  # only this key's rows (and no savings: they are the fleet's)
    groups: list[Group]
    total: Totals
    savings: list[HostSavings]
    unpriced_hosts: list[str]  # hosts in the period without a price: no savings line

    def with_names(self, names: Mapping[str, str]) -> Report:
        """The report with each key's name beside its id (by key)."""
        groups = [msgspec.structs.replace(g, name=names.get(g.group, g.name)) for g in self.groups]
        return msgspec.structs.replace(self, groups=groups)


class Window(msgspec.Struct, frozen=True, kw_only=True):
    since: float
    until: float
    totals: Totals


class MyUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One key's own use: today and this month in its time zone, and since a given time."""

    key_id: str
    timezone: str
    today: Window
    month: Window
    since: Window | None


class _Sum:
    """A mutable `Totals` while rows are added up; money stays fractional until `freeze()`."""

    __slots__ = (
        "completion",
        "cost",
        "gpu",
        "interval_cost",
        "interval_gpu",
        "prompt",
        "reasons",
        "requests",
        "unknown",
    )

    def __init__(self) -> None:
        self.requests = self.prompt = self.completion = self.unknown = 0
        self.gpu = self.cost = self.interval_gpu = self.interval_cost = 0.0
        self.reasons: dict[str, float] = {}

    def add_requests(self, count: int, prompt: int, completion: int, unknown: int, gpu: float, cost: float) -> None:
        self.requests += count
        self.prompt += prompt
        self.completion += completion
        self.unknown += unknown
        self.gpu += gpu
        self.cost += cost

    def add_interval(self, reason: str, gpu: float, cost: float) -> None:
        self.interval_gpu += gpu
        self.interval_cost += cost
        self.reasons[reason] = self.reasons.get(reason, 0.0) + cost

    def merge(self, other: _Sum) -> None:
        self.add_requests(other.requests, other.prompt, other.completion, other.unknown, other.gpu, other.cost)
        for reason, cost in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0.0) + cost
        self.interval_gpu += other.interval_gpu
        self.interval_cost += other.interval_cost

    def freeze(self) -> Totals:
        return Totals(
            requests=self.requests,
            prompt_tokens=self.prompt,
            completion_tokens=self.completion,
            without_counts=self.unknown,
            serving_gpu_seconds=self.gpu,
            serving_cost_micro=round(self.cost),
            interval_gpu_seconds=self.interval_gpu,
            interval_cost_micro=round(self.interval_cost),
            interval_cost_by_reason={reason: round(cost) for reason, cost in sorted(self.reasons.items())},
            gpu_seconds=self.gpu + self.interval_gpu,
            cost_micro=round(self.cost + self.interval_cost),
        )


def connect(db_path: Location) -> Connection:
    """The ledger opened read-only. Raises `LedgerError` when there is none yet, or it is not one
    this gpumanager can read."""
    where = shown(db_path)
    try:
        if isinstance(db_path, str) and is_url(db_path):
            conn: Connection = connect_postgres(db_path, read_only=True)
        else:
            path = Path(db_path)
            if not path.is_file():
                raise LedgerError(f"no usage recorded yet at {path}: the server writes it")
            conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        found = version(conn)
    except database_errors() as exc:
        raise LedgerError(f"{where}: cannot read the usage ledger: {exc}") from None
    if found == 0:
        conn.close()
        raise LedgerError(f"no usage recorded yet at {where}: the server writes it")
    if found > SCHEMA_VERSION:
        conn.close()
        raise LedgerError(f"{where}: written by a newer gpumanager (schema {found}, this one reads {SCHEMA_VERSION})")
    return conn


def usage(
    db_path: Location,
    since: float,
    until: float,
    by: By,
    key: str | None = None,
    *,
    prices: Mapping[str, float] | None = None,
) -> Report:
    """The period [since, until) by `by`, with totals, and (for the whole fleet, not one `key`)
    savings against always-on for each host with a price in `prices` (dollars per hour)."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
    conn = connect(db_path)
    try:
        sums = _request_sums(conn, since, until, by, key)
        by_host = _request_sums(conn, since, until, "host", key)
        billed = {host: s.cost for host, s in by_host.items() if host != NO_HOST}
        for interval in _intervals(conn, since, until, key):
            billed[interval.host] = billed.get(interval.host, 0.0) + interval.cost
            for label, part in _split(interval, by):
                sums.setdefault(label, _Sum()).add_interval(interval.reason, part.gpu, part.cost)
    except database_errors() as exc:
        raise LedgerError(f"{shown(db_path)}: cannot read the usage ledger: {exc}") from None
    finally:
        conn.close()
    total = _Sum()
    for s in sums.values():
        total.merge(s)
    groups = [Group(group=label, totals=s.freeze()) for label, s in sums.items()]
    prices = prices or {}
    return Report(
        since=since,
        until=until,
        by=by,
        key=key,
        groups=_ordered(groups, by),
        total=total.freeze(),
        savings=[]
        if key is not None
        else _savings(prices, billed, until - since, _oracles(db_path, since, until, prices)),
        unpriced_hosts=[] if key is not None else sorted(h for h in billed if prices.get(h, 0.0) <= 0),
    )


def hosts(db_path: Location, since: float, until: float) -> list[str]:
    """The hosts that served a request or were billed in [since, until)."""
    conn = connect(db_path)
    try:
        found = conn.execute(
            """SELECT host FROM requests WHERE ts >= ? AND ts < ? AND host != ''
            UNION SELECT host FROM intervals WHERE "end" > ? AND "start" < ? ORDER BY 1""",
            (since, until, since, until),
        ).fetchall()
    except database_errors() as exc:
        raise LedgerError(f"{shown(db_path)}: cannot read the usage ledger: {exc}") from None
    finally:
        conn.close()
    return [str(host) for (host,) in found]


def me(db_path: Location, key_id: str, now: float, tz: str = "UTC", since: float | None = None) -> MyUsage:
    """`key_id`'s own requests, tokens, GPU-seconds and dollars: today and this month (midnight and
    the first of the month in `tz`, an IANA name), and since `since` when given, all up to `now`."""
    zone = _zone(tz)
    local = datetime.fromtimestamp(now, zone)
    day_start = local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    month_start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()

    def window(start: float) -> Window:
        return Window(since=start, until=now, totals=usage(db_path, start, now, "key", key_id).total)

    return MyUsage(
        key_id=key_id,
        timezone=tz,
        today=window(day_start),
        month=window(month_start),
        since=window(since) if since is not None else None,
    )


def _zone(tz: str) -> tzinfo:
    if tz.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise LedgerError(f"unknown time zone {tz!r} (an IANA name such as Europe/Amsterdam)") from None


def _request_sums(conn: Connection, since: float, until: float, by: str, key: str | None) -> dict[str, _Sum]:
    params: list[float | str] = [since, until]
    where = "ts >= ? AND ts < ?"
    if key is not None:
        where += " AND key_id = ?"
        params.append(key)
    query = f"""SELECT {_SQL_GROUP[by]}, COUNT(*), TOTAL(prompt_tokens), TOTAL(completion_tokens),
        SUM(CASE WHEN prompt_tokens IS NULL OR completion_tokens IS NULL THEN 1 ELSE 0 END), TOTAL(gpu_seconds),
        TOTAL(cost_micro)
        FROM requests WHERE {where} GROUP BY 1"""
    sums: dict[str, _Sum] = {}
    for label, count, prompt, completion, unknown, gpu, cost in conn.execute(query, params):
        s = sums.setdefault(NO_HOST if by == "host" and not label else str(label), _Sum())
        s.add_requests(count, int(prompt), int(completion), int(unknown), gpu, cost)
    return sums


class _Interval(msgspec.Struct, frozen=True):
    """An interval clipped to the period: its owner's label, and its GPU-seconds and cost inside."""

    host: str
    start: float
    end: float
    reason: str
    owner: str
    gpu: float
    cost: float


def _intervals(conn: Connection, since: float, until: float, key: str | None) -> Iterator[_Interval]:
    params: list[float | str] = [since, until]
    where = '"end" > ? AND "start" < ?'
    if key is not None:
        where += " AND key_id = ?"
        params.append(key)
    query = f'SELECT host, "start", "end", reason, key_id, gpu_seconds, cost_micro FROM intervals WHERE {where}'
    for host, start, end, reason, key_id, gpu, cost in conn.execute(query, params):
        owner = key_id if key_id is not None else UNATTRIBUTED
        if end <= start:
            yield _Interval(host, start, end, reason, owner, gpu, cost)
            continue
        clipped_start, clipped_end = max(start, since), min(end, until)
        share = (clipped_end - clipped_start) / (end - start)
        yield _Interval(host, clipped_start, clipped_end, reason, owner, gpu * share, cost * share)


def _split(interval: _Interval, by: str) -> Iterator[tuple[str, _Interval]]:
    """`interval` under the labels of `by`: by day or hour, cut at each boundary, pro rata."""
    if by == "key":
        yield interval.owner, interval
    elif by == "model":
        yield NOT_SERVING, interval
    elif by == "host":
        yield interval.host, interval
    else:
        step, fmt = (86_400, _DAY_FORMAT) if by == "day" else (3_600, _HOUR_FORMAT)
        length = interval.end - interval.start
        start = interval.start
        while True:
            end = min(interval.end, (start // step + 1) * step)
            share = (end - start) / length if length > 0 else 1.0
            part = msgspec.structs.replace(
                interval, start=start, end=end, gpu=interval.gpu * share, cost=interval.cost * share
            )
            yield datetime.fromtimestamp(start, UTC).strftime(fmt), part
            if end >= interval.end:
                return
            start = end


def _ordered(groups: list[Group], by: str) -> list[Group]:
    """Days and hours in order; keys, models and hosts by cost, most first, the catch-all rows last."""
    if by in ("day", "hour"):
        return sorted(groups, key=lambda g: g.group)
    last = {UNATTRIBUTED, NOT_SERVING, NO_HOST}
    return sorted(groups, key=lambda g: (g.group in last, -g.totals.cost_micro, g.group))


def _savings(
    prices: Mapping[str, float], billed: Mapping[str, float], seconds: float, oracles: Mapping[str, float]
) -> list[HostSavings]:
    rows = []
    for host, price in sorted(prices.items()):
        if price <= 0:
            continue
        always_on = round(price * MICRO * seconds / 3600)
        cost = round(billed.get(host, 0.0))
        oracle = oracles.get(host)
        rows.append(
            HostSavings(
                host=host,
                price_per_hour=price,
                always_on_micro=always_on,
                billed_micro=cost,
                saved_micro=always_on - cost,
                oracle_micro=None if oracle is None else round(price * MICRO * oracle / 3600),
            )
        )
    return rows


def _oracles(db_path: Location, since: float, until: float, prices: Mapping[str, float]) -> dict[str, float]:
    """Each priced host's oracle seconds for its answered requests of the period (see `oracle_seconds`),
    where a wake of it was recorded to price a cold start."""
    _, wakes = recent_timings(db_path)
    cold: dict[str, list[float]] = {}
    for host, seconds in wakes:
        cold.setdefault(host, []).append(seconds)
    found = {}
    conn = connect(db_path)
    try:
        for host in sorted(h for h, price in prices.items() if price > 0 and h in cold):
            busy = conn.execute(
                "SELECT ts - max(0, duration_ms - wait_ms) / 1000.0, ts FROM requests "
                "WHERE host = ? AND ts >= ? AND ts < ? AND status = 200 ORDER BY 1",
                (host, since, until),
            ).fetchall()
            found[host] = oracle_seconds([(float(a), float(b)) for a, b in busy], statistics.median(cold[host]))
    except database_errors() as exc:
        raise LedgerError(f"{shown(db_path)}: cannot read the usage ledger: {exc}") from None
    finally:
        conn.close()
    return found


def oracle_seconds(busy: Sequence[tuple[float, float]], cold_start: float) -> float:
    """The billed seconds of a host whose policy knows the future: its busy time, each idle gap
    min(gap, cold start) (paused when that pays, woken just in time), and one cold start before its
    first use. No policy serving the same requests at the same times on it bills less."""
    if not busy:
        return 0.0
    total, run_start, run_end = cold_start, None, None
    for start, end in sorted(busy):
        if run_end is None or run_start is None:
            run_start, run_end = start, end
        elif start <= run_end:
            run_end = max(run_end, end)
        else:
            total += (run_end - run_start) + min(start - run_end, cold_start)
            run_start, run_end = start, end
    assert run_start is not None and run_end is not None
    return total + (run_end - run_start)


def recent_timings(
    db_path: Location, *, per_model: int = 50, per_host: int = 20
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The newest service times by model (a successful request's duration less its wait) and wake
    times by host (its `wake` intervals: resume asked to ready), oldest first, at most `per_model`
    and `per_host` of each: what the scheduler's cost-aware scale-up starts from."""
    conn = connect(db_path)
    try:
        services = conn.execute(
            "SELECT model, max(0, duration_ms - wait_ms) / 1000.0 FROM requests "
            "WHERE status = 200 AND host != '' AND route NOT IN ('/api/pull', '/api/push', '/api/create', "
            f"'/api/copy', '/api/delete', '/api/show') AND {NOT_JOBS} ORDER BY ts DESC LIMIT 20000"
        ).fetchall()
        wakes = conn.execute(
            "SELECT host, gpu_seconds FROM intervals WHERE reason = 'wake' ORDER BY \"start\" DESC LIMIT 5000"
        ).fetchall()
    except database_errors() as exc:
        raise LedgerError(f"{shown(db_path)}: cannot read the usage ledger: {exc}") from None
    finally:
        conn.close()
    return _newest(services, per_model), _newest(wakes, per_host)


def _newest(rows: list[tuple[str, float]], keep: int) -> list[tuple[str, float]]:
    """Of rows newest first, the `keep` newest of each name, oldest first."""
    counts: dict[str, int] = {}
    kept = []
    for name, seconds in rows:
        if counts.get(name, 0) < keep:
            counts[name] = counts.get(name, 0) + 1
            kept.append((str(name), float(seconds)))
    return kept[::-1]


def served(db_path: Location, since: float, until: float) -> list[tuple[float, str, float, str]]:
    """The answered requests that arrived in [since, until) and finished by `until`: (arrival,
    model, seconds holding a slot, key id), by arrival. Arrival is the finish less the whole
    duration; the slot was held for the duration less the wait."""
    rows = _rows(
        db_path,
        "SELECT ts - duration_ms / 1000.0, model, max(0, duration_ms - wait_ms) / 1000.0, key_id FROM requests "
        "WHERE ts >= ? AND ts < ? AND ts - duration_ms / 1000.0 >= ? AND status = 200 AND host != '' "
        f"AND {NOT_JOBS} ORDER BY 1",
        (since, until, since),
    )
    return [(float(a), str(m), float(d), str(k)) for a, m, d, k in rows]


def models_by_host(db_path: Location, since: float, until: float) -> dict[str, set[str]]:
    """The models each host answered in [since, until)."""
    rows = _rows(
        db_path,
        "SELECT DISTINCT host, model FROM requests WHERE ts >= ? AND ts < ? AND status = 200 AND host != '' "
        f"AND {NOT_JOBS}",
        (since, until),
    )
    found: dict[str, set[str]] = {}
    for host, model in rows:
        found.setdefault(str(host), set()).update(model_names(str(model)))
    return found


def requests_per_minute(db_path: Location, since: float, until: float) -> list[tuple[float, int]]:
    """Requests finished in each minute of [since, until) that had any: (the minute's start, count)."""
    rows = _rows(
        db_path,
        "SELECT CAST((ts - ?) / 60 AS INTEGER), count(*) FROM requests WHERE ts >= ? AND ts < ? GROUP BY 1 ORDER BY 1",
        (since, since, until),
    )
    return [(since + int(minute) * 60, int(count)) for minute, count in rows]


def awake_periods(
    db_path: Location, since: float, until: float, *, join: float = 60.0
) -> dict[str, list[tuple[float, float]]]:
    """When each host was billed in [since, until): its intervals and its requests' serving times,
    merged where less than `join` seconds apart."""
    spans = _rows(
        db_path,
        'SELECT host, max("start", ?), min("end", ?) FROM intervals WHERE "end" > ? AND "start" < ? '
        "UNION ALL SELECT host, max(ts - (duration_ms - wait_ms) / 1000.0, ?), min(ts, ?) FROM requests "
        "WHERE host != '' AND ts > ? AND ts - duration_ms / 1000.0 < ? ORDER BY 1, 2",
        (since, until, since, until) * 2,
    )
    periods: dict[str, list[tuple[float, float]]] = {}
    for host, start, end in spans:
        merged = periods.setdefault(str(host), [])
        if merged and start - merged[-1][1] < join:
            merged[-1] = (merged[-1][0], max(merged[-1][1], float(end)))
        else:
            merged.append((float(start), float(end)))
    return periods


def jobs_since(db_path: Location, since: float) -> list[JobRecord]:
    """The RunPod jobs submitted or ended since `since`, and those never seen to end, oldest first:
    whose each is, and which to watch again."""
    fields = JobRecord.__struct_fields__
    columns = ", ".join(fields)
    rows = _rows(
        db_path, f"SELECT {columns} FROM jobs WHERE ts >= ? OR ended IS NULL OR ended >= ? ORDER BY ts", (since, since)
    )
    return [JobRecord(**dict(zip(fields, row, strict=True))) for row in rows]


def _rows(db_path: Location, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
    """Every row of one query of the ledger, read-only."""
    conn = connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    except database_errors() as exc:
        raise LedgerError(f"{shown(db_path)}: cannot read the usage ledger: {exc}") from None
    finally:
        conn.close()

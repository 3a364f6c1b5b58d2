"""The budget's calendar and counters without a server: days that are not 24 hours long, counters
that start again at midnight, seeding from the ledger, and the warning before the fleet's cap."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest
from loguru import logger

from gpumanager.budget import Budget, Calendar
from gpumanager.config import loads
from gpumanager.errors import BudgetSpent
from gpumanager.fleet import Fleet
from gpumanager.keys import Identity, Limits
from gpumanager.ledger.schema import open_database
from gpumanager.pace import Pace
from gpumanager.recorder import RequestRecord

AMSTERDAM = ZoneInfo("Europe/Amsterdam")


def at(*args: int, zone: ZoneInfo = AMSTERDAM) -> float:
    return datetime(*args, tzinfo=zone).timestamp()  # type: ignore[misc]


def test_days_and_months_follow_the_time_zone_across_daylight_saving() -> None:
    calendar = Calendar(AMSTERDAM)
    day = calendar.day(at(2026, 3, 29, 12))  # clocks go forward: a day of 23 hours
    assert (day.start, day.end) == (at(2026, 3, 29), at(2026, 3, 30)) and day.end - day.start == 23 * 3600
    assert calendar.day(at(2026, 10, 25, 1)).end - calendar.day(at(2026, 10, 25, 1)).start == 25 * 3600
    month = calendar.month(at(2026, 12, 31, 23, 30))
    assert (month.start, month.end) == (at(2026, 12, 1), at(2027, 1, 1))
    assert calendar.at(at(2027, 1, 1)) == "00:00 CET" and calendar.at(at(2026, 7, 1), with_date=True).endswith("CEST")


def record(key: str, tokens: int, cost_micro: int = 0) -> RequestRecord:
    return RequestRecord(
        route="/api/chat", model="llama3.2", status=200, key=key, host="gpu", wait_seconds=0.0,
        first_byte_seconds=0.1, duration_seconds=1.0, overhead_seconds=None, prompt_tokens=tokens,
        completion_tokens=0, gpu_seconds=1.0, cost_micro=cost_micro,
    )  # fmt: skip


def test_a_spent_budget_opens_again_when_its_day_ends() -> None:
    now = [at(2026, 5, 4, 23, 0, zone=UTC)]
    config = loads('[budget]\ntimezone = "UTC"\n')
    budget = Budget(config, Fleet(config), wall=lambda: now[0])
    who = Identity("k1", "Ada", False, Limits(tokens_per_day=100, dollars_per_month=2.0))
    budget.request(record("k1", 60, cost_micro=1_500_000))
    budget.admit(who, "llama3.2")
    budget.request(record("k1", 60, cost_micro=600_000))
    used_up = re.escape("daily budget of 100 tokens is used up (120 used); it resets at 00:00 UTC")
    with pytest.raises(BudgetSpent, match=used_up):
        budget.admit(who, "llama3.2")
    now[0] = at(2026, 5, 5, 0, 0, 1, zone=UTC)  # a new day: tokens again, but not a new month
    spent = re.escape("monthly GPU budget of $2.00 is spent ($2.10); it resets at 2026-06-01")
    with pytest.raises(BudgetSpent, match=spent):
        budget.admit(who, "llama3.2")
    now[0] = at(2026, 6, 1, 0, 0, 1, zone=UTC)
    assert budget.admit(who, "llama3.2").no_wake == ""


def test_counters_start_from_the_ledger_and_the_fleet_warns_before_its_cap(tmp_path: Path) -> None:
    now = at(2026, 5, 4, 15, 0, zone=UTC)
    database = tmp_path / "usage.db"
    conn = open_database(database, retention_days=400, now=now)
    rows = [  # today: k1 30 tokens and $8.50 on the cloud host; yesterday: $100; a static host's showback
        (now - 3600, "k1", "gpu", 20, 10, 8_500_000),
        (now - 86_400, "k1", "gpu", 5, 5, 100_000_000),
        (now - 60, "k2", "box", 1, 1, 9_000_000),
    ]
    for ts, key, host, prompt, completion, cost in rows:
        conn.execute(
            "INSERT INTO requests (ts, key_id, route, model, host, status, wait_ms, duration_ms, prompt_tokens, "
            "completion_tokens, gpu_seconds, cost_micro) VALUES (?, ?, '/api/chat', 'm', ?, 200, 0, 1, ?, ?, 1, ?)",
            (ts, key, host, prompt, completion, cost),
        )
    conn.close()
    config = loads('[budget]\ndaily_dollars = 10\n[[hosts]]\nname = "box"\nurl = "http://127.0.0.1:9"\n')
    budget = Budget(config, Fleet(config), wall=lambda: now)
    budget.seed(database)
    assert budget.usage_of(Identity("k1", "Ada", False))["tokens_today"] == 30
    assert budget.usage_of(Identity("k1", "Ada", False))["dollars_this_month"] == pytest.approx(108.5)
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        assert budget.reached() is None and budget.reached() is None
    finally:
        logger.remove(sink)
    assert len(warnings) == 1 and "spent $8.50 of its daily GPU budget of $10.00 (85%)" in warnings[0]


def test_when_both_dollar_budgets_are_spent_the_later_reset_is_told() -> None:
    now = at(2026, 5, 4, 12, 0, zone=UTC)
    config = loads('[budget]\ntimezone = "UTC"\n')
    budget = Budget(config, Fleet(config), wall=lambda: now)
    who = Identity("k1", "Ada", False, Limits(dollars_per_day=1.0, dollars_per_month=1.5))
    budget.admit(who, "llama3.2")
    budget.request(record("k1", 1, cost_micro=2_000_000))
    with pytest.raises(BudgetSpent, match=re.escape("monthly GPU budget of $1.50 is spent")) as refused:
        budget.admit(who, "llama3.2")
    assert refused.value.retry_after == pytest.approx(at(2026, 6, 1, zone=UTC) - now)


def test_only_answers_of_models_count_as_their_service_time() -> None:
    pace = Pace()
    answer = record("k1", 5)
    pace.request(msgspec.structs.replace(answer, route="/api/pull", duration_seconds=600.0))  # model management
    assert pace.service_seconds("llama3.2") is None
    pace.request(answer)
    assert pace.service_seconds("llama3.2:latest") == pytest.approx(1.0)  # either spelling

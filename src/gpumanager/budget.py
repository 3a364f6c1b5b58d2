"""Budgets and limits (DESIGN.md §4, §10): what each key may use and spend, and the fleet's spend cap.

Checked at admission only, from memory: a running request is never cut for money, and no request
waits on a database. The counters are seeded from the ledger at start and then fed through the
`Recorder` seam: each finished request's tokens and serving cost, and each billed interval as it
grows (the billing meter records open ones every second). A key's spend adds the serving cost of
its requests still running, accrued to their last settle, so "spent" is the closed charges plus
the open ones. Days and months are `[budget] timezone`'s.

The fleet's spend is the billed cost of its cloud hosts (DESIGN.md §10, from the billing meters;
static hosts' showback prices are not spend). At `warn_percent` of a cap a warning is logged; at
the cap no host is woken, cloud hosts take no new requests, and those awake are paused once their
requests end (`pauses_total{reason="budget"}`), protected ones too unless `spare_protected`. An
admin's override lifts the cap until the period ends.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any, NamedTuple

import anyio
from loguru import logger

from gpumanager.config import Config
from gpumanager.errors import BudgetSpent, FleetBudgetSpent, Forbidden, TooManyRequests
from gpumanager.events import BudgetLevel
from gpumanager.fleet import Fleet
from gpumanager.hosts import AWAKE, WAKEABLE
from gpumanager.keys import NO_LIMITS, Identity, Limits
from gpumanager.ledger import reader
from gpumanager.ledger.rows import MICRO
from gpumanager.ledger.schema import LedgerError, Location
from gpumanager.lifecycle import Lifecycle
from gpumanager.models import model_names
from gpumanager.recorder import IntervalRecord, NoopRecorder, RequestRecord

WINDOW = 60.0  # requests_per_minute counts the admissions of the last this many seconds
CHECK_SECONDS = 1.0  # the fleet's spend is checked against its caps this often


class Terms(NamedTuple):
    """What an admitted request may do beyond being served."""

    no_wake: str = ""  # why it may not wake a host (its budget cannot pay a cold start); "" = it may
    max_concurrent: int | None = None  # the key's own limit of requests running or waiting


FREE = Terms()


class Period(NamedTuple):
    start: float  # Unix seconds
    end: float


class Calendar:
    """Days and months in one time zone, as Unix-second bounds."""

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone

    def day(self, t: float) -> Period:
        local = datetime.fromtimestamp(t, self.zone)
        start = datetime(local.year, local.month, local.day, tzinfo=self.zone)
        following = start.date() + timedelta(days=1)
        end = datetime(following.year, following.month, following.day, tzinfo=self.zone)
        return Period(start.timestamp(), end.timestamp())

    def month(self, t: float) -> Period:
        local = datetime.fromtimestamp(t, self.zone)
        start = datetime(local.year, local.month, 1, tzinfo=self.zone)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        return Period(start.timestamp(), datetime(year, month, 1, tzinfo=self.zone).timestamp())

    def at(self, t: float, *, with_date: bool = False) -> str:
        """`t` as a person in the zone reads it: "00:00 CET", or "2027-01-01 00:00 CET"."""
        local = datetime.fromtimestamp(t, self.zone)
        return local.strftime("%Y-%m-%d %H:%M %Z" if with_date else "%H:%M %Z")


@dataclass(eq=False)
class _Spend:
    """One key's use in the current day and month, closed charges only."""

    tokens_day: int = 0
    micro_day: int = 0
    micro_month: int = 0
    admitted: deque[float] = field(default_factory=deque)  # clock times of its admissions in the window


class Budget(NoopRecorder):
    """The keys' limits and the fleet's cap, checked at admission.

    Owns: the counters of each key's use, the fleet's cap state (`Fleet.capped`), and the cap's
    override. Reads: the fleet's leases and hosts, the billing meters. Calls: the lifecycle, to
    pause hosts past the cap. Every method runs on the event loop.
    """

    def __init__(
        self,
        config: Config,
        fleet: Fleet,
        *,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.fleet = config, fleet
        self.wall, self.clock = wall, clock
        self.calendar = Calendar(config.budget.zone())
        self._spend: dict[str, _Spend] = {}
        now = wall()
        self._day, self._month = self.calendar.day(now), self.calendar.month(now)
        # The fleet's spend before this process (from the ledger), and each host's billed seconds
        # when the current day and month began in this process.
        self._fleet_day_before = self._fleet_month_before = 0
        self._billed_at_day: dict[str, float] = {}
        self._billed_at_month: dict[str, float] = {}
        self._warned: set[tuple[str, int, float]] = set()  # (cap, level, period start) already told
        self._limits: dict[str, Limits] = {}  # each key's limits as last seen at admission
        self._told: set[tuple[str, str, int, float]] = set()  # (key, limit, level, period start) announced
        self.override_until = 0.0
        self.override_by = ""
        # With several replicas: this replica's use not yet added to the shared counters, key ->
        # (tokens, micro-dollars); None in one process.
        self.pending: dict[str, list[int]] | None = None

    # -- the calendar ------------------------------------------------------------------------------

    def _roll(self, now: float) -> None:
        """A new day (or month) began: its counters start from nothing."""
        if now < self._day.end:
            return
        self._day = self.calendar.day(now)
        new_month = now >= self._month.end
        if new_month:
            self._month = self.calendar.month(now)
        billed = {h.name: self.fleet.billing.billed_seconds(h) for h in self.fleet.hosts.values()}
        self._fleet_day_before, self._billed_at_day = 0, billed
        if new_month:
            self._fleet_month_before, self._billed_at_month = 0, dict(billed)
        for spend in self._spend.values():
            spend.tokens_day = spend.micro_day = 0
            if new_month:
                spend.micro_month = 0

    def _of(self, key: str) -> _Spend:
        spend = self._spend.get(key)
        if spend is None:
            spend = self._spend[key] = _Spend()
        return spend

    # -- seeding -----------------------------------------------------------------------------------

    def seed(self, database: Location) -> None:
        """Start from what the ledger says of the current day and month (nothing if there is none
        yet), and the fleet's pace from its recent service and wake times."""
        now = self.wall()
        self._roll(now)
        static = {h.name for h in self.config.hosts if h.url}
        try:
            self.fleet.pace.seed(*reader.recent_timings(database))
            for period, by_month in ((self._day, False), (self._month, True)):
                keys = reader.usage(database, period.start, now, "key")
                for group in keys.groups:
                    if group.group == reader.UNATTRIBUTED:
                        continue
                    spend, totals = self._of(group.group), group.totals
                    if by_month:
                        spend.micro_month = totals.cost_micro
                    else:
                        spend.micro_day = totals.cost_micro
                        spend.tokens_day = totals.prompt_tokens + totals.completion_tokens
                hosts = reader.usage(database, period.start, now, "host")
                cloud = sum(g.totals.cost_micro for g in hosts.groups if g.group not in static | {reader.NO_HOST})
                if by_month:
                    self._fleet_month_before = cloud
                else:
                    self._fleet_day_before = cloud
        except LedgerError as exc:
            if isinstance(database, str) or database.exists():
                logger.warning("budgets start from nothing: {}", exc)

    # -- admission ---------------------------------------------------------------------------------

    def admit(self, who: Identity, model: str) -> Terms:
        """The terms of a request of `who` for `model`, or the `ClientError` that refuses it."""
        limits = who.limits
        if limits is NO_LIMITS:
            return FREE
        if not limits.allows(model_names(model)):
            allowed = ", ".join(limits.models or ())
            raise Forbidden(f"this key may not use model '{model}'; it may use: {allowed}")
        now = self.wall()
        self._roll(now)
        self._limits[who.id] = limits
        spend = self._of(who.id)
        window = self._window(spend, limits)
        self._check_tokens(spend, limits)
        no_wake = ""
        if limits.spends:
            left = self._check_dollars(who.id, spend, limits, now)
            no_wake = self._cold_start_refusal(model, left)
        if window is not None:
            window.append(self.clock())
        return Terms(no_wake, limits.max_concurrent)

    def _window(self, spend: _Spend, limits: Limits) -> deque[float] | None:
        """The key's admissions in the last minute, if it has a rate limit; `TooManyRequests` when full."""
        if limits.requests_per_minute is None:
            return None
        now, window = self.clock(), spend.admitted
        while window and window[0] <= now - WINDOW:
            window.popleft()
        if len(window) >= limits.requests_per_minute:
            wait = window[0] + WINDOW - now
            raise TooManyRequests(
                f"this key may make {limits.requests_per_minute} requests a minute; the next is allowed in "
                f"{math.ceil(wait)}s",
                retry_after=wait,
            )
        return window

    def _check_tokens(self, spend: _Spend, limits: Limits) -> None:
        if limits.tokens_per_day is not None and spend.tokens_day >= limits.tokens_per_day:
            raise BudgetSpent(
                f"this key's daily budget of {limits.tokens_per_day:,} tokens is used up "
                f"({spend.tokens_day:,} used); it resets at {self.calendar.at(self._day.end)}",
                retry_after=self._day.end - self.wall(),
            )

    def _check_dollars(self, key: str, spend: _Spend, limits: Limits, now: float) -> float:
        """Refuse a key past a dollar budget; else the dollars it has left (the tighter budget's)."""
        running = self._running(key)
        left = math.inf
        refusal = None
        # The month's budget first: when both are spent, the later reset is the true one.
        for limit, used, period, word in (
            (limits.dollars_per_month, spend.micro_month, self._month, "monthly"),
            (limits.dollars_per_day, spend.micro_day, self._day, "daily"),
        ):
            if limit is None:
                continue
            spent = (used + running) / MICRO
            if spent >= limit and refusal is None:
                resets = self.calendar.at(period.end, with_date=word == "monthly")
                refusal = BudgetSpent(
                    f"this key's {word} GPU budget of ${limit:,.2f} is spent (${spent:,.2f}); it resets at {resets}",
                    retry_after=period.end - now,
                )
            left = min(left, limit - spent)
        if refusal is not None:
            raise refusal
        return left

    def _running(self, key: str) -> int:
        """The cost so far of the key's requests still running (micro-dollars), to their last settle."""
        return sum(lease.cost_micro for lease in self.fleet.all_leases() if lease.key == key)

    def _cold_start_refusal(self, model: str, left: float) -> str:
        """Why this key may not wake a host for `model` (its dollars left cannot pay the cheapest
        cold start: the host's median wake plus its fallback window, priced), or ""."""
        asleep = [h for h in self.fleet.candidates(model) if h.state in WAKEABLE and not h.always_on]
        if not asleep:
            return ""
        window = self.config.timing.fallback_reservation_minutes * 60
        cost, host = min(((self.fleet.cold_start(h) + window) * h.cost_per_hour / 3600, h.name) for h in asleep)
        if left >= cost:
            return ""
        chosen = self.fleet.hosts[host]
        return (
            f"this key has ${left:,.2f} of its GPU budget left, less than waking {host} would cost (about "
            f"${cost:,.2f}: {self.fleet.cold_start(chosen):.0f}s to wake and {window / 60:g} min kept for you); "
            "it may use hosts that are awake, but not wake one"
        )

    # -- the Recorder ------------------------------------------------------------------------------

    def request(self, record: RequestRecord) -> None:
        if not (record.cost_micro or record.prompt_tokens or record.completion_tokens):
            return
        self._roll(self.wall())
        spend = self._of(record.key)
        tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        spend.tokens_day += tokens
        spend.micro_day += record.cost_micro
        spend.micro_month += record.cost_micro
        self.add_pending(record.key, tokens, record.cost_micro)
        self._announce(record.key, spend)

    def interval(self, record: IntervalRecord) -> None:
        if record.key is None or not record.added_micro:
            return
        self._roll(self.wall())
        spend = self._of(record.key)
        spend.micro_day += record.added_micro
        spend.micro_month += record.added_micro
        self.add_pending(record.key, 0, record.added_micro)
        self._announce(record.key, spend)

    # -- several replicas --------------------------------------------------------------------------

    def add_pending(self, key: str, tokens: int, micro: int) -> None:
        """Use not yet in the shared counters (a round that failed gives its share back here)."""
        if self.pending is not None:
            added = self.pending.setdefault(key, [0, 0])
            added[0] += tokens
            added[1] += micro

    def periods(self) -> tuple[float, float]:
        """The starts of the current day and month (the shared counters' names)."""
        self._roll(self.wall())
        return self._day.start, self._month.start

    def seeded(self) -> dict[str, tuple[int, int, int]]:
        """Each key's use this day and month as this replica knows it: key -> (tokens today,
        micro-dollars today, micro-dollars this month); what the first replica of a day puts in
        the shared counters."""
        return {k: (s.tokens_day, s.micro_day, s.micro_month) for k, s in self._spend.items()}

    def shared_totals(
        self, periods: tuple[float, float], day: dict[str, tuple[int, int]], month: dict[str, int]
    ) -> None:
        """Every replica's use, as the shared counters said when `periods` were current (key ->
        (tokens, micro) today, and micro this month); this replica's use added since is kept."""
        if periods != self.periods():
            return  # a day began meanwhile: the next reading is of the new one
        pending = self.pending or {}
        for key in day.keys() | month.keys() | self._spend.keys():
            spend = self._of(key)
            added = pending.get(key, (0, 0))
            tokens, micro = day.get(key, (0, 0))
            spend.tokens_day = tokens + added[0]
            spend.micro_day = micro + added[1]
            spend.micro_month = month.get(key, 0) + added[1]

    def _announce(self, key: str, spend: _Spend) -> None:
        """A `budget` event when a key's use reaches `warn_percent` or all of one of its budgets."""
        limits = self._limits.get(key)
        if limits is None or limits is NO_LIMITS:
            return
        for name, used, limit, period, unit in (
            ("tokens_per_day", spend.tokens_day, limits.tokens_per_day, self._day, "tokens"),
            ("dollars_per_day", spend.micro_day / MICRO, limits.dollars_per_day, self._day, "dollars"),
            ("dollars_per_month", spend.micro_month / MICRO, limits.dollars_per_month, self._month, "dollars"),
        ):
            if limit is None:
                continue
            for level in (round(self.config.budget.warn_percent), 100):
                mark = (key, name, level, period.start)
                if used >= limit * level / 100 and mark not in self._told:
                    self._told.add(mark)
                    word = "day" if period is self._day else "month"
                    self.fleet.events.publish(
                        BudgetLevel(scope="key", key=key, level=level, period=word, spent=used, limit=limit, unit=unit)
                    )

    # -- the fleet's cap ---------------------------------------------------------------------------

    def fleet_spend(self) -> tuple[float, float]:
        """The fleet's billed cloud cost today and this month, in dollars."""
        self._roll(self.wall())
        day, month = self._fleet_day_before / MICRO, self._fleet_month_before / MICRO
        for host in self.fleet.hosts.values():
            if host.always_on or not host.cost_per_hour:
                continue
            billed = self.fleet.billing.billed_seconds(host)
            day += (billed - self._billed_at_day.get(host.name, 0.0)) * host.cost_per_hour / 3600
            month += (billed - self._billed_at_month.get(host.name, 0.0)) * host.cost_per_hour / 3600
        return day, month

    def reached(self) -> FleetBudgetSpent | None:
        """The cap the fleet's spend has reached, or None. Reaching `warn_percent` of a cap, and the
        cap, is logged and published once per period."""
        caps = self.config.budget
        day, month = self.fleet_spend()
        now = self.wall()
        reached = None
        for cap, spent, period, word in (
            (caps.daily_dollars, day, self._day, "day"),
            (caps.monthly_dollars, month, self._month, "month"),
        ):
            if cap is None:
                continue
            adjective = "daily" if word == "day" else "monthly"
            for level in (round(caps.warn_percent), 100):
                if spent < cap * level / 100 or (word, level, period.start) in self._warned:
                    continue
                self._warned.add((word, level, period.start))
                logger.warning(
                    "the fleet has spent ${:,.2f} of its {} GPU budget of ${:,.2f} ({:.0f}%)",
                    spent,
                    adjective,
                    cap,
                    100 * spent / cap,
                )
                self.fleet.events.publish(
                    BudgetLevel(scope="fleet", key=None, level=level, period=word, spent=spent, limit=cap)
                )
            if spent >= cap and now >= self.override_until:  # the month's, when both: the later reset
                resets = self.calendar.at(period.end, with_date=word == "month")
                reached = FleetBudgetSpent(
                    f"the fleet's {adjective} GPU budget of ${cap:,.2f} is spent; it resets at {resets}",
                    retry_after=period.end - now,
                )
        return reached

    def check(self, lifecycle: Lifecycle) -> None:
        """Apply the cap: refuse wakes and new leases on cloud hosts, and pause the awake ones."""
        capped = self.reached()
        was = self.fleet.capped
        self.fleet.capped = capped
        if capped is None:
            if was is not None:
                logger.warning("the fleet's GPU budget allows wakes again")
                self.fleet.dispatch()
            return
        if was is None:
            logger.warning("{}: pausing the cloud hosts once their requests end", capped.message)
        spare = self.config.budget.spare_protected
        for host in list(self.fleet.hosts.values()) if self.fleet.shared.leader else ():
            awake = host.state in AWAKE or host.wake is not None
            if host.always_on or (spare and host.protected) or not awake or host.pausing is not None:
                continue
            lifecycle.request_pause(host, capped.message, kind="budget")
        self.fleet.dispatch()  # waiters of cloud hosts are told

    async def run(self, lifecycle: Lifecycle) -> None:
        """Check the fleet's spend against its caps every second, until cancelled."""
        if self.config.budget.daily_dollars is None and self.config.budget.monthly_dollars is None:
            return
        while True:
            self.check(lifecycle)
            await anyio.sleep(CHECK_SECONDS)

    def override(self, admin: str, lifecycle: Lifecycle) -> float:
        """Admin key `admin` lifts the cap until the end of the period whose cap is reached (the
        day, or the month when the monthly cap is reached); returns when it ends (Unix seconds)."""
        now = self.wall()
        self._roll(now)
        caps, (_, month) = self.config.budget, self.fleet_spend()
        monthly = caps.monthly_dollars is not None and month >= caps.monthly_dollars
        self.override_until = (self._month if monthly else self._day).end
        self.override_by = admin
        logger.warning(
            "the fleet's GPU budget cap is lifted by key {} until {}",
            admin,
            self.calendar.at(self.override_until, with_date=True),
        )
        self.check(lifecycle)
        return self.override_until

    # -- reading -----------------------------------------------------------------------------------

    def usage_of(self, who: Identity) -> dict[str, Any]:
        """A key's limits and its use of them in the current day and month."""
        self._roll(self.wall())
        spend = self._spend.get(who.id) or _Spend()
        running = self._running(who.id)
        return {
            "limits": {name: value for name, value in _fields(who.limits).items() if value is not None},
            "tokens_today": spend.tokens_day,
            "dollars_today": round((spend.micro_day + running) / MICRO, 6),
            "dollars_this_month": round((spend.micro_month + running) / MICRO, 6),
            "day_resets_at": self.calendar.at(self._day.end, with_date=True),
            "month_resets_at": self.calendar.at(self._month.end, with_date=True),
        }

    def status(self) -> dict[str, Any]:
        """The fleet's spend against its caps (the admin API)."""
        day, month = self.fleet_spend()
        caps = self.config.budget
        return {
            "timezone": caps.timezone,
            "dollars_today": round(day, 6),
            "dollars_this_month": round(month, 6),
            "daily_dollars": caps.daily_dollars,
            "monthly_dollars": caps.monthly_dollars,
            "capped": self.fleet.capped.message if self.fleet.capped is not None else None,
            "override_until": (
                self.calendar.at(self.override_until, with_date=True) if self.override_until > self.wall() else None
            ),
            "override_by": self.override_by if self.override_until > self.wall() else None,
        }


def _fields(limits: Limits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in limits.__struct_fields__}

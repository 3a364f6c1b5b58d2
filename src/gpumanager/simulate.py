"""What-if replay: your own traffic against other settings, on a virtual clock.

`replay()` runs requests (arrival, model, duration) against hosts (slots, price, cold start) in a
discrete-event loop, through the server's own policy: `scheduler.choose()` for every admission and
every freed slot (the fair queue, wakes, cost-aware scale-up with the model's measured service
times from the same `Pace`), and `scheduler.reserve()` / `scheduler.pause_at()` for the idle
windows. A wake takes the host's cold start; a pause is taken to end billing at once. Requests
wait as long as they must (no queue timeout).

For each setting it reports billed GPU-hours and dollars, and the cold starts users waited
through, against every host always on, and against the oracle of the same replay: the same
requests on the same hosts at the same times, by a policy that knows the future, so each idle gap
of a host costs min(gap, cold start) (paused when that pays, woken just in time) and its first use
one cold start. No policy that puts the requests where this one did can bill less.
"""

from __future__ import annotations

import csv
import heapq
import math
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from gpumanager.config import Config
from gpumanager.errors import GpuManagerError
from gpumanager.hosts import WAKING, HostState
from gpumanager.ledger import reader
from gpumanager.ledger.report import host_prices
from gpumanager.ledger.schema import Location
from gpumanager.models import model_names
from gpumanager.pace import Pace, model_key
from gpumanager.scheduler import (
    Ask,
    FairQueue,
    HostView,
    Reject,
    Snapshot,
    Use,
    Wait,
    Waiter,
    Wake,
    choose,
    pause_at,
    reserve,
)

ST = HostState


class TraceError(GpuManagerError):
    """A trace file that cannot be read: says which line and why."""


class Request(msgspec.Struct, frozen=True):
    arrival: float  # seconds (any origin)
    model: str
    duration: float  # seconds it holds a slot
    key: str = "trace"


class HostSpec(msgspec.Struct, frozen=True):
    name: str
    slots: int
    price: float  # dollars an hour
    cold_start: float  # seconds from resume to ready
    models: frozenset[str] | None = None  # None: every model of the replay
    always_on: bool = False  # a static host: never paused, billed throughout


class Setting(msgspec.Struct, frozen=True):
    reservation_minutes: float
    scale_up: str  # "expected_wait" or "queue_depth"
    fallback_minutes: float = 3.0
    scale_up_depth: int = 8


class Outcome(msgspec.Struct, frozen=True):
    setting: Setting | None  # None: always on, or the oracle
    label: str
    gpu_hours: float
    dollars: float
    cold_starts: int = 0  # requests that waited for a wake
    wait_p50: float = 0.0  # seconds those requests waited
    wait_p95: float = 0.0
    queue_p95: float = 0.0  # seconds the 95th percentile of all requests waited for a slot
    oracle_hours: float = 0.0  # the same replay's requests billed by a policy that knows the future
    oracle_dollars: float = 0.0
    wakes: int = 0
    refused: int = 0
    until: float = 0.0  # when the replay billed last (its last pause), in the requests' time


@dataclass(eq=False)
class _Host:
    spec: HostSpec
    state: HostState = ST.PAUSED
    leases: int = 0
    deadline: float = 0.0
    reserved_key: str | None = None
    billed_since: float | None = None
    billed: float = 0.0
    wakes: int = 0
    busy: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each request


@dataclass(eq=False)
class _Waiting:
    request: Request
    waiter: Waiter


class _Replay:
    """One setting's run: the hosts, the queue, the event heap."""

    def __init__(self, hosts: Sequence[HostSpec], setting: Setting, start: float) -> None:
        self.setting = setting
        self.hosts = {spec.name: _Host(spec) for spec in hosts}
        for host in self.hosts.values():
            if host.spec.always_on:
                host.state, host.billed_since = ST.READY, start
        self.by_model: dict[str, list[_Host]] = {}
        self.queue = FairQueue()
        self.waiting: dict[int, _Waiting] = {}
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.now = start
        self.pace = Pace()
        self.queued: dict[str, int] = {}  # waiters by model (the fair queue would count them one by one)
        self.waits: list[float] = []  # of the requests that waited for a wake
        self.all_waits: list[float] = []  # of every request: arrival to a slot
        self.refused = 0

    # -- events ------------------------------------------------------------------------------------

    def at(self, when: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, payload))

    def run(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.at(request.arrival, "arrive", request)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(payload)
            elif kind == "end":
                self.end(*payload)
            elif kind == "ready":
                self.ready(payload)
            elif kind == "idle":
                self.idle(payload)

    def finish(self, end: float, static_end: float) -> None:
        """Stop billing: cloud hosts at `end`, static ones at `static_end` (the last answer: the same
        for every setting, so their showback does not grow with the reservation window)."""
        for host in self.hosts.values():
            if host.billed_since is not None:
                stop = static_end if host.spec.always_on else end
                host.billed += max(0.0, stop - host.billed_since)
                host.billed_since = None

    # -- the policy, as the fleet applies it -------------------------------------------------------

    def candidates(self, model: str) -> list[_Host]:
        key = model_key(model)
        found = self.by_model.get(key)
        if found is None:
            names = set(model_names(model))
            found = self.by_model[key] = [
                h for h in self.hosts.values() if h.spec.models is None or names & h.spec.models
            ]
        return found

    def snapshot(self, ask: Ask, queued: int) -> Snapshot:
        views = tuple(
            HostView(
                h.spec.name,
                h.state,
                True,
                False,
                h.leases,
                h.spec.slots,
                h.spec.price,
                False,
                True,
                h.reserved_key,
                h.deadline,
                h.spec.always_on,
                h.spec.always_on,
                h.spec.cold_start,
            )
            for h in self.candidates(ask.model)
        )
        return Snapshot(
            views,
            self.now,
            queued=queued,
            scale_up_depth=self.setting.scale_up_depth,
            scale_up=self.setting.scale_up,
            service_seconds=self.pace.service_seconds(ask.model) if self.setting.scale_up == "expected_wait" else None,
        )

    def arrive(self, request: Request) -> None:
        ask = Ask(request.model, request.key)
        decision = choose(self.snapshot(ask, self.queued.get(ask.model, 0)), ask)
        if type(decision) is Use:
            self.all_waits.append(0.0)
            self.start(self.hosts[decision.host], request)
            return
        if type(decision) is Reject:
            self.refused += 1
            return
        waiter = Waiter(ask, self.now, None, since=self.now)
        waiter.waking = {h.spec.name for h in self.candidates(ask.model) if h.state in WAKING}
        if type(decision) is Wake:
            self.wake(self.hosts[decision.host], waiter)
        self.queue.push(waiter)
        self.queued[ask.model] = self.queued.get(ask.model, 0) + 1
        self.waiting[id(waiter)] = _Waiting(request, waiter)

    def dispatch(self) -> None:
        """As `Fleet.dispatch`: free slots to waiters in fair order, wakes the policy asks for on the way
        (stopping once every waiting model is blocked: the server's queue is bounded, a replay's is not)."""
        progress = True
        while progress and self.queue:
            progress = False
            blocked: set[str] = set()
            waiting_models = sum(1 for count in self.queued.values() if count)
            for waiter in self.queue:
                ask = waiter.ask
                if ask.model in blocked:
                    continue
                decision = choose(self.snapshot(ask, self.queued[ask.model] - 1), ask)
                if type(decision) is Wait or type(decision) is Wake:
                    if type(decision) is Wake:
                        self.wake(self.hosts[decision.host], waiter)
                    blocked.add(ask.model)
                    if len(blocked) == waiting_models:
                        break
                    continue
                self.queue.remove(waiter)
                self.queue.served(ask.key)
                self.queued[ask.model] -= 1
                waiting = self.waiting.pop(id(waiter))
                if type(decision) is Use:
                    waited = self.now - waiting.request.arrival
                    self.all_waits.append(waited)
                    if waiter.waking:
                        self.waits.append(waited)
                    self.start(self.hosts[decision.host], waiting.request)
                else:
                    self.refused += 1
                progress = True
                break

    def start(self, host: _Host, request: Request) -> None:
        host.leases += 1
        self.at(self.now + request.duration, "end", (host, request))
        host.busy.append((self.now, self.now + request.duration))

    def end(self, host: _Host, request: Request) -> None:
        host.leases -= 1
        host.deadline = reserve(host.deadline, self.now, self.setting.reservation_minutes * 60)
        host.reserved_key = request.key
        self.pace.served(request.model, request.duration)
        self.dispatch()
        self.check_idle(host)

    def wake(self, host: _Host, waiter: Waiter) -> None:
        waiter.waking.add(host.spec.name)
        if host.state in WAKING:
            return
        host.state, host.wakes = ST.RESUMING, host.wakes + 1
        if host.billed_since is None:
            host.billed_since = self.now
        self.at(self.now + host.spec.cold_start, "ready", host)

    def ready(self, host: _Host) -> None:
        host.state = ST.READY
        host.deadline = reserve(host.deadline, self.now, self.setting.fallback_minutes * 60)
        self.dispatch()
        self.check_idle(host)

    @staticmethod
    def pause_at(host: _Host) -> float | None:
        """When the server's idle rule pauses `host` (pauses here are instant: never "pausing")."""
        return pause_at(
            host.state,
            always_on=host.spec.always_on,
            protected=False,
            pausing=False,
            leases=host.leases,
            deadline=host.deadline,
        )

    def check_idle(self, host: _Host) -> None:
        due = self.pause_at(host)
        if due is not None:
            self.at(max(due, self.now), "idle", host)

    def idle(self, host: _Host) -> None:
        due = self.pause_at(host)
        if due is None or due > self.now:
            return  # used again meanwhile: a later check stands
        host.state, host.reserved_key = ST.PAUSED, None
        if host.billed_since is not None:
            host.billed += self.now - host.billed_since
            host.billed_since = None
        self.dispatch()  # a request waiting for this host's pause (none here: pauses are instant)


def replay(requests: Sequence[Request], hosts: Sequence[HostSpec], setting: Setting) -> Outcome:
    """One setting's billed GPU time, dollars and cold-start waits for `requests` on `hosts`."""
    ordered = sorted(requests, key=lambda r: r.arrival)
    start = ordered[0].arrival if ordered else 0.0
    run = _Replay(hosts, setting, start)
    run.run(ordered)
    end = max((b for h in run.hosts.values() for _, b in h.busy), default=start)
    run.finish(max(end, run.now), max(r.arrival + r.duration for r in ordered) if ordered else start)
    billed = sum(h.billed for h in run.hosts.values())
    dollars = sum(h.billed * h.spec.price / 3600 for h in run.hosts.values())
    oracle = {
        h.spec.name: h.billed if h.spec.always_on else reader.oracle_seconds(h.busy, h.spec.cold_start)
        for h in run.hosts.values()
    }
    waits = sorted(run.waits)
    return Outcome(
        setting=setting,
        label=f"{setting.scale_up}, {setting.reservation_minutes:g} min",
        gpu_hours=billed / 3600,
        dollars=dollars,
        cold_starts=len(waits),
        wait_p50=_quantile(waits, 0.5),
        wait_p95=_quantile(waits, 0.95),
        queue_p95=_quantile(sorted(run.all_waits), 0.95),
        oracle_hours=sum(oracle.values()) / 3600,
        oracle_dollars=sum(oracle[h.spec.name] * h.spec.price / 3600 for h in run.hosts.values()),
        wakes=sum(h.wakes for h in run.hosts.values()),
        refused=run.refused,
        until=max(end, run.now),
    )


def always_on(hosts: Sequence[HostSpec], start: float, end: float) -> Outcome:
    """Every host billed throughout [start, end)."""
    span = max(0.0, end - start)
    return Outcome(None, "always on", span * len(hosts) / 3600, sum(span * h.price / 3600 for h in hosts))


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


# -- inputs ----------------------------------------------------------------------------------------


def read_trace(path: str | Path) -> list[Request]:
    """A CSV of `time,model,duration_s` (a header line and `#` comments allowed). `time` is seconds
    from any origin, or an ISO date and time."""
    requests = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark too
            for number, row in enumerate(csv.reader(f), start=1):
                if not row or row[0].startswith("#") or row[0].strip().lower() == "time":
                    continue
                if len(row) < 3:
                    raise TraceError(f"{path}:{number}: expected time,model,duration_s, got {','.join(row)!r}")
                requests.append(Request(_time(row[0], path, number), row[1].strip(), _seconds(row[2], path, number)))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    if not requests:
        raise TraceError(f"{path}: no requests in it")
    return requests


def _time(text: str, path: str | Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise TraceError(f"{path}:{line}: time {text!r} is not a number of seconds")
        return value
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise TraceError(f"{path}:{line}: time {text!r} is neither seconds nor an ISO date and time") from None


def _seconds(text: str, path: str | Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise TraceError(f"{path}:{line}: duration_s {text!r} is not a number of seconds")
    return value


def ledger_requests(database: Location, since: float, until: float) -> list[Request]:
    """The ledger's answered requests of the period: arrival, model, time holding a slot, key."""
    return [
        Request(arrival, model, duration, key)
        for arrival, model, duration, key in reader.served(database, since, until)
    ]


def ledger_hosts(config: Config, database: Location, since: float, until: float) -> list[HostSpec]:
    """The hosts that served in the period, with their prices (the config), slots (the config) and
    cold starts (the median of their recent wakes in the ledger; a quarter of the startup timeout
    before any), and the models each served."""
    names = [h for h in reader.hosts(database, since, until) if h != reader.NO_HOST]
    prices = host_prices(config, names)
    _, wakes = reader.recent_timings(database)
    served = reader.models_by_host(database, since, until)
    pace = Pace()
    pace.seed((), wakes)
    static = {h.name for h in config.hosts if h.url}
    specs = []
    for name in names:
        override = next((h for h in config.hosts if h.name == name), None)
        cold = pace.cold_start_seconds(name)
        specs.append(
            HostSpec(
                name=name,
                slots=override.slots if override and override.slots else config.scheduler.default_slots,
                price=prices.get(name, 0.0),
                cold_start=cold if cold is not None else config.timing.startup_timeout_seconds / 4,
                models=frozenset(served.get(name, ())) or None,
                always_on=name in static,
            )
        )
    return specs


def config_hosts(config: Config) -> list[HostSpec]:
    """The hosts a config names: static `[[hosts]]` (always on), `[[hosts]]` entries for cloud hosts
    with their slots, price and models, and the simulated provider's machines."""
    default_cold = config.timing.startup_timeout_seconds / 4
    specs: dict[str, HostSpec] = {}
    for provider in config.all_providers():
        for machine in getattr(provider, "hosts", []):
            specs[machine.name] = HostSpec(
                name=machine.name,
                slots=machine.slots,
                price=machine.cost_per_hour,
                cold_start=machine.boot_seconds + machine.ollama_seconds,
                models=_names(machine.models),
            )
    for host in config.hosts:
        known = specs.get(host.name)
        specs[host.name] = HostSpec(
            name=host.name,
            slots=host.slots or (known.slots if known else config.scheduler.default_slots),
            price=host.cost_per_hour if host.cost_per_hour is not None else (known.price if known else 0.0),
            cold_start=known.cold_start if known else default_cold,
            models=_names(host.models) or (known.models if known else None),
            always_on=host.url is not None,
        )
    return list(specs.values())


def _names(models: Iterable[str]) -> frozenset[str] | None:
    names = frozenset(name for model in models for name in model_names(model))
    return names or None


def settings(reservations: Sequence[float], rules: Sequence[str], config: Config) -> list[Setting]:
    timing, sched = config.timing, config.scheduler
    return [
        Setting(
            minutes,
            rule,
            fallback_minutes=timing.fallback_reservation_minutes,
            scale_up_depth=sched.scale_up_queue_depth,
        )
        for rule in rules
        for minutes in reservations
    ]


class Report(msgspec.Struct, frozen=True):
    requests: int
    hours: float  # the replayed period
    hosts: list[HostSpec]
    outcomes: list[Outcome]
    always_on: Outcome
    seconds: float  # how long the replay took


PARALLEL_FROM = 20_000  # requests: replays this long run in worker processes, one setting each


def simulate(
    requests: Sequence[Request],
    hosts: Sequence[HostSpec],
    chosen: Sequence[Setting],
    period: tuple[float, float] | None = None,
) -> Report:
    """Every setting's outcome, and always-on over the same period: `period` (the ledger's), or the
    first arrival to the last moment any setting billed (a trace's). Long replays use every core
    (they are independent)."""
    started = time.perf_counter()
    workers = min(len(chosen) + 1, os.cpu_count() or 1)
    if len(requests) >= PARALLEL_FROM and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            outcomes = list(pool.map(replay, *zip(*((requests, hosts, setting) for setting in chosen), strict=True)))
    else:
        outcomes = [replay(requests, hosts, setting) for setting in chosen]
    first = min((r.arrival for r in requests), default=0.0)
    last = max([r.arrival + r.duration for r in requests] + [o.until for o in outcomes], default=first)
    start, end = period if period is not None else (first, last)
    end = max(end, last)  # a replay may bill past the period's end (its last window): count it on both sides
    return Report(
        requests=len(requests),
        hours=(end - start) / 3600,
        hosts=list(hosts),
        outcomes=outcomes,
        always_on=always_on(hosts, start, end),
        seconds=time.perf_counter() - started,
    )


def table(report: Report) -> str:
    """The report as `gpumanager simulate` prints it."""
    hosts = ", ".join(
        f"{h.name} ({h.slots} slots, ${h.price:,.2f}/h, {h.cold_start:.0f}s cold start)" for h in report.hosts
    )
    lines = [f"replay of {report.requests:,} requests over {report.hours:,.1f} h on {hosts}", ""]
    rows: list[tuple[str, ...]] = [
        (
            "SCALE-UP",
            "WINDOW",
            "GPU-HOURS",
            "DOLLARS",
            "WAKES",
            "COLD STARTS",
            "WAIT P50",
            "WAIT P95",
            "ALL P95",
            "VS ALWAYS-ON",
            "ORACLE",
            "VS ORACLE",
        )
    ]
    always = report.always_on
    for o in report.outcomes:
        assert o.setting is not None
        rows.append(
            (
                o.setting.scale_up,
                f"{o.setting.reservation_minutes:g} min",
                f"{o.gpu_hours:,.2f}",
                f"${o.dollars:,.2f}",
                f"{o.wakes:,}",
                f"{o.cold_starts:,}",
                f"{o.wait_p50:.0f}s",
                f"{o.wait_p95:.0f}s",
                f"{o.queue_p95:.0f}s",
                _versus(o.dollars, always.dollars, "saved"),
                f"${o.oracle_dollars:,.2f}",
                _versus(o.dollars, o.oracle_dollars, "more"),
            )
        )
    rows.append((always.label, "", f"{always.gpu_hours:,.2f}", f"${always.dollars:,.2f}", *[""] * 8))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    lines += ["", f"replayed in {report.seconds:.2f} s"]
    return "\n".join(lines)


def _versus(dollars: float, other: float, word: str) -> str:
    if not other:
        return "-"
    if word == "saved":
        return f"{100 * (1 - dollars / other):.0f}% saved"
    return f"{100 * (dollars / other - 1):+.0f}%"

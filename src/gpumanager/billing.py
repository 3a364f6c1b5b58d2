"""Who pays for each billed second of each host (DESIGN.md §10).

A host is billed from the resume call (or from being found starting or running) until the cloud
reports it paused; a static host while gpumanager runs. Every billed second goes to one owner:
the requests in flight (split equally among their leases), else one key or nobody
(`unattributed`) with a reason, as §10 lists them.

`settle(host)` is called after every change that can move a host's time to another owner: its
state (the fleet passes on `Host.on_change`), its leases, its idle deadline, a wake or a pause starting or
ending. It charges the time since the previous settle to what was planned then, and plans the next
stretch from what the host is doing now. Between two settles only the clock moves, and the idle
deadline is the one thing that depends on it, so a plan is the leases in flight, or an owner
before the deadline and one after it.

Non-serving time becomes intervals, one per run of the same owner; so that a busy host does not
write a row for every gap between two requests, an owner's runs less than `MERGE_SECONDS` apart
make one interval (its `gpu_seconds` is then less than its end minus its start). An interval is
recorded (`Recorder.interval`) when it ends and, while it lasts, at each `checkpoint()` (the ledger
writer asks for one before each flush, every second, and at shutdown), so a killed process loses
at most the last second of it. The ledger writes an interval's records over one row (same host and
start).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import anyio

from gpumanager.hosts import WAKING, Host, HostState
from gpumanager.ledger.rows import MICRO, Reason
from gpumanager.recorder import IntervalRecord, NoopRecorder, Recorder

ST = HostState
MERGE_SECONDS = 60.0  # an owner's runs of non-serving time that start within this make one interval


class Share(Protocol):
    """A request in flight on a host (a lease): it pays an equal share of the host's serving time."""

    gpu_seconds: float


class Owner(NamedTuple):
    reason: Reason
    key: str | None  # None: unattributed


@dataclass(eq=False)
class _Plan:
    """What a host does until its next settle: serve `leases`, or belong to `early` until `deadline`
    and to `late` from then on. Not billed when `billed` is false."""

    billed: bool = False
    leases: tuple[Share, ...] = ()
    others: int = 0  # requests through other replicas share the serving time (each meters its own)
    early: Owner | None = None
    deadline: float = 0.0
    late: Owner | None = None


@dataclass(eq=False)
class _Open:
    """An interval being built: one owner's non-serving time on one host since `start`."""

    owner: Owner
    start: float  # clock time
    end: float
    seconds: float = 0.0
    recorded_seconds: float = 0.0  # as of its last record
    recorded_micro: int = 0


@dataclass(eq=False)
class _Bill:
    """One host's meter."""

    since: float  # the clock time of the last settle
    known_since: float  # when gpumanager first knew of the host (savings are counted from then)
    plan: _Plan = field(default_factory=_Plan)
    open: dict[Owner, _Open] = field(default_factory=dict)
    seconds: float = 0.0  # billed, in total
    waker: Owner | None = None  # who started the latest wake: its fallback window, a failed wake's pause
    previous: Owner | None = None  # ...and the wake before (a pause under way when a new wake began is its)
    wake: object = None  # the latest wake seen (`hosts.Wake`)


class Billing:
    """The meters of every host in the fleet.

    Owns: billed time and its owners. Reads: hosts (state, wake, pause, deadline, reservation) and
    their leases through `leases_of`. Calls: the `Recorder` with each interval.
    """

    def __init__(
        self,
        leases_of: Callable[[Host], Collection[Share]],
        *,
        recorder: Recorder | None = None,
        clock: Callable[[], float] = anyio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.leases_of = leases_of
        self.recorder: Recorder = recorder or NoopRecorder()
        self.clock = clock
        self.wall = wall
        self._epoch: float | None = None  # wall time - clock time, fixed at the first use
        # Whether this meter records the hosts' non-serving time: with several replicas, only the
        # leader's does (each still charges its own requests their share of the serving time).
        self.attributes: Callable[[], bool] = lambda: True
        self._bills: dict[Host, _Bill] = {}

    # -- hosts -------------------------------------------------------------------------------------

    def add(self, host: Host) -> None:
        now = self.clock()
        self._bills[host] = _Bill(since=now, known_since=now)
        self.settle(host)

    def remove(self, host: Host) -> None:
        """The host left the fleet: its billing ends here."""
        bill = self._bills.get(host)
        if bill is None:
            return
        self._charge(host, bill, self.clock())
        self._close(host, bill, before=math.inf)
        del self._bills[host]

    # -- settling ----------------------------------------------------------------------------------

    def settle(self, host: Host) -> None:
        """Charge the time since the last settle as planned then, and plan anew from `host` now."""
        bill = self._bills.get(host)
        if bill is None:
            return
        now = self.clock()
        self._charge(host, bill, now)
        bill.plan = plan = self._plan(host, bill)
        if not plan.billed:
            self._close(host, bill, before=math.inf)
            bill.waker = bill.previous = bill.wake = None  # a wake waiting for this pause is seen anew

    def checkpoint(self) -> None:
        """Settle every host and record every open interval that grew since it was last recorded."""
        for host, bill in list(self._bills.items()):
            self.settle(host)
            for interval in bill.open.values():
                if interval.seconds > interval.recorded_seconds:
                    self._record(host, interval)

    def _charge(self, host: Host, bill: _Bill, now: float) -> None:
        start, bill.since = bill.since, now
        plan = bill.plan
        if not plan.billed or now <= start:
            return
        bill.seconds += now - start
        if plan.leases or plan.others:
            self._close(host, bill, before=start - MERGE_SECONDS)
            share = (now - start) / (len(plan.leases) + plan.others)
            for lease in plan.leases:
                lease.gpu_seconds += share
            return
        if not self.attributes():
            return
        assert plan.early is not None and plan.late is not None
        if now <= plan.deadline or plan.early == plan.late:
            self._extend(host, bill, plan.early, start, now)
        elif start >= plan.deadline:
            self._extend(host, bill, plan.late, start, now)
        else:  # the deadline passed in between: the reserving owner up to it, the late one after
            self._extend(host, bill, plan.early, start, plan.deadline)
            self._extend(host, bill, plan.late, plan.deadline, now)

    def _extend(self, host: Host, bill: _Bill, owner: Owner, start: float, end: float) -> None:
        if end <= start:
            return
        interval = bill.open.get(owner)
        if interval is None or interval.end < start:  # another owner's time came between
            self._close(host, bill, before=start - MERGE_SECONDS)
            interval = bill.open.get(owner)
            if interval is None:
                interval = bill.open[owner] = _Open(owner, start, start)
        interval.seconds += end - start
        interval.end = end

    def _close(self, host: Host, bill: _Bill, *, before: float) -> None:
        """End the host's intervals that started before `before`, recording what they grew by."""
        for owner, interval in list(bill.open.items()):
            if interval.start < before:
                if interval.seconds > interval.recorded_seconds:
                    self._record(host, interval)
                del bill.open[owner]

    def _record(self, host: Host, interval: _Open) -> None:
        if self._epoch is None:
            self._epoch = self.wall() - self.clock()
        micro = round(interval.seconds * host.cost_per_hour * MICRO / 3600)
        self.recorder.interval(
            IntervalRecord(
                host=host.name,
                start=self._epoch + interval.start,
                end=self._epoch + interval.end,
                reason=interval.owner.reason,
                key=interval.owner.key,
                gpu_seconds=interval.seconds,
                cost_micro=micro,
                added_seconds=interval.seconds - interval.recorded_seconds,
                added_micro=micro - interval.recorded_micro,
            )
        )
        interval.recorded_seconds, interval.recorded_micro = interval.seconds, micro

    # -- who owns the time -------------------------------------------------------------------------

    def _plan(self, host: Host, bill: _Bill) -> _Plan:
        if not _billed(host, bill.plan.billed):
            return _Plan()
        leases = tuple(self.leases_of(host))
        if leases or host.others:
            return _Plan(billed=True, leases=leases, others=host.others)
        if host.wake is not None and host.wake is not bill.wake:
            bill.wake, bill.previous = host.wake, bill.waker
            bill.waker = _waker(host.wake.by, admin=host.wake.admin)
        if host.pause_failing:
            return _always(Owner(Reason.PAUSE_RETRY, None))
        if host.paused_by is not None:  # an admin's pause or emergency-off, until the cloud says paused
            return _always(Owner(Reason.ADMIN, host.paused_by))
        if host.pausing is not None and host.state is not ST.FAILED:
            # An idle pause under way is its reserving owner's, even when a new wake already waits for it.
            return _always(self._late(host, bill.previous if host.wake is not None else bill.waker))
        woken_by = bill.waker or Owner(Reason.FOUND, None)
        if host.wake is not None or host.state in WAKING or host.state is ST.FAILED:
            return _always(woken_by)
        early = self._early(host, woken_by)
        late = early if early.key is None else Owner(Reason.DRAIN, early.key)
        if host.protected or host.always_on:
            late = Owner(Reason.PROTECTED, None)
        return _Plan(billed=True, early=early, deadline=host.idle_deadline, late=late)

    @staticmethod
    def _early(host: Host, woken_by: Owner) -> Owner:
        """Who owns the host's idle time before its deadline."""
        if host.reserved_key is not None:
            return Owner(Reason.RESERVE, host.reserved_key)
        if woken_by.key is not None:
            return Owner(Reason.FALLBACK, woken_by.key)
        return woken_by

    def _late(self, host: Host, woken_by: Owner | None) -> Owner:
        """Who owns the host's idle time after its deadline, and its idle pause."""
        early = self._early(host, woken_by or Owner(Reason.FOUND, None))
        return early if early.key is None else Owner(Reason.DRAIN, early.key)

    # -- reading -----------------------------------------------------------------------------------

    def billed_seconds(self, host: Host) -> float:
        """The host's billed time so far, the stretch since its last settle included."""
        bill = self._bills.get(host)
        if bill is None:
            return 0.0
        extra = max(0.0, self.clock() - bill.since) if bill.plan.billed else 0.0
        return bill.seconds + extra

    def known_seconds(self, host: Host) -> float:
        """How long gpumanager has known the host: always-on would have billed all of it."""
        bill = self._bills.get(host)
        return 0.0 if bill is None else max(0.0, self.clock() - bill.known_since)


def _billed(host: Host, was: bool) -> bool:
    """Whether the cloud bills `host` now; `was`: whether it did at the last settle."""
    if host.always_on or host.state in (ST.RESUMING, ST.STARTING, ST.READY):
        return True
    if host.state is ST.PAUSING:
        return was  # paused hosts that emergency-off pauses again are not billed meanwhile
    if host.state is ST.FAILED:  # until the pause after the failed wake is done
        return was and (host.wake is not None or host.pausing is not None)
    return False


def _waker(key: str | None, *, admin: bool) -> Owner:
    if key is None:
        return Owner(Reason.FOUND, None)
    return Owner(Reason.ADMIN if admin else Reason.WAKE, key)


def _always(owner: Owner) -> _Plan:
    return _Plan(billed=True, early=owner, deadline=0.0, late=owner)

"""The hosts at run time: which host serves a request, slots and leases, the wait queue.

A request is admitted with `admit()`: it gets a `Lease` at once (the fast path, no await), or a
`Waiter` in the fair queue (after any wake the policy asked for was started), or a `ClientError`.
`wait()` then waits for the waiter's lease. A lease is released whatever happens (response end,
client gone, upstream failure); each release hands free slots to waiters in fair order.
Waking, pausing and the background loops live in `lifecycle.py`; the fleet starts a wake only
through the `Waker` it is given, and never waits for one itself.

Owns: the hosts' leases, `Host.leases`, idle deadlines and reservations, the wait queue, the
emergency flag, and the hosts' billing meters (`billing.py`), which it settles after each change of
leases or deadlines. Calls: the pure `scheduler.choose()`, and `Waker.start_wake`. Every method runs on
the event loop's one thread and none awaits except `wait()`, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio

from gpumanager.billing import Billing
from gpumanager.config import Config, HostConfig
from gpumanager.errors import (
    BudgetSpent,
    ClientError,
    FleetBudgetSpent,
    ModelNotFound,
    NoCapacity,
    TooManyRequests,
    WakeTimeout,
)
from gpumanager.events import HostStateChanged, NoPublisher, Publisher
from gpumanager.hosts import AWAKE, WAKING, Host, HostEvent, HostState
from gpumanager.models import model_names
from gpumanager.pace import Pace
from gpumanager.recorder import Recorder
from gpumanager.scheduler import Ask, FairQueue, HostView, Reject, Snapshot, Use, Waiter, Wake, choose, reserve


class Waker(Protocol):
    """Starts the wake of `host`, or joins the one in progress (single flight), and returns at once;
    the wake then runs on its own. `model` is what the waiting requests need the host to list; `by`
    is the key whose request starts it (it pays for the wake)."""

    def start_wake(self, host: Host, model: str | None = None, *, by: str | None = None) -> object: ...


class Shared(Protocol):
    """What several replicas of one fleet must agree on (DESIGN.md §12). One process has `Alone`;
    with `[cluster] redis_url`, `cluster.RedisShared` keeps it in Redis. The fleet and the lifecycle
    see only this, so their policy is the same either way."""

    @property
    def alone(self) -> bool:
        """No other replica: nothing to coordinate."""
        ...

    @property
    def leader(self) -> bool:
        """This replica runs the idle pauses, reconcile's fixes and webhooks, and records the
        hosts' non-serving time."""
        ...

    async def take(self, lease: Lease) -> bool:
        """Count `lease` against its host's slots across replicas: False when another replica took
        the last one meanwhile."""
        ...

    def released(self, lease: Lease) -> None: ...

    def touched(self, host: Host, key: str | None, window: float) -> None:
        """A request of `key` ended on `host`: it is kept `window` seconds more, for every replica."""
        ...

    async def claim_wake(self, host: Host) -> bool:
        """True: this replica makes the wake's resume call; False: another one does (or did)."""
        ...

    def wake_over(self, host: Host) -> None: ...

    async def drain(self, host: Host) -> None:
        """No replica takes a new slot of `host` (it is about to pause) until `drained`."""
        ...

    def drained(self, host: Host) -> None: ...

    def protected(self, host: Host, protected: bool) -> None: ...

    def wakes_refused(self) -> str:
        """Why no host may be woken now ("" when they may)."""
        ...

    def job_started(self, job_id: str, key: str, host: Host) -> None:
        """A RunPod job of `key` was submitted through this replica: others may be asked about it."""
        ...

    async def job_owner(self, job_id: str) -> tuple[str, str] | None:
        """(key, host name) of a job submitted through another replica, if one was."""
        ...

    async def adopt_job(self, job_id: str) -> bool:
        """Whether this replica may watch a running job of the ledger (no other replica watches it)."""
        ...

    def job_ended(self, job_id: str) -> None: ...


class Alone:
    """One process: every slot, wake and pause is this process's own."""

    alone = True
    leader = True

    async def take(self, lease: Lease) -> bool:
        return True

    def released(self, lease: Lease) -> None:
        pass

    def touched(self, host: Host, key: str | None, window: float) -> None:
        pass

    async def claim_wake(self, host: Host) -> bool:
        return True

    def wake_over(self, host: Host) -> None:
        pass

    async def drain(self, host: Host) -> None:
        pass

    def drained(self, host: Host) -> None:
        pass

    def protected(self, host: Host, protected: bool) -> None:
        pass

    def wakes_refused(self) -> str:
        return ""

    def job_started(self, job_id: str, key: str, host: Host) -> None:
        pass

    async def job_owner(self, job_id: str) -> tuple[str, str] | None:
        return None

    async def adopt_job(self, job_id: str) -> bool:
        return True

    def job_ended(self, job_id: str) -> None:
        pass


class _NoWaker:
    """Until a waker is wired in, a wake the policy asks for is a bug: say so loudly."""

    def start_wake(self, host: Host, model: str | None = None, *, by: str | None = None) -> object:
        raise RuntimeError(f"the fleet has no waker to wake {host.name}")


class Lease:
    """One slot of one host, held by one request until `release()` (idempotent)."""

    __slots__ = ("aborted", "counted", "fleet", "gpu_seconds", "host", "job", "key", "on_abort", "released", "scope")

    def __init__(self, fleet: Fleet, host: Host, key: str, *, counted: bool = True, job: bool = False) -> None:
        self.fleet, self.host, self.key, self.counted, self.job = fleet, host, key, counted, job
        self.released = False
        self.scope: anyio.CancelScope | None = None  # set by the proxy while it streams
        self.on_abort: Callable[[Lease], None] | None = None  # a job's: cancel it where it runs
        self.aborted = ""
        # Its share of the host's serving time: each second is split equally among the requests
        # in flight then (DESIGN §10, `billing.py`), so a lone request pays the whole GPU.
        self.gpu_seconds = 0.0

    @property
    def cost_micro(self) -> int:
        """Its serving share of the host's price, in micro-dollars."""
        return round(self.gpu_seconds * self.host.cost_per_hour * 1_000_000 / 3600)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.fleet._release(self)

    def abort(self, reason: str) -> None:
        """End the request holding this lease (emergency-off): the proxy reports `reason` in-band."""
        self.aborted = reason
        if self.scope is not None:
            self.scope.cancel()
        if self.on_abort is not None:
            self.on_abort(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Fleet:
    def __init__(
        self,
        config: Config,
        *,
        waker: Waker | None = None,
        recorder: Recorder | None = None,
        events: Publisher | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.waker: Waker = waker or _NoWaker()
        self.shared: Shared = Alone()  # the other replicas, if any (`cluster.py`)
        self.hosts: dict[str, Host] = {}
        self.overrides: dict[str, HostConfig] = {h.name: h for h in config.hosts if h.url is None}
        self._by_model: dict[str, list[Host]] = {}
        self.queue = FairQueue()
        self._held: Counter[str] = Counter()
        self._leases: dict[Host, set[Lease]] = {}
        self.billing = Billing(self.leases_of, recorder=recorder, clock=clock)
        self.events: Publisher = events or NoPublisher()  # the event bus
        self.pace = Pace()  # recent service and wake times, for cost-aware scale-up
        self._startup: dict[str, float] = {}  # provider -> its startup_timeout_seconds
        self.emergency = False
        self.capped: FleetBudgetSpent | None = None  # the fleet's spend cap is reached (budget.py)
        self._changed: anyio.Event | None = None

    @property
    def changed(self) -> anyio.Event:
        """Set when leases or deadlines change (the idle loop and draining pauses wait on it)."""
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    # -- hosts -------------------------------------------------------------------------------------

    def add(self, host: Host) -> None:
        self.hosts[host.name] = host
        self._leases.setdefault(host, set())
        self.billing.add(host)
        host.on_change = self._state_changed
        self.reindex()

    def remove(self, host: Host) -> None:
        self.billing.remove(host)
        host.on_change = None
        self.hosts.pop(host.name, None)
        self._leases.pop(host, None)
        self.reindex()

    def reindex(self) -> None:
        """Rebuild model -> hosts after any change of a host's models (rare: not on the request path)."""
        index: dict[str, list[Host]] = {}
        for host in self.hosts.values():
            for model in host.models:
                index.setdefault(model, []).append(host)
        self._by_model = index
        self.dispatch()

    def _state_changed(self, host: Host, old: HostState, event: HostEvent) -> None:
        self.billing.settle(host)
        if host.state is not old:
            self.events.publish(HostStateChanged(host=host.name, old=str(old), new=str(host.state), reason=str(event)))

    def find(self, ident: str) -> Host | None:
        """A host by name or by its provider's id."""
        return self.hosts.get(ident) or next((h for h in self.hosts.values() if h.id == ident), None)

    def candidates(self, model: str) -> list[Host]:
        for name in model_names(model):
            hosts = self._by_model.get(name)
            if hosts:
                return hosts
        return []

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def leases_of(self, host: Host) -> set[Lease]:
        return self._leases.get(host, set())

    def all_leases(self) -> list[Lease]:
        return [lease for leases in self._leases.values() for lease in leases]

    def busy(self, host: Host) -> bool:
        """Whether any request runs on `host`, through this replica or another."""
        return bool(self._leases.get(host)) or host.others > 0

    def lease_count(self) -> int:
        """Open leases of the whole fleet (admin holds included): the requests still running. Jobs
        that RunPod took are not requests of this process (they run on across a restart); a job's
        submission still waiting for RunPod's answer is."""
        return sum(1 for leases in self._leases.values() for lease in leases if not lease.job or not lease.on_abort)

    # -- admission ---------------------------------------------------------------------------------

    def admit(self, ask: Ask) -> Lease | Waiter:
        """A lease, or a place in the queue, or the `ClientError` that refuses the request. A key
        has at most its `max_concurrent` (else `[scheduler] max_per_key`) running or waiting."""
        limit = ask.max_concurrent or self.config.scheduler.max_per_key
        if limit and self._held[ask.key] + self.queue.count_key(ask.key) >= limit:
            setting = "max_concurrent" if ask.max_concurrent else "max_per_key"
            message = f"this key already has {limit} requests running or waiting ({setting})"
            raise TooManyRequests(message, retry_after=5)
        decision = choose(self._snapshot(ask, queued=self.queue.count_model(ask.model) if self.queue else 0), ask)
        if type(decision) is Use:
            return self._grant(self.hosts[decision.host], ask.key)
        if type(decision) is Reject:
            raise _rejection(decision, ask, self.capped)
        max_queue = self.config.scheduler.max_queue
        if max_queue and len(self.queue) >= max_queue:
            raise TooManyRequests(f"the wait queue is full ({max_queue} requests waiting)", retry_after=10)
        now = self.clock()
        waiter = Waiter(ask, now, anyio.Event(), since=now)
        waiter.waking = {h.name for h in self.candidates(ask.model) if h.state in WAKING}
        if type(decision) is Wake:
            self._start_wake(decision.host, waiter)
        self.queue.push(waiter)
        return waiter

    async def wait(self, waiter: Waiter, patience: float | None = None) -> Lease | None:
        """The waiter's lease, or None if `patience` ran out first (it stays queued), or the error
        that ended its wait. A cancelled wait leaves the queue at once (or frees a lease just granted)."""
        try:
            started = self.clock()
            while not waiter.ready.is_set():  # type: ignore[attr-defined]
                limit = self._deadline(waiter) - self.clock()
                if limit <= 0:
                    self.queue.remove(waiter)
                    raise self._timeout_error(waiter)
                if patience is not None:
                    limit = min(limit, started + patience - self.clock())
                    if limit <= 0:
                        return None
                with anyio.move_on_after(limit):
                    await waiter.ready.wait()  # type: ignore[attr-defined]
        except BaseException:
            self.abandon(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert isinstance(waiter.lease, Lease)
        return waiter.lease

    async def take(self, lease: Lease) -> bool:
        """Take `lease`'s slot across replicas (at once in one process). False: another replica took
        the host's last slot meanwhile; the lease is given back (it reserves nothing), and the
        request asks again."""
        if await self.shared.take(lease):
            return True
        lease.aborted = "its slot was taken through another replica"
        lease.release()
        return False

    def fail_waiters(self, error: ClientError) -> None:
        """End every wait in the queue with `error` (a shutdown)."""
        for waiter in list(self.queue):
            self.queue.remove(waiter)
            waiter.error = error
            waiter.ready.set()  # type: ignore[attr-defined]

    def abandon(self, waiter: Waiter) -> None:
        """The request behind `waiter` is gone: leave the queue, or free the lease it was just handed."""
        if not self.queue.remove(waiter) and isinstance(waiter.lease, Lease):
            waiter.lease.release()

    def _deadline(self, waiter: Waiter) -> float:
        """A waiter waits for as long as a wake it waits on runs, then `queue_timeout_seconds` for a slot."""
        deadline = waiter.since + self.config.timing.queue_timeout_seconds
        for name in waiter.waking:
            host = self.hosts.get(name)
            if host is not None and host.wake is not None:
                deadline = max(deadline, host.wake.deadline)
        return deadline

    def wake_ended(self, host: Host) -> None:
        """The slot clock of the requests that waited for this wake starts now: a long cold start
        must not use up their time for a slot."""
        now = self.clock()
        for waiter in self.queue:
            if host.name in waiter.waking:
                waiter.since = max(waiter.since, now)
        self.billing.settle(host)

    def _timeout_error(self, waiter: Waiter) -> ClientError:
        seconds = self.clock() - waiter.enqueued
        return NoCapacity(
            f"no free slot for model '{waiter.ask.model}' within {seconds:.0f}s; try again later", retry_after=30
        )

    def hold(self, host: Host, key: str, *, job: bool = False) -> Lease:
        """A lease outside the slot count: an admin's operation on one host (pull, delete...), or a
        `job` queued or running on a RunPod endpoint (RunPod queues jobs: they take no slot), whose
        end reserves the host for its key as a request's does."""
        lease = Lease(self, host, key, counted=False, job=job)
        self._leases.setdefault(host, set()).add(lease)
        self.billing.settle(host)
        return lease

    def _grant(self, host: Host, key: str) -> Lease:
        lease = Lease(self, host, key)
        host.leases += 1
        self._held[key] += 1
        self._leases.setdefault(host, set()).add(lease)
        self.billing.settle(host)
        return lease

    def _release(self, lease: Lease) -> None:
        host = lease.host
        self._leases.get(host, set()).discard(lease)
        if lease.counted:
            self.shared.released(lease)
            host.leases -= 1
            self._held[lease.key] -= 1
            if not self._held[lease.key]:
                del self._held[lease.key]
            if not lease.aborted:  # a request ended by a pause does not reserve the host being paused
                self.touch(host, lease.key)
        elif lease.job and not lease.aborted:
            self.touch(host, lease.key)
        self.billing.settle(host)
        self.dispatch()
        if not self._leases.get(host):
            self.notify()

    def touch(self, host: Host, key: str | None) -> None:
        """A request ended on `host`: its idle deadline moves to now + reservation, reserved for `key`."""
        now, window = self.clock(), self.config.timing.reservation_minutes * 60
        host.idle_deadline = reserve(host.idle_deadline, now, window)
        if key is not None:
            host.reserved_key = key
            host.recent_keys[key] = now
        self.shared.touched(host, key, window)

    def notify(self) -> None:
        """Wake whoever waits on `changed` (the idle loop, draining pauses); later waits use a fresh event."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    # -- the queue ---------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand free slots to waiters in fair order; start wakes the policy asks for on the way."""
        progress = True
        while progress and self.queue:
            progress = False
            blocked: set[str] = set()
            for waiter in self.queue:
                ask = waiter.ask
                if ask.model in blocked:
                    continue
                decision = choose(self._snapshot(ask, queued=self.queue.count_model(ask.model) - 1), ask)
                if type(decision) is Use:
                    self.queue.remove(waiter)
                    self.queue.served(ask.key)
                    waiter.lease = self._grant(self.hosts[decision.host], ask.key)
                elif type(decision) is Reject:
                    self.queue.remove(waiter)
                    waiter.error = self._wake_error(waiter) or _rejection(decision, ask, self.capped)
                else:
                    if type(decision) is Wake:
                        self._start_wake(decision.host, waiter)
                    blocked.add(ask.model)
                    continue
                waiter.ready.set()  # type: ignore[attr-defined]
                progress = True
                break  # the queue changed: iterate afresh

    def _wake_error(self, waiter: Waiter) -> ClientError | None:
        failed = [self.hosts[n] for n in waiter.waking if n in self.hosts and self.hosts[n].state is HostState.FAILED]
        if not failed:
            return None
        host = failed[0]
        return WakeTimeout(f"host {host.name} did not become ready: {host.last_error or 'wake failed'}")

    def _start_wake(self, name: str, waiter: Waiter) -> None:
        waiter.waking.add(name)
        self.waker.start_wake(self.hosts[name], waiter.ask.model, by=waiter.ask.key)

    def _snapshot(self, ask: Ask, *, queued: int) -> Snapshot:
        now = self.clock()
        names = model_names(ask.model)
        spare = self.config.budget.spare_protected
        views = tuple(_view(h, names, ask.num_ctx, spare, self.cold_start(h)) for h in self.candidates(ask.model))
        sched = self.config.scheduler
        awake = (
            sum(1 for h in self.hosts.values() if h.state in AWAKE and not h.always_on) if sched.max_awake_hosts else 0
        )
        return Snapshot(
            views,
            now,
            queued=queued,
            awake=awake,
            max_awake=sched.max_awake_hosts,
            scale_up_depth=sched.scale_up_queue_depth,
            scale_up=sched.scale_up,
            service_seconds=self.pace.service_seconds(ask.model) if sched.scale_up == "expected_wait" else None,
            emergency=self.emergency,
            capped=self.capped.message if self.capped is not None else "",
            no_wakes=self.shared.wakes_refused(),
        )

    def reserved_until(self, host: Host) -> str | None:
        """When `host` will be paused if nothing else comes after the request now on it ends (RFC
        3339, UTC), when that is within `pause_warning_minutes`; else None (and for hosts never
        paused for idleness)."""
        if host.always_on or host.protected:
            return None
        timing, now = self.config.timing, self.clock()
        left = reserve(host.idle_deadline, now, timing.reservation_minutes * 60) - now
        if left > timing.pause_warning_minutes * 60:
            return None
        return datetime.fromtimestamp(time.time() + left, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def cold_start(self, host: Host) -> float:
        """How long a wake of `host` takes: the median of its recent wakes; before any, a quarter of
        its `startup_timeout_seconds`."""
        measured = self.pace.cold_start_seconds(host.name)
        if measured is not None:
            return measured
        startup = self._startup.get(host.provider)
        if startup is None:
            startup = self._startup[host.provider] = self.config.host_timing(host.provider).startup_timeout_seconds
        return startup / 4

    def protect(self, host: Host, protected: bool, *, share: bool = True) -> None:
        """A protected host is never paused for idleness (an admin's choice, told to every replica
        unless it came from one)."""
        host.protected = protected
        if share:
            self.shared.protected(host, protected)
        self.billing.settle(host)
        self.notify()


def _view(host: Host, names: Iterable[str], num_ctx: int | None, spare_protected: bool, cold_start: float) -> HostView:
    ctx: Any = None
    loaded = False
    for name in names:
        if name in host.loaded:
            loaded, ctx = True, host.loaded[name]
            break
    return HostView(
        host.name,
        host.state,
        host.healthy,
        host.draining,
        host.leases + host.others,
        host.slots,
        host.cost_per_hour,
        loaded,
        num_ctx is None or ctx is None or ctx == num_ctx,
        host.reserved_key,
        host.idle_deadline,
        host.always_on,
        host.always_on or (host.protected and spare_protected),
        cold_start,
    )


def _rejection(decision: Reject, ask: Ask, capped: FleetBudgetSpent | None) -> ClientError:
    if decision.status == 404:
        return ModelNotFound(f"model '{ask.model}' not found on any host")
    if decision.status == 429:
        return BudgetSpent(decision.reason)
    if capped is not None and decision.reason == capped.message:
        return capped
    return NoCapacity(decision.reason, retry_after=30)

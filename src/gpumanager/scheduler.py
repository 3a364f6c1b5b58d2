"""Choosing a host: the pure policy `choose()` and the fair wait queue.

`choose(snapshot, ask)` decides from a snapshot of the candidate hosts, with no I/O and no logging:

1. `ready` hosts with a free slot: the host this key is reserved on, then the model already loaded
   (with the same `num_ctx` when the request names one), then the lowest `leases/slots`, then the
   lowest `cost_per_hour`. A host reserved for another key is taken only when no other has a slot.
2. A candidate is waking, or every awake candidate is full: `Wait`, and `Wake` the cheapest paused
   candidate too when scaling up pays (`scale_up`): with "expected_wait", when the expected wait for
   a slot ((requests queued ahead + 1) x the model's mean service time / the awake slots) is longer
   than that host's cold start; with "queue_depth", or before the model has a measured service
   time, when the model's queue is at least `scale_up_queue_depth` deep.
3. Otherwise wake the cheapest paused candidate, unless `max_awake_hosts` are awake (wait),
   emergency-off is on (503), or the key's budget cannot pay for a cold start (`Ask.no_wake`: 429).
4. No host has the model: 404.
Past the fleet's spend cap (`Snapshot.capped`) only static hosts (and protected ones, if spared)
serve, and nothing is woken: 503 when none of them has the model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from gpumanager.hosts import WAKEABLE, WAKING, HostState


class HostView(msgspec.Struct, frozen=True):
    """What the policy may know of one candidate host."""

    name: str
    state: HostState
    healthy: bool
    draining: bool
    leases: int
    slots: int
    cost: float
    loaded: bool  # the requested model is in VRAM
    ctx_match: bool  # ... with the requested num_ctx (or none was asked)
    reserved_key: str | None
    reserved_until: float
    always_on: bool = False
    spared: bool = False  # serves past the fleet's spend cap (static, or protected and spared)
    cold_start: float = 0.0  # seconds its wake takes (recent median, or an estimate)


class Snapshot(msgspec.Struct, frozen=True):
    hosts: tuple[HostView, ...]  # the hosts that have the model
    now: float
    queued: int = 0  # requests already waiting for this model
    awake: int = 0  # hosts awake in the whole fleet
    max_awake: int = 0  # 0 = no limit
    scale_up_depth: int = 8
    scale_up: str = "queue_depth"  # or "expected_wait"
    service_seconds: float | None = None  # the model's recent mean service time (None: none measured)
    emergency: bool = False
    capped: str = ""  # the fleet's spend cap is reached: why, for the 503
    no_wakes: str = ""  # no host may be woken now (the replicas' Redis is unreachable): why, for the 503


class Ask(msgspec.Struct, frozen=True):
    model: str
    key: str
    num_ctx: int | None = None
    no_wake: str = ""  # this request may not wake a host: why (its key's budget), for the 429
    max_concurrent: int | None = None  # its key's own limit of requests running or waiting


class Use(msgspec.Struct, frozen=True):
    host: str


class Wait(msgspec.Struct, frozen=True):
    reason: str


class Wake(msgspec.Struct, frozen=True):
    host: str


class Reject(msgspec.Struct, frozen=True):
    status: int  # 404 unknown model, 429 may not wake, 503 no capacity
    reason: str


Decision = Use | Wait | Wake | Reject


def choose(snapshot: Snapshot, ask: Ask) -> Decision:
    if not snapshot.hosts:
        return Reject(404, f"model '{ask.model}' not found")
    candidates = [h for h in snapshot.hosts if h.state is not HostState.FAILED]
    if snapshot.capped:
        candidates = [h for h in candidates if h.spared]
        if not candidates:
            return Reject(503, snapshot.capped)
    if not candidates:
        return Reject(503, f"every host with model '{ask.model}' failed to wake; try again later")
    ready = [h for h in candidates if h.state is HostState.READY and h.healthy and not h.draining]
    free = [h for h in ready if h.leases < h.slots]
    if free:
        return Use(min(free, key=lambda h: _preference(h, ask, snapshot.now)).name)
    # A draining host is about to pause: like a pausing one, it can be woken again once paused.
    asleep = sorted(
        (h for h in candidates if (h.state in WAKEABLE or h.draining) and not h.always_on),
        key=lambda h: (h.cost, h.draining or h.state is HostState.PAUSING, not h.loaded, h.name),
    )
    may_wake = not (snapshot.emergency or snapshot.no_wakes) and (
        snapshot.max_awake == 0 or snapshot.awake < snapshot.max_awake
    )
    if ready or any(h.state in WAKING for h in candidates):
        if asleep and may_wake and not ask.no_wake and scale_up_pays(snapshot, candidates, asleep[0]):
            return Wake(asleep[0].name)
        return Wait("every host with the model is busy or waking")
    if asleep:
        if snapshot.emergency:
            return Reject(503, "emergency-off is on: no host is woken until an admin turns it off")
        if snapshot.no_wakes:
            return Reject(503, snapshot.no_wakes)
        if ask.no_wake:
            return Reject(429, ask.no_wake)
        if not may_wake:
            return Wait(f"{snapshot.max_awake} hosts are awake (max_awake_hosts); waiting for one to pause")
        return Wake(asleep[0].name)
    return Reject(503, f"no host with model '{ask.model}' is answering now")


def expected_wait(snapshot: Snapshot, candidates: list[HostView]) -> float | None:
    """Seconds until a slot is likely free for one more request of the model: (the requests queued
    ahead + this one) x the model's mean service time / the slots of its awake (or waking) hosts."""
    if snapshot.service_seconds is None:
        return None
    slots = sum(h.slots for h in candidates if (h.state is HostState.READY and not h.draining) or h.state in WAKING)
    return (snapshot.queued + 1) * snapshot.service_seconds / max(1, slots)


def scale_up_pays(snapshot: Snapshot, candidates: list[HostView], asleep: HostView) -> bool:
    """Whether to wake `asleep` while the model's awake hosts are busy (or waking)."""
    if snapshot.scale_up == "expected_wait":
        wait = expected_wait(snapshot, candidates)
        if wait is not None:
            return wait > asleep.cold_start
    return snapshot.queued >= snapshot.scale_up_depth


# -- the idle rules (the lifecycle's idle loop, and `gpumanager simulate`) ---------------------------


def reserve(deadline: float, now: float, window_seconds: float) -> float:
    """A host's idle deadline after a request ended on it (or a wake made it ready) at `now`."""
    return max(deadline, now + window_seconds)


def pause_at(
    state: HostState, *, always_on: bool, protected: bool, pausing: bool, leases: int, deadline: float
) -> float | None:
    """When a host is to be paused for idleness: at its deadline, if it is ready, idle, neither
    static nor protected, and not pausing already; else never (None)."""
    if state is not HostState.READY or always_on or protected or pausing or leases:
        return None
    return deadline


def _preference(h: HostView, ask: Ask, now: float) -> tuple[int, int, float, float, str]:
    reserved = h.reserved_key is not None and now < h.reserved_until
    owner = 0 if reserved and h.reserved_key == ask.key else (2 if reserved else 1)
    affinity = 0 if h.loaded and h.ctx_match else (1 if h.loaded else 2)
    return owner, affinity, h.leases / h.slots, h.cost, h.name


# -- the wait queue --------------------------------------------------------------------------------


@dataclass(eq=False)
class Waiter:
    """A request waiting for a slot. The fleet hands it a lease, or an error, and sets `ready`."""

    ask: Ask
    enqueued: float
    ready: object  # anyio.Event; typed loosely so this module stays free of anyio
    since: float = 0.0  # the queue timeout counts from here: arrival, or the end of the wake it waited for
    lease: object | None = None
    error: Exception | None = None
    waking: set[str] = field(default_factory=set)  # hosts whose wake this request waits for


class FairQueue:
    """Round-robin across keys, FIFO within a key. Iteration yields waiters in the order to serve."""

    def __init__(self) -> None:
        self._by_key: dict[str, deque[Waiter]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, waiter: Waiter) -> None:
        self._by_key.setdefault(waiter.ask.key, deque()).append(waiter)
        self._size += 1

    def remove(self, waiter: Waiter) -> bool:
        queue = self._by_key.get(waiter.ask.key)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self._size -= 1
        if not queue:
            del self._by_key[waiter.ask.key]
        return True

    def served(self, key: str) -> None:
        """Move a key that was just served to the back of the rotation."""
        queue = self._by_key.pop(key, None)
        if queue:
            self._by_key[key] = queue

    def __iter__(self) -> Iterator[Waiter]:
        """Fair order: the first waiter of each key, then the second of each, and so on."""
        queues = list(self._by_key.values())
        depth = max((len(q) for q in queues), default=0)
        for i in range(depth):
            for queue in queues:
                if i < len(queue):
                    yield queue[i]

    def count_key(self, key: str) -> int:
        queue = self._by_key.get(key)
        return len(queue) if queue else 0

    def count_model(self, model: str) -> int:
        return sum(1 for q in self._by_key.values() for w in q if w.ask.model == model)

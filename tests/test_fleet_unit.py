"""Unit tests of `Fleet`: admission, the fair queue, release, dispatch and deadlines.

No server and no waiting: the fleet runs on a virtual clock, and its one seam to the lifecycle,
the `Waker`, is a recorder. Each test moves hosts through their states as a wake would.
"""

from __future__ import annotations

import anyio
import pytest

from gpumanager.config import Config, loads
from gpumanager.errors import ModelNotFound, NoCapacity, TooManyRequests, WakeTimeout
from gpumanager.fleet import Fleet, Lease
from gpumanager.hosts import Host, HostEvent, HostState, Wake
from gpumanager.scheduler import Ask, Waiter
from tests.virtual_time import VirtualTimeLoop

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


class RecordingWaker:
    def __init__(self) -> None:
        self.wakes: list[tuple[str, str | None]] = []
        self.by: list[str | None] = []  # the key each wake was started for

    def start_wake(self, host: Host, model: str | None = None, *, by: str | None = None) -> object:
        self.wakes.append((host.name, model))
        self.by.append(by)
        return None


def config(extra: str = "") -> Config:
    return loads("[timing]\nreservation_minutes = 10\nqueue_timeout_seconds = 300\n" + extra)


def host(name: str, *, state: HostState = HostState.READY, slots: int = 2, cost: float = 1.0) -> Host:
    h = Host(
        id=name,
        name=name,
        provider="mem",
        url=f"http://{name}.test",
        slots=slots,
        cost_per_hour=cost,
        models=frozenset({"llama3.2:latest"}),
    )
    path = {
        HostState.READY: (HostEvent.CLOUD_RUNNING, HostEvent.OLLAMA_READY),
        HostState.PAUSED: (HostEvent.CLOUD_PAUSED,),
    }[state]
    for event in path:
        h.apply(event)
    return h


def fleet_of(*hosts: Host, extra: str = "") -> tuple[Fleet, RecordingWaker]:
    waker = RecordingWaker()
    fleet = Fleet(config(extra), waker=waker)
    for h in hosts:
        fleet.add(h)
    return fleet, waker


def one_busy_slot() -> tuple[Fleet, Host, Lease, Waiter]:
    """A one-slot host whose slot key k1 holds, and key k2 waiting for it."""
    h = host("a", slots=1)
    fleet, _ = fleet_of(h)
    lease = fleet.admit(Ask("llama3.2", "k1"))
    waiter = fleet.admit(Ask("llama3.2", "k2"))
    assert isinstance(lease, Lease) and isinstance(waiter, Waiter)
    return fleet, h, lease, waiter


def wake(fleet: Fleet, h: Host) -> None:
    """What a successful wake does to the fleet's view of a host."""
    for event in (HostEvent.RESUME, HostEvent.CLOUD_RUNNING, HostEvent.OLLAMA_READY):
        h.apply(event)
    fleet.wake_ended(h)
    fleet.reindex()


async def test_a_free_slot_is_leased_at_once_and_release_sets_the_reservation() -> None:
    h = host("a")
    fleet, waker = fleet_of(h)
    lease = fleet.admit(Ask("llama3.2", "k1"))
    assert isinstance(lease, Lease) and lease.host is h and h.leases == 1
    now = anyio.current_time()
    lease.release()
    lease.release()  # idempotent
    assert h.leases == 0 and h.reserved_key == "k1"
    assert h.idle_deadline == pytest.approx(now + 600)
    assert waker.wakes == []


async def test_the_queue_is_fair_across_keys_and_fifo_within_a_key() -> None:
    h = host("a", slots=1)
    fleet, _ = fleet_of(h)
    first = fleet.admit(Ask("llama3.2", "busy"))
    assert isinstance(first, Lease)
    a1, a2 = fleet.admit(Ask("llama3.2", "a")), fleet.admit(Ask("llama3.2", "a"))
    b1 = fleet.admit(Ask("llama3.2", "b"))
    assert all(isinstance(w, Waiter) for w in (a1, a2, b1)) and len(fleet.queue) == 3
    served = []
    lease = first
    for _ in range(3):
        lease.release()
        waiter = next(w for w in (a1, a2, b1) if isinstance(w, Waiter) and w.lease is not None and w not in served)
        served.append(waiter)
        assert isinstance(waiter.lease, Lease)
        lease = waiter.lease
    assert served == [a1, b1, a2]
    lease.release()
    assert len(fleet.queue) == 0 and h.leases == 0


async def test_a_paused_host_is_woken_through_the_waker_and_its_waiters_served_when_ready() -> None:
    h = host("a", state=HostState.PAUSED)
    fleet, waker = fleet_of(h)
    waiter = fleet.admit(Ask("llama3.2", "k1"))
    assert isinstance(waiter, Waiter) and waiter.waking == {"a"}
    assert waker.wakes == [("a", "llama3.2")]
    async with anyio.create_task_group() as tg:
        got: list[Lease | None] = []

        async def wait() -> None:
            got.append(await fleet.wait(waiter))

        tg.start_soon(wait)
        await anyio.sleep(45)  # a cold start, on the virtual clock
        wake(fleet, h)
    assert got and got[0] is not None and got[0].host is h


async def test_limits_refuse_with_429_and_unknown_models_with_404() -> None:
    h = host("a", slots=1)
    fleet, _ = fleet_of(h, extra="[scheduler]\nmax_per_key = 2\nmax_queue = 2\n")
    assert isinstance(fleet.admit(Ask("llama3.2", "k1")), Lease)
    assert isinstance(fleet.admit(Ask("llama3.2", "k1")), Waiter)
    with pytest.raises(TooManyRequests, match="max_per_key"):
        fleet.admit(Ask("llama3.2", "k1"))
    assert isinstance(fleet.admit(Ask("llama3.2", "k2")), Waiter)
    with pytest.raises(TooManyRequests, match="queue is full"):
        fleet.admit(Ask("llama3.2", "k3"))
    with pytest.raises(ModelNotFound):
        fleet.admit(Ask("no-such-model", "k9"))


async def test_a_waiter_times_out_after_queue_timeout_and_leaves_the_queue() -> None:
    fleet, _, _, waiter = one_busy_slot()
    start = anyio.current_time()
    with pytest.raises(NoCapacity) as caught:
        await fleet.wait(waiter)
    assert anyio.current_time() - start == pytest.approx(300)
    assert caught.value.retry_after is not None and len(fleet.queue) == 0


async def test_patience_returns_none_and_keeps_the_place() -> None:
    fleet, _, lease, waiter = one_busy_slot()
    assert await fleet.wait(waiter, patience=10) is None
    assert len(fleet.queue) == 1
    lease.release()
    assert await fleet.wait(waiter, patience=10) is waiter.lease is not None


async def test_a_wake_extends_the_wait_and_its_end_restarts_the_slot_clock() -> None:
    h = host("a", state=HostState.PAUSED, slots=1)
    fleet, _ = fleet_of(h)
    waiter = fleet.admit(Ask("llama3.2", "k1"))
    assert isinstance(waiter, Waiter)
    h.wake = Wake(anyio.Event(), deadline=anyio.current_time() + 600, started=anyio.current_time())
    # Past queue_timeout_seconds (300 s), the wake's deadline (600 s) still holds the place.
    assert await fleet.wait(waiter, patience=500) is None
    assert len(fleet.queue) == 1
    h.wake = None
    fleet.wake_ended(h)  # the wake ended without a slot: 300 s more from now
    restarted = anyio.current_time()
    with pytest.raises(NoCapacity):
        await fleet.wait(waiter)
    assert anyio.current_time() - restarted == pytest.approx(300)


async def test_a_failed_wake_ends_its_waiters_with_504() -> None:
    h = host("a", state=HostState.PAUSED)
    fleet, _ = fleet_of(h)
    waiter = fleet.admit(Ask("llama3.2", "k1"))
    assert isinstance(waiter, Waiter)
    h.last_error = "no GPU free"
    h.apply(HostEvent.WAKE_FAILED)
    fleet.dispatch()
    with pytest.raises(WakeTimeout, match="no GPU free"):
        await fleet.wait(waiter)


async def test_a_cancelled_wait_leaves_the_queue_and_a_granted_lease_is_freed() -> None:
    fleet, h, lease, waiter = one_busy_slot()
    with anyio.move_on_after(1):  # the client left while it waited
        await fleet.wait(waiter)
    assert len(fleet.queue) == 0
    late = fleet.admit(Ask("llama3.2", "k3"))
    assert isinstance(late, Waiter)
    lease.release()  # hands the slot to `late`
    assert h.leases == 1
    fleet.abandon(late)  # ...whose client left: the slot is free again
    assert h.leases == 0


async def test_the_reserved_host_is_preferred_for_its_key_and_avoided_by_others() -> None:
    cheap, dear = host("cheap", cost=1.0), host("dear", cost=5.0)
    fleet, _ = fleet_of(cheap, dear)
    first = fleet.admit(Ask("llama3.2", "k1"))
    assert isinstance(first, Lease) and first.host is cheap  # cheapest, all else equal
    first.release()  # cheap is reserved for k1 now
    other = fleet.admit(Ask("llama3.2", "k2"))
    assert isinstance(other, Lease) and other.host is dear  # not the host reserved for k1
    other.release()  # dear is reserved for k2
    mine = fleet.admit(Ask("llama3.2", "k2"))
    assert isinstance(mine, Lease) and mine.host is dear  # its own, though dearer
    mine.release()
    await anyio.sleep(601)  # both reservations run out
    last = fleet.admit(Ask("llama3.2", "k2"))
    assert isinstance(last, Lease) and last.host is cheap


async def test_serving_time_is_split_equally_among_the_requests_in_flight() -> None:
    h = host("a", slots=3)
    h.cost_per_hour = 3.6  # 1,000 micro-dollars a second
    fleet, _ = fleet_of(h)
    first = fleet.admit(Ask("llama3.2", "k1"))
    assert isinstance(first, Lease)
    await anyio.sleep(10)  # alone: the whole GPU
    second = fleet.admit(Ask("llama3.2", "k2"))
    assert isinstance(second, Lease)
    await anyio.sleep(10)  # two in flight: half each
    first.release()
    await anyio.sleep(5)
    second.release()
    assert first.gpu_seconds == pytest.approx(15) and second.gpu_seconds == pytest.approx(10)
    assert first.cost_micro == 15_000 and second.cost_micro == 10_000  # 25 s of a $3.60/h host, to the cent

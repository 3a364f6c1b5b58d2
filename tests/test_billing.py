"""Who pays for each billed second (DESIGN.md §10), on an in-memory cloud that keeps its own bill,
on a virtual clock: exact owners for the simple cases, and conservation to the cent over a day."""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.errors import ProviderUnavailable, WakeFailed
from gpumanager.fleet import Lease
from gpumanager.hosts import Host, HostState
from gpumanager.recorder import IntervalRecord, NoopRecorder, RequestRecord
from gpumanager.scheduler import Ask
from tests.harness import async_wait_until
from tests.memory_cloud import Core, MemoryCloud, MemoryMachine, running_core
from tests.virtual_time import VirtualTimeLoop

pytestmark = pytest.mark.anyio

TIMING = """
[timing]
reservation_minutes = 10
fallback_reservation_minutes = 3
startup_timeout_seconds = 600
ollama_readiness_wait_seconds = 0.5
failed_cooldown_seconds = 120
queue_timeout_seconds = 900
pause_retry_seconds = 5
"""
PRICE = 3.6  # dollars an hour: 1,000 micro-dollars a second


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


until = functools.partial(async_wait_until, timeout=24 * 3600, interval=0.1)


@dataclass
class BilledCloud(MemoryCloud):
    """A cloud that bills as §10 says a cloud does: from each resume call until it first reports the
    machine paused (or from the start, for a machine found running). It can refuse pauses."""

    refuse_pauses: int = 0  # the next this many pause calls fail
    bills: dict[str, list[list[float]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, machine: MemoryMachine) -> MemoryMachine:
        if machine.running:
            self.bills[machine.name].append([anyio.current_time(), -1.0])
        return super().add(machine)

    def _billing(self, name: str) -> bool:
        return bool(self.bills[name]) and self.bills[name][-1][1] < 0

    async def resume(self, host_id: str) -> None:
        if not self._billing(host_id):
            self.bills[host_id].append([anyio.current_time(), -1.0])
        await super().resume(host_id)

    async def pause(self, host_id: str) -> None:
        if self.refuse_pauses:
            self.refuse_pauses -= 1
            self.calls.append(("pause", host_id))
            raise ProviderUnavailable("the cloud is down for maintenance", provider=self.name, host=host_id)
        await super().pause(host_id)

    def _info(self, m: MemoryMachine) -> HostInfo:
        info = super()._info(m)
        if info.state is CloudState.PAUSED and self._billing(m.name):
            self.bills[m.name][-1][1] = anyio.current_time()
        return info

    def billed_seconds(self, name: str) -> float:
        now = anyio.current_time()
        return sum((end if end >= 0 else now) - start for start, end in self.bills[name])


class Ledger(NoopRecorder):
    """The rows the ledger would keep: each interval's newest record (one row per host and start)."""

    def __init__(self) -> None:
        self.intervals: dict[tuple[str, float], IntervalRecord] = {}
        self.added_micro: dict[str | None, int] = defaultdict(int)  # what the metrics counters sum
        self.requests: list[RequestRecord] = []

    def interval(self, record: IntervalRecord) -> None:
        self.intervals[(record.host, record.start)] = record
        self.added_micro[record.key] += record.added_micro

    def rows(self, host: str) -> list[IntervalRecord]:
        return sorted((r for r in self.intervals.values() if r.host == host), key=lambda r: r.start)

    def owners(self, host: str) -> list[tuple[str, str | None, float]]:
        return [(r.reason, r.key, round(r.gpu_seconds, 3)) for r in self.rows(host)]


@dataclass
class Served:
    key: str
    host: str
    gpu_seconds: float
    cost_micro: int


@asynccontextmanager
async def billed_core(tmp_path: Path, *machines: MemoryMachine) -> AsyncIterator[tuple[Core[BilledCloud], Ledger]]:
    ledger = Ledger()
    async with running_core(tmp_path, TIMING, BilledCloud(), *machines, recorder=ledger) as c:
        for host in c.fleet.hosts.values():
            host.cost_per_hour = PRICE
        yield c, ledger


async def request(c: Core[BilledCloud], key: str, seconds: float, served: list[Served]) -> None:
    """One request of `key` that streams for `seconds` once it has a slot."""
    got = c.fleet.admit(Ask("llama3.2", key))
    lease = got if isinstance(got, Lease) else await c.fleet.wait(got)
    assert lease is not None
    try:
        await anyio.sleep(seconds)
    finally:
        lease.release()
        served.append(Served(key, lease.host.name, lease.gpu_seconds, lease.cost_micro))


async def all_paused(c: Core[BilledCloud]) -> None:
    await until(lambda: all(h.state is HostState.PAUSED and h.pausing is None for h in c.fleet.hosts.values()))


def assert_conserved(c: Core[BilledCloud], ledger: Ledger, served: list[Served], host: Host) -> None:
    """The cloud's bill of `host` = its requests' serving cost + its intervals' cost, to the cent;
    and the meter's billed time is the cloud's."""
    billed = c.cloud.billed_seconds(host.name)
    assert c.fleet.billing.billed_seconds(host) == pytest.approx(billed, abs=1e-6)
    serving = sum(s.cost_micro for s in served if s.host == host.name)
    intervals = sum(r.cost_micro for r in ledger.rows(host.name))
    assert abs(serving + intervals - billed * 1000) < 10_000  # micro-dollars: within a cent
    seconds = sum(s.gpu_seconds for s in served if s.host == host.name) + sum(
        r.gpu_seconds for r in ledger.rows(host.name)
    )
    assert seconds == pytest.approx(billed, abs=1e-6)


async def test_a_lone_request_pays_its_wake_its_stream_its_reservation_and_the_pause(tmp_path: Path) -> None:
    async with billed_core(tmp_path, MemoryMachine("gpu", boot_seconds=30, pause_seconds=5)) as (c, ledger):
        served: list[Served] = []
        await request(c, "k1", 20, served)
        await all_paused(c)
        wake, reserve, drain = ledger.owners("gpu")
        assert wake[:2] == ("wake", "k1") and 30 <= wake[2] <= 31.5  # boot, then a poll at most
        assert reserve == ("reserve", "k1", 600.0)  # reservation_minutes
        assert drain[:2] == ("drain", "k1") and 5 <= drain[2] <= 6.5  # the pause, then a poll at most
        assert [(s.key, s.gpu_seconds, s.cost_micro) for s in served] == [("k1", 20.0, 20_000)]
        assert_conserved(c, ledger, served, c.host("gpu"))


async def test_requests_in_flight_share_the_gpu_equally(tmp_path: Path) -> None:
    async with billed_core(tmp_path, MemoryMachine("gpu", running=True)) as (c, ledger):
        await anyio.sleep(100)  # found running: nobody asked for it
        await c.lifecycle.ensure_ready(c.host("gpu"))
        served: list[Served] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, c, "long", 40, served)
            tg.start_soon(request, c, "short", 10, served)
        cost = {s.key: (s.gpu_seconds, s.cost_micro) for s in served}
        assert cost == {"short": (5.0, 5_000), "long": (35.0, 35_000)}  # 10 s shared, 30 s alone
        # Found running: its time before anyone used it is nobody's; after, the last user reserves it.
        assert [o[:2] for o in ledger.owners("gpu")] == [("found", None)]
        await anyio.sleep(60)
        c.fleet.billing.checkpoint()
        assert [o[:2] for o in ledger.owners("gpu")] == [("found", None), ("reserve", "long")]


async def test_short_gaps_between_requests_are_not_a_row_each(tmp_path: Path) -> None:
    async with billed_core(tmp_path, MemoryMachine("gpu", running=True)) as (c, ledger):
        await c.lifecycle.ensure_ready(c.host("gpu"))
        served: list[Served] = []
        for i in range(60):  # ten minutes: a 5 s answer every 10 s, two keys taking turns
            await request(c, f"k{i % 2}", 5, served)
            await anyio.sleep(5)
        c.fleet.billing.checkpoint()
        rows = ledger.rows("gpu")
        assert {(r.reason, r.key) for r in rows} == {("reserve", "k0"), ("reserve", "k1")}
        assert len(rows) <= 2 * 11  # each key's gaps of a minute make one interval, not 30
        assert sum(r.gpu_seconds for r in rows) == pytest.approx(300)
        assert all(r.gpu_seconds <= r.end - r.start + 1e-6 for r in rows)
        assert_conserved(c, ledger, served, c.host("gpu"))


async def test_the_fallback_window_goes_to_the_key_whose_request_left_during_the_wake(tmp_path: Path) -> None:
    async with billed_core(tmp_path, MemoryMachine("gpu", boot_seconds=60, pause_seconds=5)) as (c, ledger):
        waiter = c.fleet.admit(Ask("llama3.2", "impatient"))
        assert not isinstance(waiter, Lease)
        with anyio.move_on_after(10):  # gives up; the wake goes on
            await c.fleet.wait(waiter)
        await all_paused(c)
        reasons = [o[:2] for o in ledger.owners("gpu")]
        assert reasons == [("wake", "impatient"), ("fallback", "impatient"), ("drain", "impatient")]
        assert ledger.owners("gpu")[1][2] == 180.0  # fallback_reservation_minutes
        assert_conserved(c, ledger, [], c.host("gpu"))


async def test_a_failed_wake_is_paid_by_its_key_and_a_refused_pause_by_nobody(tmp_path: Path) -> None:
    machine = MemoryMachine("gpu", pause_seconds=5, hang=True)  # resumes, and never runs
    async with billed_core(tmp_path, machine) as (c, ledger):
        c.cloud.refuse_pauses = 2
        with pytest.raises(WakeFailed, match="startup_timeout_seconds"):
            await c.lifecycle.ensure_ready(c.host("gpu"), by="k1")
        await until(lambda: c.host("gpu").pausing is None)
        wake, retry, paused = ledger.owners("gpu")
        assert wake == ("wake", "k1", 600.0)  # startup_timeout_seconds
        assert retry == ("pause_retry", None, 15.0)  # refused twice: retried after 5 s, then 10 s
        assert paused[:2] == ("wake", "k1") and 5 <= paused[2] <= 6.5  # the pause, then a poll at most
        assert_conserved(c, ledger, [], c.host("gpu"))


async def test_an_admin_pays_for_a_resume_a_pause_and_an_emergency_off(tmp_path: Path) -> None:
    machines = MemoryMachine("a", boot_seconds=30, pause_seconds=5), MemoryMachine("b", running=True, pause_seconds=5)
    async with billed_core(tmp_path, *machines) as (c, ledger):
        a, b = c.host("a"), c.host("b")
        assert c.lifecycle.resume(a, "root") is True
        await until(lambda: a.state is HostState.READY)
        await c.lifecycle.ensure_ready(b)
        c.fleet.protect(b, True)
        await anyio.sleep(60)
        c.lifecycle.pause(a, "an admin asked", "ops")
        await anyio.sleep(3600)  # b is protected: idle past its window on nobody's bill
        assert a.state is HostState.PAUSED
        served: list[Served] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, c, "k1", 1000, served)
            await anyio.sleep(50)
            await c.lifecycle.emergency_off("red-button")
            for lease in c.fleet.all_leases():
                lease.release()  # the proxy ends the aborted stream
            tg.cancel_scope.cancel()
        await all_paused(c)
        assert [o[:2] for o in ledger.owners("a")] == [("admin", "root"), ("fallback", "root"), ("admin", "ops")]
        reasons_b = [o[:2] for o in ledger.owners("b")]
        assert reasons_b[:2] == [("found", None), ("protected", None)]
        assert reasons_b[-1] == ("admin", "red-button")  # the aborted request does not reserve it
        assert ("reserve", "k1") not in reasons_b
        for host in (a, b):
            assert_conserved(c, ledger, served, host)


async def test_a_scripted_day_is_conserved_to_the_cent(tmp_path: Path) -> None:
    """A day of requests from several keys on two hosts, with wakes, idle pauses, an admin pause,
    refused resumes and pauses and an emergency-off: every billed second has exactly one owner."""
    rng = random.Random(9)
    machines = (
        MemoryMachine("a", boot_seconds=45, pause_seconds=8),
        MemoryMachine("b", boot_seconds=90, pause_seconds=20, running=True),
    )
    async with billed_core(tmp_path, *machines) as (c, ledger):
        c.lifecycle.start_wake(c.host("b"))  # found running: the reconciler waits for it to be ready
        served: list[Served] = []
        keys = ["alice", "bob", "carol", "dave"]
        async with anyio.create_task_group() as tg:
            for hour in range(24):
                if hour == 9:
                    c.cloud.machines["a"].refuse_resume = "no GPU available"
                if hour == 10:
                    c.cloud.machines["a"].refuse_resume = ""
                    c.cloud.refuse_pauses = 3
                if hour == 14:
                    c.lifecycle.resume(c.host("b"), "ops")
                if hour == 21:
                    c.lifecycle.emergency_on("admin")
                for _ in range(rng.choice((0, 0, 3, 8, 20))):  # bursts, and quiet hours
                    await anyio.sleep(rng.expovariate(1 / 120))
                    tg.start_soon(_tolerant_request, c, rng.choice(keys), rng.uniform(1, 300), served)
                if hour == 15:
                    for host in c.fleet.hosts.values():
                        if host.state is HostState.READY and host.pausing is None:
                            c.lifecycle.pause(host, "an admin asked", "ops")
                if hour == 20:
                    await c.lifecycle.emergency_off("ops")
                    for lease in c.fleet.all_leases():
                        lease.release()
                await anyio.sleep(max(0.0, (hour + 1) * 3600 - anyio.current_time()))
        await until(lambda: not c.fleet.lease_count() and not c.fleet.queue)
        await all_paused(c)
        reasons = {r.reason for r in ledger.intervals.values()}
        assert {"wake", "reserve", "drain", "admin", "found", "pause_retry"} <= reasons
        for host in c.fleet.hosts.values():
            assert_conserved(c, ledger, served, host)
        total_intervals = sum(r.cost_micro for r in ledger.intervals.values())
        assert sum(ledger.added_micro.values()) == total_intervals  # the metrics' counters agree
        billed = sum(c.cloud.billed_seconds(h) for h in ("a", "b"))
        assert billed < 2 * 24 * 3600 * 0.9  # pausing saved something


async def _tolerant_request(c: Core[BilledCloud], key: str, seconds: float, served: list[Served]) -> None:
    """A request that may be refused (emergency-off) or fail with its wake: the user tries later."""
    try:
        await request(c, key, seconds, served)
    except Exception as exc:
        assert any(word in str(exc) for word in ("emergency", "ready", "GPU", "no free slot")), exc


async def test_a_wake_that_waits_for_an_idle_pause_leaves_the_pause_to_its_reserving_key(tmp_path: Path) -> None:
    machine = MemoryMachine("gpu", boot_seconds=30, pause_seconds=120)  # a slow pause
    phases: list[tuple[str, float]] = []

    class Timed(Ledger):
        def wake(self, host: str, outcome: str, seconds: float) -> None:
            phases.append((outcome, seconds))

    ledger = Timed()
    async with running_core(tmp_path, TIMING, BilledCloud(), machine, recorder=ledger) as c:
        c.host("gpu").cost_per_hour = PRICE
        served: list[Served] = []
        await request(c, "k1", 20, served)
        await until(lambda: c.host("gpu").state is HostState.PAUSING)
        await anyio.sleep(10)
        await request(c, "k2", 5, served)  # wakes the host once its pause is done
        await all_paused(c)
        owners = [o[:2] for o in ledger.owners("gpu")]
        assert owners[:4] == [("wake", "k1"), ("reserve", "k1"), ("drain", "k1"), ("wake", "k2")]
        drain = ledger.owners("gpu")[2][2]
        assert 120 <= drain <= 122  # the whole pause, though k2 was waiting for it from 10 s in
        assert phases[-1][0] == "ready" and 30 <= phases[-1][1] <= 32  # its cold start: not the pause too
        assert_conserved(c, ledger, served, c.host("gpu"))

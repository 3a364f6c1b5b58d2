"""Unit tests of `Lifecycle`: wake, single flight, failed and timed-out wakes, idle pause, drain,
emergency-off. An in-memory cloud on a virtual clock: no server, no waiting, exact timings."""

from __future__ import annotations

import functools
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
import pytest

from gpumanager.errors import Conflict, WakeFailed
from gpumanager.fleet import Lease
from gpumanager.hosts import HostState
from gpumanager.scheduler import Ask, Waiter
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
failed_cooldown_seconds = 300
queue_timeout_seconds = 300
pause_retry_seconds = 5
"""


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


# Waits on the virtual clock: an hour passes in no time.
until = functools.partial(async_wait_until, timeout=3600, interval=0.1)


def core(tmp_path: Path, *machines: MemoryMachine) -> AbstractAsyncContextManager[Core[MemoryCloud]]:
    return running_core(tmp_path, TIMING, MemoryCloud(), *machines)


async def test_one_resume_however_many_wait_then_ready_with_the_fallback_window(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("gpu", boot_seconds=40)) as c:
        h, start = c.host("gpu"), anyio.current_time()
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(c.lifecycle.ensure_ready, h, "llama3.2")
        took = anyio.current_time() - start
        assert h.state is HostState.READY and c.cloud.count("resume", "gpu") == 1
        assert 40 <= took <= 41.5  # boot, then one poll and one readiness interval at most
        assert h.idle_deadline == pytest.approx(anyio.current_time() + 180)
        assert h.models == {"llama3.2:latest"} and h.url == "http://gpu.test:11434"


async def test_waiters_of_the_fleet_are_served_when_the_wake_ends(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("gpu", boot_seconds=40)) as c:
        waiters = [c.fleet.admit(Ask("llama3.2", f"k{i}")) for i in range(3)]
        served = []
        for w in waiters:  # two slots: the third is served when the first answer ends
            assert isinstance(w, Waiter)
            lease = await c.fleet.wait(w)
            assert lease is not None
            served.append((lease.host.name, round(anyio.current_time())))
            lease.release()
        assert [name for name, _ in served] == ["gpu"] * 3 and c.cloud.count("resume", "gpu") == 1


async def test_a_refused_resume_fails_the_host_pauses_it_and_cools_down(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("gpu", refuse_resume="no GPU available")) as c:
        h = c.host("gpu")
        with pytest.raises(WakeFailed, match="no GPU available"):
            await c.lifecycle.ensure_ready(h, "llama3.2")
        failed_at = anyio.current_time()
        assert h.state is HostState.FAILED and "no GPU available" in h.last_error
        await until(lambda: c.cloud.count("pause", "gpu") == 1)  # never left half-woken
        await until(lambda: h.state is HostState.PAUSED)
        assert anyio.current_time() - failed_at == pytest.approx(300, abs=0.5)  # failed_cooldown_seconds


async def test_a_wake_that_never_gets_ready_fails_after_startup_timeout(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("gpu", hang=True)) as c:
        h, start = c.host("gpu"), anyio.current_time()
        with pytest.raises(WakeFailed, match="startup_timeout_seconds"):
            await c.lifecycle.ensure_ready(h)
        assert anyio.current_time() - start == pytest.approx(600, abs=1)
        await until(lambda: c.cloud.count("pause", "gpu") == 1)


async def test_an_idle_host_is_paused_at_its_deadline_and_not_before(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("gpu", boot_seconds=10, pause_seconds=5)) as c:
        h = c.host("gpu")
        await c.lifecycle.ensure_ready(h, "llama3.2")
        lease = c.fleet.admit(Ask("llama3.2", "k1"))
        assert isinstance(lease, Lease)
        await anyio.sleep(3600)  # a long answer: an open lease is never paused
        assert h.state is HostState.READY and c.cloud.count("pause", "gpu") == 0
        lease.release()
        released = anyio.current_time()
        await until(lambda: c.cloud.count("pause", "gpu") == 1)
        assert anyio.current_time() - released == pytest.approx(600, abs=0.2)  # reservation_minutes
        await until(lambda: h.state is HostState.PAUSED)
        assert h.reserved_key is None and not h.draining


async def test_an_admin_pause_drains_open_requests_first(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("gpu", running=True, boot_seconds=40)) as c:
        h = c.host("gpu")
        await c.lifecycle.ensure_ready(h)
        lease = c.fleet.admit(Ask("llama3.2", "k1"))
        assert isinstance(lease, Lease)
        assert c.lifecycle.pause(h, "an admin asked", "admin") == 1
        with pytest.raises(Conflict):
            c.lifecycle.pause(h, "twice", "admin")
        late = c.fleet.admit(Ask("llama3.2", "k2"))
        assert isinstance(late, Waiter)  # draining: no new leases
        await anyio.sleep(120)
        assert c.cloud.count("pause", "gpu") == 0 and h.state is HostState.READY
        lease.release()
        await until(lambda: c.cloud.count("pause", "gpu") == 1)
        # The request that came during the drain is not lost: the host is woken again once paused.
        again = await c.fleet.wait(late)
        assert again is not None and again.host is h and c.cloud.count("resume", "gpu") == 1


async def test_emergency_off_ends_streams_pauses_everything_and_refuses_wakes(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("a", running=True), MemoryMachine("b")) as c:
        a, b = c.host("a"), c.host("b")
        await c.lifecycle.ensure_ready(a)
        a.protected = True
        lease = c.fleet.admit(Ask("llama3.2", "k1"))
        assert isinstance(lease, Lease)
        await c.lifecycle.emergency_off("admin")
        assert lease.aborted and "emergency-off" in lease.aborted
        lease.release()
        await until(lambda: a.state is HostState.PAUSED)
        with pytest.raises(Conflict, match="emergency-off"):
            c.lifecycle.resume(b, "admin")
        c.lifecycle.emergency_on("admin")
        assert c.lifecycle.resume(b, "admin") is True
        await until(lambda: b.state is HostState.READY)


async def test_a_pause_asked_for_before_a_wake_began_stops_it_at_once(tmp_path: Path) -> None:
    async with core(tmp_path, MemoryMachine("gpu", boot_seconds=30, pause_seconds=5)) as c:
        h, start = c.host("gpu"), anyio.current_time()
        wake = c.lifecycle.start_wake(h, "llama3.2", by="k1")
        c.lifecycle.request_pause(h, "the fleet's GPU budget is spent", kind="budget")  # before the wake's task ran
        await until(lambda: h.wake is None and h.pausing is None)
        assert anyio.current_time() - start < 10  # not the 600 s of startup_timeout_seconds
        assert "budget" in wake.error and c.cloud.count("resume", "gpu") == 0 and h.state is HostState.PAUSED

"""A woken host's first byte follows its Ollama's readiness, not the cloud's next status poll.

Through the real server, over the clouds' fakes with a slow cloud poll; and the lifecycle alone, on
a virtual clock, with an in-memory cloud that tells a host's address while it still resumes.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.errors import ProviderUnavailable, WakeFailed
from gpumanager.hosts import HostState
from gpumanager.providers.base import Polling
from gpumanager.recorder import NoopRecorder, Recorder
from tests.clouds import Machine
from tests.harness import async_wait_until, running_cloud_stack
from tests.memory_cloud import Core, MemoryCloud, MemoryMachine, running_core
from tests.virtual_time import VirtualTimeLoop

SLOW_POLL = 5.0  # the cloud is asked about a waking host this often
LIFE = """
[timing]
startup_timeout_seconds = 30
probe_timeout_seconds = 1
queue_timeout_seconds = 30
wake_keepalive_seconds = 60
reconcile_interval_seconds = 60
shutdown_grace_seconds = 1
"""


@pytest.mark.parametrize(
    "kind",
    [
        "simulated",
        "surf",
        "ec2",  # these three report the address while the cloud still says resuming
        "runpod-endpoint",  # its address is known at once
    ],
)
def test_the_first_byte_comes_well_before_the_clouds_next_poll(tmp_path: Path, kind: str) -> None:
    with running_cloud_stack(tmp_path, kind, [Machine("gpu-1")], extra=LIFE, boot_seconds=0.5) as (stack, cloud):
        provider = stack.runtime.providers[cloud.provider]
        assert isinstance(provider, Polling)
        stack.call(setattr, provider, "poll_seconds", SLOW_POLL)
        sim = cloud.sim("gpu-1")
        if kind != "runpod-endpoint":  # an endpoint is ready when its worker is up; Ollama, when it lists the model
            stack.call(sim.set_models, [])

        async def ready_soon_after_the_machine_runs() -> float:
            await async_wait_until(lambda: cloud.running("gpu-1"), timeout=10, interval=0.005)
            sim.set_models(["llama3.2:latest"])
            return time.monotonic()

        ready = stack.portal.start_task_soon(ready_soon_after_the_machine_runs)
        body = {
            "model": "llama3.2",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
            "options": {"num_predict": 3},
        }
        started = time.monotonic()
        with (
            httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client,
            client.stream("POST", "/api/chat", json=body) as response,
        ):
            lines = response.iter_lines()
            first = next(lines)
            first_byte = time.monotonic()
            rest = list(lines)
        ready_at = ready.result(timeout=10)
        resumes = cloud.resumes("gpu-1")
        woken = stack.call(lambda: stack.runtime.fleet.hosts["gpu-1"].state)
    assert response.status_code == 200 and "tok0" in first and '"done":true' in rest[-1]
    assert resumes == 1 and woken is HostState.READY
    # The cloud was asked as the resume was accepted, and would be asked next 5 s later.
    assert first_byte - started < SLOW_POLL - 2
    assert first_byte - ready_at < 2


# -- the lifecycle alone, on a virtual clock --------------------------------------------------------

TIMING = """
[timing]
startup_timeout_seconds = 600
ollama_readiness_wait_seconds = 0.5
probe_timeout_seconds = 2
failed_cooldown_seconds = 300
"""


@dataclass
class EarlyCloud(MemoryCloud):
    """An in-memory cloud polled every 5 s that tells a host's address as soon as it resumes (as SURF
    and EC2 know it). Each machine's Ollama answers `ollama_seconds` after its resume, whatever the
    cloud says; before that it refuses connections, or drops them (`dropping`: a machine not yet on
    the network), which only a probe's timeout ends."""

    poll_seconds: float = SLOW_POLL
    ollama_seconds: dict[str, float] = field(default_factory=dict)
    failing_at: dict[str, float] = field(default_factory=dict)  # the cloud reports the resume failed, from then
    blips: int = 0  # inspect calls that fail with a 5xx first
    dropping: bool = False
    inspected: list[float] = field(default_factory=list)
    _up_at: dict[str, float] = field(default_factory=dict)

    def _info(self, m: MemoryMachine) -> HostInfo:
        info = super()._info(m)
        if m.name in self.failing_at and anyio.current_time() >= self.failing_at[m.name]:
            return msgspec.structs.replace(info, state=CloudState.PAUSED, address=None, error="no GPU free")
        if info.state is CloudState.RESUMING:
            return msgspec.structs.replace(info, address=f"http://{m.name}.test:11434")
        return info

    async def inspect(self, host_id: str) -> HostInfo:
        self.inspected.append(anyio.current_time())
        if self.blips:
            self.blips -= 1
            raise ProviderUnavailable("the cloud answered 503", provider=self.name, host=host_id, action="inspect")
        return await super().inspect(host_id)

    async def resume(self, host_id: str) -> None:
        await super().resume(host_id)
        self._up_at[host_id] = anyio.current_time() + self.ollama_seconds.get(host_id, math.inf)

    def up_at(self, name: str) -> float:
        return self._up_at[name]

    async def ready(self, info: HostInfo, model: str | None) -> bool | None:
        return None  # plain Ollama hosts: the fleet's own probe decides

    async def _reach(self, name: str, request: httpx.Request) -> None:
        if anyio.current_time() < self._up_at.get(name, math.inf):
            if self.dropping:
                await anyio.sleep(3600)
            raise httpx.ConnectError("connection refused", request=request)


def core(
    tmp_path: Path, cloud: EarlyCloud, *machines: MemoryMachine, recorder: Recorder | None = None
) -> AbstractAsyncContextManager[Core[EarlyCloud]]:
    return running_core(tmp_path, TIMING, cloud, *machines, recorder=recorder)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


@pytest.mark.anyio
async def test_ollama_is_probed_while_the_cloud_is_polled_slowly(tmp_path: Path) -> None:
    cloud = EarlyCloud(ollama_seconds={"gpu": 31.3})
    async with core(tmp_path, cloud, MemoryMachine("gpu", boot_seconds=31)) as c:
        await c.lifecycle.ensure_ready(c.host("gpu"), "llama3.2")
        ready = anyio.current_time()
        assert c.host("gpu").state is HostState.READY and c.host("gpu").url == "http://gpu.test:11434"
        assert cloud.up_at("gpu") <= ready <= cloud.up_at("gpu") + 0.5  # one readiness interval, not a poll
        assert ready < 35  # the cloud, asked at 0 s, 5 s ... 35 s, tells it runs at 35 s


@pytest.mark.anyio
async def test_ollama_answering_before_the_cloud_says_running_ends_the_wake(tmp_path: Path) -> None:
    cloud = EarlyCloud(ollama_seconds={"gpu": 12})
    async with core(tmp_path, cloud, MemoryMachine("gpu", boot_seconds=60)) as c:
        host = c.host("gpu")
        await c.lifecycle.ensure_ready(host, "llama3.2")
        assert 12 <= anyio.current_time() <= 12.5 and host.state is HostState.READY
        assert host.models == {"llama3.2:latest"}  # the inventory was read before the wake counted as done
        assert len(cloud.inspected) == 3  # at 0, 5 and 10 s: the cloud was not asked after Ollama answered
        await anyio.sleep(120)  # the cloud says running later on: nothing changes
        assert host.state is HostState.READY


@pytest.mark.anyio
async def test_a_failure_the_cloud_reports_still_ends_the_wake_early(tmp_path: Path) -> None:
    cloud = EarlyCloud(failing_at={"gpu": 21})  # its Ollama never answers
    async with core(tmp_path, cloud, MemoryMachine("gpu", boot_seconds=500)) as c:
        with pytest.raises(WakeFailed, match="no GPU free"):
            await c.lifecycle.ensure_ready(c.host("gpu"), "llama3.2")
        assert anyio.current_time() == pytest.approx(25, abs=0.1)  # the first poll after the failure
        assert c.host("gpu").state is HostState.FAILED
        await anyio.sleep(10)
        assert c.cloud.count("pause", "gpu") == 1  # never left half-woken


@pytest.mark.anyio
async def test_cloud_blips_are_tolerated_while_ollama_is_probed(tmp_path: Path) -> None:
    cloud = EarlyCloud(ollama_seconds={"gpu": 22}, blips=1)  # the first answer is a 503: no address yet
    async with core(tmp_path, cloud, MemoryMachine("gpu", boot_seconds=40)) as c:
        await c.lifecycle.ensure_ready(c.host("gpu"), "llama3.2")
        assert 22 <= anyio.current_time() <= 22.5 and c.host("gpu").state is HostState.READY


@pytest.mark.anyio
async def test_a_probe_that_hangs_does_not_hold_back_the_next(tmp_path: Path) -> None:
    cloud = EarlyCloud(ollama_seconds={"gpu": 10.2}, dropping=True)  # each probe before 10.2 s hangs for 2 s
    async with core(tmp_path, cloud, MemoryMachine("gpu", boot_seconds=30)) as c:
        await c.lifecycle.ensure_ready(c.host("gpu"), "llama3.2")
        assert 10.2 <= anyio.current_time() <= 10.7


@pytest.mark.anyio
async def test_a_pause_stops_a_wake_while_ollama_is_probed(tmp_path: Path) -> None:
    cloud = EarlyCloud(ollama_seconds={"gpu": 50})
    async with core(tmp_path, cloud, MemoryMachine("gpu", boot_seconds=40)) as c:
        host = c.host("gpu")
        async with anyio.create_task_group() as tg:

            async def wake() -> None:
                with pytest.raises(WakeFailed, match="being paused"):
                    await c.lifecycle.ensure_ready(host, "llama3.2")

            tg.start_soon(wake)
            await anyio.sleep(8)
            c.lifecycle.pause(host, "an admin asked", "admin")
        assert anyio.current_time() == pytest.approx(8)  # the wake ended at once
        await anyio.sleep(30)
        assert host.state is HostState.PAUSED and cloud.count("pause", "gpu") == 1


@dataclass
class PullingCloud(EarlyCloud):
    """Its machines' Ollama answers before it lists the model (the node still pulls it)."""

    listed_at: dict[str, float] = field(default_factory=dict)

    def _listed(self, name: str) -> tuple[str, ...]:
        return super()._listed(name) if anyio.current_time() >= self.listed_at[name] else ()


class Phases(NoopRecorder):
    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def wake_phase(self, host: str, phase: str, seconds: float) -> None:
        self.seen[phase] = seconds


@pytest.mark.anyio
async def test_a_wake_is_timed_in_its_phases_cloud_boot_and_model(tmp_path: Path) -> None:
    """resume: asked -> the cloud says running; boot: -> Ollama answers; model: -> it lists the model."""
    cloud = PullingCloud(poll_seconds=1.0, ollama_seconds={"gpu": 25.0}, listed_at={"gpu": 40.0})
    phases = Phases()
    async with core(tmp_path, cloud, MemoryMachine("gpu", boot_seconds=20), recorder=phases) as c:
        await c.lifecycle.ensure_ready(c.host("gpu"), "llama3.2")
    assert phases.seen["resume"] == pytest.approx(20, abs=1)  # polled every second
    assert phases.seen["boot"] == pytest.approx(5, abs=0.6)  # probed every 0.5 s
    assert phases.seen["model"] == pytest.approx(15, abs=0.6)

"""An in-memory cloud for unit tests of the core: the real `Provider` Protocol, no network.

Machines boot and stop on the event loop's clock (virtual in the unit tests), so a test can say
"this machine takes 40 s to boot" and see the fleet's timing without waiting. Its hosts' Ollama is
an `httpx.MockTransport` handler answering `/api/version`, `/api/tags` and `/api/ps`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import anyio
import httpx

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import loads
from gpumanager.errors import HostNotFound, ProviderRejected
from gpumanager.fleet import Fleet
from gpumanager.hosts import Host, HostEvent
from gpumanager.inventory import Inventory
from gpumanager.lifecycle import Lifecycle
from gpumanager.recorder import Recorder


@dataclass
class MemoryMachine:
    name: str
    models: tuple[str, ...] = ("llama3.2:latest",)
    boot_seconds: float = 30.0
    pause_seconds: float = 5.0
    running: bool = False
    refuse_resume: str = ""  # the cloud refuses the resume with this message
    hang: bool = False  # accepts the resume but never runs
    changing_until: float = 0.0  # resuming or pausing until this time
    target: bool = False  # running once the change is done


@dataclass
class MemoryCloud:
    """The `Provider` Protocol in memory; also `ReadinessProbe` (Ollama answers once running)."""

    name: str = "mem"
    machines: dict[str, MemoryMachine] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    poll_seconds: float = 1.0

    def add(self, machine: MemoryMachine) -> MemoryMachine:
        self.machines[machine.name] = machine
        return machine

    def _machine(self, host_id: str) -> MemoryMachine:
        try:
            return self.machines[host_id]
        except KeyError:
            raise HostNotFound("no such machine", provider=self.name, host=host_id) from None

    def _state(self, m: MemoryMachine) -> CloudState:
        if anyio.current_time() < m.changing_until or (m.hang and m.target):
            return CloudState.RESUMING if m.target else CloudState.PAUSING
        m.running = m.target
        return CloudState.RUNNING if m.running else CloudState.PAUSED

    def _info(self, m: MemoryMachine) -> HostInfo:
        state = self._state(m)
        address = f"http://{m.name}.test:11434" if state is CloudState.RUNNING else None
        return HostInfo(id=m.name, name=m.name, state=state, cloud_status=str(state), address=address, models=m.models)

    async def list(self) -> list[HostInfo]:
        return [self._info(m) for m in self.machines.values()]

    async def inspect(self, host_id: str) -> HostInfo:
        return self._info(self._machine(host_id))

    async def resume(self, host_id: str) -> None:
        m = self._machine(host_id)
        self.calls.append(("resume", host_id))
        if m.refuse_resume:
            raise ProviderRejected(m.refuse_resume, provider=self.name, host=host_id, action="resume")
        if not m.target:
            m.target, m.changing_until = True, anyio.current_time() + m.boot_seconds

    async def pause(self, host_id: str) -> None:
        m = self._machine(host_id)
        self.calls.append(("pause", host_id))
        if m.target or m.running:
            m.target, m.hang, m.changing_until = False, False, anyio.current_time() + m.pause_seconds

    async def ready(self, info: HostInfo, model: str | None) -> bool | None:
        return info.state is CloudState.RUNNING

    def count(self, action: str, host_id: str) -> int:
        return self.calls.count((action, host_id))

    def ollama(self) -> httpx.MockTransport:
        """The machines' Ollama: answers only while the machine runs (`_reach` says)."""

        async def handle(request: httpx.Request) -> httpx.Response:
            name = (request.url.host or "").removesuffix(".test")
            await self._reach(name, request)
            if request.url.path == "/api/version":
                return httpx.Response(200, json={"version": "0.32.0"})
            if request.url.path in ("/api/tags", "/api/ps"):
                models = self._listed(name) if request.url.path == "/api/tags" else ()
                return httpx.Response(200, json={"models": [{"name": n, "model": n} for n in models]})
            return httpx.Response(404, json={"error": "not found"})

        return httpx.MockTransport(handle)

    def _listed(self, name: str) -> tuple[str, ...]:
        """The models the machine's Ollama lists now."""
        return self.machines[name].models

    async def _reach(self, name: str, request: httpx.Request) -> None:
        """Raise as a connection to a machine that does not answer would."""
        m = self.machines.get(name)
        if m is None or not m.running:
            raise httpx.ConnectError("connection refused", request=request)


C = TypeVar("C", bound=MemoryCloud)


@dataclass
class Core(Generic[C]):
    """The fleet and its lifecycle in front of an in-memory cloud, running."""

    fleet: Fleet
    lifecycle: Lifecycle
    cloud: C

    def host(self, name: str) -> Host:
        return self.fleet.hosts[name]


@asynccontextmanager
async def running_core(
    tmp_path: Path, timing: str, cloud: C, *machines: MemoryMachine, recorder: Recorder | None = None
) -> AsyncIterator[Core[C]]:
    """A `Fleet` and a running `Lifecycle` (its task group open) with `machines` in `cloud`, whose
    Ollama is `cloud.ollama()`: no server, only the virtual clock of the test's loop."""
    config = loads(timing)
    fleet = Fleet(config, recorder=recorder)
    async with httpx.AsyncClient(transport=cloud.ollama()) as http:
        inventory = Inventory(str(tmp_path), http, probe_timeout=config.timing.probe_timeout_seconds)
        lifecycle = Lifecycle(config, fleet, {cloud.name: cloud}, inventory, recorder)
        fleet.waker = lifecycle
        for m in machines:
            cloud.add(m)
            host = Host(id=m.name, name=m.name, provider=cloud.name, url="", slots=2, models=frozenset(m.models))
            host.apply(HostEvent.CLOUD_RUNNING if m.running else HostEvent.CLOUD_PAUSED)
            m.target = m.running
            fleet.add(host)
        async with anyio.create_task_group() as tg:
            await tg.start(lifecycle.run)
            yield Core(fleet, lifecycle, cloud)
            tg.cancel_scope.cancel()

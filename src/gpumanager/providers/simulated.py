"""A simulated cloud, in process: its hosts are simulated Ollama servers on loopback.

Resume takes `boot_seconds`, pause `pause_seconds`; each boot serves the host's Ollama on a new
port (as a cloud's public address changes on every start). Failure injection for tests and demos:
a resume that fails after booting (`fail_resume`), one that hangs, and pauses that fail.
The demo and the tests use it; nothing here needs a cloud account.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import SimulatedHostConfig, SimulatedProviderConfig
from gpumanager.errors import HostNotFound, ProviderUnavailable
from gpumanager.sim import SimOllama, SimServer, running_server
from gpumanager.sim.server import free_port_on


@dataclass(eq=False)
class Machine:
    config: SimulatedHostConfig
    sim: SimOllama
    state: CloudState = CloudState.PAUSED
    server: SimServer | None = None
    address: str | None = None
    error: str = ""
    stop: anyio.Event | None = None
    fail_resume: bool = False
    hang_resume: bool = False
    fail_pauses: int = 0
    boots: int = 0
    resumes: int = 0  # a boot belongs to the resume that asked for it: an older one's boot is dropped
    ollama_up: float = 0.0  # time.monotonic() when its Ollama last started answering
    pause_asked: float = 0.0  # time.monotonic() of the last pause call
    history: list[str] = field(default_factory=list)


class SimulatedProvider:
    """Implements `Provider` and `Service` (its machines' servers run in its own task group)."""

    def __init__(self, config: SimulatedProviderConfig) -> None:
        self.name = config.name
        self.poll_seconds = 0.05
        self.calls: Counter[str] = Counter()  # "resume:NAME" / "pause:NAME": what the fleet asked
        self.machines: dict[str, Machine] = {}
        for host in config.hosts:
            sim = SimOllama(name=host.name, models=host.models, slots=host.slots, token_delay=host.token_delay_seconds)
            sim.words = tuple(host.answer.split())
            sim.gpu = host.gpu
            self.machines[host.name] = Machine(host, sim, fail_resume=host.fail_resume)
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for machine in self.machines.values():
                if machine.config.running:
                    await self._boot(machine, 0, machine.resumes)
            task_status.started()
            await anyio.sleep_forever()

    # -- the Provider protocol ---------------------------------------------------------------------

    async def list(self) -> list[HostInfo]:
        return [self._info(m) for m in self.machines.values()]

    async def inspect(self, host_id: str) -> HostInfo:
        return self._info(self._machine(host_id))

    async def resume(self, host_id: str) -> None:
        machine = self._machine(host_id)
        self.calls[f"resume:{host_id}"] += 1
        if machine.state in (CloudState.RUNNING, CloudState.RESUMING):
            return
        while machine.state is CloudState.PAUSING:  # noqa: ASYNC110 - a cloud is polled, as real ones are
            await anyio.sleep(self.poll_seconds)
        machine.state, machine.error = CloudState.RESUMING, ""
        machine.address = f"http://127.0.0.1:{free_port_on(['127.0.0.1'])}"  # known while it boots
        machine.resumes += 1
        machine.history.append("resume")
        if machine.hang_resume:
            return
        assert self._tg is not None
        self._tg.start_soon(self._boot, machine, machine.config.boot_seconds, machine.resumes)

    async def pause(self, host_id: str) -> None:
        machine = self._machine(host_id)
        self.calls[f"pause:{host_id}"] += 1
        machine.pause_asked = time.monotonic()
        if machine.fail_pauses:
            machine.fail_pauses -= 1
            raise ProviderUnavailable(
                "simulated cloud error (HTTP 500)", provider=self.name, host=host_id, action="pause"
            )
        if machine.state in (CloudState.PAUSED, CloudState.PAUSING):
            return
        machine.state = CloudState.PAUSING
        machine.history.append("pause")
        assert self._tg is not None
        self._tg.start_soon(self._shutdown, machine)

    # -- the machines ------------------------------------------------------------------------------

    async def _boot(self, machine: Machine, delay: float, resume: int) -> None:
        await anyio.sleep(delay)
        if machine.state is CloudState.PAUSING or resume != machine.resumes:
            return  # paused while booting (and maybe resumed again: that resume's boot goes on)
        if machine.fail_resume:
            machine.state, machine.error = CloudState.PAUSED, "no GPU available for this flavour (simulated)"
            machine.address = None
            return
        machine.stop = anyio.Event()
        assert self._tg is not None
        await self._tg.start(self._serve, machine)

    async def _serve(self, machine: Machine, *, task_status: TaskStatus[None]) -> None:
        """The machine runs at once, at the address its resume chose; its Ollama answers `ollama_seconds` later."""
        stop = machine.stop
        assert stop is not None
        if machine.address is None:  # started from the console: no resume chose its address
            machine.address = f"http://127.0.0.1:{free_port_on(['127.0.0.1'])}"
        port = int(machine.address.rsplit(":", 1)[1])
        machine.state = CloudState.RUNNING
        machine.boots += 1
        task_status.started()
        with anyio.move_on_after(machine.config.ollama_seconds):
            await stop.wait()
        if stop.is_set():
            return
        async with running_server(machine.sim, port=port) as server:
            machine.server, machine.ollama_up = server, time.monotonic()
            await stop.wait()
            machine.server = None

    async def _shutdown(self, machine: Machine) -> None:
        await anyio.sleep(machine.config.pause_seconds)
        if machine.stop is not None:
            machine.stop.set()
            machine.stop = None
            while machine.server is not None:  # noqa: ASYNC110 - its server task clears it on the way out
                await anyio.sleep(0.01)
        machine.state, machine.address = CloudState.PAUSED, None

    def set_state(self, host_id: str, running: bool) -> None:
        """What someone does in the cloud's console: start or stop a machine behind gpumanager's back."""
        machine = self._machine(host_id)
        assert self._tg is not None
        if running and machine.state is CloudState.PAUSED:
            machine.state = CloudState.RESUMING
            machine.resumes += 1
            self._tg.start_soon(self._boot, machine, 0, machine.resumes)
        elif not running and machine.state is CloudState.RUNNING:
            machine.state = CloudState.PAUSING
            self._tg.start_soon(self._shutdown, machine)

    def _machine(self, host_id: str) -> Machine:
        try:
            return self.machines[host_id]
        except KeyError:
            raise HostNotFound("no such simulated host", provider=self.name, host=host_id) from None

    def _info(self, machine: Machine) -> HostInfo:
        return HostInfo(
            id=machine.config.name,
            name=machine.config.name,
            state=machine.state,
            cloud_status=str(machine.state),
            address=machine.address,
            error=machine.error,
            slots=machine.config.slots,
            cost_per_hour=machine.config.cost_per_hour,
            models=tuple(machine.sim.models),
            details={"flavor": "simulated GPU", "boots": machine.boots},
        )

"""What the three fake clouds (SURF, EC2, RunPod) do alike with a machine.

* `SimMachine`, the machine: the transition in progress, and its simulated Ollama (`SimPower`): at
  most one server per machine, up while the machine runs, a stop during start-up honoured, and a stop
  that resets open connections like a VM going away.
* `MachineCloud`, the fake's side: one transition per machine at a time (`_launch`; a new action or
  the console cancels the one in progress), the sims started and stopped with their machines
  (`_ensure_sim`, `_stop_sim`), also as the fake itself starts and closes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from gpumanager.sim import SimOllama, SimServer, running_server


class SimPower:
    def __init__(self, sim: SimOllama) -> None:
        self.sim = sim
        self.wanted = False  # whether the machine runs (its Ollama should listen)
        self.server: SimServer | None = None
        self._release: anyio.Event | None = None
        self._lock: anyio.Lock | None = None

    @property
    def up(self) -> bool:
        return self.server is not None

    async def start(self, tg: TaskGroup, host: str, port: int) -> None:
        """Serve the sim unless it runs; returns once it listens (or is not wanted any more)."""
        self.wanted = True
        if self._lock is None:
            self._lock = anyio.Lock()
        with anyio.CancelScope(shield=True):  # a half-started uvicorn must not be abandoned
            async with self._lock:
                if self.server is None and self.wanted:
                    await tg.start(self._serve, host, port)

    async def _serve(self, host: str, port: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        release = self._release = anyio.Event()
        async with running_server(self.sim, host=host, port=port, timeout_graceful_shutdown=1) as server:
            self.server = server
            if not self.wanted:  # stopped while uvicorn was starting
                self.stop()
            task_status.started()
            await release.wait()

    def stop(self) -> None:
        """Drop the sim at once, open connections included, as when the machine goes away."""
        self.wanted = False
        if self.server is not None:
            server, self.server = self.server, None
            server.kill()
            assert self._release is not None
            self._release.set()


@dataclass(eq=False, kw_only=True)
class SimMachine:
    """A fake cloud's machine with a simulated Ollama; the fakes' machine records extend it."""

    sim: SimOllama
    job: anyio.CancelScope | None = None  # the transition in progress
    power: SimPower = field(init=False)  # its Ollama, up while the machine runs

    def __post_init__(self) -> None:
        self.power = SimPower(self.sim)


M = TypeVar("M", bound=SimMachine)


class MachineCloud(Generic[M]):
    """The machine side of a fake cloud; the fake tells where a machine's sim listens (`_sim_address`).

    Transitions and sims run in `_tg`, set while the fake runs; once `_closing` is set, no sim starts.
    """

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None
        self._closing = anyio.Event()

    def _sim_address(self, machine: M) -> tuple[str, int]:
        """The host and port the machine's sim is to listen on (port 0: any free one)."""
        raise NotImplementedError

    def _launch(self, machine: M, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` as the machine's only transition, interrupting the one before it."""
        if self._tg is None:
            raise RuntimeError("the fake cloud is not running")
        _cancel_job(machine)
        machine.job = scope = anyio.CancelScope()
        self._tg.start_soon(_run, scope, job)

    def _interrupt(self, machine: M) -> None:
        """End the machine's transition in progress, if any."""
        _cancel_job(machine)

    async def _ensure_sim(self, machine: M) -> None:
        """Start the machine's sim unless it runs; returns once it listens (or is not wanted any more)."""
        if self._tg is None or self._closing.is_set():
            machine.power.wanted = True
            return
        host, port = self._sim_address(machine)
        await machine.power.start(self._tg, host, port)

    def _stop_sim(self, machine: M) -> None:
        machine.power.stop()

    def _start_sim_soon(self, machine: M) -> None:
        """For a machine made running: its sim starts in the background, or as the fake starts."""
        machine.power.wanted = True
        if self._tg is not None:
            self._tg.start_soon(self._ensure_sim, machine)

    async def _start_wanted_sims(self, machines: Iterable[M]) -> None:
        """As the fake starts: the sims of the machines made running before it did."""
        for machine in machines:
            if machine.power.wanted:
                await self._ensure_sim(machine)

    def _close_machines(self, machines: Iterable[M]) -> None:
        """As the fake closes: `_closing` is set, every transition ends and every sim goes."""
        self._closing.set()
        for machine in machines:
            self._interrupt(machine)
            self._stop_sim(machine)


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds; the caller bounds the wait (``anyio.fail_after``)."""
    # Polling memory every 5 ms is cheap and keeps the transitions free of notification plumbing;
    # the conditions mix states, sims and (RunPod) timestamps, which no single event could announce.
    while not condition():
        await anyio.sleep(0.005)


def _cancel_job(machine: SimMachine) -> None:
    if machine.job is not None:
        machine.job.cancel()
        machine.job = None


async def _run(scope: anyio.CancelScope, job: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await job()

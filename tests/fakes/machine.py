"""What the three fake clouds (SURF, EC2, RunPod) do alike with a machine.

* One transition at a time (`launch`, `interrupt`): a new action or the console cancels the one
  in progress.
* Its simulated Ollama (`SimPower`): at most one server per machine, up while the machine runs, a
  stop during start-up honoured, and a stop that resets open connections like a VM going away.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus

from gpumanager.sim import SimOllama, SimServer, running_server


class Transitional(Protocol):
    job: anyio.CancelScope | None  # the transition in progress


def interrupt(machine: Transitional) -> None:
    if machine.job is not None:
        machine.job.cancel()
        machine.job = None


def launch(tg: TaskGroup | None, machine: Transitional, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` as the machine's only transition, interrupting the one before it."""
    if tg is None:
        raise RuntimeError("the fake cloud is not running")
    interrupt(machine)
    machine.job = scope = anyio.CancelScope()
    tg.start_soon(_run, scope, job)


async def _run(scope: anyio.CancelScope, job: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await job()


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

"""Every cloud the lifecycle suite runs against, behind one small interface.

A `Cloud` makes the machines (paused or running, with their models), writes the `[[providers]]`
block that points gpumanager at them, and lets a test count resume/pause calls, inject failures
and act "from the console". The shared suite in test_lifecycle.py runs once per cloud kind.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gpumanager.providers.simulated import SimulatedProvider
from gpumanager.runtime import Runtime
from gpumanager.sim import SimOllama
from tests.fakes.ec2 import FakeEC2
from tests.fakes.runpod import FakeRunPod
from tests.fakes.surf import FakeSurf


@dataclass(frozen=True)
class Machine:
    name: str
    models: tuple[str, ...] = ("llama3.2:latest",)
    slots: int = 4
    running: bool = False
    cost: float = 1.0
    token_delay: float = 0.005
    protected: bool = False
    announce_models: bool = True  # whether gpumanager's config tells the models (SURF: [[hosts]] models)


class Cloud(Protocol):
    provider: str  # the provider's name in the config
    environ: dict[str, str]

    def config(self) -> str: ...

    def attach(self, runtime: Runtime) -> None: ...

    def resumes(self, name: str) -> int: ...

    def pauses(self, name: str) -> int: ...

    def running(self, name: str) -> bool: ...

    def sim(self, name: str) -> SimOllama: ...

    def fail_next_resume(self, name: str) -> None: ...

    def hang_next_resume(self, name: str) -> None: ...

    def fail_pauses(self, name: str, times: int) -> None: ...

    def set_running(self, name: str, running: bool) -> Any: ...

    def host_id(self, name: str) -> str: ...


class SimulatedCloud:
    """The in-process simulated provider; the cloud lives inside gpumanager itself."""

    provider = "sim"

    def __init__(self, machines: list[Machine], *, boot_seconds: float = 0.2, pause_seconds: float = 0.05) -> None:
        self.machines, self.boot, self.pause = machines, boot_seconds, pause_seconds
        self.environ: dict[str, str] = {}
        self._provider: SimulatedProvider | None = None

    def config(self) -> str:
        hosts = ",\n  ".join(
            f'{{name = "{m.name}", models = {list(m.models)!r}, slots = {m.slots}, cost_per_hour = {m.cost}, '
            f"boot_seconds = {self.boot}, pause_seconds = {self.pause}, token_delay_seconds = {m.token_delay}, "
            f"running = {str(m.running).lower()}}}"
            for m in self.machines
        )
        return textwrap.dedent(f"""
            [[providers]]
            type = "simulated"
            name = "{self.provider}"
            hosts = [
              {hosts}
            ]
            """).replace("'", '"') + "".join(
            f'\n[[hosts]]\nname = "{m.name}"\nprotected = true\n' for m in self.machines if m.protected
        )

    def attach(self, runtime: Runtime) -> None:
        provider = runtime.providers[self.provider]
        assert isinstance(provider, SimulatedProvider)
        self._provider = provider

    @property
    def p(self) -> SimulatedProvider:
        assert self._provider is not None
        return self._provider

    def resumes(self, name: str) -> int:
        return self.p.calls[f"resume:{name}"]

    def pauses(self, name: str) -> int:
        return self.p.calls[f"pause:{name}"]

    def running(self, name: str) -> bool:
        return self.p.machines[name].server is not None

    def sim(self, name: str) -> SimOllama:
        return self.p.machines[name].sim

    def fail_next_resume(self, name: str) -> None:
        self.p.machines[name].fail_resume = True

    def hang_next_resume(self, name: str) -> None:
        self.p.machines[name].hang_resume = True

    def fail_pauses(self, name: str, times: int) -> None:
        self.p.machines[name].fail_pauses = times

    def set_running(self, name: str, running: bool) -> None:
        self.p.set_state(name, running)

    def host_id(self, name: str) -> str:
        return name


@contextlib.asynccontextmanager
async def simulated_cloud(machines: list[Machine], *, boot_seconds: float = 0.2) -> AsyncIterator[Cloud]:
    yield SimulatedCloud(machines, boot_seconds=boot_seconds)


CloudFactory = Callable[..., contextlib.AbstractAsyncContextManager[Any]]
CLOUDS: dict[str, CloudFactory] = {"simulated": simulated_cloud}


def overrides(provider: str, machines: list[Machine], models: Callable[[Machine], tuple[str, ...]]) -> str:
    """`[[hosts]]` entries telling gpumanager what the cloud does not: slots, cost, protection, models."""
    blocks = []
    for m in machines:
        listed = ", ".join(f'"{name}"' for name in (models(m) if m.announce_models else ()))
        blocks.append(
            f'\n[[hosts]]\nname = "{m.name}"\nprovider = "{provider}"\nslots = {m.slots}\n'
            f"cost_per_hour = {m.cost}\nprotected = {str(m.protected).lower()}\nmodels = [{listed}]\n"
        )
    return "".join(blocks)


def provider_block(kind: str, name: str, settings: dict[str, object]) -> str:
    lines = [
        f'[[providers]]\ntype = "{kind}"\nname = "{name}"',
        "poll_seconds = 0.05\nretry_seconds = 0.05\napi_timeout_seconds = 5",
    ]
    lines += [
        f"{key} = {value}" if isinstance(value, (int, float)) or str(value).startswith("{") else f'{key} = "{value}"'
        for key, value in settings.items()
    ]
    return "\n" + "\n".join(lines) + "\n"


class FakeCloud:
    """What the adapters over a fake cloud server share: the fake keeps one simulated Ollama per
    machine, and a list of the (action, machine) calls that reached it."""

    provider = ""
    starts: tuple[str, ...] = ("start",)
    stops: tuple[str, ...] = ("stop",)

    def __init__(self, fake: Any, machines: list[Machine]) -> None:
        self.fake, self.machines = fake, machines
        self.environ: dict[str, str] = {}

    def calls(self) -> list[tuple[str, str]]:
        return list(self.fake.calls)

    def attach(self, runtime: Runtime) -> None:
        pass

    def _count(self, actions: tuple[str, ...], name: str) -> int:
        return sum(1 for action, target in self.calls() if action in actions and target == name)

    def resumes(self, name: str) -> int:
        return self._count(self.starts, name)

    def pauses(self, name: str) -> int:
        return self._count(self.stops, name)

    def running(self, name: str) -> bool:
        return bool(self.fake.is_serving(name))

    def sim(self, name: str) -> SimOllama:
        return self.fake.sims[name]  # type: ignore[no-any-return]


class SurfCloud(FakeCloud):
    """SURF Research Cloud, as the fake in tests/fakes/surf.py speaks it; the workspaces' models are
    told to gpumanager through `[[hosts]]` overrides, as users do for hosts never seen awake."""

    provider = "surf"
    starts, stops = ("resume",), ("pause",)

    def __init__(self, fake: FakeSurf, machines: list[Machine]) -> None:
        super().__init__(fake, machines)
        self.environ = {"CLOUD_API_TOKEN": fake.token}
        for m in machines:
            fake.add_workspace(
                m.name,
                status="running" if m.running else "paused",
                models=m.models,
                slots=m.slots,
                token_delay=m.token_delay,
            )
        fake.add_workspace("someone-elses-box", status="running")  # not matched by machine_name_filter

    def calls(self) -> list[tuple[str, str]]:
        return list(self.fake.attempts)  # refused actions too

    def config(self) -> str:
        settings = {"base_url": self.fake.base_url, "machine_name_filter": "gpu-", "ollama_port": self.fake.ollama_port}
        return provider_block("surf", self.provider, settings) + overrides(
            self.provider, self.machines, lambda m: m.models
        )

    def fail_next_resume(self, name: str) -> None:
        self.fake.fail_next_resume(name)

    def hang_next_resume(self, name: str) -> None:
        self.fake.hang_next_resume(name)

    def fail_pauses(self, name: str, times: int) -> None:
        self.fake.fail_pauses(name, times)

    async def set_running(self, name: str, running: bool) -> None:
        await self.fake.set_status(name, "running" if running else "paused")

    def host_id(self, name: str) -> str:
        return str(self.fake.workspace(name)["id"])


@contextlib.asynccontextmanager
async def surf_cloud(machines: list[Machine], *, boot_seconds: float = 0.2) -> AsyncIterator[Cloud]:
    async with FakeSurf(token="surf-test-token", transition_seconds=boot_seconds) as fake:
        yield SurfCloud(fake, machines)


class StartStopCloud(FakeCloud):
    """Fakes whose machines are started and stopped (EC2 instances, RunPod pods and endpoints)."""

    def fail_next_resume(self, name: str) -> None:
        self.fake.fail_next_start(name)

    def hang_next_resume(self, name: str) -> None:
        self.fake.hang_next_start(name)

    def fail_pauses(self, name: str, times: int) -> None:
        self.fake.fail_stops(name, times)

    async def set_running(self, name: str, running: bool) -> None:
        await self.fake.set_running(name, running)


class Ec2Cloud(StartStopCloud):
    """AWS EC2 on moto, behind the fake's proxy that adds boot and stop times and failures. Models are
    told through the `gpumanager:models` tag; cost, slots and protection through `[[hosts]]`."""

    provider = "aws"

    def __init__(self, fake: FakeEC2, machines: list[Machine]) -> None:
        super().__init__(fake, machines)
        self.environ = dict(fake.credentials)
        for m in machines:
            tags = {"gpumanager": "true"} | ({"gpumanager:models": ",".join(m.models)} if m.announce_models else {})
            fake.add_instance(
                m.name, running=m.running, models=m.models, slots=m.slots, token_delay=m.token_delay, tags=tags
            )
        fake.add_instance("not-ours", running=True, tags={"team": "other"})  # outside the tag filter

    def config(self) -> str:
        settings = {
            "region": self.fake.region,
            "endpoint_url": self.fake.endpoint_url,
            "tag_filter": '{ gpumanager = "true" }',
            "ollama_port": self.fake.ollama_port,
        }
        return provider_block("ec2", self.provider, settings) + overrides(self.provider, self.machines, lambda m: ())

    def host_id(self, name: str) -> str:
        return str(self.fake.instance_id(name))


@contextlib.asynccontextmanager
async def ec2_cloud(machines: list[Machine], *, boot_seconds: float = 0.2) -> AsyncIterator[Cloud]:
    async with FakeEC2(boot_seconds=boot_seconds, stop_seconds=0.05) as fake:
        yield Ec2Cloud(fake, machines)


class RunpodCloud(StartStopCloud):
    """RunPod, as the fake in tests/fakes/runpod.py speaks it: either serverless endpoints (each serving
    the machine's first model through its OpenAI-compatible URL) or pods running Ollama."""

    provider = "runpod"
    starts, stops = ("start", "warm"), ("stop", "cold")

    def __init__(self, fake: FakeRunPod, machines: list[Machine], kind: str) -> None:
        super().__init__(fake, machines)
        self.kind = kind
        self.environ = {"RUNPOD_API_KEY": fake.api_key}
        self.ids: dict[str, str] = {}
        for m in machines:
            if kind == "endpoint":
                self.ids[m.name] = fake.add_endpoint(
                    m.name, model=m.models[0], workers_min=int(m.running), idle_timeout=0.1, token_delay=m.token_delay
                )
            else:
                self.ids[m.name] = fake.add_pod(
                    m.name, running=m.running, models=m.models, token_delay=m.token_delay, cost_per_hour=m.cost
                )
        fake.add_pod("another-team", running=True)  # not matched by name_filter

    def config(self) -> str:
        settings = {
            "api_url": self.fake.api_url,
            "serverless_url": self.fake.serverless_url,
            "name_filter": "gpu-",
            "pod_address": "direct",
        }
        models: Callable[[Machine], tuple[str, ...]] = (
            (lambda m: m.models[:1]) if self.kind == "endpoint" else (lambda m: m.models)
        )
        return provider_block("runpod", self.provider, settings) + overrides(self.provider, self.machines, models)

    def host_id(self, name: str) -> str:
        return self.ids[name]


@contextlib.asynccontextmanager
async def runpod_endpoints(machines: list[Machine], *, boot_seconds: float = 0.2) -> AsyncIterator[Cloud]:
    async with FakeRunPod(boot_seconds=boot_seconds, stop_seconds=0.05) as fake:
        yield RunpodCloud(fake, machines, "endpoint")


@contextlib.asynccontextmanager
async def runpod_pods(machines: list[Machine], *, boot_seconds: float = 0.2) -> AsyncIterator[Cloud]:
    async with FakeRunPod(boot_seconds=boot_seconds, stop_seconds=0.05) as fake:
        yield RunpodCloud(fake, machines, "pod")


CLOUDS.update({"surf": surf_cloud, "ec2": ec2_cloud, "runpod-endpoint": runpod_endpoints, "runpod-pod": runpod_pods})

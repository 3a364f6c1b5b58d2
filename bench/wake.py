"""Wake timings, measured through a real gpumanager on loopback.

1. Ready -> first byte, per provider: from the moment a woken host is ready (its Ollama answers and
   lists the model; for a RunPod endpoint, its worker is up) to the first byte of the answer reaching
   the client whose request woke it. Every provider runs over its cloud's fake (tests/fakes, through
   tests/clouds.py as the lifecycle suite uses them) with the provider's default `poll_seconds` and
   the default `ollama_readiness_wait_seconds` (0.5 s). Two cases:
   - "Ollama after running": Ollama is ready `d` seconds after the cloud's machine runs (a VM whose
     Docker and Ollama still boot). `d` is spread over one cloud poll interval (at least one readiness
     interval), so the figures cover every phase of both pollings rather than one lucky alignment.
     A RunPod endpoint's worker is ready `d` after the warm-up was asked for. RunPod pods are measured
     reached directly (as tests/clouds.py has them) and through a loopback stand-in for RunPod's
     proxy (the provider's default `pod_address`).
   - "running said late": Ollama answers `d` seconds before the cloud says the machine runs (SURF's
     and EC2's status can trail the machine). Clouds whose status cannot trail their Ollama
     (simulated, RunPod) have no such row.
   Each round wakes several hosts (a request every 50 ms), each through its own request for a model
   only it has; the rounds differ in the machines' boot time, so that the moment they run falls at
   different phases of the cloud polling.
2. Idle overshoot, on the simulated cloud: how long past the end of its reservation window a host
   waits before gpumanager asks the cloud to pause it (with the ready -> first byte of those cycles).
Both parts also print what gpumanager itself measured of its wakes, read from its `GET /metrics`
(with an admin key): the mean seconds of each phase of `gpumanager_wake_phase_seconds` (resume,
boot, model, first_byte) and the count of `gpumanager_wakes_total` by outcome.

Run: `.venv/bin/python bench/wake.py` (part of `make bench`); `--providers surf,ec2` for some only,
`--no-cycles` without part 2. Loopback only; about two minutes. It measures the tree it lives in (its
own `src/` comes first on the import path), so a copy of the tree elsewhere measures that copy.
"""

# ruff: noqa: E402 (the tree's own `src/` goes on the import path before gpumanager is imported)
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import anyio
import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send
from tests.clouds import CLOUDS, Cloud, Ec2Cloud, Machine, RunpodCloud, SurfCloud
from tests.fakes.machine import until
from tests.fakes.runpod import FakeRunPod

from gpumanager import logs
from gpumanager.app import build_app
from gpumanager.config import (
    Ec2ProviderConfig,
    RunpodProviderConfig,
    SimulatedProviderConfig,
    SurfProviderConfig,
    TimingConfig,
    load,
)
from gpumanager.hosts import HostState
from gpumanager.keys import KeyStore
from gpumanager.providers.base import Polling
from gpumanager.providers.simulated import SimulatedProvider
from gpumanager.runtime import Runtime
from gpumanager.sim import running_server

PROVIDERS = ("simulated", "surf", "ec2", "runpod-endpoint", "runpod-pod")
AFTER, LATE = "Ollama after running", "running said late"
LATE_BOOT = 3.0  # the machine's boot in the "running said late" case; its Ollama answers before that
STAGGER = 0.05  # between the requests of one round, so that the fakes' APIs are not asked all at once
TIMING = """
[timing]
wake_keepalive_seconds = 600
reconcile_interval_seconds = 60
[paths]
log_file = ""
"""


@dataclass(frozen=True)
class Plan:
    kind: str  # a cloud of tests/clouds.py
    case: str  # AFTER or LATE
    rounds: int  # each on a fresh gpumanager and fake cloud
    machines: int  # woken at once in each round
    proxy: bool = False  # RunPod pods reached through RunPod's proxy (the default), not their public port

    @property
    def label(self) -> str:
        return f"{self.kind} (proxy)" if self.proxy else self.kind

    @property
    def samples(self) -> int:
        return self.rounds * self.machines


def plans(kinds: list[str]) -> list[Plan]:
    chosen = []
    for kind in kinds:
        if kind == "runpod-endpoint":  # one boot time per fake: the spread comes from the rounds
            chosen.append(Plan(kind, AFTER, rounds=6, machines=4))
        else:
            chosen.append(Plan(kind, AFTER, rounds=2, machines=12))
        if kind == "runpod-pod":  # tests/clouds.py reaches pods directly; the provider's default is the proxy
            chosen.append(Plan(kind, AFTER, rounds=2, machines=12, proxy=True))
        if kind in ("surf", "ec2"):
            chosen.append(Plan(kind, LATE, rounds=2, machines=12))
    return chosen


PHASES = ("resume", "boot", "model", "first_byte")  # of gpumanager_wake_phase_seconds, in wake order


@dataclass
class Phases:
    """What gpumanagers' /metrics said of their wakes, summed over several of them (one per round)."""

    seconds: dict[str, float] = field(default_factory=dict)  # phase -> sum of gpumanager_wake_phase_seconds
    counts: dict[str, int] = field(default_factory=dict)  # phase -> its count
    wakes: dict[str, int] = field(default_factory=dict)  # outcome -> gpumanager_wakes_total
    requests: int = 0  # gpumanager_requests_total, every status

    def add(self, text: str) -> None:
        """Add the counts of one /metrics answer (Prometheus text), all hosts together."""
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                phase, value = sample.labels.get("phase", ""), sample.value
                if sample.name == "gpumanager_wake_phase_seconds_sum":
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + value
                elif sample.name == "gpumanager_wake_phase_seconds_count":
                    self.counts[phase] = self.counts.get(phase, 0) + round(value)
                elif sample.name == "gpumanager_wakes_total":
                    outcome = sample.labels["outcome"]
                    self.wakes[outcome] = self.wakes.get(outcome, 0) + round(value)
                elif sample.name == "gpumanager_requests_total":
                    self.requests += round(value)

    def mean(self, phase: str) -> float:
        count = self.counts.get(phase, 0)
        return self.seconds.get(phase, 0.0) / count if count else math.nan

    def other_outcomes(self) -> str:
        """Wakes that did not end ready, e.g. "1 failed", or ""."""
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.wakes.items()) if outcome != "ready")


async def metrics_after_wakes(client: httpx.AsyncClient, admin_key: str, requests: int, settle: float = 5.0) -> str:
    """A gpumanager's /metrics once the `requests` sent to it are all recorded. A request is recorded,
    and with it the first_byte phase of the wake it waited for, just after its last byte went out:
    poll until gpumanager_requests_total reaches `requests` (at most `settle` s)."""
    deadline = time.monotonic() + settle
    while True:
        answer = await client.get("/metrics", headers={"Authorization": f"Bearer {admin_key}"})
        answer.raise_for_status()
        seen = Phases()
        seen.add(answer.text)
        if seen.requests >= requests or time.monotonic() > deadline:
            return answer.text
        await anyio.sleep(0.05)


@dataclass
class Result:
    plan: Plan
    poll: float = 0.0
    readiness: float = 0.0
    first_byte: list[float] = field(default_factory=list)
    failures: int = 0
    phases: Phases = field(default_factory=Phases)  # from gpumanager's /metrics, over all rounds


async def measure_round(plan: Plan, number: int, result: Result) -> None:
    """One round: a fresh fake cloud and gpumanager; every machine woken by its own request."""
    machines = [Machine(f"gpu-{i:02d}", models=(f"m{i:02d}:latest",), token_delay=0.0) for i in range(plan.machines)]
    # The machines' boot moves the moment they run against the cloud polling's phase: it differs per
    # round. Within a round, Ollama's delay `d` is spread over one poll interval (or one readiness
    # interval, if longer), and in the "running said late" case over most of the boot.
    poll = _default_poll(plan.kind)
    spread = LATE_BOOT - 0.2 if plan.case == LATE else max(poll, TimingConfig().ollama_readiness_wait_seconds)
    if plan.kind == "runpod-endpoint":  # its worker's boot is its `d`
        boot = 0.1 + spread * (number + 0.5) / plan.rounds
    elif plan.case == LATE:
        boot = LATE_BOOT
    else:
        boot = 0.5 + poll * number / plan.rounds
    async with contextlib.AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpumanager-wake-")))
        cloud = await stack.enter_async_context(CLOUDS[plan.kind](machines, boot_seconds=boot))
        # tests/clouds.py sets a fast pace for the tests: without it, the provider's default applies.
        config = cloud.config().replace("poll_seconds = 0.05\n", "")
        if plan.proxy:
            assert isinstance(cloud, RunpodCloud)
            pods = PodProxy(cloud.fake)
            stack.push_async_callback(pods.http.aclose)
            proxy = await stack.enter_async_context(running_server(pods))
            config = config.replace('pod_address = "direct"', f'pod_proxy_url = "{proxy.url}/{{pod_id}}"')
        (folder / "config.toml").write_text(TIMING + config)
        loaded = load(folder / "config.toml")
        keys = KeyStore(loaded.paths.api_keys_file)
        key = keys.generate("bench", "bench@example.org")[1]
        admin_key = keys.generate("bench-admin", "bench@example.org", admin=True)[1]
        app = build_app(loaded, environ=cloud.environ)
        runtime: Runtime = app.state.runtime
        async with (
            running_server(app, lifespan="on") as server,
            httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client,
        ):
            cloud.attach(runtime)
            with anyio.fail_after(30):
                await until(lambda: _all_paused(runtime, machines))
            provider = runtime.providers[cloud.provider]
            result.poll = provider.poll_seconds if isinstance(provider, Polling) else 0.0
            result.readiness = runtime.config.host_timing(cloud.provider).ollama_readiness_wait_seconds
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i, machine in enumerate(machines):
                        sample = number * plan.machines + i
                        delay = 0.1 + spread * (sample + 0.5) / plan.samples
                        tg.start_soon(_one, plan, cloud, client, machine, delay, result, i * STAGGER)
            result.phases.add(await metrics_after_wakes(client, admin_key, len(machines)))  # one request each


async def _one(
    plan: Plan, cloud: Cloud, client: httpx.AsyncClient, machine: Machine, delay: float, r: Result, wait: float
) -> None:
    """After `wait`, wake one machine with one streaming request; record ready -> first byte of the answer."""
    await anyio.sleep(wait)
    name, model = machine.name, machine.models[0]
    ready: list[float] = []
    if plan.kind != "runpod-endpoint" and plan.case == AFTER:
        cloud.sim(name).set_models([])  # Ollama answers, but is not ready until it lists the model

    async def make_ready() -> None:
        if plan.kind == "runpod-endpoint":  # the fake's worker comes up by itself, after its boot
            while not cloud.running(name):
                await anyio.sleep(0.001)
        elif plan.case == AFTER:
            await until(lambda: cloud.running(name))
            await anyio.sleep(delay)
            cloud.sim(name).set_models([model])
        else:
            await until(lambda: cloud.resumes(name) >= 1)
            await anyio.sleep(LATE_BOOT - delay)
            await _serve_before_running(cloud, name)
        ready.append(time.monotonic())

    body = {
        "model": model.removesuffix(":latest"),
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "options": {"num_predict": 2},
    }
    first, arrived = b"", 0.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(make_ready)
        async with client.stream("POST", "/api/chat", json=body) as response:
            async for chunk in response.aiter_raw():
                if not first:
                    first, arrived = chunk, time.monotonic()
        if response.status_code != 200:
            tg.cancel_scope.cancel()
    if response.status_code != 200 or b'"message"' not in first or not ready:
        r.failures += 1
        return
    r.first_byte.append(arrived - ready[0])


async def _serve_before_running(cloud: Cloud, name: str) -> None:
    """Start a machine's Ollama while its cloud still says it starts. The fakes have no knob for a
    status that trails the machine, so this starts the sim as their own boot would, a little early;
    their boot then finds it listening and only flips the status."""
    if isinstance(cloud, SurfCloud):
        await cloud.fake._ensure_sim(cloud.fake._machines[name])
    elif isinstance(cloud, Ec2Cloud):
        await cloud.fake._ensure_sim(cloud.fake._instances[name])
    else:
        raise ValueError(f"{cloud.provider}: no status that trails its machine")


class PodProxy:
    """A stand-in for RunPod's HTTPS proxy (`https://{pod_id}-{port}.proxy.runpod.net`) on loopback:
    `/{pod_id}/...` goes to the pod's public port while its container is up (as the fake's REST API
    tells it), and gets 502 otherwise, as from the real proxy."""

    def __init__(self, fake: FakeRunPod) -> None:
        self.fake = fake
        self.http = httpx.AsyncClient(trust_env=False, timeout=60)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        pod_id, _, path = scope["path"].lstrip("/").partition("/")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        pod = await self.http.get(
            f"{self.fake.api_url}/v2/pods/{pod_id}", headers={"authorization": f"Bearer {self.fake.api_key}"}
        )
        port = ((pod.json() if pod.status_code == 200 else {}).get("portMappings") or {}).get("11434")
        if port is None:
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b"pod not running"})
            return
        query = scope.get("query_string", b"").decode()
        url = f"http://127.0.0.1:{port}/{path}" + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"host", b"content-length")]
        async with self.http.stream(scope["method"], url, content=body, headers=headers) as answer:
            passed = [(k, v) for k, v in answer.headers.raw if k.lower() not in (b"content-length", b"connection")]
            await send({"type": "http.response.start", "status": answer.status_code, "headers": passed})
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _all_paused(runtime: Runtime, machines: list[Machine]) -> bool:
    hosts = runtime.fleet.hosts
    return all(m.name in hosts and hosts[m.name].state is HostState.PAUSED for m in machines)


def _default_poll(kind: str) -> float:
    """The provider's default `poll_seconds`."""
    polls = {
        "simulated": SimulatedProvider(SimulatedProviderConfig(name="x")).poll_seconds,
        "surf": SurfProviderConfig(name="x").poll_seconds,
        "ec2": Ec2ProviderConfig(name="x").poll_seconds,
        "runpod-endpoint": RunpodProviderConfig(name="x").poll_seconds,
        "runpod-pod": RunpodProviderConfig(name="x").poll_seconds,
    }
    return polls[kind]


async def measure(plan: Plan) -> Result:
    result = Result(plan)
    for number in range(plan.rounds):
        await measure_round(plan, number, result)
    return result


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def phase_cells(phases: Phases) -> str:
    """The mean seconds of each wake phase and the count of ready wakes, as table cells."""
    means = [phases.mean(name) for name in PHASES]
    cells = " ".join(f"{'-':>8}" if math.isnan(m) else f"{m:>7.3f}s" for m in means)
    return f"{cells} {phases.wakes.get('ready', 0):>5}"


PHASE_HEAD = f"{'resume':>8} {'boot':>8} {'model':>8} {'1st byte':>8} {'wakes':>5}"
PHASE_LEGEND = (
    "resume, boot, model, 1st byte: gpumanager's own mean seconds per wake phase, and wakes: its ready wakes, "
    "read from its /metrics (gpumanager_wake_phase_seconds sum/count, gpumanager_wakes_total)"
)


def provider_table(results: list[Result]) -> None:
    print(
        f"{'provider':<18} {'case':<21} {'poll':>6} {'ready wait':>10} {'n':>3} "
        f"{'median':>9} {'p95':>9} {'max':>9} {PHASE_HEAD}  target"
    )
    for r in results:
        values = r.first_byte or [float("nan")]
        median, high = statistics.median(values), p95(values) if len(values) > 1 else values[0]
        ok = median <= 0.5 and high <= 1.0
        failed = f"  ({r.failures} failed)" if r.failures else ""
        other = r.phases.other_outcomes()
        failed += f"  (wakes: {other})" if other else ""
        case = "worker after warm-up" if r.plan.kind == "runpod-endpoint" else r.plan.case
        print(
            f"{r.plan.label:<18} {case:<21} {r.poll:>5g}s {r.readiness:>9g}s {len(values):>3} "
            f"{median * 1000:>7.0f}ms {high * 1000:>7.0f}ms {max(values) * 1000:>7.0f}ms {phase_cells(r.phases)}  "
            f"{'PASS' if ok else 'FAIL'}{failed}"
        )


# -- part 2: wake/answer/idle/pause cycles of one simulated host ---------------------------------------

CYCLES = 8
CYCLE_CONFIG = """
[timing]
reservation_minutes = 0.01667
fallback_reservation_minutes = 0.01667
ollama_readiness_wait_seconds = {readiness}
reconcile_interval_seconds = 60
[paths]
log_file = ""
[[providers]]
type = "simulated"
name = "sim"
[[providers.hosts]]
name = "gpu"
models = ["llama3.2:latest"]
boot_seconds = 0.3
ollama_seconds = 0.4
pause_seconds = 0.1
token_delay_seconds = 0.0
"""


async def cycles(readiness: float) -> tuple[list[float], list[float], Phases]:
    folder = Path(tempfile.mkdtemp(prefix="gpumanager-wake-"))
    (folder / "config.toml").write_text(CYCLE_CONFIG.format(readiness=readiness))
    config = load(folder / "config.toml")
    keys = KeyStore(config.paths.api_keys_file)
    key = keys.generate("bench", "bench@example.org")[1]
    admin_key = keys.generate("bench-admin", "bench@example.org", admin=True)[1]
    app = build_app(config, environ={})
    runtime = app.state.runtime
    first_byte: list[float] = []
    overshoot: list[float] = []
    async with (
        running_server(app, lifespan="on") as server,
        httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client,
    ):
        provider = runtime.providers["sim"]
        assert isinstance(provider, SimulatedProvider)
        machine, host = provider.machines["gpu"], runtime.fleet.hosts["gpu"]
        for cycle in range(CYCLES):
            # Spread Ollama's start over one readiness interval, so the figures cover every phase of the
            # polling rather than one lucky (or unlucky) alignment.
            late = 0.3 + readiness * cycle / CYCLES
            machine.config = msgspec.structs.replace(machine.config, ollama_seconds=late)
            body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 3}}
            async with client.stream("POST", "/api/generate", json=body) as response:
                chunks = response.aiter_raw()
                await chunks.__anext__()
                first_byte.append(time.monotonic() - machine.ollama_up)
                async for _chunk in chunks:
                    pass
            deadline = host.idle_deadline  # the loop clock is time.monotonic()
            with anyio.fail_after(30):
                while host.state is not HostState.PAUSED:
                    await anyio.sleep(0.01)
            overshoot.append(machine.pause_asked - deadline)
        phases = Phases()
        phases.add(await metrics_after_wakes(client, admin_key, CYCLES))
    return first_byte, overshoot, phases


def row(label: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{label:<52} {statistics.median(ms):>8.1f} ms {ms[-1]:>8.1f} ms {ms[0]:>8.1f} ms"


def phase_row(label: str, phases: Phases) -> str:
    means = ", ".join(f"{name.replace('_', ' ')} {phases.mean(name):.3f} s" for name in PHASES)
    other = phases.other_outcomes()
    return f"{label:<52} {means}; wakes: {phases.wakes.get('ready', 0)} ready" + (f", {other}" if other else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated, of: " + ", ".join(PROVIDERS))
    parser.add_argument("--no-cycles", action="store_true", help="skip the simulated wake/idle/pause cycles")
    args = parser.parse_args()
    kinds = [k for k in args.providers.split(",") if k]
    unknown = set(kinds) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers: {', '.join(sorted(unknown))}")
    logs.setup("ERROR", None)
    print(f"wake timings of {ROOT / 'src' / 'gpumanager'}, Python {sys.version.split()[0]}")
    print("\nready -> first byte per provider, default poll_seconds and ollama_readiness_wait_seconds")
    started = time.monotonic()
    results = [anyio.run(measure, plan, backend_options={"use_uvloop": True}) for plan in plans(kinds)]
    provider_table(results)
    print(f"({time.monotonic() - started:.0f} s; target: median <= 500 ms and p95 <= 1000 ms)")
    print(f"({PHASE_LEGEND})")
    if not args.no_cycles:
        print(f"\n{CYCLES} wake/answer/idle/pause cycles of one simulated host per setting")
        print(f"{'measure':<52} {'p50':>11} {'max':>11} {'min':>11}")
        for readiness in (0.5, 0.1):
            first_byte, overshoot, phases = anyio.run(cycles, readiness, backend_options={"use_uvloop": True})
            print(row(f"ready -> first byte (readiness wait {readiness:g} s)", first_byte))
            print(row(f"idle overshoot past the window (readiness wait {readiness:g} s)", overshoot))
            print(phase_row(f"wake phases, mean (/metrics, readiness wait {readiness:g} s)", phases))
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

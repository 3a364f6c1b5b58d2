"""A real gpumanager on loopback, with simulated Ollama hosts, run in a background event loop.

The proxy and the hosts run in a portal thread (anyio's blocking portal), so a test can drive them
with the sync `openai`/`ollama` clients or with its own event loop, as users do.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from gpumanager.app import build_app
from gpumanager.config import load
from gpumanager.keys import KeyStore
from gpumanager.runtime import Runtime
from gpumanager.sim import SimOllama, SimServer, running_server
from gpumanager.sim.wire import respond
from tests.clouds import CLOUDS, Cloud, Machine


@dataclass
class SimHost:
    name: str
    models: tuple[str, ...] = ("llama3.2:latest",)
    slots: int = 4
    token_delay: float = 0.0
    sim_slots: int | None = None  # the simulated Ollama's own parallelism (default: = slots)
    cost_per_hour: float = 0.0


@dataclass
class Stack:
    portal: BlockingPortal
    url: str
    runtime: Runtime
    sims: dict[str, SimOllama]
    servers: dict[str, SimServer]
    admin_key: str
    user_key: str
    keys: KeyStore
    config_path: Path
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    app: Any = None  # the Starlette app itself, for a test that adds a route of its own

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.user_key}"}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` in the server's event loop (to read or change fleet state safely)."""

        async def run() -> Any:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result

        return self.portal.call(run)

    def serve(self, app: Any, **options: Any) -> SimServer:
        """Serve another ASGI app on loopback until the stack ends (a host coming back, a stand-in)."""
        return self.exits.enter_context(self.portal.wrap_async_context_manager(running_server(app, **options)))

    def new_key(self, name: str = "user", *, admin: bool = False) -> str:
        return self.keys.generate(name, f"{name}@example.org", admin=admin)[1]


def write_config(tmp_path: Path, hosts: list[tuple[str, str, SimHost]], extra: str = "") -> Path:
    blocks = [textwrap.dedent(extra).strip()]
    for name, url, spec in hosts:
        models = ", ".join(f'"{m}"' for m in spec.models)
        blocks.append(
            f'[[hosts]]\nname = "{name}"\nurl = "{url}"\nslots = {spec.slots}\nmodels = [{models}]\n'
            f"cost_per_hour = {spec.cost_per_hour}"
        )
    path = tmp_path / "config.toml"
    path.write_text("\n\n".join(b for b in blocks if b) + "\n")
    return path


FAST_TIMING = """
[timing]
queue_timeout_seconds = 5
wake_keepalive_seconds = 1
inventory_refresh_seconds = 0.5
probe_timeout_seconds = 1
shutdown_grace_seconds = 1
"""


# What an older OpenAI-compatible server (Ollama before 0.5.2) answers to `stream_options`.
STREAM_OPTIONS_REFUSAL = b'{"error":{"message":"unknown field \\"stream_options\\"","type":"invalid_request_error"}}'


async def refuse_stream_options(send: Any) -> None:
    await respond(send, 400, STREAM_OPTIONS_REFUSAL)


def replaying(body: bytes, receive: Any) -> Callable[[], Any]:
    """An ASGI `receive` that gives `body` (already read) first, then what `receive` gives."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    return replay


def cycle_timing(reservation: float = 0.01, fallback: float | None = None, **more: float) -> str:
    """`[timing]` for a cloud host that wakes in a fraction of a second and is paused `reservation`
    minutes after its last request (`fallback` after a wake nobody used; default the same)."""
    lines = {
        "reservation_minutes": reservation,
        "fallback_reservation_minutes": reservation if fallback is None else fallback,
        "startup_timeout_seconds": 10,
        "ollama_readiness_wait_seconds": 0.05,
        "probe_timeout_seconds": 1,
        "reconcile_interval_seconds": 0.3,
        "wake_keepalive_seconds": 0.5,
        "shutdown_grace_seconds": 1,
        **more,
    }
    return "[timing]\n" + "".join(f"{key} = {value}\n" for key, value in lines.items())


@contextlib.contextmanager
def running_stack(
    tmp_path: Path, hosts: list[SimHost], *, extra: str = FAST_TIMING, environ: dict[str, str] | None = None
) -> Iterator[Stack]:
    """gpumanager in front of static simulated hosts."""
    with start_blocking_portal() as portal, contextlib.ExitStack() as stack:
        sims, servers = _static_hosts(portal, stack, hosts)
        config_path = write_config(tmp_path, [(s.name, servers[s.name].url, s) for s in hosts], extra)
        yield _serve(portal, stack, config_path, environ or {}, sims, servers)


@contextlib.contextmanager
def running_cloud_stack(
    tmp_path: Path,
    kind: str,
    machines: list[Machine],
    *,
    extra: str = FAST_TIMING,
    static: Sequence[SimHost] = (),
    boot_seconds: float | None = None,
) -> Iterator[tuple[Stack, Cloud]]:
    """gpumanager in front of a cloud of one kind (see tests/clouds.py), and optionally static hosts."""
    with running_mixed_stack(tmp_path, {kind: machines}, extra=extra, static=static, boot_seconds=boot_seconds) as (
        stack,
        clouds,
    ):
        yield stack, clouds[kind]


@contextlib.contextmanager
def running_mixed_stack(
    tmp_path: Path,
    fleet: dict[str, list[Machine]],
    *,
    extra: str = FAST_TIMING,
    static: Sequence[SimHost] = (),
    boot_seconds: float | None = None,
) -> Iterator[tuple[Stack, dict[str, Cloud]]]:
    """gpumanager in front of clouds of several kinds at once, and optionally static hosts."""
    with start_blocking_portal() as portal, contextlib.ExitStack() as stack:
        options = {} if boot_seconds is None else {"boot_seconds": boot_seconds}
        clouds: dict[str, Cloud] = {
            kind: stack.enter_context(portal.wrap_async_context_manager(CLOUDS[kind](machines, **options)))
            for kind, machines in fleet.items()
        }
        sims, servers = _static_hosts(portal, stack, static)
        config = "\n".join([extra, *(cloud.config() for cloud in clouds.values())])
        config_path = write_config(tmp_path, [(s.name, servers[s.name].url, s) for s in static], config)
        environ = {k: v for cloud in clouds.values() for k, v in cloud.environ.items()}
        running = _serve(portal, stack, config_path, environ, sims, servers)
        for cloud in clouds.values():
            cloud.attach(running.runtime)
        yield running, clouds


def _static_hosts(
    portal: BlockingPortal, stack: contextlib.ExitStack, hosts: Sequence[SimHost]
) -> tuple[dict[str, SimOllama], dict[str, SimServer]]:
    """A simulated Ollama server on loopback for each static host, until `stack` closes."""
    sims: dict[str, SimOllama] = {}
    servers: dict[str, SimServer] = {}
    for spec in hosts:
        sim = SimOllama(
            name=spec.name, models=spec.models, slots=spec.sim_slots or spec.slots, token_delay=spec.token_delay
        )
        servers[spec.name] = stack.enter_context(portal.wrap_async_context_manager(running_server(sim)))
        sims[spec.name] = sim
    return sims, servers


def _serve(
    portal: BlockingPortal,
    stack: contextlib.ExitStack,
    config_path: Path,
    environ: dict[str, str],
    sims: dict[str, SimOllama],
    servers: dict[str, SimServer],
) -> Stack:
    config = load(config_path)
    keys = KeyStore(config.paths.api_keys_file)
    admin_key = keys.generate("admin", "admin@example.org", admin=True)[1]
    user_key = keys.generate("user", "user@example.org")[1]
    app = build_app(config, environ=environ)
    proxy = stack.enter_context(
        portal.wrap_async_context_manager(running_server(app, lifespan="on", timeout_graceful_shutdown=1))
    )
    runtime = app.state.runtime
    return Stack(
        portal, proxy.url, runtime, sims, servers, admin_key, user_key, keys, config_path, exits=stack, app=app
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `predicate` (in the test's thread) until it holds, failing after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(interval)

"""`gpumanager demo`: the whole flow on a laptop, with a simulated cloud and no account.

Two paused simulated GPU hosts, short boot and idle windows. The demo makes an admin key, prints
copy-paste examples, sends one request itself and narrates what happens: the wake, the streamed
answer, the idle window and the pause. Then it stays up for the newcomer's own requests.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio
import httpx

from gpumanager import logs
from gpumanager.app import build_app
from gpumanager.config import load
from gpumanager.hosts import HostState
from gpumanager.keys import KeyStore
from gpumanager.runtime import Runtime
from gpumanager.serve import local_url, serve_app, server_for
from gpumanager.sockets import bind_socket

ANSWER = (
    "A GPU that sleeps costs nothing. gpumanager woke this simulated host for your request, "
    "streamed the answer token by token, and will pause the host again once it has been idle "
    "for its reservation window."
)

CONFIG = """\
# The demo's fleet: a simulated cloud of two paused GPU hosts (no cloud account needed).
[server]
host = "{host}"
port = {port}

[timing]
reservation_minutes = 0.25            # a host stays up 15 s after its last request
fallback_reservation_minutes = 0.25
wake_keepalive_seconds = 2
ollama_readiness_wait_seconds = 0.1
reconcile_interval_seconds = 5

[paths]
log_file = "gpumanager.log"

[metrics]
gpu_scrape_seconds = 2                # the simulated GPUs' metrics on the dashboard, every 2 s

[[providers]]
type = "simulated"
name = "demo-cloud"

[[providers.hosts]]
name = "gpu-a"
models = ["llama3.2:latest"]
slots = 4
cost_per_hour = 1.2
boot_seconds = 4
pause_seconds = 1
token_delay_seconds = 0.05
answer = "{answer}"

[[providers.hosts]]
name = "gpu-b"
models = ["qwen2.5:7b", "all-minilm:latest"]
slots = 4
cost_per_hour = 2.5
boot_seconds = 6
pause_seconds = 1
token_delay_seconds = 0.05
answer = "{answer}"
"""


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')}  {message}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gpumanager-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(
            f"gpumanager: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
            "try `gpumanager demo --port 8001`",
            file=sys.stderr,
        )
        return 1
    config_path = folder / "config.toml"
    config_path.write_text(CONFIG.format(host=args.host, port=args.port, answer=ANSWER))
    config = load(config_path)
    logs.setup("INFO", config.paths.log_file, console=False)
    record, key = KeyStore(config.paths.api_keys_file).generate("demo", "demo@localhost", admin=True)
    app = build_app(config, environ={})
    runtime: Runtime = app.state.runtime
    url = local_url(args.host, args.port)
    server = server_for(app, max_connections=config.server.max_connections)
    _banner(url, key, folder, login=f"{url}/dashboard/login/{runtime.sessions.link(record.id)}")

    async def narrate() -> None:
        tg_watch = anyio.create_task_group()
        async with tg_watch:
            tg_watch.start_soon(_watch, runtime)
            try:
                await _narrate(runtime, url, key)
            except (httpx.HTTPError, TimeoutError) as exc:
                say(f"The demo's own request did not finish ({exc or type(exc).__name__}).")
            if args.once:
                server.should_exit = True
            else:
                say("Your turn: try the examples above (Ctrl-C to stop). Watch hosts wake and pause here.")

    with sock:
        anyio.run(functools.partial(serve_app, server, sock, runtime, url, 2.0, when_ready=narrate))
    print("\nbye: the demo's files stay in", folder)
    return 0


async def _watch(runtime: Runtime) -> None:
    """Narrate every host state change, with how long the host spent in the state before."""
    seen = {name: (host.state, time.monotonic()) for name, host in runtime.fleet.hosts.items()}
    while True:
        await anyio.sleep(0.05)
        for name, host in runtime.fleet.hosts.items():
            before, since = seen.get(name, (HostState.UNKNOWN, time.monotonic()))
            if host.state is not before:
                seen[name] = (host.state, time.monotonic())
                say(f"  {name}: {before} -> {host.state} (after {time.monotonic() - since:.1f}s){_why(host.state)}")


def _why(state: HostState) -> str:
    return {
        HostState.RESUMING: "  the cloud was asked to resume it",
        HostState.STARTING: "  the machine runs; waiting for Ollama to answer and list the model",
        HostState.READY: "  Ollama answers: requests flow",
        HostState.PAUSING: "  idle past its window: pausing it, so it costs nothing",
        HostState.PAUSED: "  paused: no cost until the next request",
    }.get(state, "")


async def _narrate(runtime: Runtime, url: str, key: str) -> None:
    hosts = ", ".join(
        f"{h.name} ({h.state}, {', '.join(sorted(h.models))}, {h.cost_per_hour}/h)"
        for h in runtime.fleet.hosts.values()
    )
    say(f"The fleet: {hosts}.")
    say("Asking for llama3.2: its only host, gpu-a, is paused, so gpumanager wakes it and holds the request.")
    started = time.monotonic()
    first: float | None = None
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        body = {"model": "llama3.2", "prompt": "Why pause idle GPUs?", "options": {"num_predict": len(ANSWER.split())}}
        async with client.stream("POST", "/api/generate", json=body) as response:
            async for line in response.aiter_lines():
                word = _response_text(line)
                if word and first is None:
                    first = time.monotonic()
                    say(f"First token after {first - started:.1f}s (the wake). The answer streams in:")
                    print("          ", end="", flush=True)
                print(word, end="", flush=True)
    print(flush=True)
    window = runtime.config.timing.reservation_minutes * 60
    say(
        f"Answered in {time.monotonic() - started:.1f}s. gpu-a stays reserved for {window:.0f}s, "
        "then pauses if nobody uses it."
    )
    with anyio.fail_after(window + 30):
        while runtime.fleet.hosts["gpu-a"].state is not HostState.PAUSED:  # noqa: ASYNC110 - narration pace
            await anyio.sleep(0.1)
    say("The whole cycle is done: wake, answer, idle window, pause. An idle fleet costs nothing.")


def _response_text(line: str) -> str:
    import json

    try:
        frame = json.loads(line)
    except ValueError:
        return ""
    return str(frame.get("response", "")) if isinstance(frame, dict) else ""


def _banner(url: str, key: str, folder: Path, *, login: str) -> None:
    python = sys.executable  # the interpreter that runs gpumanager has the openai and ollama clients
    script = Path(sys.executable).with_name("gpumanager")
    gpumanager = str(script) if script.exists() else f"{python} -m gpumanager"
    print(
        textwrap.dedent(f"""
        gpumanager demo: a proxy at {url} in front of a simulated cloud of two paused GPU hosts.
        Its config, keys and log are in {folder} (log: {folder / "gpumanager.log"}).

        Admin API key (made for this demo):  {key}

        Dashboard: {url}/dashboard
          log in at once with this one-time link: {login}

        Try it yourself (in another terminal):
          curl {url}/api/chat -H "Authorization: Bearer {key}" \\
               -d '{{"model": "qwen2.5:7b", "messages": [{{"role": "user", "content": "hello"}}]}}'
          curl {url}/gpu/discover -H "Authorization: Bearer {key}"

          {python} -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="{key}")
          r = c.chat.completions.create(model="llama3.2", messages=[{{"role": "user", "content": "hi"}}])
          print(r.choices[0].message.content)'

          {python} -c 'import ollama; c = ollama.Client(host="{url}", headers={{"Authorization": "Bearer {key}"}})
          print(c.generate(model="qwen2.5:7b", prompt="hi").response)'

          {gpumanager} events --follow --url {url} --key {key}     # what the fleet does, live
          {gpumanager} usage --config {folder / "config.toml"}     # who used what, and what it cost
        """)
    )

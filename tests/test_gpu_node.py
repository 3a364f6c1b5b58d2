"""The GPU node kit (gpu-node/) and the project's Dockerfile.

No Docker engine is needed: every part runs as a real process here.

- entrypoint.sh runs with a stand-in `ollama` executable first on PATH, a shell
  script that records each call's arguments;
- the nginx door is a real nginx (it must be installed: Debian/Ubuntu
  `apt-get install -y --no-install-recommends nginx`) serving the rendered
  template in front of a stand-in Ollama and a stand-in dcgm-exporter (uvicorn
  on loopback, in threads);
- docker-compose.yml and the Dockerfile are checked for their structure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "gpu-node"
ENTRYPOINT = NODE / "entrypoint.sh"
COMPOSE = NODE / "docker-compose.yml"
TEMPLATE = NODE / "nginx.conf.template"
ENV_EXAMPLE = NODE / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

TOKEN = "0123456789abcdef" * 4  # the shape `openssl rand -hex 32` prints


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def process_gone(pid: int) -> bool:
    if not Path("/proc/self/stat").exists():  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie is gone too


def live_group_members(pgid: int) -> list[str]:
    """Processes of a process group that still run (Linux; elsewhere nothing is checked)."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(f"{stat_path.parent.name} {name}")
    return members


# --------------------------------------------------------------------------------------------
# entrypoint.sh with a stand-in `ollama`
# --------------------------------------------------------------------------------------------

STANDIN_OLLAMA = r"""#!/bin/sh
# Stand-in for `ollama`: records each call's arguments, one line per call.
# The TERM traps are set before the call is recorded and the pid published: a
# test signals once it sees them, and the signal must find the trap.
case "$1" in
serve)
    trap 'echo "serve stopped by TERM" >> "$STANDIN_LOG"; exit 0' TERM
    ;;
pull)
    case " ${STANDIN_PULL_HANG:-} " in
    *" $2 "*) trap 'echo "pull $2 stopped by TERM" >> "$STANDIN_LOG"; exit 143' TERM ;;
    esac
    ;;
esac
printf '%s\n' "$*" >> "$STANDIN_LOG"
case "$1" in
serve)
    echo $$ > "$STANDIN_DIR/serve.pid"
    if [ -n "${STANDIN_SERVE_EXIT:-}" ]; then
        sleep 0.3
        echo "serve exits $STANDIN_SERVE_EXIT" >> "$STANDIN_LOG"
        exit "$STANDIN_SERVE_EXIT"
    fi
    while :; do sleep 0.02; done
    ;;
list)
    calls=$(grep -c '^list$' "$STANDIN_LOG")
    [ "$calls" -gt "${STANDIN_LIST_FAILS:-0}" ] || { echo "could not connect" >&2; exit 1; }
    echo "NAME    ID    SIZE    MODIFIED"
    ;;
pull)
    case " ${STANDIN_PULL_FAIL:-} " in
    *" $2 "*) echo "Error: pull model manifest: file does not exist" >&2; exit 1 ;;
    esac
    case " ${STANDIN_PULL_HANG:-} " in
    *" $2 "*)
        while :; do sleep 0.02; done
        ;;
    esac
    echo success
    ;;
esac
"""


# Starts the entrypoint the way a container's first process starts: with no signal ignored.
# A shell cannot trap a signal ignored on entry, and pytest may run with SIGINT ignored (a
# background job of a non-interactive shell does), which its children would inherit.
# (Popen's preexec_fn could do this too, but it is not safe while other threads run.)
WITH_DEFAULT_SIGNALS = """
import os, signal, sys
for signum in signal.valid_signals():
    try:
        signal.signal(signum, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL, SIGSTOP, and the ones libc keeps for itself
os.execv(sys.argv[1], sys.argv[1:])
"""


def ignored_signals(pid: int) -> set[int] | None:
    """The signals a process ignores (from procfs; None where there is none)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


@dataclass
class Node:
    """One run of entrypoint.sh."""

    dir: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def calls(self) -> list[str]:
        log = self.dir / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def pulls(self) -> list[str]:
        return [c.removeprefix("pull ") for c in self.calls() if c.startswith("pull ")]

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def serve_pid(self) -> int:
        path = self.dir / "serve.pid"
        wait_until(lambda: path.exists() and path.read_text().strip(), 5, "the stand-in server")
        return int(path.read_text())

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Signal the entrypoint; return its exit status and how long it took to exit."""
        start = time.monotonic()
        self.proc.send_signal(signum)
        status = self.proc.wait(timeout=10)
        took = time.monotonic() - start
        self.assert_nothing_left()
        return status, took

    def assert_nothing_left(self) -> None:
        """Once the entrypoint has exited, none of its children may still run."""
        wait_until(
            lambda: not live_group_members(self.proc.pid),
            2,
            f"the entrypoint's children to exit: {live_group_members(self.proc.pid)}",
        )


@pytest.fixture
def run_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    standin = bin_dir / "ollama"
    standin.write_text(STANDIN_OLLAMA)
    standin.chmod(0o755)
    started: list[Node] = []

    def run(**env: str) -> Node:
        stderr_path = tmp_path / "entrypoint.stderr"
        full_env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "STANDIN_DIR": str(tmp_path),
            "STANDIN_LOG": str(tmp_path / "calls.log"),
            "PULL_WAIT_INTERVAL": "0.01",
            **env,
        }
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", WITH_DEFAULT_SIGNALS, str(ENTRYPOINT)],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        node = Node(tmp_path, proc, stderr_path)
        started.append(node)
        return node

    yield run
    for node in started:  # whatever a failed test left behind: its own process group
        if node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)


def test_entrypoint_is_posix_sh_and_executable() -> None:
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK), "gpu-node/entrypoint.sh must be executable (mode 755)"
    assert "set -eu" in ENTRYPOINT.read_text()
    dash = shutil.which("dash")
    if dash:  # the Ollama image's /bin/sh is dash
        subprocess.run([dash, "-n", str(ENTRYPOINT)], check=True, timeout=5)


def test_entrypoint_waits_then_pulls_each_model_and_survives_a_failed_pull(run_node: Callable[..., Node]) -> None:
    node = run_node(
        PULL_MODELS=" llama3.2, qwen2.5:7b ,,nomic-embed-text",
        STANDIN_LIST_FAILS="2",
        STANDIN_PULL_FAIL="qwen2.5:7b",
    )
    wait_until(lambda: "all models pulled" in node.stderr() or "not pulled" in node.stderr(), 20, "the pulls to end")

    # Trimmed, empties skipped, in order, and past the failing one.
    assert node.pulls() == ["llama3.2", "qwen2.5:7b", "nomic-embed-text"]
    calls = node.calls()
    # `ollama list` failed twice, then answered; the pulls came only after that.
    assert calls.count("list") == 3
    assert calls.index("pull llama3.2") > max(i for i, c in enumerate(calls) if c == "list")
    assert calls.count("serve") == 1
    assert "pull of qwen2.5:7b failed" in node.stderr()

    # The failed pull killed neither the server nor the entrypoint.
    serve_pid = node.serve_pid()
    assert not process_gone(serve_pid)
    assert node.proc.poll() is None

    # SIGTERM (docker stop) reaches the server, and the entrypoint exits promptly with it.
    status, took = node.stop(signal.SIGTERM)
    assert took < 5, f"the entrypoint took {took:.2f} s to exit after SIGTERM"
    assert "serve stopped by TERM" in node.calls()
    assert status == 0  # the server's own status (the stand-in exits 0 on SIGTERM)
    wait_until(lambda: process_gone(serve_pid), 2, "the stand-in server to exit")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_pull_stops_the_pull_and_the_server(run_node: Callable[..., Node], signum: int) -> None:
    node = run_node(PULL_MODELS="huge-model,next-model", STANDIN_PULL_HANG="huge-model")
    wait_until(lambda: "pull huge-model" in node.calls(), 5, "the pull to start")
    serve_pid = node.serve_pid()
    ignored = ignored_signals(node.proc.pid)
    assert ignored is None or signum not in ignored, f"the entrypoint started with {signum!r} ignored"

    status, took = node.stop(signum)

    assert took < 5, f"the entrypoint took {took:.2f} s to exit after {signum!r}"
    calls = node.calls()
    assert "serve stopped by TERM" in calls  # SIGINT is passed on as SIGTERM
    wait_until(lambda: "pull huge-model stopped by TERM" in node.calls(), 2, "the hanging pull to be stopped")
    assert "pull next-model" not in node.calls()
    assert process_gone(serve_pid)
    assert status == 0


def test_when_ollama_never_answers_nothing_is_pulled_and_the_server_keeps_running(
    run_node: Callable[..., Node],
) -> None:
    node = run_node(PULL_MODELS="llama3.2", STANDIN_LIST_FAILS="1000", PULL_WAIT_TRIES="5")
    wait_until(lambda: "did not answer" in node.stderr(), 5, "the wait for Ollama to give up")

    assert node.calls().count("list") == 5
    assert node.pulls() == []
    assert "after 5 tries" in node.stderr()
    assert node.proc.poll() is None
    assert not process_gone(node.serve_pid())

    status, took = node.stop()
    assert took < 5
    assert status == 0


def test_when_the_server_dies_the_entrypoint_exits_with_its_status(run_node: Callable[..., Node]) -> None:
    node = run_node(PULL_MODELS="huge-model", STANDIN_PULL_HANG="huge-model", STANDIN_SERVE_EXIT="3")
    status = node.proc.wait(timeout=5)

    assert status == 3  # so `restart: unless-stopped` starts the container again
    node.assert_nothing_left()
    wait_until(lambda: "pull huge-model stopped by TERM" in node.calls(), 2, "the pull to be stopped")
    assert "ollama exited with status 3" in node.stderr()


def test_no_models_to_pull(run_node: Callable[..., Node]) -> None:
    node = run_node(PULL_MODELS=" , ,")
    wait_until(lambda: "all models pulled" in node.stderr(), 5, "the (empty) pulls")
    assert node.pulls() == []
    status, took = node.stop()
    assert (status, took < 5) == (0, True)


# --------------------------------------------------------------------------------------------
# docker-compose.yml (structure; no `docker compose` here)
# --------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("-"):
            return arg if missing else value
        if op and op.endswith("?"):
            if missing:
                raise ValueError(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(one, value)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_ollama_service(compose: dict) -> None:
    ollama = compose["services"]["ollama"]
    assert ollama["image"].split(":")[0] == "ollama/ollama"
    assert ollama["restart"] == "unless-stopped"

    # GPU.
    (device,) = ollama["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == "all"
    assert "gpu" in device["capabilities"]

    # Our entrypoint, mounted read-only.
    entrypoint = ollama["entrypoint"]
    entrypoint = entrypoint if isinstance(entrypoint, list) else shlex.split(entrypoint)
    assert entrypoint in (["/entrypoint.sh"], ["/bin/sh", "/entrypoint.sh"])
    assert "./entrypoint.sh:/entrypoint.sh:ro" in ollama["volumes"]

    # Models in a named volume.
    model_volume = next(v for v in ollama["volumes"] if v.split(":")[1] == "/root/.ollama")
    assert model_volume.split(":")[0] in compose["volumes"]

    # Not reachable from outside except through the door.
    assert "ports" not in ollama
    assert ollama.get("network_mode") != "host"

    # Environment: defaults, and the values of .env.example.
    env = environment(ollama)
    defaults = {k: interpolate(v, {}) for k, v in env.items()}
    assert defaults["OLLAMA_HOST"] == "0.0.0.0:11434"
    assert defaults["OLLAMA_NUM_PARALLEL"] == "4"  # gpumanager's [scheduler] default_slots
    assert defaults["OLLAMA_KEEP_ALIVE"] == "30m"
    assert defaults["PULL_MODELS"] == "llama3.2"
    example = read_env_file(ENV_EXAMPLE)
    assert interpolate(env["PULL_MODELS"], example) == example["OLLAMA_MODELS"]
    assert interpolate(env["OLLAMA_NUM_PARALLEL"], {"OLLAMA_NUM_PARALLEL": "2"}) == "2"
    # OLLAMA_MODELS is Ollama's model directory inside the image: the pull list must not land
    # there, neither directly nor through env_file.
    assert "OLLAMA_MODELS" not in env
    assert "env_file" not in ollama
    assert "PULL_MODELS" in ENTRYPOINT.read_text()

    # Healthcheck without curl.
    test = ollama["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert "ollama list" in " ".join(test[1:])


def test_compose_door_service(compose: dict) -> None:
    door = compose["services"]["door"]
    ollama_env = environment(compose["services"]["ollama"])
    assert door["image"].split(":")[0] == "nginx"
    assert door["restart"] in ("unless-stopped", "always")
    assert door["depends_on"]["ollama"]["condition"] == "service_healthy"
    # The exporter is started first, but neither waited for nor required: the door resolves it
    # at each request, and must serve Ollama where the exporter cannot run.
    exporter = door["depends_on"]["dcgm-exporter"]
    assert exporter["condition"] == "service_started"
    assert exporter["required"] is False

    env = environment(door)
    listen = interpolate(env["DOOR_LISTEN"], {})
    # The door is the one published port, to the port it listens on.
    (port,) = door["ports"]
    assert interpolate(port, {}) == f"11434:{listen}"
    assert interpolate(port, {"OLLAMA_PORT": "10.0.0.5:8443"}) == f"10.0.0.5:8443:{listen}"
    # It forwards to the ollama service on the port Ollama listens on.
    upstream = interpolate(env["OLLAMA_UPSTREAM"], {})
    assert upstream == "ollama:" + interpolate(ollama_env["OLLAMA_HOST"], {}).rsplit(":", 1)[1]
    # And /gpu-metrics to the exporter, by its service name, on the port it listens on.
    exporter_env = environment(compose["services"]["dcgm-exporter"])
    exporter_port = interpolate(exporter_env.get("DCGM_EXPORTER_LISTEN", ":9400"), {}).rsplit(":", 1)[1]
    assert interpolate(env["DCGM_UPSTREAM"], {}) == f"dcgm-exporter:{exporter_port}"
    # No token, no door.
    with pytest.raises(ValueError, match="GPUMANAGER_UPSTREAM_TOKEN"):
        interpolate(env["GPUMANAGER_UPSTREAM_TOKEN"], {})
    with pytest.raises(ValueError):
        interpolate(env["GPUMANAGER_UPSTREAM_TOKEN"], {"GPUMANAGER_UPSTREAM_TOKEN": ""})
    assert interpolate(env["GPUMANAGER_UPSTREAM_TOKEN"], {"GPUMANAGER_UPSTREAM_TOKEN": TOKEN}) == TOKEN
    # Every variable of the template is given.
    assert set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text())) <= set(env)

    # The template goes where the nginx image renders templates.
    (mount,) = [v for v in door["volumes"] if v.startswith("./nginx.conf.template:")]
    target = mount.split(":")[1]
    assert target.startswith("/etc/nginx/templates/") and target.endswith(".conf.template")

    test = " ".join(door["healthcheck"]["test"])
    assert f"127.0.0.1:{listen}/door-health" in test


def test_compose_dcgm_exporter_service(compose: dict) -> None:
    exporter = compose["services"]["dcgm-exporter"]
    image, _, tag = exporter["image"].partition(":")
    assert image == "nvcr.io/nvidia/k8s/dcgm-exporter"
    # Pinned: DCGM version, exporter version, image variant (a parser depends on its output).
    assert re.fullmatch(r"\d+(\.\d+)+-\d+(\.\d+)+-[a-z0-9.]+", tag), tag
    assert exporter["restart"] == "unless-stopped"

    # Every GPU, reserved as Ollama's are.
    (device,) = exporter["deploy"]["resources"]["reservations"]["devices"]
    (ollama_device,) = compose["services"]["ollama"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == ollama_device
    assert device["count"] == "all" and "gpu" in device["capabilities"]

    # Reachable only through the door: no port of its own, no host network, no extra privilege
    # (SYS_ADMIN only serves the profiling series, which gpumanager does not read).
    assert "ports" not in exporter
    assert exporter.get("network_mode") != "host"
    assert not exporter.get("privileged")
    assert "SYS_ADMIN" not in exporter.get("cap_add", [])
    published = sorted(name for name, service in compose["services"].items() if "ports" in service)
    assert published == ["door"]

    # It reads the GPUs as often as gpumanager's default scrape asks (ms; its own default is 30000).
    env = environment(exporter)
    assert interpolate(env["DCGM_EXPORTER_INTERVAL"], {}) == "15000"


def test_env_example() -> None:
    example = read_env_file(ENV_EXAMPLE)
    assert {
        "OLLAMA_MODELS",
        "OLLAMA_NUM_PARALLEL",
        "OLLAMA_KEEP_ALIVE",
        "GPUMANAGER_UPSTREAM_TOKEN",
        "OLLAMA_PORT",
    } <= set(example)
    assert example["GPUMANAGER_UPSTREAM_TOKEN"] == ""  # no token is ever committed
    assert example["OLLAMA_NUM_PARALLEL"] == "4"
    assert "openssl rand -hex 32" in ENV_EXAMPLE.read_text()


# --------------------------------------------------------------------------------------------
# The nginx door, for real
# --------------------------------------------------------------------------------------------

TAGS = {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189}]}
CHAT_CHUNKS = 4
CHUNK_GAP = 0.06

# What dcgm-exporter 4.x serves at /metrics with its default counters, on a machine with two
# A100s (one busy): HELP and TYPE lines, its labels in its own order, the driver version as a
# label, series gpumanager does not read, and a counter.
DCGM_GPUS = (  # gpu index, UUID, PCI bus id
    ("0", "GPU-5bd3a1e2-7c0f-4b8e-9a41-0d6c3f2e1a77", "00000000:07:00.0"),
    ("1", "GPU-e08a44c1-2b93-4d5f-8c07-91f2ab6d3c05", "00000000:0F:00.0"),
)
DCGM_MODEL = "NVIDIA A100-SXM4-40GB"
DCGM_SERIES = (  # field, type, help, the value of each GPU (as the exporter writes it)
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", ("1410", "210")),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", ("61", "33")),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", ("312.250000", "55.500000")),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        ("913374610", "201877543"),
    ),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", ("87", "0")),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", ("41", "0")),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", ("9812", "40333")),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", ("30512", "3")),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", ("0", "0")),
)


def dcgm_text(
    series: Iterable[tuple[str, str, str, tuple[str, ...]]] = DCGM_SERIES,
    gpus: Iterable[tuple[str, str, str]] = DCGM_GPUS,
    model: str = DCGM_MODEL,
) -> str:
    """Prometheus text as dcgm-exporter writes it: per field its HELP and TYPE, then one line per
    GPU with the labels gpu, UUID, pci_bus_id, device, modelName, Hostname, then the driver
    version (a field of type `label` in its counters file)."""
    gpus = list(gpus)
    lines = []
    for name, kind, help_text, values in series:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for (gpu, uuid, bus), value in zip(gpus, values, strict=True):
            labels = (
                f'gpu="{gpu}",UUID="{uuid}",pci_bus_id="{bus}",device="nvidia{gpu}",modelName="{model}",'
                'Hostname="3f9c2a1b7d4e",DCGM_FI_DRIVER_VERSION="550.127.05"'
            )
            lines.append(f"{name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


DCGM_TEXT = dcgm_text()
DCGM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class StandIn:
    """A stand-in upstream (Ollama or dcgm-exporter) on loopback, and the requests it saw."""

    port: int
    seen: list[dict] = field(default_factory=list)


async def record(request: Request, seen: list[dict]) -> bytes:
    body = await request.body()
    seen.append(
        {
            "path": request.url.path,
            "host": request.headers.get("host"),
            "authorization": request.headers.get("authorization"),
            "body": body,
            "peer_port": request.client.port if request.client else None,
        }
    )
    return body


def stand_in_app(seen: list[dict]) -> Starlette:
    async def tags(request: Request) -> Response:
        await record(request, seen)
        return JSONResponse(TAGS)

    async def chat(request: Request) -> Response:
        await record(request, seen)

        async def chunks() -> AsyncIterator[str]:
            for i in range(CHAT_CHUNKS):
                if i:
                    await anyio.sleep(CHUNK_GAP)
                done = i == CHAT_CHUNKS - 1
                message = {"role": "assistant", "content": "" if done else f"word{i} "}
                yield json.dumps({"model": "llama3.2", "message": message, "done": done}) + "\n"

        return StreamingResponse(chunks(), media_type="application/x-ndjson")

    return Starlette(
        routes=[
            Route("/api/tags", tags),
            Route("/api/chat", chat, methods=["POST"]),
        ]
    )


def exporter_app(seen: list[dict], text: Callable[[], str] = lambda: DCGM_TEXT) -> Starlette:
    """A stand-in dcgm-exporter: `text()` at /metrics, as Prometheus text."""

    async def metrics(request: Request) -> Response:
        await record(request, seen)
        return Response(text(), headers={"content-type": DCGM_CONTENT_TYPE})

    return Starlette(routes=[Route("/metrics", metrics)])


@contextlib.contextmanager
def serving(app: Starlette, what: str) -> Iterator[int]:
    """Serve `app` with uvicorn on a free loopback port, in a thread; yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", ws="none", http="h11", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 10, what)
        assert server.started, f"{what} did not start"
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def stand_in_exporter_running(text: Callable[[], str] = lambda: DCGM_TEXT) -> Iterator[StandIn]:
    seen: list[dict] = []
    with serving(exporter_app(seen, text), "the stand-in dcgm-exporter") as port:
        yield StandIn(port, seen)


@pytest.fixture(scope="module")
def stand_in_ollama() -> Iterator[StandIn]:
    seen: list[dict] = []
    with serving(stand_in_app(seen), "the stand-in Ollama") as port:
        yield StandIn(port, seen)


@pytest.fixture(scope="module")
def stand_in_exporter() -> Iterator[StandIn]:
    with stand_in_exporter_running() as stand_in:
        yield stand_in


NGINX_INSTALL_HINT = (
    "nginx is not installed, and the door test runs a real nginx. Install it:\n"
    "    sudo apt-get install -y --no-install-recommends nginx     # Debian, Ubuntu\n"
    "    sudo dnf install -y nginx                                  # Fedora, RHEL\n"
    "    brew install nginx                                         # macOS\n"
    "(it only has to be on PATH or in /usr/sbin; the test starts its own instance)"
)


def find_nginx() -> str:
    """The nginx binary: $GPUMANAGER_TEST_NGINX, else `nginx` on PATH or in the usual sbin dirs."""
    if override := os.environ.get("GPUMANAGER_TEST_NGINX"):
        if not os.access(override, os.X_OK):
            pytest.fail(f"GPUMANAGER_TEST_NGINX={override} is not an executable.\n" + NGINX_INSTALL_HINT, pytrace=False)
        return override
    path = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin", "/opt/homebrew/bin"]
    )
    nginx = shutil.which("nginx", path=path)
    if nginx is None:
        pytest.fail(NGINX_INSTALL_HINT, pytrace=False)
    return nginx


def test_nginx_is_installed() -> None:
    """The door tests need a real nginx: a missing one fails here, by name (never a skip)."""
    version = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True, timeout=10)
    assert version.returncode == 0, version.stderr
    assert "nginx/" in version.stderr


def render_template(text: str, env: dict[str, str]) -> str:
    """What the nginx image's envsubst does: replace $NAME and ${NAME} for the names given."""
    for name, value in env.items():
        text = re.sub(rf"\$(\{{{name}\}}|{name}\b)", lambda _m, value=value: value, text)
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def door_env(ollama_port: int, exporter_port: int | None) -> dict[str, str]:
    """The door's environment, as docker-compose.yml gives it, with loopback upstreams.
    `exporter_port` None: DCGM_UPSTREAM not set at all (an older compose file)."""
    env = {"GPUMANAGER_UPSTREAM_TOKEN": TOKEN, "OLLAMA_UPSTREAM": f"127.0.0.1:{ollama_port}"}
    if exporter_port is not None:
        env["DCGM_UPSTREAM"] = f"127.0.0.1:{exporter_port}"
    return env


@contextlib.contextmanager
def nginx_door(prefix: Path, env: dict[str, str]) -> Iterator[str]:
    """A real nginx serving the template rendered with `env` (plus DOOR_LISTEN), its files under
    `prefix`; yield its URL. Fails if nginx logged an [emerg] or [alert]."""
    nginx = find_nginx()
    port = free_port()
    conf_d = prefix / "conf.d"
    conf_d.mkdir()
    rendered = render_template(TEMPLATE.read_text(), {**env, "DOOR_LISTEN": f"127.0.0.1:{port}"})
    (conf_d / "default.conf").write_text(rendered)
    # Around it, the parts of the image's /etc/nginx/nginx.conf that matter, in the temp dir.
    user = "user root root;" if os.geteuid() == 0 else ""  # workers must reach the temp dir
    (prefix / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 65;
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    include {conf_d}/*.conf;
}}
""")
    command = [nginx, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    with open(prefix / "stderr.log", "wb") as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    def error_log() -> str:
        return "\n".join(p.read_text() for p in (prefix / "stderr.log", prefix / "error.log") if p.exists())

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited with {proc.returncode}:\n{error_log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    try:
        wait_until(listening, 10, f"nginx on port {port} ({shlex.join(command)})")
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nginx: fast shutdown
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    assert "[emerg]" not in error_log() and "[alert]" not in error_log(), error_log()


@dataclass
class Door:
    url: str
    upstream: StandIn
    exporter: StandIn


@pytest.fixture(scope="module")
def door(
    stand_in_ollama: StandIn, stand_in_exporter: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    env = door_env(stand_in_ollama.port, stand_in_exporter.port)
    assert "${" not in render_template(TEMPLATE.read_text(), {**env, "DOOR_LISTEN": "8080"})
    with nginx_door(tmp_path_factory.mktemp("nginx"), env) as url:
        yield Door(url, stand_in_ollama, stand_in_exporter)


@pytest.fixture
def client(door: Door) -> Iterator[httpx.Client]:
    door.upstream.seen.clear()
    door.exporter.seen.clear()
    with httpx.Client(base_url=door.url, timeout=5) as c:
        yield c


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",  # the comparison is case-sensitive (an nginx `map` is not)
        f"bearer {TOKEN.upper()}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer",
        "",
    ],
)
def test_door_refuses_without_the_token(client: httpx.Client, door: Door, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    for method, path in (("GET", "/api/tags"), ("POST", "/api/chat"), ("GET", "/gpu-metrics")):
        response = client.request(method, path, headers=headers, content=b"{}" if method == "POST" else None)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"error": "unauthorized"}
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert door.upstream.seen == []  # nothing reached Ollama
    assert door.exporter.seen == []  # nor the exporter


def test_door_passes_the_token_holder_through_without_the_token(client: httpx.Client, door: Door) -> None:
    response = client.get("/api/tags", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    assert response.json() == TAGS
    assert response.headers["content-type"] == "application/json"
    (seen,) = door.upstream.seen
    assert seen["path"] == "/api/tags"
    assert seen["authorization"] is None  # the token stops at the door
    assert seen["host"] == "localhost:11434"


def test_door_serves_the_exporters_metrics_at_gpu_metrics(client: httpx.Client, door: Door) -> None:
    response = client.get("/gpu-metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    assert response.text == DCGM_TEXT  # passed through as it is
    assert response.headers["content-type"] == DCGM_CONTENT_TYPE
    (seen,) = door.exporter.seen
    assert seen["path"] == "/metrics"
    assert seen["authorization"] is None  # the token stops at the door here too
    assert door.upstream.seen == []  # Ollama is not involved
    # Only that exact path: anything below it is Ollama's (which has no such route).
    assert client.get("/gpu-metrics/x", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert len(door.exporter.seen) == 1


def test_door_without_a_dcgm_upstream_starts_and_answers_404(stand_in_ollama: StandIn, tmp_path: Path) -> None:
    """An older compose file sets no DCGM_UPSTREAM: envsubst leaves the template's reference to it
    as written. nginx must start all the same, serve Ollama, and answer /gpu-metrics with 404."""
    env = door_env(stand_in_ollama.port, None)
    assert "${DCGM_UPSTREAM}" in render_template(TEMPLATE.read_text(), env)
    stand_in_ollama.seen.clear()
    with nginx_door(tmp_path, env) as url, httpx.Client(base_url=url, timeout=5) as c:
        token = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/api/tags", headers=token).json() == TAGS
        response = c.get("/gpu-metrics", headers=token)
        assert response.status_code == 404
        assert response.json() == {"error": "no GPU metrics on this node"}
        assert c.get("/gpu-metrics").status_code == 401  # the token is checked first
        assert c.get("/door-health").text == "ok\n"
    assert [seen["path"] for seen in stand_in_ollama.seen] == ["/api/tags"]


def test_door_with_its_exporter_down_answers_502_at_once(stand_in_ollama: StandIn, tmp_path: Path) -> None:
    env = door_env(stand_in_ollama.port, free_port())  # nothing listens there
    with nginx_door(tmp_path, env) as url, httpx.Client(base_url=url, timeout=5) as c:
        token = {"Authorization": f"Bearer {TOKEN}"}
        start = time.monotonic()
        assert c.get("/gpu-metrics", headers=token).status_code == 502
        assert time.monotonic() - start < 3
        assert c.get("/api/tags", headers=token).json() == TAGS  # Ollama is served all the same


def test_door_streams_chunk_by_chunk(client: httpx.Client, door: Door) -> None:
    body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()
    arrivals: list[float] = []
    lines: list[dict] = []
    start = time.monotonic()
    with client.stream("POST", "/api/chat", content=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        for line in response.iter_lines():
            arrivals.append(time.monotonic() - start)
            lines.append(json.loads(line))

    assert len(lines) == CHAT_CHUNKS
    assert [line["done"] for line in lines] == [False] * (CHAT_CHUNKS - 1) + [True]
    # Unbuffered: the first chunk arrives well before the last one was even produced.
    spread = CHUNK_GAP * (CHAT_CHUNKS - 1)
    assert arrivals[-1] - arrivals[0] > spread * 0.6, arrivals
    assert all(b - a > CHUNK_GAP * 0.3 for a, b in itertools.pairwise(arrivals)), arrivals
    (seen,) = door.upstream.seen
    assert seen["body"] == body
    assert seen["authorization"] is None
    assert seen["host"] == "localhost:11434"


def test_door_takes_large_bodies(client: httpx.Client, door: Door) -> None:
    image = "A" * (8 * 1024 * 1024)  # a base64 image in a chat: far above nginx's 1 MB default
    body = json.dumps({"model": "llava", "messages": [{"role": "user", "images": [image]}]}).encode()
    with client.stream("POST", "/api/chat", content=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200
        assert len(list(response.iter_lines())) == CHAT_CHUNKS
    (seen,) = door.upstream.seen
    assert seen["body"] == body


def test_door_keeps_upstream_connections_alive(client: httpx.Client, door: Door) -> None:
    for _ in range(3):
        response = client.get("/api/tags", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
    ports = {seen["peer_port"] for seen in door.upstream.seen}
    assert len(door.upstream.seen) == 3
    assert len(ports) == 1, f"nginx opened a new upstream connection per request: {ports}"


def test_door_health_needs_no_token_and_leaves_ollama_alone(client: httpx.Client, door: Door) -> None:
    response = client.get("/door-health")
    assert response.status_code == 200
    assert response.text == "ok\n"
    assert door.upstream.seen == []
    assert door.exporter.seen == []


# --------------------------------------------------------------------------------------------
# Dockerfile (structure; no `docker build` here)
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def test_dockerfile() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    stage_starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert stage_starts and stage_starts[0] == 0
    final = instructions[stage_starts[-1] :]
    assert all(args.split()[0].startswith("python:3.11-slim") for keyword, args in instructions if keyword == "FROM")

    # Installed from the source tree.
    assert any(
        keyword == "RUN" and re.search(r"pip install --no-cache-dir (\S+ )*\"?\.(\[[\w,]+\])?\"?($|\s)", args)
        for keyword, args in instructions
    )
    copied = [
        args.split()[:-1] for keyword, args in instructions if keyword == "COPY" and not args.startswith("--from")
    ]
    sources = {source.rstrip("/") for sources in copied for source in sources}
    assert {"pyproject.toml", "src"} <= sources
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"

    def last(keyword: str) -> str:
        values = [args for k, args in final if k == keyword]
        assert values, f"the final stage has no {keyword}"
        return values[-1]

    user = last("USER")
    assert user.split(":")[0] not in ("root", "0")
    user_index = max(i for i, (k, _) in enumerate(final) if k == "USER")
    cmd_index = max(i for i, (k, _) in enumerate(final) if k == "CMD")
    assert user_index < cmd_index
    assert last("WORKDIR") == "/app"
    envs = " ".join(args for k, args in final if k == "ENV")
    config = re.search(r"GPUMANAGER_CONFIG=(\S+)", envs)
    assert config and config.group(1).startswith("/app/data/")
    assert "/app/data" in last("VOLUME")
    assert "8000" in last("EXPOSE").split()
    healthcheck = last("HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck
    assert "curl" not in healthcheck  # python:3.11-slim has none
    code = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert code[:2] == ["python", "-c"]
    compile(code[2], "HEALTHCHECK", "exec")
    assert json.loads(last("CMD")) == ["gpumanager", "server"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "gpumanager" in pyproject["project"]["scripts"]


def test_dockerignore() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".env", "api_keys.json", "state", "logs"} <= patterns
    assert ".pytest_cache" in patterns
    # What the build copies is not ignored.
    for needed in ("pyproject.toml", "README.md", "src"):
        assert needed not in patterns

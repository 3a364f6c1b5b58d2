"""Start and stop the benchmark's processes: simulated Ollamas, proxies and load generator runs.

Every child is recorded the moment it starts and stopped by its pid in `Procs.__exit__`, also on an
error or Ctrl-C. Children run in their own session (so a terminal's Ctrl-C reaches only the bench,
which then stops them in order) and get SIGTERM from the kernel if the bench itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
LOADGEN = Path(__file__).with_name("loadgen.py")

CONFIG = """\
[server]
host = "127.0.0.1"
port = {port}
[timing]
upstream_read_timeout_seconds = 120
[paths]
log_file = "app.log"
[[hosts]]
name = "sim"
url = "http://127.0.0.1:{sim_port}"
slots = 1100
models = ["llama3.2:latest"]
[scheduler]
max_queue = 0
"""


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    folder: Path
    key: str | None = None  # the proxy's API key; None for a sim
    admin_key: str | None = None  # the proxy's admin key (it reads /metrics); None for a sim

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> tuple[int, int]:
    """Children inherit the limit: the proxy and the sim each hold 1000+ sockets in the RSS phase."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the bench dies without cleaning up (Linux only)."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=0.5) as answer:
            return int(answer.status)
    except OSError:
        return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, through `Procs.__exit__`."""
    raise KeyboardInterrupt


class Procs:
    """Owns the temp folder and every child process of one benchmark run."""

    def __init__(self, keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gpumanager-bench-"))
        self.keep = keep
        self.children: list[subprocess.Popen[Any]] = []
        self.logs: list[Path] = []

    def __enter__(self) -> Procs:
        signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.children):
            self._stop(proc)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, argv: list[str], folder: Path, **kwargs: Any) -> subprocess.Popen[Any]:
        # Never a pipe nobody reads (a full pipe would stall the child); closed when the child is reaped.
        out = open(folder / "output.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                argv,
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                **kwargs,
            )
        finally:
            out.close()
        self.children.append(proc)
        return proc

    def _stop(self, proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # by pid: Popen signals exactly this child
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc in self.children:
            self.children.remove(proc)

    def stop(self, server: Server) -> None:
        self._stop(server.proc)

    def _wait_ready(self, server: Server, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                break
            if _get(server.port, path) == 200:
                return
            time.sleep(0.05)
        tail = (server.folder / "output.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{server.name} did not become ready on port {server.port}:\n{tail}")

    def _launch(
        self, name: str, folder: Path, argv_for: Callable[[int], list[str]], ready_path: str, key: str | None = None
    ) -> Server:
        """Start on a free port; if the child exits at once (a port taken meanwhile), retry on another."""
        for attempt in range(3):
            port = free_port()
            server = Server(name, port, self._spawn(argv_for(port), folder), folder, key)
            try:
                self._wait_ready(server, ready_path)
                return server
            except RuntimeError:
                exited = server.proc.poll() is not None
                self._stop(server.proc)
                if not exited or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def start_sim(self, name: str, *, token_delay: float, slots: int, tokens: int = 20) -> Server:
        folder = self.root / name
        folder.mkdir()

        def argv(port: int) -> list[str]:
            return [
                sys.executable,
                "-m",
                "gpumanager.sim",
                "--host",
                HOST,
                "--port",
                str(port),
                "--models",
                "llama3.2",
                "--slots",
                str(slots),
                "--token-delay",
                str(token_delay),
                "--tokens",
                str(tokens),
                "--name",
                name,
            ]

        return self._launch(name, folder, argv, "/api/version")

    def start_proxy(self, name: str, sim: Server, *, log_level: str = "WARNING") -> Server:
        folder = self.root / name
        folder.mkdir()
        config = folder / "config.toml"
        config.write_text(CONFIG.format(port=0, sim_port=sim.port))
        key, admin_key = _generate_key(config, "bench"), _generate_key(config, "bench-admin", admin=True)

        def argv(port: int) -> list[str]:
            config.write_text(CONFIG.format(port=port, sim_port=sim.port))
            return [str(BIN / "gpumanager"), "server", "--config", str(config), "--log-level", log_level]

        self.logs.append(folder / "app.log")
        server = self._launch(name, folder, argv, "/health", key)
        server.admin_key = admin_key
        return server

    def loadgen(
        self, spec: dict[str, Any], *, timeout: float, tick: Callable[[], None] | None = None, tick_s: float = 0.05
    ) -> dict[str, Any]:
        """Run loadgen.py with `spec`; call `tick` about every `tick_s` while it runs (RSS sampling)."""
        proc = subprocess.Popen(
            [sys.executable, str(LOADGEN), json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=_die_with_parent,
        )
        self.children.append(proc)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=tick_s if tick else max(0.1, deadline - time.monotonic()))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"load generator ({spec['mode']}) still running after {timeout:.0f} s"
                        ) from None
                    if tick:
                        tick()
        finally:
            self._stop(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator ({spec['mode']}) failed:\n{err[-3000:]}")
        result: dict[str, Any] = json.loads(out)
        return result


def _generate_key(config: Path, name: str, *, admin: bool = False) -> str:
    """A new key in the proxy's key file, made as an operator would (`gpumanager generate-key`)."""
    argv = [str(BIN / "gpumanager"), "generate-key", "--config", str(config), "--name", name]
    argv += ["--email", "bench@example.org", "--quiet", *(["--admin"] if admin else [])]
    return subprocess.run(
        argv, cwd=config.parent, capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


def metrics_text(server: Server) -> str:
    """A proxy's `GET /metrics` (Prometheus text), read with its admin key."""
    request = urllib.request.Request(
        f"http://{HOST}:{server.port}/metrics", headers={"Authorization": f"Bearer {server.admin_key}"}
    )
    with _LOOPBACK.open(request, timeout=10) as answer:
        return bytes(answer.read()).decode()


_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy of the environment


def log_problems(path: Path, limit: int = 5) -> tuple[int, list[str]]:
    """WARNING-or-worse lines of a proxy's app.log (the per-request INFO lines are expected)."""
    if not path.exists():
        return 0, []
    bad = [
        line
        for line in path.read_text(errors="replace").splitlines()
        if any(f" {level} " in line[:40] for level in ("WARNING", "ERROR", "CRITICAL"))
    ]
    return len(bad), bad[:limit]

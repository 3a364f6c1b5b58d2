"""A real Redis server for tests: Debian's `redis-server`, started in a temporary folder on a free
loopback port and stopped by its pid.

    with running_redis() as r:
        r.url                     # redis://127.0.0.1:PORT/0
        r.stop(); r.start()       # the same port and data folder: Redis gone for a while, then back

It keeps its data in an append-only file in that folder, as a production Redis should: a restart
(`stop()`, `start()`) finds the keys it held.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

INSTALL_HINT = (
    "redis-server is not installed, and these tests run a real Redis. Install it:\n"
    "    sudo apt-get install -y --no-install-recommends redis-server     # Debian, Ubuntu"
)
HOST = "127.0.0.1"
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else ""
    )
    if not found:
        raise AssertionError(INSTALL_HINT)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Redis:
    """One redis-server process (restartable on the same port)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.url = f"redis://{HOST}:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        command = [
            redis_server_binary(),
            *("--port", str(self.port), "--bind", HOST, "--dir", str(self.directory)),
            *(
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ),
            *("--logfile", str(self.directory / "redis.log")),
        ]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer on {HOST}:{self.port}:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it by its pid (SIGTERM, then SIGKILL if it lingers) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)

    def log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_redis() -> Iterator[Redis]:
    """A Redis on a free loopback port in a new temporary folder; stopped and removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="gm-redis-"))
    server = Redis(directory, _free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)

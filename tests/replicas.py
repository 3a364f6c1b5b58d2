"""Several gpumanager processes sharing one fleet: a fake SURF cloud (a real HTTP server, its
workspaces serving simulated Ollama on 127.0.0.N), a real Redis and a real PostgreSQL.

    with running_replicas(tmp_path, machines, redis, pg_url, count=3) as fleet:
        fleet.replicas[0].url, fleet.key, fleet.admin_key
        fleet.call(fleet.cloud.wait_for, "gpu-1", "running")   # the fake runs in a thread's event loop
        fleet.replicas[0].kill()                               # SIGKILL, by its pid

Each replica is `python -m gpumanager server` with its own port and state folder, and the same
config otherwise; it logs to its own file, shown when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx

from gpumanager.cluster import redis_key_store
from gpumanager.sim.server import free_port_on
from tests.clouds import Machine, overrides, provider_block
from tests.fakes.runpod import FakeRunPod
from tests.fakes.surf import FakeSurf

START_TIMEOUT = 30.0


@dataclass
class Replica:
    name: str
    port: int
    config: Path
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpumanager", "server", "--config", str(self.config), "--log-level", "INFO"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def wait_ready(self, *, attempts: int = 3) -> None:
        """Wait for /health; a port another test took meanwhile is traded for a new one (restarted)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None and "Address already in use" in self.tail(500) and attempts > 1:
                attempts -= 1
                port = free_port_on(["127.0.0.1"])
                text = self.config.read_text()
                self.config.write_text(text.replace(f"port = {self.port}\n", f"port = {port}\n", 1))
                self.port = port
                self.start()
                continue
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start within {START_TIMEOUT:g}s:\n{self.tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no giving back of its slots or locks."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def tail(self, chars: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def says(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except OSError:
            return False


@dataclass
class Replicas:
    replicas: list[Replica]
    cloud: FakeSurf
    portal: Any
    key: str
    admin_key: str
    redis_url: str
    cluster_name: str
    extra: dict[str, str] = field(default_factory=dict)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` (sync or async) in the fake cloud's event loop."""
        if kwargs:

            async def run() -> Any:
                result = fn(*args, **kwargs)
                return await result if hasattr(result, "__await__") else result

            return self.portal.call(run)
        return self.portal.call(fn, *args)

    def resumes(self, name: str) -> int:
        return sum(1 for action, target in list(self.cloud.attempts) if action == "resume" and target == name)

    def pauses(self, name: str) -> int:
        return sum(1 for action, target in list(self.cloud.attempts) if action == "pause" and target == name)

    def keys(self) -> Any:
        return redis_key_store(self.redis_url, self.cluster_name)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def logs(self) -> str:
        return "\n".join(f"===== {r.name} =====\n{r.tail()}" for r in self.replicas)


def timing(reservation_seconds: float) -> str:
    minutes = reservation_seconds / 60
    lines = {
        "reservation_minutes": minutes,
        "fallback_reservation_minutes": minutes,
        "pause_warning_minutes": 0,
        "startup_timeout_seconds": 20,
        "ollama_readiness_wait_seconds": 0.05,
        "probe_timeout_seconds": 1,
        "reconcile_interval_seconds": 0.3,
        "wake_keepalive_seconds": 1,
        "queue_timeout_seconds": 30,
        "shutdown_grace_seconds": 1,
        "job_poll_seconds": 0.2,
    }
    return "[timing]\n" + "".join(f"{key} = {value}\n" for key, value in lines.items())


@contextlib.contextmanager
def running_replicas(
    tmp_path: Path,
    machines: list[Machine],
    redis_url: str,
    database_url: str,
    *,
    count: int = 3,
    reservation_seconds: float = 2.0,
    lease_ttl: float = 2.0,
    retry_seconds: float = 0.2,
    extra: str = "",
    cluster_name: str = "",
    boot_seconds: float = 0.3,
    job_endpoint: str = "",
) -> Iterator[Replicas]:
    """`count` replicas of one fleet over `machines` (SURF workspaces), started and ready. With
    `job_endpoint`, the fleet is instead that one RunPod serverless endpoint serving jobs
    (`Replicas.cloud` is then the `FakeRunPod`)."""
    name = cluster_name or f"t{os.getpid()}-{tmp_path.name[-12:]}".replace("_", "-")
    with anyio.from_thread.start_blocking_portal() as portal:
        cloud: Any = (
            FakeRunPod(boot_seconds=boot_seconds, stop_seconds=0.05, queue_timeout=2)
            if job_endpoint
            else FakeSurf(token="surf-test-token", transition_seconds=boot_seconds)
        )
        with portal.wrap_async_context_manager(cloud):
            if job_endpoint:
                portal.call(lambda: cloud.add_endpoint(job_endpoint, workers_min=0, idle_timeout=0.1))
                fleet_config = (
                    provider_block(
                        "runpod",
                        "runpod",
                        {"api_url": cloud.api_url, "serverless_url": cloud.serverless_url, "name_filter": "gpu-"},
                    )
                    + "jobs = true\n"
                )
                environ = {"RUNPOD_API_KEY": cloud.api_key}
            for m in machines:
                portal.call(
                    lambda m=m: cloud.add_workspace(
                        m.name,
                        status="running" if m.running else "paused",
                        models=m.models,
                        slots=m.slots,
                        token_delay=m.token_delay,
                    )
                )
            if not job_endpoint:
                settings = {
                    "base_url": cloud.base_url,
                    "machine_name_filter": "gpu-",
                    "ollama_port": cloud.ollama_port,
                }
                fleet_config = provider_block("surf", "surf", settings) + overrides(
                    "surf", machines, lambda m: m.models
                )
                environ = {"CLOUD_API_TOKEN": cloud.token}
            store = redis_key_store(redis_url, name)
            key = store.generate("user", "user@example.org")[1]
            admin_key = store.generate("admin", "admin@example.org", admin=True)[1]
            replicas = []
            for i in range(count):
                folder = tmp_path / f"replica-{i + 1}"
                folder.mkdir()
                port = free_port_on(["127.0.0.1"])
                config = folder / "config.toml"
                config.write_text(
                    f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n'
                    f'[paths]\napi_keys_file = "api_keys.json"\nstate_dir = "state"\n\n'
                    f'[cluster]\nredis_url = "{redis_url}"\nname = "{name}"\n'
                    f"lease_ttl_seconds = {lease_ttl}\nretry_seconds = {retry_seconds}\n\n"
                    f'[usage]\ndatabase_url = "{database_url}"\n\n' + timing(reservation_seconds) + extra + fleet_config
                )
                env = {**os.environ, **environ}
                env.pop("GPUMANAGER_REDIS_URL", None)
                replicas.append(Replica(f"replica-{i + 1}", port, config, folder / "server.log", env))
            try:
                for replica in replicas:
                    replica.start()
                for replica in replicas:
                    replica.wait_ready()
                yield Replicas(replicas, cloud, portal, key, admin_key, redis_url, name)
            finally:
                for replica in replicas:
                    replica.stop()

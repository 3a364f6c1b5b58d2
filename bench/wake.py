"""Wake and idle-pause timings, measured on the simulated cloud through a real gpumanager.

1. Ready to first byte: from the moment a woken host's Ollama starts answering to the moment the
   first byte of the answer reaches the client that waited for it. The machine runs 0.3 s after the
   resume and its Ollama answers 0.3 s or more later (as a VM whose Docker/Ollama still boots), so both
   pollings count: the cloud state (every 0.05 s here) and Ollama readiness
   (`ollama_readiness_wait_seconds`, default 0.5 s and a tighter 0.1 s).
2. Idle overshoot: how long past the end of its reservation window a host waits before gpumanager
   asks the cloud to pause it.

Run: `.venv/bin/python bench/wake.py` (part of `make bench`). Loopback only; about 40 s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx
import msgspec

from gpumanager import logs
from gpumanager.app import build_app
from gpumanager.config import load
from gpumanager.hosts import HostState
from gpumanager.keys import KeyStore
from gpumanager.providers.simulated import SimulatedProvider
from gpumanager.sim import running_server

CYCLES = 8
CONFIG = """
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


async def measure(readiness: float) -> tuple[list[float], list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="gpumanager-wake-"))
    (folder / "config.toml").write_text(CONFIG.format(readiness=readiness))
    config = load(folder / "config.toml")
    key = KeyStore(config.paths.api_keys_file).generate("bench", "bench@example.org")[1]
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
    return first_byte, overshoot


def row(label: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{label:<52} {statistics.median(ms):>8.1f} ms {ms[-1]:>8.1f} ms {ms[0]:>8.1f} ms"


def main() -> int:
    logs.setup("ERROR", None)
    print(
        f"wake timings: {CYCLES} wake/answer/idle/pause cycles per setting, simulated cloud, Python "
        f"{sys.version.split()[0]}"
    )
    print(f"{'measure':<52} {'p50':>11} {'max':>11} {'min':>11}")
    for readiness in (0.5, 0.1):
        first_byte, overshoot = anyio.run(measure, readiness, backend_options={"use_uvloop": True})
        print(row(f"ready -> first byte (readiness wait {readiness:g} s)", first_byte))
        print(row(f"idle overshoot past the window (readiness wait {readiness:g} s)", overshoot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

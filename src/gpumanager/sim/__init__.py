"""A simulated Ollama server for tests, the demo and the benchmark.

`SimOllama` is the ASGI app, `running_server` serves any ASGI app on loopback inside
the current event loop, and `expected_text` gives the exact answer for n tokens.
"""

from __future__ import annotations

from gpumanager.sim.ollama import SimOllama, expected_text
from gpumanager.sim.server import SimServer, running_server

__all__ = ["SimOllama", "SimServer", "expected_text", "running_server"]

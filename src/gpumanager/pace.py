"""How long things take, recently: each model's service time and each host's cold start.

The scheduler's cost-aware scale-up (`scheduler.choose`, `scale_up = "expected_wait"`) and the
budget's no-wake rule read it; the `Recorder` seam feeds it (each finished request, each wake that
ended ready), and the ledger seeds it at start. Plain numbers, no clock, no I/O.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

from gpumanager.models import model_names
from gpumanager.recorder import NoopRecorder, RequestRecord

SERVICES_KEPT = 50  # a model's service time is the mean of its last this many answers
# The routes whose answers are a model's service (not model management, nor /api/show from a cache).
SERVED_ROUTES = frozenset(
    {
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)
WAKES_KEPT = 20  # a host's cold start is the median of its last this many wakes


def model_key(model: str) -> str:
    """One spelling per model: `llama3` and `llama3:latest` are the same model."""
    return model_names(model)[-1]


class Pace(NoopRecorder):
    """Recent service times by model and wake times by host (a `Recorder`: it hears of both)."""

    def __init__(self) -> None:
        self._services: dict[str, deque[float]] = {}
        self._wakes: dict[str, deque[float]] = {}

    def served(self, model: str, seconds: float) -> None:
        self._services.setdefault(model_key(model), deque(maxlen=SERVICES_KEPT)).append(seconds)

    def woke(self, host: str, seconds: float) -> None:
        self._wakes.setdefault(host, deque(maxlen=WAKES_KEPT)).append(seconds)

    def service_seconds(self, model: str) -> float | None:
        """The mean of the model's recent service times (a slot held), or None before any."""
        found = self._services.get(model_key(model))
        return sum(found) / len(found) if found else None

    def cold_start_seconds(self, host: str) -> float | None:
        """The median of the host's recent wakes (asked to ready), or None before any."""
        found = self._wakes.get(host)
        return statistics.median(found) if found else None

    def seed(self, services: Iterable[tuple[str, float]], wakes: Iterable[tuple[str, float]]) -> None:
        """Start from history, oldest first: (model, seconds) and (host, seconds)."""
        for model, seconds in services:
            self.served(model, seconds)
        for host, seconds in wakes:
            self.woke(host, seconds)

    # -- the Recorder ------------------------------------------------------------------------------

    def request(self, record: RequestRecord) -> None:
        if record.host and record.status == 200 and record.route in SERVED_ROUTES:
            self.served(record.model, max(0.0, record.duration_seconds - record.wait_seconds))

    def wake(self, host: str, outcome: str, seconds: float) -> None:
        if outcome == "ready":
            self.woke(host, seconds)

"""Prometheus series of one gpumanager, through prometheus-client (no hand-written exposition).

`Metrics` is the core's `Recorder`: counters and histograms are fed as things happen, on the
event loop, each call a few microseconds. Gauges of the fleet (queue depth, in-flight requests,
slots, host states) are read from the fleet when Prometheus scrapes, so they are never stale. Each
app has its own registry. Label values are bounded: `model` is a model the fleet knows, else
`other`, and `key` is a key's id, so a client cannot create series at will.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gpumanager.auth import require_admin
from gpumanager.fleet import Fleet
from gpumanager.hosts import HostState
from gpumanager.ledger.reader import UNATTRIBUTED
from gpumanager.ledger.writer import LedgerWriter
from gpumanager.models import model_names
from gpumanager.recorder import IntervalRecord, JobRecord, RequestRecord

# Waits include cold starts of several minutes; answers can stream for as long.
SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, fleet: Fleet, *, ledger: LedgerWriter | None = None) -> None:
        self.fleet = fleet
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        p = "gpumanager_"
        self.requests = Counter(p + "requests", "Requests answered", ["route", "model", "status"], registry=registry)
        self.duration = Histogram(
            p + "request_duration_seconds", "Receipt to last byte", ["route"], buckets=SLOW, registry=registry
        )
        self.first_byte = Histogram(
            p + "time_to_first_byte_seconds", "Receipt to first byte", ["route"], buckets=SLOW, registry=registry
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Wait for a slot, a wake included", buckets=SLOW, registry=registry
        )
        self.overhead = Histogram(
            p + "overhead_seconds", "gpumanager's own time per request", buckets=FAST, registry=registry
        )
        self.tokens = Counter(p + "tokens", "Tokens counted in answers", ["key", "model", "kind"], registry=registry)
        self.wakes = Counter(p + "wakes", "Wakes ended", ["host", "outcome"], registry=registry)
        self.wake_time = Histogram(
            p + "wake_seconds",
            "A wake, asked to ready (or to failed)",
            ["host", "outcome"],
            buckets=SLOW,
            registry=registry,
        )
        self.phases = Histogram(
            p + "wake_phase_seconds", "One phase of a wake", ["host", "phase"], buckets=SLOW, registry=registry
        )
        self.pauses = Counter(p + "pauses", "Pauses asked of the cloud", ["host", "reason"], registry=registry)
        self.gpu_seconds = Counter(
            p + "gpu_seconds",
            "Billed GPU-seconds by who pays: requests' serving shares and idle, waking or pausing time",
            ["key", "host"],
            registry=registry,
        )
        self.cost = Counter(p + "cost_dollars", "Billed cost by who pays (DESIGN.md §10)", ["key"], registry=registry)
        self.jobs = Counter(p + "jobs", "RunPod jobs ended, by final state", ["host", "status"], registry=registry)
        self.job_seconds = Counter(
            p + "job_seconds",
            "RunPod jobs' own times (RunPod's delayTime and executionTime), recorded, not priced",
            ["key", "host", "phase"],
            registry=registry,
        )
        self.webhook_failures = Counter(
            p + "webhook_failures", "Events a webhook did not take after every retry", ["webhook"], registry=registry
        )
        registry.register(_FleetCollector(fleet, ledger))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def model_label(self, model: str) -> str:
        known = self.fleet.candidates(model)
        if not known:
            return "other"
        listed = known[0].models
        return next((name for name in model_names(model) if name in listed), "other")

    # -- the Recorder ------------------------------------------------------------------------------

    def request(self, record: RequestRecord) -> None:
        # A job's "model" is its endpoint's host name: bounded like the hosts.
        model = record.model if record.route.startswith("/v2/") else self.model_label(record.model)
        child = self._child
        child(self.requests, record.route, model, str(record.status)).inc()
        child(self.duration, record.route).observe(record.duration_seconds)
        if record.first_byte_seconds is not None:
            child(self.first_byte, record.route).observe(record.first_byte_seconds)
        if record.host:
            self.queue_wait.observe(record.wait_seconds)
        if record.overhead_seconds is not None:
            self.overhead.observe(record.overhead_seconds)
        if record.prompt_tokens:
            child(self.tokens, record.key, model, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            child(self.tokens, record.key, model, "completion").inc(record.completion_tokens)
        if record.gpu_seconds:
            child(self.gpu_seconds, record.key, record.host).inc(record.gpu_seconds)
            child(self.cost, record.key).inc(record.cost_micro / 1_000_000)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the lookup with its checks and lock costs more than
        the increment (label sets are bounded, see the module's docstring)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def interval(self, record: IntervalRecord) -> None:
        key = record.key or UNATTRIBUTED
        if record.added_seconds:
            self._child(self.gpu_seconds, key, record.host).inc(record.added_seconds)
        if record.added_micro:
            self._child(self.cost, key).inc(record.added_micro / 1_000_000)

    def job(self, record: JobRecord) -> None:
        if record.ended is None:
            return
        self.jobs.labels(record.host, record.status).inc()
        for phase, ms in (("delay", record.delay_ms), ("execution", record.execution_ms)):
            if ms:
                self._child(self.job_seconds, record.key_id, record.host, phase).inc(ms / 1000)

    def webhook_failed(self, webhook: str) -> None:
        self.webhook_failures.labels(webhook).inc()

    def wake(self, host: str, outcome: str, seconds: float) -> None:
        self.wakes.labels(host, outcome).inc()
        self.wake_time.labels(host, outcome).observe(seconds)

    def wake_phase(self, host: str, phase: str, seconds: float) -> None:
        self.phases.labels(host, phase).observe(seconds)

    def paused(self, host: str, reason: str) -> None:
        self.pauses.labels(host, reason).inc()


class _FleetCollector:
    """Gauges read from the fleet at scrape time."""

    def __init__(self, fleet: Fleet, ledger: LedgerWriter | None) -> None:
        self.fleet, self.ledger = fleet, ledger

    def describe(self) -> Iterable[Metric]:
        return []  # created at collect time: the hosts are discovered after start

    def collect(self) -> Iterable[Metric]:
        p = "gpumanager_"
        depth = GaugeMetricFamily(p + "queue_depth", "Requests waiting for a slot", labels=["model"])
        inflight = GaugeMetricFamily(p + "inflight", "Requests being served", labels=["host"])
        slots = GaugeMetricFamily(p + "slots", "Concurrent requests a host is given", labels=["host"])
        state = GaugeMetricFamily(p + "host_state", "1 for the host's current state", labels=["host", "state"])
        awake = CounterMetricFamily(
            p + "host_awake_seconds", "Time the cloud billed the host (resume asked to paused)", labels=["host"]
        )
        cost = CounterMetricFamily(p + "host_cost_dollars", "The host's billed time, priced", labels=["host"])
        savings = CounterMetricFamily(
            p + "savings_dollars", "The host always on would have cost this much more", labels=["host"]
        )
        billing = self.fleet.billing
        waiting: dict[str, int] = {}
        for waiter in self.fleet.queue:
            hosts = self.fleet.candidates(waiter.ask.model)
            model = next((n for n in model_names(waiter.ask.model) if hosts and n in hosts[0].models), "other")
            waiting[model] = waiting.get(model, 0) + 1
        for model in self.fleet.models():
            depth.add_metric([model], waiting.get(model, 0))
        if "other" in waiting:
            depth.add_metric(["other"], waiting["other"])
        for host in list(self.fleet.hosts.values()):
            inflight.add_metric([host.name], host.leases)
            slots.add_metric([host.name], host.slots)
            for name in HostState:
                state.add_metric([host.name, str(name)], 1.0 if host.state is name else 0.0)
            billed, price = billing.billed_seconds(host), host.cost_per_hour / 3600
            awake.add_metric([host.name], billed)
            cost.add_metric([host.name], billed * price)
            savings.add_metric([host.name], max(0.0, billing.known_seconds(host) - billed) * price)
        families: list[Metric] = [depth, inflight, slots, state, awake, cost, savings]
        if self.ledger is not None:
            stats = self.ledger.statistics()
            dropped = CounterMetricFamily(p + "ledger_dropped_rows", "Usage rows lost: the ledger was unwritable")
            dropped.add_metric([], stats.dropped)
            buffered = GaugeMetricFamily(p + "ledger_buffered_rows", "Usage rows waiting to be written")
            buffered.add_metric([], stats.buffered)
            families += [dropped, buffered]
        return families


def metrics_route(metrics: Metrics, *, public: bool) -> Route:
    async def scrape(request: Request) -> Response:
        if not public:
            require_admin(request.scope)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return Route("/metrics", scrape, methods=["GET"])

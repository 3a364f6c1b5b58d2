"""GPU metrics of the awake hosts: dcgm-exporter's series, read through each node's door.

gpu-node/ runs NVIDIA's dcgm-exporter beside Ollama, and the node's door serves its Prometheus text
at `/gpu-metrics` to the holder of the upstream token. Every `[metrics] gpu_scrape_seconds` the
`GpuScraper` reads it from each READY Ollama host, all at once, each read bounded by `timeout`, and
keeps per GPU its utilisation, memory used and total, temperature and power (`GpuReading`).
`readings()` gives them to the dashboard; `collector()` adds them to gpumanager's own /metrics as
the `gpumanager_gpu_*` gauges, labelled `host` and `gpu`.

A host without an exporter (a node set up before it, an Ollama without the door, a GPU that DCGM
cannot read) answers 404, 401 or 502, or not at all, or with text that is no Prometheus or has no
DCGM series: it is simply not shown. That is logged once (info), and the host is asked again only
every `retry_rounds` intervals. A host that answered the round before is first given one more
round: one lost answer is no reason to hide its GPUs for minutes. The readings of a host that
leaves READY are dropped at once.

Owns: the readings. Calls: the hosts' doors over HTTP; reads the fleet's hosts, never changes them.
Runs on the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
import httpx
import msgspec
from loguru import logger
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gpumanager.errors import NoGpuMetrics
from gpumanager.fleet import Fleet
from gpumanager.hosts import Host, HostState
from gpumanager.logs import clean
from gpumanager.tasks import forever

PATH = "/gpu-metrics"  # where the node's door serves dcgm-exporter's /metrics
RETRY_ROUNDS = 10  # a host without GPU metrics is asked again every this many intervals
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # dcgm-exporter writes ~20 kB per GPU with its default counters
MIB = 1024 * 1024

# DCGM's "no value" sentinels (blank, not found, not supported, no permission) are 0x7ffffff0 and
# up for 32-bit fields, far higher for 64-bit and floating ones. Exporters since 4.x leave such
# series out; older ones wrote them as numbers. No reading of ours comes near.
_DCGM_BLANK = 0x7FFFFFF0

_UTIL, _FB_USED, _FB_FREE, _TEMP, _POWER = (
    "DCGM_FI_DEV_GPU_UTIL",  # %
    "DCGM_FI_DEV_FB_USED",  # MiB
    "DCGM_FI_DEV_FB_FREE",  # MiB
    "DCGM_FI_DEV_GPU_TEMP",  # °C
    "DCGM_FI_DEV_POWER_USAGE",  # W
)
_FIELDS = frozenset({_UTIL, _FB_USED, _FB_FREE, _TEMP, _POWER})


class GpuReading(msgspec.Struct, frozen=True):
    """One GPU of one host, as its dcgm-exporter last reported it. A value is None when the
    exporter did not report its series (or reported DCGM's "no value")."""

    gpu: str  # its index on the host (dcgm-exporter's `gpu` label); "0-1" for MIG instance 1 of GPU 0
    name: str = ""  # the model, e.g. "NVIDIA A100-SXM4-40GB" (the `modelName` label)
    uuid: str = ""  # e.g. "GPU-5bd3a1e2-..." (the `UUID` label)
    utilization: float | None = None  # 0..1: the share of the last sample period a kernel ran
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None  # used + free (what the driver reserves for itself is in neither)
    temperature_celsius: float | None = None
    power_watts: float | None = None
    read_at: float = 0.0  # when it was read, on the scraper's clock (anyio's, by default)


def parse(text: str, *, read_at: float = 0.0) -> list[GpuReading]:
    """The GPUs in a dcgm-exporter answer, ordered by index. Pure.

    Prometheus text without DCGM's GPU series gives []; text that is not Prometheus text at all (an
    HTML error page, JSON, "404 page not found") raises `NoGpuMetrics`. Series other than the five
    read here, and samples without a `gpu` label, are ignored.
    """
    values: dict[str, dict[str, float]] = {}
    names: dict[str, str] = {}
    uuids: dict[str, str] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in _FIELDS or "gpu" not in sample.labels:
                    continue
                labels = sample.labels
                instance = labels.get("GPU_I_ID")
                key = f"{labels['gpu']}-{instance}" if instance else labels["gpu"]
                names.setdefault(key, labels.get("modelName", ""))
                uuids.setdefault(key, labels.get("UUID") or labels.get("uuid", ""))
                value = float(sample.value)
                if math.isfinite(value) and 0 <= value < _DCGM_BLANK:
                    values.setdefault(key, {})[sample.name] = value
                else:
                    values.setdefault(key, {})
    except (ValueError, TypeError, IndexError, KeyError) as exc:  # what the parser raises on foreign text
        raise NoGpuMetrics(f"not Prometheus text: {exc}") from None
    return [_reading(key, names[key], uuids[key], values[key], read_at) for key in sorted(values, key=_by_index)]


def _reading(gpu: str, name: str, uuid: str, series: dict[str, float], read_at: float) -> GpuReading:
    util, used, free = series.get(_UTIL), series.get(_FB_USED), series.get(_FB_FREE)
    return GpuReading(
        gpu=gpu,
        name=name,
        uuid=uuid,
        utilization=None if util is None else util / 100,
        memory_used_bytes=None if used is None else used * MIB,
        memory_total_bytes=None if used is None or free is None else (used + free) * MIB,
        temperature_celsius=series.get(_TEMP),
        power_watts=series.get(_POWER),
        read_at=read_at,
    )


def _by_index(key: str) -> tuple[tuple[int, int | str], ...]:
    """GPU 2 before GPU 10, and a GPU's MIG instances after it."""
    return tuple((0, int(part)) if part.isdecimal() else (1, part) for part in key.split("-"))


def scraped(host: Host) -> bool:
    """Whether the scraper reads `host` now: awake, and an Ollama node (with a door, perhaps);
    OpenAI-compatible upstreams and job endpoints have no GPU of their own to show."""
    return host.state is HostState.READY and host.api == "ollama" and not host.jobs_url


@dataclass
class _Miss:
    """A host that gave no GPU metrics: when to ask again, and whether that was logged."""

    retry_at: float = 0.0
    logged: bool = False


class GpuScraper:
    """Reads the GPU metrics of the awake hosts every `interval` seconds (see the module's doc)."""

    def __init__(
        self,
        fleet: Fleet,
        client: httpx.AsyncClient,
        *,
        interval: float,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
        retry_rounds: int = RETRY_ROUNDS,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.fleet, self.client = fleet, client
        self.interval, self.timeout, self.retry_rounds = interval, timeout, retry_rounds
        self.headers = headers or {}  # the fleet's upstream token, for hosts without credentials of their own
        self.clock = clock
        self._readings: dict[str, tuple[Host, list[GpuReading]]] = {}
        self._misses: dict[str, _Miss] = {}

    async def run(self) -> None:
        """Scrape every `interval` seconds until cancelled (a failing loop is logged and restarted)."""
        await forever(self._loop)

    async def _loop(self) -> None:
        while True:
            await self.scrape()
            await anyio.sleep(self.interval)

    async def scrape(self) -> None:
        """One round: read every READY Ollama host that is due, all at once; drop the readings of
        hosts that are no longer READY."""
        hosts = [host for host in list(self.fleet.hosts.values()) if scraped(host)]
        awake = {host.name: host for host in hosts}
        for name, (host, _) in list(self._readings.items()):
            if awake.get(name) is not host:
                del self._readings[name]
        now = self.clock()
        due = [host for host in hosts if host.name not in self._misses or self._misses[host.name].retry_at <= now]
        async with anyio.create_task_group() as tg:
            for host in due:
                tg.start_soon(self._scrape, host)

    def readings(self) -> dict[str, list[GpuReading]]:
        """Host name -> its GPUs, for the hosts READY now that reported some."""
        return {
            name: list(gpus)
            for name, (host, gpus) in self._readings.items()
            if self.fleet.hosts.get(name) is host and scraped(host)
        }

    def collector(self) -> Collector:
        """The readings as gauges, for a `CollectorRegistry` (read at each scrape of /metrics)."""
        return _GpuCollector(self)

    # -- one host ----------------------------------------------------------------------------------

    async def _scrape(self, host: Host) -> None:
        try:
            gpus = parse(await self._fetch(host), read_at=self.clock())
            if not gpus:
                raise NoGpuMetrics("the answer has no DCGM GPU series")
        except NoGpuMetrics as exc:
            self._missed(host, str(exc))
            return
        if not scraped(host):  # it left READY while it was read
            return
        self._readings[host.name] = (host, gpus)
        miss = self._misses.pop(host.name, None)
        if miss is not None and miss.logged:
            logger.bind(host=host.name).info("GPU metrics of {}: {} GPUs", host.name, len(gpus))

    async def _fetch(self, host: Host) -> str:
        headers = host.read_headers(self.headers)
        try:
            with anyio.fail_after(self.timeout):
                async with self.client.stream("GET", host.url.rstrip("/") + PATH, headers=headers) as response:
                    if response.status_code != 200:
                        raise NoGpuMetrics(f"HTTP {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_ANSWER_BYTES:
                            raise NoGpuMetrics(f"an answer over {MAX_ANSWER_BYTES} bytes")
        except (httpx.HTTPError, TimeoutError) as exc:
            raise NoGpuMetrics(f"{type(exc).__name__} {exc}".strip()) from None
        return body.decode("utf-8", errors="replace")

    def _missed(self, host: Host, reason: str) -> None:
        had = self._readings.pop(host.name, None) is not None
        miss = self._misses.get(host.name)
        log = logger.bind(host=host.name)
        if had and miss is None:  # it answered the round before: ask again next round
            self._misses[host.name] = _Miss()
            log.debug("no GPU metrics from {} this round ({})", host.name, clean(reason))
            return
        if miss is None:
            miss = self._misses[host.name] = _Miss()
        every = self.interval * self.retry_rounds
        miss.retry_at = self.clock() + every
        if not miss.logged:
            miss.logged = True
            log.info(
                "no GPU metrics from {} ({}); not shown, asked again every {:g} s", host.name, clean(reason), every
            )


class _GpuCollector:
    """The scraper's readings as gauges, made at each collect (hosts come and go)."""

    def __init__(self, scraper: GpuScraper) -> None:
        self.scraper = scraper

    def describe(self) -> Iterable[Metric]:
        return _families()  # no samples: the names, so that a registry refuses duplicates

    def collect(self) -> Iterable[Metric]:
        families = _families()
        util, used, total, temperature, power = families
        for host, gpus in sorted(self.scraper.readings().items()):
            for gpu in gpus:
                labels = [host, gpu.gpu]
                for family, value in (
                    (util, gpu.utilization),
                    (used, gpu.memory_used_bytes),
                    (total, gpu.memory_total_bytes),
                    (temperature, gpu.temperature_celsius),
                    (power, gpu.power_watts),
                ):
                    if value is not None:
                        family.add_metric(labels, value)
        return families


def _families() -> list[GaugeMetricFamily]:
    p, labels = "gpumanager_gpu_", ["host", "gpu"]
    return [
        GaugeMetricFamily(p + "utilization_ratio", "Share of time a kernel ran on the GPU (0 to 1)", labels=labels),
        GaugeMetricFamily(p + "memory_used_bytes", "GPU memory in use", labels=labels),
        GaugeMetricFamily(p + "memory_total_bytes", "GPU memory in use or free", labels=labels),
        GaugeMetricFamily(p + "temperature_celsius", "GPU temperature", labels=labels),
        GaugeMetricFamily(p + "power_watts", "GPU power draw", labels=labels),
    ]

"""GPU metrics (gpumanager.gpu_metrics): dcgm-exporter's text parsed, and scraped through the door.

`parse()` is read with realistic dcgm-exporter answers. `GpuScraper` runs for real: a real nginx
serving gpu-node/nginx.conf.template (the machinery of test_gpu_node.py) in front of a stand-in
dcgm-exporter (uvicorn on loopback), hosts in a `Fleet`, a short interval, and tests that wait for
conditions, never for fixed times. Network: loopback only.
"""

from __future__ import annotations

import itertools
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import msgspec
import pytest
from loguru import logger
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpumanager.config import loads
from gpumanager.errors import NoGpuMetrics
from gpumanager.fleet import Fleet
from gpumanager.gpu_metrics import MIB, RETRY_ROUNDS, GpuReading, GpuScraper, parse
from gpumanager.hosts import Host, HostEvent
from tests.harness import async_wait_until
from tests.test_gpu_node import (
    DCGM_GPUS,
    DCGM_MODEL,
    DCGM_SERIES,
    DCGM_TEXT,
    TOKEN,
    StandIn,
    dcgm_text,
    door_env,
    free_port,
    nginx_door,
    stand_in_exporter_running,
)

UUID0, UUID1 = DCGM_GPUS[0][1], DCGM_GPUS[1][1]
INTERVAL = 0.05
WAIT = 10.0  # seconds any condition below may take, at most

# --------------------------------------------------------------------------------------------
# parse()
# --------------------------------------------------------------------------------------------

EXPECTED = [
    GpuReading(
        gpu="0",
        name="NVIDIA A100-SXM4-40GB",
        uuid=UUID0,
        utilization=0.87,
        memory_used_bytes=30512 * MIB,
        memory_total_bytes=(30512 + 9812) * MIB,
        temperature_celsius=61.0,
        power_watts=312.25,
        read_at=12.5,
    ),
    GpuReading(
        gpu="1",
        name="NVIDIA A100-SXM4-40GB",
        uuid=UUID1,
        utilization=0.0,
        memory_used_bytes=3 * MIB,
        memory_total_bytes=(3 + 40333) * MIB,
        temperature_celsius=33.0,
        power_watts=55.5,
        read_at=12.5,
    ),
]


def test_parse_reads_each_gpu_of_a_dcgm_exporter_answer() -> None:
    assert parse(DCGM_TEXT, read_at=12.5) == EXPECTED


def test_parse_takes_the_form_of_older_exporters() -> None:
    """The exporter's README shows spaces after commas, no HELP or TYPE, fewer labels, and DCGM's
    "no value" sentinels written as numbers; and some series may be missing altogether."""
    text = (
        'DCGM_FI_DEV_GPU_UTIL{gpu="0", UUID="GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"} 45\n'
        'DCGM_FI_DEV_FB_USED{gpu="0", UUID="GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"} 1024\n'
        'DCGM_FI_DEV_GPU_TEMP{gpu="0", UUID="GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"} 9223372036854775794\n'
        'DCGM_FI_DEV_POWER_USAGE{gpu="0", UUID="GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"} 140737488355328.0\n'
        'DCGM_FI_DEV_MEMORY_TEMP{gpu="0", UUID="GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"} 9223372036854775794\n'
    )
    assert parse(text) == [
        GpuReading(
            gpu="0",
            uuid="GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52",
            utilization=0.45,
            memory_used_bytes=1024 * MIB,
            memory_total_bytes=None,  # no FB_FREE: no total
            temperature_celsius=None,  # DCGM's int64 "blank"
            power_watts=None,  # DCGM's fp64 "blank"
        )
    ]


def test_parse_orders_gpus_by_index_and_keeps_mig_instances_apart() -> None:
    gpus = [(str(i), f"GPU-{i}", f"00000000:{i:02X}:00.0") for i in (10, 2, 0)]
    util = [("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", ("10", "2", "0"))]
    assert [g.gpu for g in parse(dcgm_text(util, gpus))] == ["0", "2", "10"]

    mig = (
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",'
        'GPU_I_PROFILE="3g.40gb",GPU_I_ID="2",Hostname="h"} 100\n'
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",'
        'GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",Hostname="h"} 200\n'
        'DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-b",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",'
        'Hostname="h"} 300\n'
    )
    readings = parse(mig)
    assert [(g.gpu, g.memory_used_bytes) for g in readings] == [
        ("0-1", 200 * MIB),
        ("0-2", 100 * MIB),
        ("1", 300 * MIB),
    ]


def test_parse_gives_nothing_for_prometheus_text_without_dcgm_series() -> None:
    assert parse("") == []
    assert parse("# HELP up Up.\n# TYPE up gauge\nup 1\n") == []
    # DCGM series without a `gpu` label (an NVSwitch's, a CPU's) are not GPUs.
    assert parse('DCGM_FI_DEV_POWER_USAGE{cpu="0",Hostname="h"} 80\n') == []


@pytest.mark.parametrize(
    "text",
    [
        "404 page not found\n",  # Ollama, behind a door without the /gpu-metrics location
        "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n</html>\r\n",  # nginx
        '{"error":"unauthorized"}\n',  # the door, to a wrong token
        "ok\n",
    ],
)
def test_parse_refuses_what_is_not_prometheus_text(text: str) -> None:
    with pytest.raises(NoGpuMetrics, match="not Prometheus text"):
        parse(text)


# --------------------------------------------------------------------------------------------
# GpuScraper, through real doors
# --------------------------------------------------------------------------------------------


class Exporter:
    """A stand-in dcgm-exporter whose answer a test may change."""

    def __init__(self) -> None:
        self.text = DCGM_TEXT
        self.stand_in: StandIn | None = None


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    state = Exporter()
    with stand_in_exporter_running(lambda: state.text) as stand_in:
        state.stand_in = stand_in
        yield state


@pytest.fixture(scope="module")
def doors(exporter: Exporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two doors in front of the exporter (two hosts of one fleet). Their Ollama is not running:
    these tests never ask it."""
    assert exporter.stand_in is not None
    port = exporter.stand_in.port
    with (
        nginx_door(tmp_path_factory.mktemp("door-a"), door_env(free_port(), port)) as a,
        nginx_door(tmp_path_factory.mktemp("door-b"), door_env(free_port(), port)) as b,
    ):
        yield a, b


@pytest.fixture(scope="module")
def bare_door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A door set up without DCGM_UPSTREAM: it answers /gpu-metrics with 404."""
    with nginx_door(tmp_path_factory.mktemp("door-bare"), door_env(free_port(), None)) as url:
        yield url


@pytest.fixture
def fresh_exporter(exporter: Exporter) -> Iterator[Exporter]:
    exporter.text = DCGM_TEXT
    yield exporter
    exporter.text = DCGM_TEXT


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="DEBUG", format="{level} {message}")
    yield lines
    logger.remove(sink)


def ready_host(name: str, url: str, **fields: object) -> Host:
    host = Host(id=name, name=name, provider="static", url=url, slots=1, **fields)
    host.apply(HostEvent.CLOUD_RUNNING)
    host.apply(HostEvent.OLLAMA_READY)
    return host


def fleet_of(*hosts: Host) -> Fleet:
    fleet = Fleet(loads(""))
    for host in hosts:
        fleet.add(host)
    return fleet


class Requests:
    """The requests a client sent, by origin (`http://127.0.0.1:PORT`): how many, and when."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}

    async def hook(self, request: httpx.Request) -> None:
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        self.count[origin] += 1
        self.times.setdefault(origin, []).append(anyio.current_time())


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, Requests]]:
    requests = Requests()
    async with httpx.AsyncClient(event_hooks={"request": [requests.hook]}) as c:
        yield c, requests


def with_util(*percent: str) -> str:
    """DCGM_TEXT with other utilisations."""
    series = [
        (name, kind, help_text, percent if name == "DCGM_FI_DEV_GPU_UTIL" else values)
        for name, kind, help_text, values in DCGM_SERIES
    ]
    return dcgm_text(series)


def at_read_zero(readings: list[GpuReading]) -> list[GpuReading]:
    return [msgspec.structs.replace(r, read_at=0.0) for r in readings]


def samples(registry: CollectorRegistry) -> dict[str, dict[tuple[str, str], float]]:
    """name -> (host, gpu) -> value, from the registry's exposition (as Prometheus would read it)."""
    found: dict[str, dict[tuple[str, str], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        assert family.type == "gauge"
        for sample in family.samples:
            assert set(sample.labels) == {"host", "gpu"}
            found.setdefault(sample.name, {})[(sample.labels["host"], sample.labels["gpu"])] = sample.value
    return found


@pytest.mark.anyio
async def test_the_scraper_reads_each_gpu_through_the_door_and_exports_gauges(
    doors: tuple[str, str],
    fresh_exporter: Exporter,
    client: tuple[httpx.AsyncClient, Requests],
) -> None:
    http, requests = client
    # One host with the fleet's token, one with credentials of its own, and three that are not
    # read (at addresses where nothing listens): an OpenAI-compatible upstream, a job endpoint
    # and a paused host.
    a = ready_host("gpu-a", doors[0])
    b = ready_host("gpu-b", doors[1], auth=[(b"Authorization", f"Bearer {TOKEN}".encode())])
    openai = ready_host("runpod", "http://127.0.0.1:1", api="openai")
    jobs = ready_host("jobs", "http://127.0.0.1:2", jobs_url="http://127.0.0.1:2/v2/abc")
    paused = Host(id="paused", name="paused", provider="static", url="http://127.0.0.1:3", slots=1)
    paused.apply(HostEvent.CLOUD_PAUSED)
    fleet = fleet_of(a, b, openai, jobs, paused)
    scraper = GpuScraper(fleet, http, interval=INTERVAL, headers=AUTH)
    # The fleet's token wrong: only the host with its own credentials is read.
    wrong_token = GpuScraper(fleet, http, interval=INTERVAL, headers={"Authorization": "Bearer wrong"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(scraper.run)
        tg.start_soon(wrong_token.run)
        await async_wait_until(lambda: set(scraper.readings()) == {"gpu-a", "gpu-b"}, WAIT)
        await async_wait_until(lambda: set(wrong_token.readings()) == {"gpu-b"}, WAIT)

        for gpus in scraper.readings().values():
            assert at_read_zero(gpus) == at_read_zero(EXPECTED)
            assert all(0 < g.read_at <= anyio.current_time() for g in gpus)

        # Read again every interval: a change shows.
        fresh_exporter.text = with_util("12", "0")
        await async_wait_until(lambda: all(gpus[0].utilization == 0.12 for gpus in scraper.readings().values()), WAIT)
        tg.cancel_scope.cancel()

    assert set(requests.count) == set(doors)  # only the doors were asked
    assert fresh_exporter.stand_in is not None
    assert {seen["path"] for seen in fresh_exporter.stand_in.seen} == {"/metrics"}
    assert {seen["authorization"] for seen in fresh_exporter.stand_in.seen} == {None}

    # The gauges, as /metrics will show them.
    registry = CollectorRegistry()
    registry.register(scraper.collector())
    got = samples(registry)
    expected_gpus = {"0": EXPECTED[0], "1": EXPECTED[1]}
    assert set(got) == {
        "gpumanager_gpu_utilization_ratio",
        "gpumanager_gpu_memory_used_bytes",
        "gpumanager_gpu_memory_total_bytes",
        "gpumanager_gpu_temperature_celsius",
        "gpumanager_gpu_power_watts",
    }
    keys = {(host, gpu) for host in ("gpu-a", "gpu-b") for gpu in ("0", "1")}
    for series in got.values():
        assert set(series) == keys
    for (host, gpu), value in got["gpumanager_gpu_utilization_ratio"].items():
        assert value == scraper.readings()[host][int(gpu)].utilization
    for host in ("gpu-a", "gpu-b"):
        for gpu, reading in expected_gpus.items():
            assert got["gpumanager_gpu_memory_used_bytes"][(host, gpu)] == reading.memory_used_bytes
            assert got["gpumanager_gpu_memory_total_bytes"][(host, gpu)] == reading.memory_total_bytes
            assert got["gpumanager_gpu_temperature_celsius"][(host, gpu)] == reading.temperature_celsius
            assert got["gpumanager_gpu_power_watts"][(host, gpu)] == reading.power_watts
    assert got["gpumanager_gpu_utilization_ratio"][("gpu-b", "0")] == 0.12
    assert got["gpumanager_gpu_utilization_ratio"][("gpu-a", "1")] == 0.0
    # Its names are declared: registering it twice is refused, as for any collector.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(scraper.collector())


@pytest.mark.anyio
async def test_a_host_without_an_exporter_is_not_shown_logged_once_and_asked_less_often(
    doors: tuple[str, str],
    bare_door: str,
    fresh_exporter: Exporter,
    client: tuple[httpx.AsyncClient, Requests],
    log_lines: list[str],
) -> None:
    http, requests = client
    fleet = fleet_of(ready_host("with", doors[0]), ready_host("without", bare_door))
    scraper = GpuScraper(fleet, http, interval=INTERVAL, headers=AUTH)

    async with anyio.create_task_group() as tg:
        tg.start_soon(scraper.run)
        # Asked three times: at the first round, then after each wait of RETRY_ROUNDS intervals.
        await async_wait_until(lambda: requests.count[bare_door] >= 3, WAIT)
        tg.cancel_scope.cancel()

    assert set(scraper.readings()) == {"with"}
    # Every round asked the host with an exporter; the other one only RETRY_ROUNDS intervals after
    # its last answer.
    asked = requests.times[bare_door]
    assert all(b - a > RETRY_ROUNDS * INTERVAL for a, b in itertools.pairwise(asked)), asked
    assert requests.count[doors[0]] >= requests.count[bare_door]
    about = [line for line in log_lines if "without" in line]
    assert about == [
        f"INFO no GPU metrics from without (HTTP 404); not shown, asked again every {INTERVAL * RETRY_ROUNDS:g} s"
    ]
    assert not [line for line in log_lines if line.startswith(("WARNING", "ERROR"))], log_lines


@pytest.mark.anyio
async def test_a_host_that_leaves_ready_loses_its_readings_and_is_no_longer_asked(
    doors: tuple[str, str],
    fresh_exporter: Exporter,
    client: tuple[httpx.AsyncClient, Requests],
) -> None:
    http, requests = client
    leaving, staying = ready_host("leaving", doors[0]), ready_host("staying", doors[1])
    fleet = fleet_of(leaving, staying)
    scraper = GpuScraper(fleet, http, interval=INTERVAL, headers=AUTH)

    async with anyio.create_task_group() as tg:
        tg.start_soon(scraper.run)
        await async_wait_until(lambda: set(scraper.readings()) == {"leaving", "staying"}, WAIT)

        leaving.apply(HostEvent.PAUSE)  # -> pausing
        assert set(scraper.readings()) == {"staying"}  # at once, not at the next round
        asked = requests.count[doors[0]]
        rounds = requests.count[doors[1]]
        await async_wait_until(lambda: requests.count[doors[1]] >= rounds + 3, WAIT)
        assert requests.count[doors[0]] <= asked + 1  # at most the read under way when it left
        assert "leaving" not in scraper._readings  # forgotten, not only hidden

        fleet.remove(staying)
        assert scraper.readings() == {}
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_exporter_that_stops_answering_is_hidden_then_shown_again(
    doors: tuple[str, str],
    fresh_exporter: Exporter,
    client: tuple[httpx.AsyncClient, Requests],
    log_lines: list[str],
) -> None:
    http, _ = client
    fleet = fleet_of(ready_host("flaky", doors[0]))
    scraper = GpuScraper(fleet, http, interval=INTERVAL, headers=AUTH, retry_rounds=4)

    async with anyio.create_task_group() as tg:
        tg.start_soon(scraper.run)
        await async_wait_until(lambda: "flaky" in scraper.readings(), WAIT)

        fresh_exporter.text = "<html><body>not metrics</body></html>\n"
        await async_wait_until(lambda: "flaky" not in scraper.readings(), WAIT)
        await async_wait_until(
            lambda: any(line.startswith("INFO no GPU metrics from flaky") for line in log_lines), WAIT
        )

        fresh_exporter.text = DCGM_TEXT
        await async_wait_until(lambda: "flaky" in scraper.readings(), WAIT)
        tg.cancel_scope.cancel()

    infos = [line for line in log_lines if line.startswith("INFO") and "flaky" in line]
    assert len(infos) == 2, infos
    assert infos[0].startswith("INFO no GPU metrics from flaky (not Prometheus text: ")
    assert infos[1] == "INFO GPU metrics of flaky: 2 GPUs"
    # Before hiding it, the scraper gave it one more round (a debug line), then backed off.
    assert any(line.startswith("DEBUG no GPU metrics from flaky this round") for line in log_lines)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.anyio
async def test_a_host_that_never_answers_delays_no_other(
    doors: tuple[str, str],
    fresh_exporter: Exporter,
    silent_port: int,
    client: tuple[httpx.AsyncClient, Requests],
    log_lines: list[str],
) -> None:
    http, _ = client
    # The silent host first: were the hosts read one after the other, the fast one would wait.
    fleet = fleet_of(ready_host("silent", f"http://127.0.0.1:{silent_port}"), ready_host("fast", doors[0]))
    timeout = 2.0
    scraper = GpuScraper(fleet, http, interval=INTERVAL, headers=AUTH, timeout=timeout)

    async with anyio.create_task_group() as tg:
        start = anyio.current_time()
        tg.start_soon(scraper.run)
        await async_wait_until(lambda: "fast" in scraper.readings(), WAIT)
        assert anyio.current_time() - start < timeout
        await async_wait_until(lambda: any("from silent (TimeoutError" in line for line in log_lines), WAIT)
        assert anyio.current_time() - start >= timeout
        tg.cancel_scope.cancel()
    assert set(scraper.readings()) == {"fast"}


@pytest.mark.anyio
async def test_a_series_not_reported_is_left_out_of_the_gauges(
    client: tuple[httpx.AsyncClient, Requests],
) -> None:
    """Not exported as 0: a GPU whose exporter reports only its utilisation has only that gauge."""
    util_only = [s for s in DCGM_SERIES if s[0] == "DCGM_FI_DEV_GPU_UTIL"]
    readings = parse(dcgm_text(util_only))
    assert [(r.name, r.memory_total_bytes, r.power_watts) for r in readings] == [(DCGM_MODEL, None, None)] * 2

    class Fixed(GpuScraper):
        def readings(self) -> dict[str, list[GpuReading]]:
            return {"h": readings}

    registry = CollectorRegistry()
    registry.register(Fixed(fleet_of(), client[0], interval=1.0).collector())
    assert samples(registry) == {"gpumanager_gpu_utilization_ratio": {("h", "0"): 0.87, ("h", "1"): 0.0}}

"""The proxy's accounting path measured in-process, without a server (bench.py row 9).

Per request the proxy admits it (`Fleet.admit` -> `Lease`: the scheduler's choice, then the billing
meter's settle), releases the lease (another settle, which shares the serving time among the leases
in flight) and hands a `RequestRecord` to its recorder: the Prometheus series and a ledger row
buffered for the writer. This does the same with the same objects the proxy builds (`Runtime`),
`CONCURRENCY` leases in flight as in the c=32 rate run, and times each part with
`time.process_time()`. The ledger writer then commits the buffered rows in its worker thread;
`process_time()` counts every thread of the process, so its figure per row includes that thread.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from gpumanager.config import loads
from gpumanager.fleet import Fleet, Lease
from gpumanager.hosts import Host, HostEvent
from gpumanager.ledger.recording import LedgerRecorder
from gpumanager.ledger.writer import LedgerWriter
from gpumanager.metrics import Metrics
from gpumanager.recorder import Recorder, Recorders, RequestRecord
from gpumanager.scheduler import Ask
from servers import CONFIG

MODEL, KEY_ID = "llama3.2", "5e1f0c2a"  # what the bench asks for; a key id as `generate-key` makes them
WARMUP = 2_000


@dataclass(frozen=True)
class AccountingCost:
    """CPU µs per request of each part of the accounting path."""

    requests: int
    in_flight: int
    lease_us: float  # admit + release: the scheduler's choice and the billing meter's two settles
    record_us: float  # the RequestRecord and `recorder.request`: metrics and a ledger row buffered
    writer_us: float  # the ledger writer committing one row, its worker thread included
    rows: int  # rows the writer committed in the timed flush
    flush_s: float  # wall time of that flush

    @property
    def total_us(self) -> float:
        return self.lease_us + self.record_us + self.writer_us


@contextmanager
def cpu_timer(into: list[float]) -> Iterator[None]:
    """Append the process's CPU seconds (all threads) spent in the block to `into`."""
    start = time.process_time()
    yield
    into.append(time.process_time() - start)


def ready_host() -> Host:
    """The bench's one host (servers.CONFIG), READY, priced like a cloud GPU so the cost path runs."""
    host = Host(
        id="sim",
        name="sim",
        provider="bench",
        url="http://127.0.0.1:11434",
        slots=1100,
        cost_per_hour=1.2,
        models=frozenset({"llama3.2:latest"}),
    )
    for event in (HostEvent.CLOUD_RUNNING, HostEvent.OLLAMA_READY):
        host.apply(event)
    return host


def admit(fleet: Fleet) -> Lease:
    got = fleet.admit(Ask(MODEL, KEY_ID))
    if not isinstance(got, Lease):
        raise RuntimeError(f"the fleet queued a request instead of leasing a free slot: {got!r}")
    return got


def lease_requests(fleet: Fleet, count: int, in_flight: int) -> list[Lease]:
    """`count` requests as a closed loop at `in_flight`: each admit is followed by the oldest's release."""
    held = deque(admit(fleet) for _ in range(in_flight - 1))
    done: list[Lease] = []
    for _ in range(count):
        held.append(admit(fleet))
        lease = held.popleft()
        lease.release()
        done.append(lease)
    for lease in held:
        lease.release()
    return done


def record_requests(recorder: Recorder, leases: list[Lease]) -> None:
    """What the proxy records at the end of each request (proxy/routes.py `_record`)."""
    for i, lease in enumerate(leases):
        duration = 0.002 + (i % 40) * 0.0001  # spread over a few histogram buckets
        recorder.request(
            RequestRecord(
                route="/api/chat",
                model=MODEL,
                status=200,
                key=KEY_ID,
                host=lease.host.name,
                wait_seconds=0.0,
                first_byte_seconds=duration * 0.6,
                duration_seconds=duration,
                overhead_seconds=0.0002,
                prompt_tokens=26,
                completion_tokens=5,
                gpu_seconds=lease.gpu_seconds,
                cost_micro=lease.cost_micro,
            )
        )


async def committed(writer: LedgerWriter, rows: int, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while writer.statistics().written < rows:
            await anyio.sleep(0.005)


async def _measure(folder: Path, requests: int, in_flight: int) -> AccountingCost:
    config = loads(CONFIG.format(port=0, sim_port=11434))
    fleet = Fleet(config)
    fleet.add(ready_host())
    writer = LedgerWriter(folder / "usage.sqlite3")
    metrics = Metrics(fleet, ledger=writer)
    recorder = Recorders(metrics, LedgerRecorder(writer))
    fleet.billing.recorder = recorder  # as Runtime wires it
    lease_cpu: list[float] = []
    record_cpu: list[float] = []
    writer_cpu: list[float] = []
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)  # opens (creates) the file: not timed
        record_requests(recorder, lease_requests(fleet, WARMUP, in_flight))  # label children, caches
        await committed(writer, WARMUP)
        before = writer.statistics().written
        # Nothing below awaits until the rows are all buffered, so the writer cannot flush meanwhile.
        with cpu_timer(lease_cpu):
            leases = lease_requests(fleet, requests, in_flight)
        with cpu_timer(record_cpu):
            record_requests(recorder, leases)
        rows = writer.statistics().buffered
        started = time.perf_counter()
        with cpu_timer(writer_cpu):
            await committed(writer, before + rows)  # the buffer passed FLUSH_ROWS: it flushes at once
        flush_s = time.perf_counter() - started
        tg.cancel_scope.cancel()
    return AccountingCost(
        requests=requests,
        in_flight=in_flight,
        lease_us=lease_cpu[0] / requests * 1e6,
        record_us=record_cpu[0] / requests * 1e6,
        writer_us=writer_cpu[0] / max(rows, 1) * 1e6,
        rows=rows,
        flush_s=flush_s,
    )


def measure_accounting(requests: int = 20_000, in_flight: int = 32) -> AccountingCost:
    with tempfile.TemporaryDirectory(prefix="gpumanager-bench-ledger-") as folder:
        # The stdlib loop, as `gpumanager server` runs (anyio's default): its clock moves within a
        # loop iteration, so leases are billed serving time; uvloop's stands still until the next one.
        return anyio.run(_measure, Path(folder), requests, in_flight)

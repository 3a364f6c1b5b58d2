"""Benchmark of the gpumanager proxy against a simulated Ollama, all on 127.0.0.1 (`make bench`).

Prints one table: sanity of the upstream, added latency, requests/s and proxy CPU per request,
time to first chunk, socket reads per stream, the proxy's RSS while it holds 1000 streams, whether
the proxy's /metrics counted every stream and its tokens, and the CPU cost of its accounting.
The machine has few cores shared by the proxy, the sim and the client, so wall-clock figures are
noisy: CPU-time-per-request figures (from /proc via psutil) are the stable ones, every phase warms
up first, and rates are medians of several windows, shown with their min-max spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from accounting import AccountingCost, measure_accounting
from servers import Procs, Server, log_problems, metrics_text, raise_nofile

CONCURRENCY = 32
TARGETS = {
    "added_p50_ms": 1.0,
    "rps": 1500.0,
    "cpu_us": 700.0,
    "rss_mb": 150.0,
    "sanity_ratio": 2.5,
    "accounting_pct": 10.0,  # of the proxy's CPU per request (row 4)
}
STREAMS, STREAM_TOKENS, STREAM_DELAY = 1000, 20, 0.25
ACCOUNTED_REQUESTS = 20_000  # run through the accounting path in-process
T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {message}", file=sys.stderr, flush=True)


def expected_text(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))  # what the sim answers for num_predict = n


def chat_target(name: str, server: Server, tokens: int, *, stream: bool) -> dict[str, Any]:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        "options": {"num_predict": tokens},
    }
    return {
        "name": name,
        "port": server.port,
        "path": "/api/chat",
        "body": body,
        "key": server.key,
        "expect": expected_text(tokens),
        "check": "ndjson" if stream else "contains",
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Rate:
    """Medians over the timed windows of one closed-loop run at CONCURRENCY connections."""

    rps: float
    low: float
    high: float
    cpu_us: dict[str, float]  # role -> CPU µs per completed request ("client" is the load generator)
    other_cores: float  # busy cores outside our processes: the background load during the run
    errors: int

    def cell(self) -> str:
        return f"{self.rps:,.0f} [{self.low:,.0f}-{self.high:,.0f}]"


def measure_rate(
    procs: Procs,
    target: dict[str, Any],
    roles: dict[str, int],
    *,
    warmup_s: float = 1.5,
    windows: int = 3,
    window_s: float = 2.5,
) -> Rate:
    spec = {
        "mode": "rate",
        "target": target,
        "concurrency": CONCURRENCY,
        "warmup_s": warmup_s,
        "windows": windows,
        "window_s": window_s,
        "pids": list(roles.values()),
    }
    result = procs.loadgen(spec, timeout=warmup_s + windows * window_s + 30)
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} failed requests to {target['name']}: {result['first_error']}")
    rates, cpu, other = [], {role: [] for role in [*roles, "client"]}, []
    for w in result["windows"]:
        done = max(1, w["completed"])
        rates.append(w["completed"] / w["seconds"])
        for role, pid in roles.items():
            cpu[role].append(w["cpu"][str(pid)] / done * 1e6)
        cpu["client"].append(w["cpu"]["self"] / done * 1e6)
        ours = sum(w["cpu"][str(pid)] for pid in roles.values()) + w["cpu"]["self"]
        other.append(max(0.0, w["cpu"]["machine"] - ours) / w["seconds"])
    return Rate(
        statistics.median(rates),
        min(rates),
        max(rates),
        {role: statistics.median(v) for role, v in cpu.items()},
        statistics.median(other),
        0,
    )


def sequential(
    procs: Procs, targets: list[dict[str, Any]], *, warmup: int, rounds: int, per_round: int, budget_s: float
) -> dict[str, list[dict[str, Any]]]:
    spec = {"mode": "sequential", "targets": targets, "warmup": warmup, "rounds": rounds, "per_round": per_round}
    results: dict[str, list[dict[str, Any]]] = procs.loadgen(spec, timeout=budget_s)["results"]
    for name, rows in results.items():
        bad = sum(not r["ok"] for r in rows)
        if bad:
            raise RuntimeError(f"{bad} of {len(rows)} answers from {name} were wrong or incomplete")
    return results


@dataclass(frozen=True)
class Counted:
    """One proxy's /metrics against what the bench's streams through it received."""

    proxy: str
    streams: int  # streams the bench received in full
    tokens: int  # completion tokens those streams asked for and received
    counted_streams: int  # sum of gpumanager_requests_total{status="200"}
    counted_tokens: int  # sum of gpumanager_tokens_total{kind="completion"}

    @property
    def exact(self) -> bool:
        return (self.counted_streams, self.counted_tokens) == (self.streams, self.tokens)

    def cell(self) -> str:
        return (
            f"{self.counted_streams:,} of {self.streams:,} streams ({share(self.counted_streams, self.streams)}), "
            f"{self.counted_tokens:,} of {self.tokens:,} tokens ({share(self.counted_tokens, self.tokens)})"
        )


@dataclass
class Report:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # correctness failures: exit status 1
    proxy_cpu_us: float | None = None  # row 4, the base of the accounting row
    counted: list[Counted] = field(default_factory=list)  # per proxy that served streams

    def row(self, measure: str, proxy: str = "", direct: str = "", target: str = "", result: str = "") -> None:
        self.rows.append((measure, proxy, direct, target, result))


def verdict(ok: bool, good: str = "PASS", bad: str = "FAIL") -> str:
    return good if ok else bad


def share(part: int, whole: int) -> str:
    """`part` of `whole` in percent: "100 %" only when they are equal (99.97 % shows as 99.9 %, 100.01 % as 100.1 %)."""
    if part == whole:
        return "100 %"
    if not whole:
        return "n/a"
    tenths = part * 1000 // whole if part < whole else -(-part * 1000 // whole)  # away from 100
    return f"{tenths / 10:.1f} %"


def metric_counts(text: str) -> tuple[int, int]:
    """(requests answered 200, completion tokens) in a proxy's /metrics, summed over all label sets."""
    answered = tokens = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gpumanager_requests_total" and sample.labels.get("status") == "200":
                answered += sample.value
            elif sample.name == "gpumanager_tokens_total" and sample.labels.get("kind") == "completion":
                tokens += sample.value
    return round(answered), round(tokens)


def count_streams(proxy: Server, streams: int, tokens: int, settle_s: float = 5.0) -> Counted:
    """What `proxy` counted of the `streams` (with `tokens` completion tokens in all) the bench received.
    The proxy records a request just after its last byte went out: poll until the counts reach the
    bench's (or `settle_s` passed)."""
    deadline = time.monotonic() + settle_s
    while True:
        answered, seen = metric_counts(metrics_text(proxy))
        if (answered >= streams and seen >= tokens) or time.monotonic() > deadline:
            return Counted(proxy.name, streams, tokens, answered, seen)
        time.sleep(0.05)


def phase_throughput(procs: Procs, report: Report) -> None:
    """List items 1-4: sanity of the sim, added latency at c=1, requests/s and CPU at c=32."""
    sim = procs.start_sim("sim-fast", token_delay=0.0, slots=64)
    progress(f"sim alone: {CONCURRENCY} connections, non-streaming chat, 5 tokens")
    direct = measure_rate(
        procs, chat_target("direct", sim, 5, stream=False), {"sim": sim.pid}, warmup_s=1.0, windows=3, window_s=2.0
    )
    proxy = procs.start_proxy("proxy-warning", sim, log_level="WARNING")
    progress("latency at concurrency 1, direct and proxy alternated")
    seq = sequential(
        procs,
        [chat_target("direct", sim, 5, stream=False), chat_target("proxy", proxy, 5, stream=False)],
        warmup=300,
        rounds=4,
        per_round=750,
        budget_s=90,
    )
    progress(f"proxy at {CONCURRENCY} connections, --log-level WARNING")
    via = measure_rate(procs, chat_target("proxy", proxy, 5, stream=False), {"proxy": proxy.pid, "sim": sim.pid})
    procs.stop(proxy)
    info_proxy = procs.start_proxy("proxy-info", sim, log_level="INFO")
    progress(f"proxy at {CONCURRENCY} connections, --log-level INFO")
    info = measure_rate(
        procs,
        chat_target("proxy", info_proxy, 5, stream=False),
        {"proxy": info_proxy.pid, "sim": sim.pid},
        warmup_s=1.0,
        windows=3,
        window_s=2.0,
    )
    procs.stop(info_proxy)
    procs.stop(sim)

    ratio = direct.rps / max(via.rps, 1.0)
    sane = ratio >= TARGETS["sanity_ratio"]
    report.row(
        "1. Sanity: sim alone, req/s @ c=32",
        "",
        direct.cell(),
        f">= {TARGETS['sanity_ratio']}x proxy",
        f"{ratio:.1f}x " + verdict(sane, "ok", "WARN"),
    )
    report.row("   Sanity: sim CPU per request", "", f"{direct.cpu_us['sim']:.0f} us")
    if not sane:
        report.alarms.append(
            f"the simulated Ollama alone does only {ratio:.1f}x the proxy's requests/s (want >= "
            f"{TARGETS['sanity_ratio']}x): the throughput rows measure the sim or the machine, "
            "not the proxy"
        )
    lat_d = [r["latency"] * 1e3 for r in seq["direct"]]
    lat_p = [r["latency"] * 1e3 for r in seq["proxy"]]
    added50, added99 = pct(lat_p, 0.5) - pct(lat_d, 0.5), pct(lat_p, 0.99) - pct(lat_d, 0.99)
    report.row(f"2. Latency p50, c=1 ({len(lat_p)} req)", f"{pct(lat_p, 0.5):.3f} ms", f"{pct(lat_d, 0.5):.3f} ms")
    report.row(
        "   Added latency p50 (proxy - direct)",
        f"+{added50:.3f} ms",
        "",
        f"<= {TARGETS['added_p50_ms']:g} ms",
        verdict(added50 <= TARGETS["added_p50_ms"]),
    )
    report.row("   Latency p99, c=1", f"{pct(lat_p, 0.99):.3f} ms", f"{pct(lat_d, 0.99):.3f} ms")
    report.row("   Added latency p99", f"+{added99:.3f} ms")
    report.row(
        "3. Requests/s @ c=32 [min-max]",
        via.cell(),
        direct.cell(),
        f">= {TARGETS['rps']:,.0f}",
        verdict(via.rps >= TARGETS["rps"]),
    )
    report.row(
        "4. Proxy CPU per request",
        f"{via.cpu_us['proxy']:.0f} us",
        "",
        f"<= {TARGETS['cpu_us']:.0f} us",
        verdict(via.cpu_us["proxy"] <= TARGETS["cpu_us"]),
    )
    report.proxy_cpu_us = via.cpu_us["proxy"]
    report.row("   Requests/s @ c=32, --log-level INFO", info.cell(), "", "(production default)")
    report.row("   Proxy CPU per request, INFO", f"{info.cpu_us['proxy']:.0f} us")
    report.notes.append(
        f"c=32 through the proxy: per request the sim used {via.cpu_us['sim']:.0f} us and the load generator "
        f"{via.cpu_us['client']:.0f} us of CPU (direct: client {direct.cpu_us['client']:.0f} us); "
        f"background load from other processes: {via.other_cores:.2f} cores (direct run {direct.other_cores:.2f}, "
        f"INFO run {info.other_cores:.2f})"
    )


def phase_streams(procs: Procs, report: Report) -> None:
    """List items 5-6: time to first chunk (5 ms/token) and socket reads per 50-token stream (10 ms/token)."""
    sim = procs.start_sim("sim-5ms", token_delay=0.005, slots=64)
    proxy = procs.start_proxy("proxy-ttfb", sim)
    progress("time to first chunk, streaming chat, 5 ms per token")
    seq = sequential(
        procs,
        [chat_target("direct", sim, 3, stream=True), chat_target("proxy", proxy, 3, stream=True)],
        warmup=20,
        rounds=4,
        per_round=50,
        budget_s=60,
    )
    streams = 20 + len(seq["proxy"])  # the warm-up streams included
    report.counted.append(count_streams(proxy, streams, 3 * streams))
    procs.stop(proxy)
    procs.stop(sim)
    ttfb = {name: pct([r["ttfb"] * 1e3 for r in rows], 0.5) for name, rows in seq.items()}
    gap = ttfb["proxy"] - ttfb["direct"]
    report.row(
        f"5. Time to first chunk p50 (5 ms/token, {len(seq['proxy'])} streams)",
        f"{ttfb['proxy']:.2f} ms (+{gap:.2f})",
        f"{ttfb['direct']:.2f} ms",
    )

    sim = procs.start_sim("sim-10ms", token_delay=0.010, slots=64)
    proxy = procs.start_proxy("proxy-reads", sim)
    progress("socket reads per 50-token stream, 10 ms per token")
    seq = sequential(
        procs,
        [chat_target("direct", sim, 50, stream=True), chat_target("proxy", proxy, 50, stream=True)],
        warmup=1,
        rounds=4,
        per_round=1,
        budget_s=60,
    )
    streams = 1 + len(seq["proxy"])
    report.counted.append(count_streams(proxy, streams, 50 * streams))
    procs.stop(proxy)
    procs.stop(sim)
    reads = {name: statistics.median(r["reads"] for r in rows) for name, rows in seq.items()}
    # 50 token frames + the final frame, plus the head and the chunked terminator when they come apart.
    unbuffered = reads["proxy"] >= 50 and reads["proxy"] >= reads["direct"] - 2
    report.row(
        "6. Socket reads per 50-token stream",
        f"{reads['proxy']:.0f}",
        f"{reads['direct']:.0f}",
        "~51 (unbuffered)",
        verdict(unbuffered, "ok", "BUFFERED"),
    )
    if not unbuffered:
        report.alarms.append(f"the proxy delivers a 50-token stream in {reads['proxy']:.0f} reads: it buffers chunks")


def sample_rss(pid: int, count: int, every_s: float = 0.05) -> list[int]:
    process, samples = psutil.Process(pid), []
    for _ in range(count):
        samples.append(process.memory_info().rss)
        time.sleep(every_s)
    return samples


def phase_memory(procs: Procs, report: Report) -> None:
    """List item 7: peak RSS of the proxy holding 1000 slow streams at once, all checked complete."""
    sim = procs.start_sim("sim-slow", token_delay=STREAM_DELAY, slots=1100, tokens=STREAM_TOKENS)
    proxy = procs.start_proxy("proxy-rss", sim)
    progress("warm-up: 50 short streams through the proxy")
    warm = procs.loadgen(
        {"mode": "hold", "streams": 50, "timeout_s": 30, "target": chat_target("proxy", proxy, 2, stream=True)},
        timeout=60,
    )
    if warm["ok"] != 50:
        raise RuntimeError(f"warm-up streams failed: {warm}")
    baseline = statistics.median(sample_rss(proxy.pid, 10))
    process, peak = psutil.Process(proxy.pid), [0]

    def tick() -> None:
        peak[0] = max(peak[0], process.memory_info().rss)

    progress(f"{STREAMS} streams at once through the proxy, {STREAM_TOKENS} tokens at {STREAM_DELAY} s each")
    held = hold(procs, chat_target("proxy", proxy, STREAM_TOKENS, stream=True), tick)
    after = statistics.median(sample_rss(proxy.pid, 10))
    received = warm["ok"] + held["ok"]
    report.counted.append(count_streams(proxy, received, 2 * warm["ok"] + STREAM_TOKENS * held["ok"]))
    procs.stop(proxy)
    progress(f"{STREAMS} streams at once to the sim alone, for comparison")
    direct = hold(procs, chat_target("direct", sim, STREAM_TOKENS, stream=True))
    procs.stop(sim)
    complete = held["ok"] == STREAMS
    report.row(
        f"7. Streams completed, all {STREAMS} opened at once",
        hold_cell(held),
        hold_cell(direct),
        f"all {STREAMS}",
        verdict(complete),
    )
    report.row("   Proxy RSS before the streams", f"{baseline / 2**20:.1f} MB")
    report.row(
        "   Proxy RSS peak, 1000 streams",
        f"{peak[0] / 2**20:.1f} MB",
        "",
        f"<= {TARGETS['rss_mb']:.0f} MB",
        verdict(peak[0] / 2**20 <= TARGETS["rss_mb"]),
    )
    report.notes.append(
        f"RSS: {(peak[0] - baseline) / STREAMS / 1024:.0f} KB per held stream; "
        f"{after / 2**20:.1f} MB once they finished; requests all sent "
        f"{held['all_sent_after_s'] or 0:.2f} s after the first connect"
    )
    for name, result in (("proxy", held), ("direct", direct)):
        if result["ok"] != STREAMS:
            report.broken.append(
                f"{name}: only {result['ok']} of {STREAMS} streams completed with the full answer "
                f"(finished {result['finished']}, timed out {result['timed_out']}, errors "
                f"{result['error_count']}: {result['errors']})"
            )


def phase_accounting(procs: Procs, report: Report) -> None:
    """List items 8-9: the streams and tokens the proxies' /metrics counted (scraped in the phases
    above), and the CPU per request of the accounting path, measured in-process (no server)."""
    counted_rows(report)
    progress(f"accounting path in-process: {ACCOUNTED_REQUESTS:,} requests, {CONCURRENCY} leases in flight")
    accounting_rows(report, measure_accounting(ACCOUNTED_REQUESTS, CONCURRENCY))


def counted_rows(report: Report) -> None:
    counted = report.counted
    if not counted:
        return
    total = Counted(
        "all",
        sum(c.streams for c in counted),
        sum(c.tokens for c in counted),
        sum(c.counted_streams for c in counted),
        sum(c.counted_tokens for c in counted),
    )
    report.row(
        f"8. Tokens counted in /metrics ({len(counted)} proxies)",
        f"{total.counted_streams:,} of {total.streams:,} streams ({share(total.counted_streams, total.streams)})",
        "",
        "100 %",
        verdict(all(c.exact for c in counted)),
    )
    report.row(
        "   completion tokens counted",
        f"{total.counted_tokens:,} of {total.tokens:,} ({share(total.counted_tokens, total.tokens)})",
    )
    report.notes.append(
        "counted in /metrics (gpumanager_requests_total{status=200}, gpumanager_tokens_total{kind=completion}): "
        + "; ".join(f"{c.proxy} {c.cell()}" for c in counted)
    )
    for c in counted:
        if not c.exact:
            report.alarms.append(f"{c.proxy}: /metrics counted {c.cell()}")


def accounting_rows(report: Report, cost: AccountingCost) -> None:
    base = report.proxy_cpu_us

    def cell(us: float) -> str:
        return f"{us:.1f} us" + (f" ({us / base * 100:.1f} % of row 4)" if base else "")

    limit = TARGETS["accounting_pct"]
    report.row(
        "9. Accounting CPU per request (metrics + billing + ledger row)",
        cell(cost.total_us),
        "",
        f"<= {limit:g} % of row 4",
        verdict(cost.total_us <= base * limit / 100) if base else "n/a",
    )
    report.row("   admit + release (scheduler, billing settles)", cell(cost.lease_us))
    report.row("   recorder.request (metrics, ledger row buffered)", cell(cost.record_us))
    report.row("   ledger writer per row (its thread included)", cell(cost.writer_us))
    report.notes.append(
        f"accounting: {cost.requests:,} requests in-process with {cost.in_flight} leases in flight, CPU from "
        f"time.process_time(); the writer committed {cost.rows:,} rows in one batch in {cost.flush_s * 1e3:.0f} ms"
    )


def hold(procs: Procs, target: dict[str, Any], tick: Callable[[], None] | None = None) -> dict[str, Any]:
    wait = STREAM_TOKENS * STREAM_DELAY + 60
    return procs.loadgen(
        {"mode": "hold", "streams": STREAMS, "timeout_s": wait, "target": target}, timeout=wait + 30, tick=tick
    )


def hold_cell(result: dict[str, Any]) -> str:
    secs = result["seconds"]
    span = f"each {secs[0]:.1f}-{secs[-1]:.1f} s" if secs else "none finished"
    return f"{result['ok']}/{STREAMS} ({span})"


def print_table(report: Report) -> None:
    head = ("Measure", "Proxy", "Direct (sim)", "Target", "Result")
    widths = [max(len(r[i]) for r in [head, *report.rows]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for row in report.rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(line)


def context_line(nofile: tuple[int, int]) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()} ({platform.machine()}), "
        f"{platform.system()} {platform.release()}, load average {load}, open files {nofile[0]}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (configs, app.log files)")
    args = parser.parse_args()
    nofile = raise_nofile()
    print(context_line(nofile), flush=True)
    report = Report()
    phases: list[Callable[[Procs, Report], None]] = [phase_throughput, phase_streams, phase_memory, phase_accounting]
    with Procs(keep=args.keep) as procs:
        try:
            for phase in phases:
                phase(procs, report)
        finally:
            for path in procs.logs:
                count, lines = log_problems(path)
                if count:
                    report.alarms.append(
                        f"{count} WARNING+ lines in {path.parent.name}/app.log, first: " + " | ".join(lines)
                    )
            if args.keep:
                print(f"temp folder kept: {procs.root}", flush=True)
    progress("done")
    print_table(report)
    for note in report.notes:
        print(f"note: {note}")
    for alarm in [*report.alarms, *report.broken]:
        print(f"!!! {alarm}")
    return 1 if report.broken else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the children were already stopped by Procs.__exit__
        print("interrupted: every process the bench started was stopped", file=sys.stderr)
        sys.exit(130)

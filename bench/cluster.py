"""One gpumanager replica with Redis against one in memory, and two replicas against one (`make bench`).

Three phases, each a warm-up then timed windows of non-streaming chats (5 tokens, token delay 0) in
front of one simulated Ollama, all on 127.0.0.1:

  A. one replica, state in memory (no [cluster]): requests/s at c=32 and proxy CPU per request.
  B. one replica with [cluster] in a local redis-server: the same, its ratio to A (target >= 70 %),
     Redis's own CPU per request, and the Redis commands per request (INFO commandstats).
  C. two replicas with the same Redis, no balancer: the load generator opens 16 connections to each
     (32 in all, as in A and B). The sum of their requests/s against B.

The proxies, the sim, Redis and the load generator are child processes, stopped by pid at the end,
also on an error or Ctrl-C. `--keep` keeps the temp folder (configs, each replica's app.log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import (
    BIN,
    CONFIG,
    HOST,
    Procs,
    Server,
    _die_with_parent,
    _generate_key,
    free_port,
    log_problems,
    raise_nofile,
)

REDIS_SERVER = "/usr/bin/redis-server"
CLUSTER = """\
[cluster]
redis_url = "{url}"
name = "bench"
lease_ttl_seconds = 15
retry_seconds = 1
"""
CONCURRENCY = 32  # in all: phase C splits it, CONCURRENCY // 2 connections per replica
TOKENS = 5
WARMUP_S, WINDOWS, WINDOW_S = 1.5, 3, 2.5
REDIS_TARGET = 0.70  # B's requests/s at least this share of A's
BUSY_CORES = 0.25  # background load above this during a phase: its req/s is not comparable
T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {message}", file=sys.stderr, flush=True)


def expected_text(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))  # what the sim answers for num_predict = n


def chat_target(server: Server, concurrency: int) -> dict[str, Any]:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": TOKENS},
    }
    return {
        "name": server.name,
        "port": server.port,
        "path": "/api/chat",
        "body": body,
        "key": server.key,
        "expect": expected_text(TOKENS),
        "concurrency": concurrency,
    }


# -- the load generator: loadgen.py's connections and workers, over several targets at once -------


async def run_split(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop load on every target at once (each its own connections), counted in the same windows."""
    import loadgen

    tallies: list[loadgen.Tally] = []
    tasks: list[asyncio.Task[None]] = []
    conns: list[loadgen.Conn] = []
    for t in spec["targets"]:
        payload = loadgen.request_bytes(t["port"], t["path"], t["body"], t.get("key"))
        opened = await asyncio.gather(*(loadgen.connect(t["port"]) for _ in range(t["concurrency"])))
        tally = loadgen.Tally()
        tallies.append(tally)
        conns += opened
        expect = t["expect"].encode()
        tasks += [asyncio.create_task(loadgen._rate_worker(c, payload, expect, tally)) for c in opened]
    await asyncio.sleep(spec["warmup_s"])
    windows = []
    for _ in range(spec["windows"]):
        t0, n0, c0 = time.perf_counter(), [(t.ok, t.bad) for t in tallies], loadgen.cpu_seconds(spec["pids"])
        await asyncio.sleep(spec["window_s"])
        t1, n1, c1 = time.perf_counter(), [(t.ok, t.bad) for t in tallies], loadgen.cpu_seconds(spec["pids"])
        per_target = [b[0] - a[0] for a, b in zip(n0, n1, strict=True)]
        windows.append(
            {
                "seconds": t1 - t0,
                "completed": sum(per_target),
                "per_target": per_target,
                "errors": sum(b[1] - a[1] for a, b in zip(n0, n1, strict=True)),
                "cpu": {k: c1[k] - c0[k] for k in c0},
            }
        )
    for tally in tallies:
        tally.running = False
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    for conn in conns:
        conn.close()
    return {
        "windows": windows,
        "ok": [t.ok for t in tallies],
        "bad": [t.bad for t in tallies],
        "first_error": next((t.first_error for t in tallies if t.first_error), ""),
    }


def loadgen_main(raw: str) -> None:
    import uvloop

    import loadgen

    loadgen.raise_nofile()
    json.dump(uvloop.run(run_split(json.loads(raw))), sys.stdout)


def run_loadgen(procs: Procs, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """This file in load-generator mode, a child of `procs` (stopped by pid like the others)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--loadgen", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=_die_with_parent,
    )
    procs.children.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"load generator still running after {timeout:.0f} s") from None
    finally:
        procs._stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass
class Rate:
    """Medians over the timed windows of one run; CPU in µs per request completed (all targets)."""

    rps: float
    low: float
    high: float
    per_target_rps: list[float]
    cpu_us: dict[str, float]  # role -> µs per request; "proxies" is the replicas' sum, "client" the load generator
    other_cores: float  # busy cores outside the bench's processes: background load
    requests: int  # every request of the run, warm-up included (ok + failed)
    failed: int
    first_error: str

    def cell(self) -> str:
        return f"{self.rps:,.0f} [{self.low:,.0f}-{self.high:,.0f}]"


def measure(procs: Procs, proxies: list[Server], roles: dict[str, int]) -> Rate:
    """Closed-loop load split evenly over `proxies`; `roles` are the other pids to watch (sim, redis)."""
    per = CONCURRENCY // len(proxies)
    watched = {**{p.name: p.pid for p in proxies}, **roles}
    spec = {
        "targets": [chat_target(p, per) for p in proxies],
        "warmup_s": WARMUP_S,
        "windows": WINDOWS,
        "window_s": WINDOW_S,
        "pids": list(watched.values()),
    }
    result = run_loadgen(procs, spec, timeout=WARMUP_S + WINDOWS * WINDOW_S + 30)
    rates, per_target, other = [], [], []
    cpu: dict[str, list[float]] = {role: [] for role in [*watched, "proxies", "client"]}
    for w in result["windows"]:
        done = max(1, w["completed"])
        rates.append(w["completed"] / w["seconds"])
        per_target.append([n / w["seconds"] for n in w["per_target"]])
        for role, pid in watched.items():
            cpu[role].append(w["cpu"][str(pid)] / done * 1e6)
        cpu["proxies"].append(sum(w["cpu"][str(p.pid)] for p in proxies) / done * 1e6)
        cpu["client"].append(w["cpu"]["self"] / done * 1e6)
        ours = sum(w["cpu"][str(pid)] for pid in watched.values()) + w["cpu"]["self"]
        other.append(max(0.0, w["cpu"]["machine"] - ours) / w["seconds"])
    return Rate(
        statistics.median(rates),
        min(rates),
        max(rates),
        [statistics.median(col) for col in zip(*per_target, strict=True)],
        {role: statistics.median(v) for role, v in cpu.items()},
        statistics.median(other),
        sum(result["ok"]) + sum(result["bad"]),
        sum(result["bad"]),
        result["first_error"],
    )


# -- Redis ----------------------------------------------------------------------------------------


@dataclass
class RedisProc:
    port: int
    proc: subprocess.Popen[Any]
    folder: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def answers(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping())
        except Exception:
            return False

    def reset_stats(self) -> None:
        with self.client() as r:
            r.config_resetstat()

    def stats(self) -> tuple[dict[str, int], int]:
        """(calls per command since the last reset, socket reads the server processed)."""
        with self.client() as r:
            commands = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in r.info("commandstats").items()}
            reads = int(r.info("stats").get("total_reads_processed", 0))
        return commands, reads


def start_redis(procs: Procs) -> RedisProc:
    """Debian's redis-server, no persistence, on a free loopback port: a child of `procs`, SIGTERM by pid at the end."""
    if not os.access(REDIS_SERVER, os.X_OK):
        raise RuntimeError(f"{REDIS_SERVER} not found: sudo apt-get install -y --no-install-recommends redis-server")
    folder = procs.root / "redis"
    folder.mkdir()
    for _ in range(3):
        port = free_port()
        argv = [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--dir", str(folder)]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"]
        proc = procs._spawn(argv, folder)
        server = RedisProc(port, proc, folder)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if server.answers():
                return server
            time.sleep(0.05)
        exited = proc.poll() is not None
        procs._stop(proc)
        if not exited:
            break  # it runs but does not answer: no point in another port
    tail = (folder / "output.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server did not answer PING:\n{tail}")


def start_replica(procs: Procs, name: str, sim: Server, redis: RedisProc, keys: tuple[str, str]) -> Server:
    """`gpumanager server` with the bench's proxy config plus [cluster]: its own port and state_dir (its folder)."""
    folder = procs.root / name
    folder.mkdir()
    config = folder / "config.toml"

    def argv(port: int) -> list[str]:
        config.write_text(CONFIG.format(port=port, sim_port=sim.port) + CLUSTER.format(url=redis.url))
        return [str(BIN / "gpumanager"), "server", "--config", str(config), "--log-level", "WARNING"]

    procs.logs.append(folder / "app.log")
    server = procs._launch(name, folder, argv, "/health", keys[0])
    server.admin_key = keys[1]
    return server


def redis_keys(procs: Procs, sim: Server, redis: RedisProc) -> tuple[str, str]:
    """An API key and an admin key, written to Redis by `gpumanager generate-key` (config with [cluster])."""
    folder = procs.root / "keys"
    folder.mkdir()
    config = folder / "config.toml"
    config.write_text(CONFIG.format(port=0, sim_port=sim.port) + CLUSTER.format(url=redis.url))
    key, admin = _generate_key(config, "bench"), _generate_key(config, "bench-admin", admin=True)
    if (folder / "api_keys.json").exists():
        raise RuntimeError("generate-key wrote api_keys.json, not Redis: the [cluster] section was not used")
    return key, admin


def commands_per_request(redis: RedisProc, run: Rate, reads_before: int) -> tuple[dict[str, float], float]:
    commands, reads = redis.stats()
    n = max(1, run.requests)
    per = {name: calls / n for name, calls in sorted(commands.items(), key=lambda kv: -kv[1])}
    return per, (reads - reads_before) / n


# -- the report -----------------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # a phase failed outright: exit status 1
    rates: dict[str, Rate] = field(default_factory=dict)

    def row(self, measure: str, value: str = "", target: str = "", status: str = "") -> None:
        self.rows.append((measure, value, target, status))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def cores() -> tuple[int, int]:
    return os.cpu_count() or 0, len(os.sched_getaffinity(0))


def check(report: Report, phase: str, run: Rate) -> None:
    if run.failed:
        report.broken.append(f"phase {phase}: {run.failed} of {run.requests} requests failed: {run.first_error}")


def phase_a(procs: Procs, sim: Server, report: Report) -> None:
    proxy = procs.start_proxy("memory", sim)
    progress(f"A. one replica in memory, {CONCURRENCY} connections")
    run = measure(procs, [proxy], {"sim": sim.pid})
    procs.stop(proxy)
    report.rates["A"] = run
    check(report, "A", run)
    report.row(f"A. 1 replica, in memory: req/s @ c={CONCURRENCY} [min-max]", run.cell())
    report.row("   proxy CPU per request", f"{run.cpu_us['proxies']:.0f} us")


def phase_b(procs: Procs, sim: Server, redis: RedisProc, keys: tuple[str, str], report: Report) -> None:
    proxy = start_replica(procs, "redis-1", sim, redis, keys)
    progress(f"B. one replica with Redis, {CONCURRENCY} connections")
    redis.reset_stats()
    reads = redis.stats()[1]
    run = measure(procs, [proxy], {"sim": sim.pid, "redis": redis.pid})
    per, reads_per = commands_per_request(redis, run, reads)
    procs.stop(proxy)
    report.rates["B"] = run
    check(report, "B", run)
    base = report.rates.get("A")
    ratio = run.rps / base.rps if base else 0.0
    report.row(
        f"B. 1 replica + Redis: req/s @ c={CONCURRENCY} [min-max]",
        run.cell(),
        f">= {REDIS_TARGET:.0%} of A",
        f"{ratio:.0%} {verdict(ratio >= REDIS_TARGET)}" if base else "n/a",
    )
    extra = f" ({run.cpu_us['proxies'] - base.cpu_us['proxies']:+.0f} vs A)" if base else ""
    report.row("   proxy CPU per request", f"{run.cpu_us['proxies']:.0f} us{extra}")
    if base:  # what the req/s ratio would be with the proxy alone on its core: steadier than req/s here
        report.row("   A's CPU per request / B's", f"{base.cpu_us['proxies'] / run.cpu_us['proxies']:.0%}", "", "info")
    report.row("   Redis CPU per request", f"{run.cpu_us['redis']:.0f} us")
    scripts = per.get("evalsha", 0.0) + per.get("eval", 0.0)
    report.row(
        "   Redis commands per request (commandstats)",
        f"{sum(per.values()):.2f} ({scripts:.2f} scripts), {reads_per:.2f} socket reads",
    )
    report.notes.append(commandstats_note("B", run, per, reads_per))


def phase_c(procs: Procs, sim: Server, redis: RedisProc, keys: tuple[str, str], report: Report) -> None:
    proxies = [start_replica(procs, f"redis-{i}", sim, redis, keys) for i in (2, 3)]
    per_conn = CONCURRENCY // len(proxies)
    progress(f"C. two replicas with Redis, {per_conn} connections each")
    redis.reset_stats()
    reads = redis.stats()[1]
    run = measure(procs, proxies, {"sim": sim.pid, "redis": redis.pid})
    per, reads_per = commands_per_request(redis, run, reads)
    for proxy in proxies:
        procs.stop(proxy)
    report.rates["C"] = run
    check(report, "C", run)
    single = report.rates.get("B")
    report.row(
        f"C. 2 replicas + Redis, c={per_conn} each: req/s (sum) [min-max]",
        run.cell(),
        "",
        "",
    )
    if single:
        usable = cores()[1]
        report.row(
            "   ratio to B (1 replica + Redis)",
            f"{run.rps / single.rps:.2f}x",
            "> 1x needs spare cores",
            "info" if usable < 4 else verdict(run.rps > single.rps),
        )
    report.row("   per replica req/s", " + ".join(f"{r:,.0f}" for r in run.per_target_rps))
    report.row("   proxy CPU per request (both replicas)", f"{run.cpu_us['proxies']:.0f} us")
    report.row("   Redis CPU per request", f"{run.cpu_us['redis']:.0f} us")
    report.row(
        "   Redis commands per request (commandstats)",
        f"{sum(per.values()):.2f}, {reads_per:.2f} socket reads",
    )
    report.notes.append(commandstats_note("C", run, per, reads_per))


def commandstats_note(phase: str, run: Rate, per: dict[str, float], reads_per: float) -> str:
    listed = ", ".join(f"{name} {calls:.2f}" for name, calls in per.items() if calls >= 0.005)
    return (
        f"phase {phase} INFO commandstats per request ({run.requests:,} requests, warm-up included; "
        f"commands run inside Lua scripts are counted too): {listed}; Redis socket reads per request "
        f"(total_reads_processed) {reads_per:.2f}"
    )


def final_checks(report: Report, redis: RedisProc | None) -> None:
    failed = {phase: run.failed for phase, run in report.rates.items()}
    total = sum(run.requests for run in report.rates.values())
    report.row(
        "Requests not answered 200 with the full text (A, B, C)",
        ", ".join(f"{p} {n}" for p, n in failed.items()) or "none run",
        "0",
        verdict(bool(failed) and not any(failed.values())),
    )
    if redis is not None:
        alive = redis.answers()
        report.row("Redis answers PING after C", "yes" if alive else "no", "yes", verdict(alive))
        if not alive:
            report.broken.append("redis-server stopped answering PING")
    report.notes.append(f"{total:,} requests in all, warm-ups included")


def context_notes(report: Report) -> None:
    rates = report.rates
    n_cpu, usable = cores()
    parts = []
    for phase, run in rates.items():
        parts.append(
            f"{phase}: proxies busy {run.cpu_us['proxies'] * run.rps / 1e6:.2f} cores, sim {run.cpu_us['sim']:.0f} us "
            f"and load generator {run.cpu_us['client']:.0f} us per request, background {run.other_cores:.2f} cores"
        )
    if parts:
        report.notes.append("; ".join(parts))
    for phase, run in rates.items():
        if run.other_cores > BUSY_CORES:
            report.alarms.append(
                f"phase {phase}: other processes kept {run.other_cores:.2f} cores busy: its req/s is not "
                "comparable, rerun on a quiet machine"
            )
    report.notes.append(
        "ledger: each replica keeps its usage ledger in SQLite in its own state_dir (the default "
        "[usage] database_url); the ledger backend is not what these rows measure"
    )
    if usable < 4:
        report.notes.append(
            f"only {usable} usable cores (os.cpu_count() {n_cpu}), shared by the load generator, the sim, Redis and "
            "the replicas: the load generator competes with the proxies for CPU. One replica is one event loop, "
            "at most one core busy; a second one gets only what the load generator, the sim and Redis leave of "
            "the other core, so C says little about more cores. CPU us per request is the figure to compare"
        )


def print_table(report: Report) -> None:
    head = ("Row", "Value", "Target", "Status")
    widths = [max(len(r[i]) for r in [head, *report.rows]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for row in report.rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(line)


def context_line(nofile: tuple[int, int]) -> str:
    n_cpu, usable = cores()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"machine: os.cpu_count() {n_cpu}, sched_getaffinity {usable} cores "
        f"({sorted(os.sched_getaffinity(0))}), Python {platform.python_version()} ({platform.machine()}), "
        f"load average {load}, open files {nofile[0]}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (configs, app.log files)")
    parser.add_argument("--loadgen", metavar="SPEC", help=argparse.SUPPRESS)  # this file as the load generator
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main(args.loadgen)
        return 0
    nofile = raise_nofile()
    print(context_line(nofile), flush=True)
    report = Report()
    redis: RedisProc | None = None
    with Procs(keep=args.keep) as procs:
        try:
            sim = procs.start_sim("sim", token_delay=0.0, slots=64)
            phase_a(procs, sim, report)
            redis = start_redis(procs)
            keys = redis_keys(procs, sim, redis)
            phase_b(procs, sim, redis, keys, report)
            phase_c(procs, sim, redis, keys, report)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            report.broken.append(f"a phase failed: {exc}")
        finally:
            final_checks(report, redis)
            for path in procs.logs:
                count, lines = log_problems(path)
                if count:
                    report.alarms.append(
                        f"{count} WARNING+ lines in {path.parent.name}/app.log, first: " + " | ".join(lines)
                    )
            if redis is not None:
                procs._stop(redis.proc)  # SIGTERM by pid, then wait (Procs stops what is left in any case)
            if args.keep:
                print(f"temp folder kept: {procs.root}", flush=True)
    progress("done")
    context_notes(report)
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

"""A lean HTTP/1.1 load generator, run by bench.py in its own process.

On a 2-core machine every microsecond the client spends is taken from the proxy it measures, so this
is as thin as asyncio allows: uvloop, one `asyncio.Protocol` per keep-alive connection, request bytes
encoded once, httptools (C) parsing the answers, and timestamps taken in the protocol callbacks (not
after a coroutine resumes), so event-loop scheduling of this process is not part of the latency.

Usage: `python loadgen.py '<json spec>'`; prints one JSON object on stdout. Modes:
  rate        N connections send back to back; after a warm-up, K timed windows each report the
              requests completed and the CPU seconds spent by the watched pids, by this process and
              by the whole machine (to tell background load apart).
  sequential  one connection per target, one request at a time, targets alternated in rounds;
              per request: latency, time to first body byte, socket reads, content check.
  hold        N connections opened at once, one streaming request each, all awaited together.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any, cast

import httptools
import psutil
import uvloop

HOST = "127.0.0.1"  # never anything else: the benchmark stays on loopback


def request_bytes(port: int, path: str, body: Any, key: str | None) -> bytes:
    """One POST, encoded once and written as is for every request of a run."""
    data = json.dumps(body, separators=(",", ":")).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode("latin-1") + data


class Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.body = bytearray()
        self.status = self.reads = 0
        self.sent_at = self.first_body_at = self.done_at = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass; it sets TCP_NODELAY itself

    def data_received(self, data: bytes) -> None:
        self.reads += 1  # one call per socket read: what "network reads per stream" counts
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed by the server"))

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.first_body_at:
            self.first_body_at = time.perf_counter()
        self.body += body

    def on_message_complete(self) -> None:
        self.done_at = time.perf_counter()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # -- use --------------------------------------------------------------------------------------
    async def request(self, payload: bytes) -> None:
        """Send one request and wait for its whole answer (bounded by the caller's deadline)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed by the server")
        self.body.clear()
        self.status = self.reads = 0
        self.first_body_at = 0.0
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent_at = time.perf_counter()
        self.transport.write(payload)
        await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(Conn, HOST, port), 10)
    return conn


def ndjson_content(body: bytes) -> str | None:
    """The concatenated `message.content` of an Ollama chat stream, None unless it ends with done."""
    frames = [json.loads(line) for line in body.splitlines() if line.strip()]
    if not frames or frames[-1].get("done") is not True:
        return None
    return "".join(f.get("message", {}).get("content", "") for f in frames)


def answer_ok(conn: Conn, check: str, expect: str) -> bool:
    if conn.status != 200:
        return False
    if check == "ndjson":
        try:
            return ndjson_content(bytes(conn.body)) == expect
        except ValueError:
            return False
    return expect.encode() in conn.body  # "contains": cheap enough for the rate loop


def cpu_seconds(pids: list[int]) -> dict[str, float]:
    """utime+stime of each watched pid, of this process, and machine-wide busy time."""
    out = {str(pid): sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids}
    own = resource.getrusage(resource.RUSAGE_SELF)
    out["self"] = own.ru_utime + own.ru_stime
    total = psutil.cpu_times()
    out["machine"] = sum(total) - total.idle - getattr(total, "iowait", 0.0)
    return out


class Tally:
    __slots__ = ("bad", "first_error", "ok", "running")

    def __init__(self) -> None:
        self.ok = self.bad = 0
        self.running = True
        self.first_error = ""


async def _rate_worker(conn: Conn, payload: bytes, expect: bytes, tally: Tally) -> None:
    try:
        while tally.running:
            await conn.request(payload)
            if conn.status == 200 and expect in conn.body:
                tally.ok += 1
            else:
                tally.bad += 1
                tally.first_error = tally.first_error or f"status {conn.status}: {bytes(conn.body[:200])!r}"
    except Exception as exc:  # counted and reported; the run goes on with the other connections
        tally.bad += 1
        tally.first_error = tally.first_error or f"{type(exc).__name__}: {exc}"


async def run_rate(spec: dict[str, Any]) -> dict[str, Any]:
    t = spec["target"]
    payload = request_bytes(t["port"], t["path"], t["body"], t.get("key"))
    conns = await asyncio.gather(*(connect(t["port"]) for _ in range(spec["concurrency"])))
    tally = Tally()
    tasks = [asyncio.create_task(_rate_worker(c, payload, t["expect"].encode(), tally)) for c in conns]
    await asyncio.sleep(spec["warmup_s"])  # connections, caches and the proxy's pool fill up here
    windows = []
    for _ in range(spec["windows"]):
        # Counters are read while the load keeps running, so no window starts or ends on an idle server.
        t0, n0, e0, c0 = time.perf_counter(), tally.ok, tally.bad, cpu_seconds(spec["pids"])
        await asyncio.sleep(spec["window_s"])
        t1, n1, e1, c1 = time.perf_counter(), tally.ok, tally.bad, cpu_seconds(spec["pids"])
        windows.append(
            {"seconds": t1 - t0, "completed": n1 - n0, "errors": e1 - e0, "cpu": {k: c1[k] - c0[k] for k in c0}}
        )
    tally.running = False
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    for conn in conns:
        conn.close()
    return {"windows": windows, "errors": tally.bad, "first_error": tally.first_error}


async def run_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    targets = spec["targets"]
    payloads = [request_bytes(t["port"], t["path"], t["body"], t.get("key")) for t in targets]
    conns = [await connect(t["port"]) for t in targets]
    results: dict[str, list[dict[str, Any]]] = {t["name"]: [] for t in targets}
    order = list(range(len(targets)))
    for i in order:  # warm-up, not recorded
        for _ in range(spec["warmup"]):
            await conns[i].request(payloads[i])
    for rnd in range(spec["rounds"]):
        # Alternate targets in blocks (and flip the order each round) so that a slow patch of
        # background load hits both sides alike.
        for i in order if rnd % 2 == 0 else order[::-1]:
            conn, t = conns[i], targets[i]
            for _ in range(spec["per_round"]):
                await conn.request(payloads[i])
                results[t["name"]].append(
                    {
                        "latency": conn.done_at - conn.sent_at,
                        "reads": conn.reads,
                        "ttfb": (conn.first_body_at or conn.done_at) - conn.sent_at,
                        "ok": answer_ok(conn, t.get("check", "contains"), t["expect"]),
                    }
                )
    for conn in conns:
        conn.close()
    return {"results": results}


async def _hold_one(port: int, payload: bytes, check: str, expect: str, opened: list[float]) -> dict[str, Any]:
    conn = await connect(port)
    try:
        request = asyncio.ensure_future(conn.request(payload))
        opened.append(time.perf_counter())
        await request
        return {"ok": answer_ok(conn, check, expect), "seconds": conn.done_at - conn.sent_at, "status": conn.status}
    finally:
        conn.close()


async def run_hold(spec: dict[str, Any]) -> dict[str, Any]:
    t = spec["target"]
    payload = request_bytes(t["port"], t["path"], t["body"], t.get("key"))
    opened: list[float] = []
    start = time.perf_counter()
    tasks = [
        asyncio.create_task(_hold_one(t["port"], payload, t.get("check", "ndjson"), t["expect"], opened))
        for _ in range(spec["streams"])
    ]
    done, pending = await asyncio.wait(tasks, timeout=spec["timeout_s"])
    for task in pending:
        task.cancel()
    answers, errors = [], []
    for task in done:
        if task.exception() is not None:
            errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
        else:
            answers.append(task.result())
    return {
        "started": len(tasks),
        "sent": len(opened),
        "finished": len(answers),
        "ok": sum(a["ok"] for a in answers),
        "timed_out": len(pending),
        "errors": errors[:5],
        "error_count": len(errors),
        "all_sent_after_s": (max(opened) - start) if opened else None,
        "seconds": sorted(a["seconds"] for a in answers),
    }


def raise_nofile() -> None:
    """1000 streams are 1000 sockets: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    spec = json.loads(sys.argv[1])
    raise_nofile()
    runner = {"rate": run_rate, "sequential": run_sequential, "hold": run_hold}[spec["mode"]]
    result = uvloop.run(runner(spec))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()

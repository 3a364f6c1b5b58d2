"""RunPod's serverless job API through gpumanager's keys, wakes and accounting.

For every RunPod endpoint configured with `jobs = true`, `/v2/{endpoint}/...` (the host's name or
its RunPod id) serves what RunPod's job API does: `run`, `runsync` (its `?wait=` passed on),
`status/{id}`, `stream/{id}`, `cancel/{id}`, `retry/{id}`, `health`, and `purge-queue` for admins.
A user of the `runpod` SDK changes only the endpoint URL base and the key.

- Bodies go to RunPod unchanged, with the fleet's RunPod key (never the client's), and RunPod's
  answers come back unchanged, status codes included. gpumanager's own refusals are RunPod-shaped
  `{"error": "..."}` bodies, and never 408 or 429, which the SDK retries for hours: a spent budget
  is 402, a rate or concurrency limit 403.
- A key may use an endpoint unless its `models` patterns exclude the host's name. A job belongs to
  the key that submitted it: another key's `status`, `stream`, `cancel` or `retry` of it is 404, as
  if it did not exist (admins see every job). Ownership is kept in the ledger: it survives a restart.
- A submission to an endpoint whose workers are off wakes it first. A job endpoint is ready once its
  workers are set: RunPod queues the job meanwhile, so it is forwarded at once.
- A job queued or running holds a lease outside the slot count (`Fleet.hold(job=True)`): the
  endpoint's serving set for billing (DESIGN.md §10), and activity that keeps the idle pause away.
  Its end releases it, and the endpoint's reservation window runs from there.
- A job's state is read from what RunPod answers its client (`runsync`, `status`, `stream`,
  `cancel`); one no client asked about for `[timing] job_poll_seconds` is asked about by
  gpumanager itself, so every job's end, and its `executionTime`, reaches the ledger.
- Emergency-off (a job lease aborted) cancels the job at RunPod; a shutdown leaves jobs running,
  and the next start watches them again.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
import httpx
import msgspec
from loguru import logger
from starlette.routing import BaseRoute, Route

from gpumanager.auth import require_admin
from gpumanager.budget import Budget
from gpumanager.errors import (
    BadRequest,
    BudgetSpent,
    ClientError,
    ClientGone,
    FleetBudgetSpent,
    Forbidden,
    InternalError,
    NoCapacity,
    NotFound,
    ProviderError,
    UpstreamFailed,
    WakeTimeout,
)
from gpumanager.fleet import Fleet, Lease
from gpumanager.hosts import Host, HostState
from gpumanager.keys import Identity
from gpumanager.lifecycle import Lifecycle
from gpumanager.logs import clean
from gpumanager.proxy.dialects import Dialect, error_body, error_headers
from gpumanager.proxy.forward import Scope, read_body
from gpumanager.recorder import JobRecord, Recorder, RequestRecord

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
LOST = "UNKNOWN"  # RunPod no longer knows a job gpumanager still watched (its results expired)
# A finished job's owner is remembered this long (RunPod keeps a job's result for 30 minutes).
REMEMBER_SECONDS = 2 * 3600.0
RUNSYNC_WAIT_MS = 90_000  # RunPod's runsync holds the answer this long unless `?wait=` says otherwise
WAIT_RANGE = (1000, 300_000)  # what RunPod accepts for `?wait=`
CALL_SECONDS = 30.0  # a call that RunPod answers at once (status, stream, cancel, health...)
POLLS_AT_ONCE = 8  # gpumanager's own status calls in flight at most
# What the request row of a job says of its end, in HTTP's words (usage reports count errors so).
ROW_STATUS = {"COMPLETED": 200, "CANCELLED": 499, "FAILED": 500, "TIMED_OUT": 504, LOST: 502}


class _Answer(msgspec.Struct):
    """The fields gpumanager reads of RunPod's answers about a job; the rest passes untouched."""

    id: str = ""
    status: str = ""
    delayTime: float | None = None  # RunPod's names
    executionTime: float | None = None


_answer_decoder = msgspec.json.Decoder(_Answer)


def _read(content: bytes) -> _Answer | None:
    try:
        return _answer_decoder.decode(content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass(eq=False)
class Job:
    """A RunPod job gpumanager knows of: whose it is, and while it is queued or running, its lease."""

    id: str
    host: Host
    key: str
    route: str  # "run", "runsync" or "retry"
    submitted: float  # Unix seconds
    status: str
    lease: Lease | None = None  # held while it is queued or running
    since: float = 0.0  # clock time it was submitted (its duration)
    wait_seconds: float = 0.0  # the wake it waited for before it was submitted
    seen: float = 0.0  # clock time its state was last read
    delay_ms: int | None = None
    execution_ms: int | None = None
    ended: float | None = None  # Unix seconds
    cancelling: bool = False
    cancel_asked: float = -math.inf  # clock time of the last cancel call (emergency-off)

    @property
    def active(self) -> bool:
        return self.ended is None

    def record(self) -> JobRecord:
        lease = self.lease
        return JobRecord(
            id=self.id,
            ts=self.submitted,
            key_id=self.key,
            host=self.host.name,
            endpoint=self.host.id,
            route=self.route,
            status=self.status,
            ended=self.ended,
            delay_ms=self.delay_ms,
            execution_ms=self.execution_ms,
            gpu_seconds=lease.gpu_seconds if lease is not None else 0.0,
            cost_micro=lease.cost_micro if lease is not None else 0,
        )


class Jobs:
    """The jobs gpumanager watches and whose each is; `run()` checks on those no client asks about."""

    def __init__(
        self,
        fleet: Fleet,
        lifecycle: Lifecycle,
        client: httpx.AsyncClient,
        recorder: Recorder,
        *,
        poll_seconds: float,
        clock: Callable[[], float] = anyio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.fleet, self.lifecycle, self.client, self.recorder = fleet, lifecycle, client, recorder
        self.poll_seconds, self.clock, self.wall = poll_seconds, clock, wall
        self.jobs: dict[str, Job] = {}
        self._pending: list[JobRecord] = []  # jobs of the ledger whose endpoint is not known yet
        self._kick = anyio.Event()

    # -- what the routes tell -------------------------------------------------------------------

    def owned(self, job_id: str, who: Identity, host: Host) -> Job | None:
        """The job `who` may see on `host`; `NotFound` when it is another key's or unknown (admins may
        reach jobs gpumanager does not know, as RunPod would answer them)."""
        job = self.jobs.get(job_id)
        if job is not None and job.host is host and (job.key == who.id or who.admin):
            return job
        if who.admin and job is None:
            return None
        raise NotFound(f"job {job_id} not found on {host.name}")

    async def find(self, job_id: str, who: Identity, host: Host) -> Job | None:
        """As `owned`, and a job of `who` submitted through another replica is theirs too (watched
        there: None here)."""
        try:
            return self.owned(job_id, who, host)
        except NotFound:
            if await self.fleet.shared.job_owner(job_id) == (who.id, host.name):
                return None
            raise

    def running(self, key: str) -> int:
        """The jobs of `key` queued or running."""
        return sum(1 for job in self.jobs.values() if job.key == key and job.active)

    def submitted(self, host: Host, lease: Lease, route: str, answer: _Answer, wait: float) -> Job:
        """RunPod took a job: it is the lease holder's, and holds the lease until it ends."""
        known = self.jobs.get(answer.id)
        if known is not None and known.active:  # RunPod requeued a job gpumanager watches already
            lease.release()
            self.observe(known, answer)
            return known
        now = self.clock()
        job = Job(
            answer.id,
            host,
            lease.key,
            route,
            submitted=self.wall(),
            status="IN_QUEUE",
            lease=lease,
            since=now - wait,
            wait_seconds=wait,
            seen=now,
        )
        lease.on_abort = self._aborted
        self.jobs[job.id] = job
        self.fleet.shared.job_started(job.id, job.key, host)
        logger.bind(host=host.name).info("job {} on {} for key={}", clean(job.id, 80), host.name, job.key)
        self.recorder.job(job.record())
        self.observe(job, answer)
        return job

    def observe(self, job: Job, answer: _Answer) -> None:
        """What RunPod said of `job` (to its client or to gpumanager): its state and times."""
        if not job.active:
            return
        job.seen = self.clock()
        if answer.delayTime is not None:
            job.delay_ms = round(answer.delayTime)
        if answer.executionTime is not None:
            job.execution_ms = round(answer.executionTime)
        if answer.status and answer.status != job.status:
            job.status = answer.status
            if job.status in FINAL:
                self._finish(job)
            else:
                self.recorder.job(job.record())

    def _finish(self, job: Job) -> None:
        job.ended = self.wall()
        self.fleet.shared.job_ended(job.id)
        lease = job.lease
        if lease is not None:
            lease.on_abort = None
            lease.release()  # settled by the fleet: its share of the endpoint's time is final
        record = job.record()
        self.recorder.job(record)
        duration = max(0.0, self.clock() - job.since)
        status = ROW_STATUS.get(job.status, 502)
        self.recorder.request(
            _row(
                job.route, job.host, job.key, status, job.wait_seconds, duration, record.gpu_seconds, record.cost_micro
            )
        )
        job.lease = None
        logger.bind(host=job.host.name).info(
            "job {} on {} for key={} ended {} (delay {} ms, execution {} ms, {:.1f} GPU-s)",
            clean(job.id, 80),
            job.host.name,
            job.key,
            job.status,
            "-" if job.delay_ms is None else job.delay_ms,
            "-" if job.execution_ms is None else job.execution_ms,
            record.gpu_seconds,
        )

    def not_taken(self, lease: Lease, route: str, status: int, wait: float) -> None:
        """A submission RunPod refused or did not answer: its lease ends, and its request row keeps
        the endpoint's time it held meanwhile."""
        lease.release()
        self.recorder.request(
            _row(route, lease.host, lease.key, status, wait, wait, lease.gpu_seconds, lease.cost_micro)
        )

    def purged(self, host: Host) -> None:
        """The endpoint's queue was purged: read its queued jobs' states at once."""
        for job in self.jobs.values():
            if job.host is host and job.active and job.status == "IN_QUEUE":
                job.seen = -math.inf
        self._kick.set()

    def _aborted(self, lease: Lease) -> None:
        """Emergency-off: the job is cancelled at RunPod (by the loop, which owns the calls)."""
        self._kick.set()

    # -- after a restart ------------------------------------------------------------------------

    def adopt(self, records: list[JobRecord]) -> None:
        """Jobs of the ledger: whose each is, and those not seen to end are watched again, their
        GPU time so far carried on. A job whose endpoint is not (yet) known waits for it: discovery
        may be slow at start-up; one still unknown after `REMEMBER_SECONDS` is recorded as lost."""
        self._pending.extend(records)
        self._adopt_pending()
        watched = sum(1 for j in self.jobs.values() if j.active)
        if watched:
            logger.info("watching {} RunPod jobs submitted before the restart", watched)

    def _adopt_pending(self) -> None:
        now, wall, waiting = self.clock(), self.wall(), []
        for record in self._pending:
            host = self.fleet.find(record.host)
            if record.id in self.jobs:
                continue
            if host is None or (record.ended is None and not host.jobs_url):
                if wall - record.ts < REMEMBER_SECONDS:
                    waiting.append(record)
                elif record.ended is None:
                    logger.warning("job {} of the gone endpoint {} is recorded as {}", record.id, record.host, LOST)
                    self.recorder.job(msgspec.structs.replace(record, status=LOST, ended=wall))
                continue
            job = Job(
                record.id,
                host,
                record.key_id,
                record.route,
                submitted=record.ts,
                status=record.status,
                since=now - max(0.0, wall - record.ts),
                seen=-math.inf,
                delay_ms=record.delay_ms,
                execution_ms=record.execution_ms,
                ended=record.ended,
            )
            if job.active:
                job.lease = self.fleet.hold(host, record.key_id, job=True)
                job.lease.gpu_seconds = record.gpu_seconds  # its share before the restart
                job.lease.on_abort = self._aborted
            self.jobs[job.id] = job
        self._pending = waiting

    def checkpoint(self) -> None:
        """Record each running job as it stands, its GPU time so far (before each ledger flush): a
        shutdown leaves it running, and the next start carries its time on."""
        for host in {job.host for job in self.jobs.values() if job.active}:
            self.fleet.billing.settle(host)
        for job in self.jobs.values():
            if job.active:
                self.recorder.job(job.record())

    # -- gpumanager's own calls -----------------------------------------------------------------

    async def run(self) -> None:
        """Check on jobs no client asked about, cancel those whose lease was aborted, forget old ones."""
        limiter = anyio.CapacityLimiter(POLLS_AT_ONCE)
        while True:
            now = self.clock()
            due = now + self.poll_seconds
            async with anyio.create_task_group() as tg:
                for job in [j for j in self.jobs.values() if j.active]:
                    aborted = job.lease is not None and job.lease.aborted
                    if aborted and not job.cancelling and now - job.cancel_asked >= self.poll_seconds:
                        job.cancel_asked = now
                        tg.start_soon(self._cancel, job, limiter)
                    elif aborted:
                        due = min(due, job.cancel_asked + self.poll_seconds)
                    elif now - job.seen >= self.poll_seconds:
                        job.seen = now  # one check at a time
                        tg.start_soon(self._check, job, limiter)
                    else:
                        due = min(due, job.seen + self.poll_seconds)
            self._forget(self.wall() - REMEMBER_SECONDS)
            if self._pending:
                self._adopt_pending()
            with anyio.move_on_after(max(0.0, due - self.clock())):
                await self._kick.wait()
            self._kick = anyio.Event()

    async def _check(self, job: Job, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            status, content = await self._quietly(job, "GET", f"status/{quote(job.id, safe='')}")
        self._answered(job, status, content)

    def _answered(self, job: Job, status: int, content: bytes) -> None:
        """What RunPod answered gpumanager's own call about `job`: its state, or that it forgot it."""
        if status == 200 and (answer := _read(content)) is not None:
            self.observe(job, answer)
        elif status == 404 and job.active:
            logger.bind(host=job.host.name).warning(
                "RunPod no longer knows job {} on {}: it is recorded as {}", clean(job.id, 80), job.host.name, LOST
            )
            job.status = LOST
            self._finish(job)

    async def _cancel(self, job: Job, limiter: anyio.CapacityLimiter) -> None:
        """Emergency-off: cancel the job at RunPod. When the cancel is not taken, its state is read
        instead (it may have ended meanwhile); the cancel is asked again each `poll_seconds`."""
        job.cancelling = True
        try:
            async with limiter:
                status, content = await self._quietly(job, "POST", f"cancel/{quote(job.id, safe='')}")
                if status not in (200, 404):
                    status, content = await self._quietly(job, "GET", f"status/{quote(job.id, safe='')}")
            self._answered(job, status, content)
        finally:
            job.cancelling = False

    async def _quietly(self, job: Job, method: str, path: str) -> tuple[int, bytes]:
        """One call of gpumanager's own about `job`: (status, body), or (0, b"") when RunPod did not answer."""
        try:
            response = await call(self.client, job.host, method, path, b"", CALL_SECONDS)
        except UpstreamFailed as exc:
            logger.bind(host=job.host.name).warning("checking on job {} failed: {}", clean(job.id, 80), exc)
            return 0, b""
        return response.status_code, response.content

    def _forget(self, before: float) -> None:
        for job_id in [i for i, j in self.jobs.items() if j.ended is not None and j.ended < before]:
            del self.jobs[job_id]


def _row(
    route: str, host: Host, key: str, status: int, wait: float, duration: float, gpu_seconds: float, cost_micro: int
) -> RequestRecord:
    """A job's (or a refused submission's) request row: the endpoint's name is its model."""
    return RequestRecord(
        route=f"/v2/{route}",
        model=host.name,
        status=status,
        key=key,
        host=host.name,
        wait_seconds=wait,
        first_byte_seconds=None,
        duration_seconds=duration,
        overhead_seconds=None,
        prompt_tokens=None,
        completion_tokens=None,
        gpu_seconds=gpu_seconds,
        cost_micro=cost_micro,
    )


async def call(
    client: httpx.AsyncClient, host: Host, method: str, path: str, body: bytes, seconds: float, query: str = ""
) -> httpx.Response:
    """One call of the endpoint's job API with the fleet's RunPod key; `UpstreamFailed` when RunPod
    did not answer."""
    headers = [(b"content-type", b"application/json"), *(host.auth or [])]
    url = f"{host.jobs_url}/{path}" + (f"?{query}" if query else "")
    try:
        with anyio.fail_after(seconds + 5):
            return await client.request(
                method,
                url,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(seconds, connect=min(10.0, seconds)),
            )
    except (httpx.HTTPError, TimeoutError) as exc:
        raise UpstreamFailed(f"RunPod did not answer ({type(exc).__name__}): {exc}") from None


# -- the routes ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobParts:
    """What the job routes use of the running system."""

    fleet: Fleet
    lifecycle: Lifecycle
    jobs: Jobs
    client: httpx.AsyncClient
    budget: Budget
    max_body: int
    client_timeout_seconds: float


SUBMIT = ("run", "runsync")
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")  # RunPod's ids: "<uuid>-e1", "sync-...", "...-u1"
ON_A_JOB = ("status", "stream", "cancel", "retry")
METHODS = {"run": "POST", "runsync": "POST", "health": "GET", "purge-queue": "POST"} | {
    "status": "GET",
    "stream": "GET",
    "cancel": "POST",
    "retry": "POST",
}


class JobRoute:
    """`/v2/{endpoint}/{op}` and `/v2/{endpoint}/{op}/{job_id}` (raw ASGI)."""

    def __init__(self, parts: JobParts) -> None:
        self.parts = parts

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        params = scope.get("path_params", {})
        op, job_id = str(params.get("op", "")), params.get("job_id")
        status = 499
        host_name = "-"
        try:
            host = self._endpoint(str(params.get("endpoint", "")))
            host_name = host.name
            if op not in METHODS or (job_id is None) == (op in ON_A_JOB):
                raise NotFound(f"no route {clean(scope['path'])}: RunPod's job API has no such call")
            if scope["method"] != METHODS[op]:
                error = ClientError(f"method {scope['method']} is not allowed on {clean(scope['path'])}")
                error.status = 405
                raise error
            who: Identity = scope["auth"]
            if op == "purge-queue":
                require_admin(scope)
            elif not who.admin and not who.limits.allows((host.name,)):
                raise Forbidden(f"this key may not use the RunPod endpoint {host.name!r}")
            status = await self._serve(scope, receive, send, host, op, job_id, who)
        except ClientError as exc:
            status = await _refuse(send, exc)
        except ClientGone:
            pass
        except Exception as exc:  # a bug: logged once here, answered 500 in RunPod's shape
            logger.opt(exception=exc).error("unexpected error on {} {}", scope["method"], clean(scope["path"]))
            status = await _refuse(send, InternalError())
        finally:
            logger.info(
                "{} {} key={} host={} status={} ms={:.0f}",
                scope["method"],
                clean(scope["path"]),
                scope["auth"].id,
                host_name,
                status,
                (time.perf_counter() - started) * 1000,
            )

    def _endpoint(self, name: str) -> Host:
        host = self.parts.fleet.find(name)
        if host is None or not host.jobs_url:
            known = sorted(h.name for h in self.parts.fleet.hosts.values() if h.jobs_url)
            raise NotFound(
                f"no RunPod job endpoint {clean(name, 100)!r}"
                + (f" (job endpoints: {', '.join(known)})" if known else " (none is configured with jobs = true)")
            )
        return host

    async def _serve(
        self, scope: Scope, receive: Any, send: Any, host: Host, op: str, job_id: str | None, who: Identity
    ) -> int:
        parts = self.parts
        body = b""
        if op in SUBMIT or op == "retry":
            body = await read_body(scope, receive, parts.max_body, parts.client_timeout_seconds)
        if job_id is None:
            if op in SUBMIT:
                return await self._submit(scope, send, host, op, body, who)
            response = await call(parts.client, host, METHODS[op], op, b"", CALL_SECONDS)
            if op == "purge-queue" and response.status_code == 200:
                parts.jobs.purged(host)
            return await _relay(send, response, host)
        if not JOB_ID.match(job_id):
            raise NotFound(f"job {clean(job_id, 100)} not found on {host.name}")
        job = await parts.jobs.find(job_id, who, host)
        if op == "retry":
            return await self._submit(scope, send, host, op, body, who, job_id=job_id, owner=job)
        response = await call(parts.client, host, METHODS[op], f"{op}/{quote(job_id, safe='')}", b"", CALL_SECONDS)
        if job is not None and response.status_code == 200 and (answer := _read(response.content)) is not None:
            parts.jobs.observe(job, answer)
        return await _relay(send, response, host)

    async def _submit(
        self,
        scope: Scope,
        send: Any,
        host: Host,
        op: str,
        body: bytes,
        who: Identity,
        *,
        job_id: str | None = None,
        owner: Any = None,
    ) -> int:
        """`run`, `runsync` or `retry`: admitted, the endpoint woken if need be, then forwarded."""
        parts = self.parts
        query, timeout = "", CALL_SECONDS
        if op == "runsync":
            wait = _wait_ms(scope)
            query = f"wait={wait}" if wait is not None else ""
            timeout = (wait or RUNSYNC_WAIT_MS) / 1000 + CALL_SECONDS
        terms = parts.budget.admit(who, host.name)
        if parts.fleet.capped is not None:  # at the fleet's cap, cloud hosts take no new work
            raise parts.fleet.capped
        if terms.max_concurrent and parts.jobs.running(who.id) >= terms.max_concurrent:
            raise Forbidden(f"this key already has {terms.max_concurrent} jobs queued or running (max_concurrent)")
        arrived = anyio.current_time()
        if host.state is not HostState.READY or host.draining:
            if parts.fleet.emergency:
                raise NoCapacity("emergency-off is on: RunPod endpoints are not woken until an admin turns it off")
            if terms.no_wake:
                raise BudgetSpent(terms.no_wake)
            try:
                await parts.lifecycle.ensure_ready(host, by=who.id)
            except ProviderError as exc:
                raise WakeTimeout(f"the RunPod endpoint {host.name} could not be woken: {exc.message or exc}") from None
        wait_seconds = anyio.current_time() - arrived
        path = op if job_id is None else f"retry/{quote(job_id, safe='')}"
        route = "retry" if job_id is not None else op
        lease = parts.fleet.hold(host, who.id if owner is None else owner.key, job=True)
        try:
            response = await call(parts.client, host, "POST", path, body, timeout, query)
        except BaseException:
            parts.jobs.not_taken(lease, route, 502, wait_seconds)
            raise
        answer = _read(response.content) if response.status_code == 200 else None
        if answer is not None and answer.id:
            parts.jobs.submitted(host, lease, route, answer, wait_seconds)
        else:
            parts.jobs.not_taken(lease, route, response.status_code, wait_seconds)
        return await _relay(send, response, host)


def _wait_ms(scope: Scope) -> int | None:
    """RunPod's `?wait=` of a runsync (milliseconds), the only query string gpumanager passes on."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("wait")
    if not values:
        return None
    try:
        wait = int(values[0])
    except ValueError:
        raise BadRequest("wait must be an integer number of milliseconds") from None
    low, high = WAIT_RANGE
    if not low <= wait <= high:
        raise BadRequest(f"wait must be between {low} and {high} milliseconds")
    return wait


async def _relay(send: Any, response: httpx.Response, host: Host) -> int:
    """RunPod's answer, unchanged."""
    content_type = response.headers.get("content-type", "application/json").encode("latin-1")
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": [(b"content-type", content_type), (b"x-gpumanager-host", host.name.encode())],
        }
    )
    await send({"type": "http.response.body", "body": response.content})
    return response.status_code


def runpod_status(exc: ClientError) -> int:
    """The status of a refusal on `/v2`: never 408 or 429 (the `runpod` SDK retries both, honouring
    `Retry-After`, so its user would wait for hours without seeing why)."""
    if isinstance(exc, (BudgetSpent, FleetBudgetSpent)):
        return 402
    if exc.status == 429:
        return 403
    if exc.status == 408:
        return 400
    return exc.status


async def _refuse(send: Any, exc: ClientError) -> int:
    status = runpod_status(exc)
    headers = [(k, v) for k, v in error_headers(exc) if k != b"retry-after" or status == 503]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": error_body(Dialect.RUNPOD, exc)})
    return status


def job_routes(parts: JobParts) -> list[BaseRoute]:
    route = JobRoute(parts)
    methods = ["GET", "POST"]
    return [
        Route("/v2/{endpoint}/{op}", route, methods=methods),
        Route("/v2/{endpoint}/{op}/{job_id}", route, methods=methods),
    ]

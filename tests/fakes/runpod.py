"""A fake of RunPod (REFERENCE.md section 4): its management API and serverless endpoints, as real HTTP servers.

`FakeRunPod` runs two loopback servers in the caller's event loop:

* `api_url` stands for https://api.runpod.io. GraphQL at ``POST /graphql`` is parsed leniently: the
  operation is recognised by a keyword in the query text (``podResume``, ``podStop``, ``saveEndpoint``,
  ``pod(``, ``myself``), the ``input: {...}`` arguments by regular expressions (GraphQL ``variables``
  work for a whole ``input: $var`` or a single ``podId: $var``), and every answer carries the full
  object whatever the selection asked for. REST v2 lives under ``/v2/serverless/{id}`` and ``/v2/pods/{id}``.
* `serverless_url` stands for https://api.runpod.ai/v2: ``/{id}/health``, the job API of a queue-based
  endpoint (``/{id}/run``, ``runsync``, ``status/{job}``, ``stream/{job}``, ``cancel/{job}``,
  ``retry/{job}``, ``purge-queue``) and a vLLM worker's OpenAI-compatible routes under ``/{id}/openai/v1``.

Pods: a start makes ``desiredStatus`` RUNNING at once; ``boot_seconds`` later the container, a
`SimOllama` on 127.0.0.1, listens and only then is ``runtime`` non-null. A stop makes it EXITED at
once; ``stop_seconds`` later the sim is killed (open connections reset) and ``runtime`` is null again.

Endpoints have workers whose state is worked out from timestamps, so no task has to run for them:
``min(workersMin, workersMax)`` "active" workers are kept (each ready ``boot_seconds`` after it was
asked for); a request finding no worker starts one "flex" worker when ``workersMax > 0`` and is held
until it is ready; a flex worker, or an active one demoted when ``workersMin`` drops, stops
``idleTimeout`` seconds after its last request or its demotion, whichever is later. A ready worker
takes any number of requests at once (vLLM batches), so a second flex worker is never started. Each
request runs the endpoint's `SimOllama` ASGI app in-process, so SSE streams pass through chunk by chunk.

A job of the job API runs on the same workers in the same way (queued, cold-starting a flex worker,
"running" and billed while it runs), as a task of the fake's. Its handler is scripted by its ``input``:

* ``seconds`` (number, default 0.05): how long it runs;
* ``fail`` (str): it then ends FAILED with that ``error``;
* ``timeout`` (number): an execution timeout: when ``seconds`` exceeds it, the job ends TIMED_OUT
  after ``timeout`` seconds (RunPod's ``executionTimeout`` policy);
* ``stream`` (list): chunks it produces spread evenly over its ``seconds`` (the last at the end); its
  ``output`` is then the list of chunks;
* otherwise its ``output`` is ``{"echo": input}``. A knob of the wrong type fails the job as a
  crashing handler would: FAILED, with the problem as its ``error``.

Choices where REFERENCE.md leaves the behaviour open (its [U] items and unstated details):

* Auth: a wrong or missing key gets HTTP 401 everywhere, GraphQL included. `read_only_key` may read
  (GraphQL queries, REST GETs, ``/health``, a job's ``status`` and ``stream``) and gets 403 on writes:
  mutations, PATCH, pod actions, the OpenAI routes (they run jobs) and the job API's ``run``,
  ``runsync``, ``cancel``, ``retry`` and ``purge-queue``. The serverless surface also takes the bare
  key (REFERENCE 4.3).
* GraphQL: an unknown query gets HTTP 200 ``{"errors": [...]}``; an unknown pod id gets
  ``{"data": {"pod": null}}`` plus an error. ``saveEndpoint`` without ``id`` (a create) is refused.
  GraphQL's ``idleTimeout`` takes any number >= 0 (tests use sub-second values and clients echo what
  they read); REST v2 enforces its documented 1-3600. ``workersMin > workersMax`` is refused on both.
* Failure knobs: a refused pod start answers GraphQL with HTTP 200 and RunPod's observed message
  (`NO_GPUS`), REST with 500 ``{"error", "status"}``; `fail_stops` answers with the chosen HTTP status on
  both surfaces. A start of a pod that is already RUNNING changes nothing and succeeds. ``restart``
  ignores the knobs; ``terminate`` removes the pod from every listing.
* REST v2 response bodies (REFERENCE read only the request schemas): an endpoint is
  ``{"id", "name", "templateId", "gpuIds": [...], "gpuCount", "workers": {"min", "max", "idleTimeout",
  "standby"}, "scaling": {"type", "value"}}``; a pod uses REST v1's names: ``{"id", "name",
  "desiredStatus", "costPerHr", "gpuCount", "imageName", "lastStatusChange", "publicIp",
  "portMappings": {"11434": port}}`` (the last two null while the container is down). Errors are
  ``{"error": message, "status": code}``. Pod actions answer 200 with the pod. ``GET
  /v2/serverless/{id}/workers`` lists ``[{"id", "status": "IDLE" | "RUNNING" | "INITIALIZING" |
  "UNHEALTHY" | "THROTTLED", "type": "ACTIVE" | "FLEX"}]``.
* Pods: ``runtime`` mirrors the container, so it stays non-null during the ``stop_seconds`` after a
  stop. The public port is kept across restarts while it is free. ``fail_next_start(zero_gpus=True)``
  lets the start succeed with ``gpuCount`` 0 and ``runtime.gpus`` empty (REFERENCE 4.1's zero-GPU resume).
* ``/health``: ``workers`` always has ``idle`` (ready, no request) and ``running`` (ready, serving);
  ``initializing``, ``unhealthy`` (`fail_next_start`) and ``throttled`` (`hang_next_start`) appear
  only when non-zero. A faulty worker shows ``initializing`` for ``boot_seconds`` first, never serves,
  is not billed, and goes like a flex worker unless it is an active one. ``jobs`` counts each OpenAI
  request (``inQueue`` while it waits for a worker, ``failed`` for HTTP >= 400 answers) and each job of
  the job API by its state: ``inQueue``, ``inProgress``, ``completed``, ``failed`` (FAILED and
  TIMED_OUT); CANCELLED counts nowhere; ``retried`` counts ``retry`` calls.
* No worker can take a request (``workersMax`` 0, or only faulty workers) and none is booting: after
  `queue_timeout` seconds it gets 503 ``{"error": "no workers available"}`` (RunPod's queue would
  wait forever; its load-balancing endpoints give up after 2 min). A booting worker is always waited for.
  A client that leaves while its request is queued is not noticed until a worker takes the request.
* ``/openai/v1/models`` is answered by the fake, not the sim, but only on a ready worker: on a cold
  endpoint it cold-starts a flex worker like any request. It lists the model under its exact Hugging
  Face id with vLLM's ``owned_by: "vllm"``. A request naming another model gets vLLM's 404
  (``{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", ...}}``); the sim
  itself would accept ``id:latest`` too, as it appends Ollama's default tag.
* The job API: a job's status object is ``{"id", "status", "delayTime", "executionTime", "output" |
  "error", "workerId"}``: ``delayTime`` (ms from submission to a worker taking it) and ``workerId`` once
  it started, ``executionTime`` (ms it ran; 0 if it never did) once final, ``output`` when COMPLETED,
  ``error`` when FAILED, neither when TIMED_OUT or CANCELLED. Ids are ``{uuid4}-e1``, ``sync-{uuid4}-e1``
  from ``runsync``. A worker takes any number of jobs at once, as it does OpenAI requests (a real
  handler worker takes one unless its ``concurrency_modifier`` says otherwise). A job no worker takes
  within `queue_timeout` ends FAILED ``"no workers available"``. Every job is kept for the fake's
  lifetime (RunPod: 30 min after ``run``, 1 after ``runsync``); an unknown id, or another endpoint's,
  gets 404 ``{"error": "request does not exist"}``. Bad bodies and queries get 400 ``{"error"}``.
* ``runsync`` takes ``?wait=`` ms from 1000 to 300000 (default 90000), anything else is 400; when the
  wait ends first it answers the status object as it is then (IN_QUEUE or IN_PROGRESS), still 200; a
  client that leaves does not cancel its job.
  ``stream`` hands out each chunk once, with the job's state; a job without ``stream`` has no chunks
  (its result is in ``status``). ``cancel`` ends a queued or running job at once, its worker released
  before the answer; a final job's answer is its unchanged state. ``retry`` (FAILED or TIMED_OUT jobs
  only, else 400) queues a new job ``{original id}-u{n}`` with the same input and leaves the old one as
  it was (RunPod requeues the job itself, answering the ``-u1`` id; what its old id shows then is not
  documented). ``purge-queue`` cancels the IN_QUEUE jobs only.
* ``workersStandby`` (FlashBoot's cached, unbilled workers, per third-party reports) is always 0.
* `calls` records every action request that passed authentication, refused ones included: ("warm" |
  "cold", name) for each write that sets ``workersMin`` (also to its current value), ("start" | "stop"
  | "restart" | "terminate", name) for pod actions. Console changes (`set_running`) are not recorded.
  `job_calls` records the job API's calls the same way, as (operation, name, job id or ""); ``/health``
  and the OpenAI routes are not recorded. `upstream_headers` holds the headers of an endpoint's latest
  OpenAI request a worker took or job-API call the key allowed.
* Billing (`billed_seconds`): a pod from each start until its stop; a healthy worker from being asked
  for (boot included) until it stops (REFERENCE 4.4 bills flex workers "from start until fully stopped").
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import secrets
import socket
import string
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import ModuleType, TracebackType
from typing import Any, NamedTuple
from uuid import uuid4

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from gpumanager.sim import SimOllama, SimServer, running_server
from tests.fakes.machine import MachineCloud, SimMachine, until

__all__ = ["DEFAULT_MODEL", "NO_GPUS", "FakeRunPod", "runpod_sdk"]

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
NO_GPUS = "There are not enough free GPUs on the host machine to start this pod."  # runpod-python issue 168
_INTERNAL = "Something went wrong. Please try again later or contact support."  # runpod-python issue 239
_NO_WORKERS = "no workers available"
_OLLAMA_PORT = 11434  # the container port; publicPort is the sim's real one
_ID_ALPHABET = string.ascii_lowercase + string.digits
_JOB_KEYS = ("completed", "failed", "inProgress", "inQueue", "retried")
_FAULTS = {"fail": "unhealthy", "hang": "throttled"}
_SCALERS = ("QUEUE_DELAY", "REQUEST_COUNT")
_POD_ACTIONS = ("start", "stop", "restart", "terminate")
_OPENAI_METHODS = {"chat/completions": "POST", "completions": "POST", "embeddings": "POST", "models": "GET"}


class _Op(NamedTuple):
    method: str
    on_job: bool  # its path ends in the job's id
    writes: bool  # refused to the read-only key


_JOB_OPS = {
    "health": _Op("GET", False, False),
    "run": _Op("POST", False, True),
    "runsync": _Op("POST", False, True),
    "status": _Op("GET", True, False),
    "stream": _Op("GET", True, False),
    "cancel": _Op("POST", True, True),
    "retry": _Op("POST", True, True),
    "purge-queue": _Op("POST", False, True),
}
_FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
_HEALTH_KEYS = {
    "IN_QUEUE": "inQueue",
    "IN_PROGRESS": "inProgress",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "TIMED_OUT": "failed",
}
_RUNSYNC_WAIT = (1000, 300_000, 90_000)  # ms: RunPod's least, most and default ``?wait=``
_NO_JOB = "request does not exist"
_READ_ONLY = "This API key may not run jobs on this endpoint."

# Checked in this order: "podResume" must not be taken for a `pod(` read.
_OPERATIONS = [
    (name, re.compile(pattern))
    for name, pattern in (
        ("podResume", r"\bpodResume\b"),
        ("podStop", r"\bpodStop\b"),
        ("saveEndpoint", r"\bsaveEndpoint\b"),
        ("pod", r"\bpod\s*\("),
        ("myself", r"\bmyself\b"),
    )
]
_MUTATIONS = ("podResume", "podStop", "saveEndpoint")
_INPUT = re.compile(r"\binput\s*:\s*(?:\{(?P<fields>[^{}]*)\}|\$(?P<var>\w+))")
_FIELD = re.compile(r'(\w+)\s*:\s*("(?:[^"\\]|\\.)*"|\[[^\]]*\]|\$\w+|[\w.+-]+)')
_REST = re.compile(r"^/v2/(?P<kind>serverless|pods)/(?P<id>[^/]+)(?P<tail>/workers|/action)?/?$")
_SERVERLESS = re.compile(
    r"^/v2/(?P<id>[^/]+)/(?:openai/v1/(?P<route>chat/completions|completions|embeddings|models)"
    rf"|(?P<op>{'|'.join(_JOB_OPS)})(?:/(?P<job>[^/]+))?)/?$"
)

_decode = msgspec.json.Decoder().decode


def _new_id(length: int = 14) -> str:
    """RunPod ids are 14 lowercase letters and digits, e.g. ``i02xupws21hp6i``."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def _status_change(verb: str) -> str:
    # The shape RunPod puts in lastStatusChange, e.g. "Rented by User: Fri Feb 09 2024 15:42:48 GMT+0000 (...)".
    return f"{verb} by User: {datetime.now(UTC):%a %b %d %Y %H:%M:%S} GMT+0000 (Coordinated Universal Time)"


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the sim's own bind_socket does
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _rest_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status)


def _gql_error(message: str, status: int = 200, operation: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"errors": [{"message": message}]}
    if operation is not None:
        body["errors"][0]["path"] = [operation]
        body["data"] = {operation: None}
    return JSONResponse(body, status)


def _literal(raw: str, variables: dict[str, Any]) -> Any:
    if raw.startswith("$"):
        return variables.get(raw[1:])
    try:
        return json.loads(raw)  # strings, numbers, true/false/null and JSON-like lists
    except ValueError:
        return raw  # an enum such as QUEUE_DELAY or FLASHBOOT


def _graphql_input(query: str, variables: dict[str, Any]) -> dict[str, Any]:
    match = _INPUT.search(query)
    if match is None:
        return {}
    if match["var"]:
        value = variables.get(match["var"])
        return dict(value) if isinstance(value, dict) else {}
    return {key: _literal(raw, variables) for key, raw in _FIELD.findall(match["fields"])}


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _wait_seconds(raw: str | None) -> float | None:
    """runsync's ``?wait=`` (ms) in seconds; None when RunPod would refuse it."""
    least, most, default = _RUNSYNC_WAIT
    if raw is None:
        return default / 1000
    if not (raw.isascii() and raw.isdigit() and least <= int(raw) <= most):
        return None
    return int(raw) / 1000


def _knob_problem(knobs: dict[str, Any]) -> str | None:
    """What is wrong with a job input's handler knobs (module docstring), if anything."""
    for key in ("seconds", "timeout"):
        if key in knobs and not _seconds(knobs[key]):
            return f"handler: {key} must be a number >= 0"
    if "fail" in knobs and not isinstance(knobs["fail"], str):
        return "handler: fail must be a string"
    if "stream" in knobs and not isinstance(knobs["stream"], list):
        return "handler: stream must be a list"
    return None


async def _sleep_until(moment: float) -> None:
    await anyio.sleep(max(0.0, moment - time.monotonic()))


def _bearer(request: Request, *, bare_ok: bool = False) -> str | None:
    header = request.headers.get("authorization", "").strip()
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return header if bare_ok and header else None


@dataclass(eq=False)
class _Pod(SimMachine):
    id: str
    name: str
    cost_per_hour: float
    gpus_asked: int
    desired: str = "EXITED"
    last_change: str = ""
    started: float | None = None  # monotonic time of the start, while RUNNING
    up_since: float | None = None  # when the container came up, while it is up
    port: int = 0  # kept across restarts while it stays free
    gpu_count: int = 0
    billed: float = 0.0
    removed: bool = False
    next_start: str | None = None  # "fail", "hang" or "zero_gpus"
    stop_failures: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Worker:
    id: str
    active: bool  # counts toward workersMin; otherwise a flex worker that idles out
    started: float
    boot_end: float
    fault: str | None = None  # "unhealthy" or "throttled": what it shows after boot instead of serving
    busy: int = 0
    retired: bool = False  # cooled from the console: goes as soon as its requests end
    idle_since: float = -math.inf

    def __post_init__(self) -> None:
        self.idle_since = self.boot_end

    def ready(self, now: float) -> bool:
        return self.fault is None and not self.retired and now >= self.boot_end

    def state(self, now: float) -> str:
        if now < self.boot_end:
            return "initializing"
        return self.fault or ("running" if self.busy else "idle")

    def gone_at(self, idle_timeout: float) -> float:
        if self.busy:
            return math.inf
        if self.retired:
            return self.idle_since
        return math.inf if self.active else self.idle_since + idle_timeout


@dataclass(eq=False)
class _Job:
    id: str
    input: dict[str, Any]
    origin: str  # the id of the job it retries, or its own
    submitted: float
    status: str = "IN_QUEUE"
    started: float | None = None
    ended: float | None = None
    worker_id: str | None = None
    output: Any = None
    error: str | None = None
    chunks: list[Any] = field(default_factory=list)  # what its handler streamed so far
    streamed: int = 0  # how many of them `stream` handed out
    retries: int = 0  # of an original job: its -u{n} ids taken
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    finished: anyio.Event = field(default_factory=anyio.Event)  # its task ended: final, worker released

    def finish(self, status: str, *, output: Any = None, error: str | None = None) -> None:
        """Enter a final state, unless it is in one already."""
        if self.status not in _FINAL:
            self.status, self.ended, self.output, self.error = status, time.monotonic(), output, error

    def answer(self) -> dict[str, Any]:
        """Its status object, as ``status`` and ``runsync`` answer it."""
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            body["delayTime"] = _ms(self.started - self.submitted)
            body["workerId"] = self.worker_id
        if self.ended is not None:
            body["executionTime"] = _ms(self.ended - self.started) if self.started is not None else 0
        if self.status == "COMPLETED":
            body["output"] = self.output
        elif self.status == "FAILED":
            body["error"] = self.error
        return body


@dataclass(eq=False)
class _Endpoint:
    id: str
    name: str  # the fake's key for calls, sims and knobs; `label` is the wire name
    label: str
    model: str
    sim: SimOllama
    gpu_ids: str
    template_id: str
    workers_min: int
    workers_max: int
    idle_timeout: float
    scaler_type: str = "QUEUE_DELAY"
    scaler_value: int = 4
    created: int = field(default_factory=lambda: int(time.time()))
    workers: list[_Worker] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_JOB_KEYS, 0))  # OpenAI requests, retries
    submitted: dict[str, _Job] = field(default_factory=dict)  # the job API's jobs by id
    changed: anyio.Event = field(default_factory=anyio.Event)
    billed: float = 0.0
    next_start: str | None = None  # "fail" or "hang"
    stop_failures: list[int] = field(default_factory=list)


class FakeRunPod(MachineCloud[_Pod]):
    """RunPod on loopback; see the module docstring. Use as ``async with FakeRunPod() as fake``."""

    def __init__(
        self,
        *,
        api_key: str = "rp-test",
        read_only_key: str | None = None,
        boot_seconds: float = 0.2,
        stop_seconds: float = 0.1,
        queue_timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.api_key, self.read_only_key = api_key, read_only_key
        self.boot_seconds, self.stop_seconds, self.queue_timeout = boot_seconds, stop_seconds, queue_timeout
        self.calls: list[tuple[str, str]] = []
        self.job_calls: list[tuple[str, str, str]] = []
        self.sims: dict[str, SimOllama] = {}
        self.upstream_headers: dict[str, dict[str, str]] = {}
        self._pods: dict[str, _Pod] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._by_id: dict[str, _Pod | _Endpoint] = {}
        self._stack = AsyncExitStack()
        self._api: SimServer | None = None
        self._serverless: SimServer | None = None

    # -- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> FakeRunPod:
        async with AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            # Bound methods are not detected as ASGI 3 by uvicorn, hence the explicit interface.
            self._api = await stack.enter_async_context(
                running_server(self._api_asgi, interface="asgi3", timeout_graceful_shutdown=1)
            )
            self._serverless = await stack.enter_async_context(
                running_server(self._serverless_asgi, interface="asgi3", timeout_graceful_shutdown=1)
            )
            await self._start_wanted_sims(self._pods.values())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._close_machines(self._pods.values())
        for ep in self._endpoints.values():
            self._notify(ep)  # requests waiting for a worker see `_closing` and give up at once
            for job in ep.submitted.values():
                job.scope.cancel()
        # uvicorn's shutdown always sleeps 0.1 s: stop both servers side by side rather than in turn.
        with anyio.move_on_after(5, shield=True):
            async with anyio.create_task_group() as tg:
                for server in (self._api, self._serverless):
                    if server is not None:
                        tg.start_soon(server.stop)
        return await self._stack.__aexit__(exc_type, exc, tb)

    @property
    def api_url(self) -> str:
        """Stands for https://api.runpod.io: ``/graphql`` and ``/v2/...``."""
        assert self._api is not None, "use it as `async with FakeRunPod() as fake`"
        return self._api.url

    @property
    def serverless_url(self) -> str:
        """Stands for https://api.runpod.ai/v2."""
        assert self._serverless is not None, "use it as `async with FakeRunPod() as fake`"
        return self._serverless.url + "/v2"

    # -- resources ----------------------------------------------------------------------------

    def add_endpoint(
        self,
        name: str,
        *,
        model: str = DEFAULT_MODEL,
        workers_min: int = 0,
        workers_max: int = 3,
        idle_timeout: float = 5.0,
        token_delay: float = 0.0,
        gpu_ids: str = "AMPERE_24",
        **sim_options: Any,
    ) -> str:
        """Create a serverless endpoint serving ``model`` and return its id; active workers start ready."""
        self._check_new(name)
        sim = SimOllama(name=name, models=[model], token_delay=token_delay, **sim_options)
        ep = _Endpoint(
            self._unique_id(), name, name, model, sim, gpu_ids, _new_id(10), workers_min, workers_max, idle_timeout
        )
        self._endpoints[name], self._by_id[ep.id], self.sims[name] = ep, ep, sim
        self._scale(ep, time.monotonic(), instant=True)
        return ep.id

    def add_pod(
        self,
        name: str,
        *,
        running: bool = False,
        models: Iterable[str] = ("llama3.2:latest",),
        token_delay: float = 0.0,
        cost_per_hour: float = 0.44,
        gpu_count: int = 1,
        **sim_options: Any,
    ) -> str:
        """Create a pod and return its id; a running one's sim starts at once (see `wait_for`)."""
        self._check_new(name)
        sim = SimOllama(name=name, models=models, token_delay=token_delay, **sim_options)
        pod = _Pod(
            self._unique_id(),
            name,
            cost_per_hour,
            gpu_count,
            sim=sim,
            last_change=_status_change("Created"),
            gpu_count=gpu_count,
        )
        self._pods[name], self._by_id[pod.id], self.sims[name] = pod, pod, sim
        if running:
            self._set_desired(pod, "RUNNING")
            self._start_sim_soon(pod)
        return pod.id

    def _check_new(self, name: str) -> None:
        if name in self.sims:
            raise ValueError(f"{name!r} exists already")

    def _unique_id(self) -> str:
        while (new := _new_id()) in self._by_id:
            pass
        return new

    def is_serving(self, name: str) -> bool:
        """A pod serves while its Ollama listens; an endpoint while it has a ready worker."""
        if name in self._pods:
            return self._pods[name].power.up
        ep, now = self._endpoints[name], time.monotonic()
        self._prune(ep, now)
        return any(w.fault is None and now >= w.boot_end for w in ep.workers)

    async def wait_for(
        self,
        name: str,
        serving: bool = True,
        *,
        timeout: float = 5.0,
    ) -> None:
        """Wait until `is_serving` says ``serving``; TimeoutError after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            await until(lambda: self.is_serving(name) == serving)

    def billed_seconds(self, name: str) -> float:
        """Billed time so far: a pod's RUNNING time, or the summed lifetimes of an endpoint's healthy workers."""
        now = time.monotonic()
        if name in self._pods:
            pod = self._pods[name]
            return pod.billed + (now - pod.started if pod.started is not None else 0.0)
        ep = self._endpoints[name]
        self._prune(ep, now)
        return ep.billed + sum(now - w.started for w in ep.workers if w.fault is None)

    def jobs_of(self, name: str) -> list[dict[str, Any]]:
        """The endpoint's job-API jobs in submission order: each one's status object plus its ``input``."""
        return [job.answer() | {"input": job.input} for job in self._endpoints[name].submitted.values()]

    # -- failure knobs and the console --------------------------------------------------------

    def fail_next_start(self, name: str, *, zero_gpus: bool = False) -> None:
        """Pod: the next start is refused with `NO_GPUS` (or, with ``zero_gpus``, comes up without a GPU).
        Endpoint: the next worker asked for turns unhealthy after its boot and never serves."""
        if zero_gpus and name not in self._pods:
            raise ValueError("zero_gpus applies to pods only")
        self._target(name).next_start = "zero_gpus" if zero_gpus else "fail"

    def hang_next_start(self, name: str) -> None:
        """The next start (pod) or worker (endpoint) is accepted but never comes up; a worker shows throttled."""
        self._target(name).next_start = "hang"

    def fail_stops(self, name: str, times: int = 1, status: int = 500) -> None:
        """The next ``times`` pod stops, or endpoint cools (workersMin 0), answer HTTP ``status``."""
        self._target(name).stop_failures.extend([status] * times)

    def set_max_workers(self, name: str, workers_max: int) -> None:
        """What RunPod does to an endpoint idle for a week (0); active workers beyond it become flex."""
        ep = self._endpoints[name]
        ep.workers_max = workers_max
        self._scale(ep, time.monotonic())

    async def set_running(self, name: str, running: bool) -> None:
        """The console, at once and unrecorded: start/stop a pod (returns when its sim is up or down), or
        warm an endpoint to workersMin >= 1 (workersMax raised to match) with a ready worker and no broken
        ones, or cool it to 0, dropping its workers as their requests end."""
        if name in self._endpoints:
            self._console_endpoint(self._endpoints[name], running)
            return
        pod = self._pods[name]
        self._interrupt(pod)
        if running:
            pod.gpu_count = pod.gpus_asked
            self._set_desired(pod, "RUNNING")
            await self._ensure_sim(pod)
        else:
            self._set_desired(pod, "EXITED")
            self._stop_sim(pod)

    def _target(self, name: str) -> _Pod | _Endpoint:
        return self._pods[name] if name in self._pods else self._endpoints[name]

    def _console_endpoint(self, ep: _Endpoint, running: bool) -> None:
        now = time.monotonic()
        for w in ep.workers:
            if not running or w.fault is not None:  # the operator also clears a broken worker
                w.retired, w.active, w.idle_since = True, False, now
        if running:
            ep.workers_min = max(ep.workers_min, 1)
            ep.workers_max = max(ep.workers_max, ep.workers_min)
            self._scale(ep, now, instant=True)
            for w in ep.workers:
                if w.active and w.boot_end > now:
                    w.boot_end = w.idle_since = now
        else:
            ep.workers_min = 0
        self._prune(ep, now)
        self._notify(ep)

    # -- management API: routing and auth ------------------------------------------------------

    def _access(self, key: str | None) -> str | None:
        """The key's scope: "write" for the API key, "read" for the read-only key, None otherwise."""
        if key is None:
            return None
        if hmac.compare_digest(key.encode(), self.api_key.encode()):
            return "write"
        if self.read_only_key and hmac.compare_digest(key.encode(), self.read_only_key.encode()):
            return "read"
        return None

    async def _api_asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope, receive)
            response = await (self._graphql(request) if request.url.path == "/graphql" else self._rest(request))
            await response(scope, receive, send)

    async def _rest(self, request: Request) -> Response:
        match = _REST.match(request.url.path)
        if match is None:
            return _rest_error(404, "not found")
        access = self._access(_bearer(request))
        if access is None:
            return _rest_error(401, "Unauthorized")
        target = self._by_id.get(match["id"])
        kind = "serverless" if isinstance(target, _Endpoint) else "pods" if isinstance(target, _Pod) else None
        if target is None or kind != match["kind"] or (isinstance(target, _Pod) and target.removed):
            return _rest_error(404, f"{match['kind']} {match['id']} not found")
        route = (request.method, match["tail"])
        if isinstance(target, _Endpoint):
            if route == ("GET", None):
                return JSONResponse(self._endpoint_rest(target))
            if route == ("GET", "/workers"):
                return JSONResponse(self._workers_rest(target))
            if route == ("PATCH", None):
                return await self._patch_endpoint(target, request, access)
        elif route == ("GET", None):
            return JSONResponse(self._pod_rest(target))
        elif route == ("POST", "/action"):
            return await self._pod_action(target, request, access)
        return _rest_error(405, "method not allowed")

    async def _json(self, request: Request) -> Any:
        try:
            return _decode(await request.body())
        except msgspec.DecodeError:
            return None

    async def _graphql(self, request: Request) -> Response:
        access = self._access(_bearer(request) or request.query_params.get("api_key"))
        if access is None:
            return _gql_error("Unauthorized", 401)
        if request.method != "POST":
            return _gql_error("use POST", 405)
        payload = await self._json(request)
        query = payload.get("query") if isinstance(payload, dict) else None
        if not isinstance(query, str):
            return _gql_error("a JSON body with a query is required", 400)
        raw_vars = payload.get("variables")
        variables = raw_vars if isinstance(raw_vars, dict) else {}
        operation = next((name for name, pattern in _OPERATIONS if pattern.search(query)), None)
        if operation is None:
            return _gql_error(
                "FakeRunPod does not know this operation; it answers myself, pod, podResume, podStop and saveEndpoint"
            )
        args = _graphql_input(query, variables)
        if operation in _MUTATIONS:
            self._record_mutation(operation, args)
            if access != "write":
                return _gql_error("This API key does not have permission for this operation.", 403, operation)
        return self._gql_operation(operation, args)

    def _record_mutation(self, operation: str, args: dict[str, Any]) -> None:
        target = self._by_id.get(str(args.get("podId") or args.get("id")))
        if isinstance(target, _Pod) and operation != "saveEndpoint":
            self.calls.append(("start" if operation == "podResume" else "stop", target.name))
        elif isinstance(target, _Endpoint) and operation == "saveEndpoint":
            self._record_min(target, args.get("workersMin"))

    def _record_min(self, ep: _Endpoint, value: Any) -> None:
        if _count(value):
            self.calls.append(("warm" if value >= 1 else "cold", ep.name))

    # -- GraphQL operations ---------------------------------------------------------------------

    def _gql_operation(self, operation: str, args: dict[str, Any]) -> Response:
        if operation == "myself":
            pods = [p for p in self._pods.values() if not p.removed]
            return JSONResponse(
                {
                    "data": {
                        "myself": {
                            "id": "fake-user",
                            "endpoints": [self._endpoint_gql(ep) for ep in self._endpoints.values()],
                            "pods": [self._pod_gql(p) for p in pods],
                        }
                    }
                }
            )
        if operation == "saveEndpoint":
            return self._save_endpoint(args)
        pod = self._by_id.get(str(args.get("podId")))
        if not isinstance(pod, _Pod) or pod.removed:
            return _gql_error(f"pod {args.get('podId')} not found", 200, operation)
        if operation == "podResume":
            refused = self._start_pod(pod)
            if refused is not None:
                return _gql_error(refused, 200, operation)
        elif operation == "podStop" and (status := self._stop_pod(pod)) is not None:
            return _gql_error(_INTERNAL, status, operation)
        return JSONResponse({"data": {operation: self._pod_gql(pod)}})

    def _save_endpoint(self, args: dict[str, Any]) -> Response:
        if "id" not in args:
            return _gql_error("FakeRunPod cannot create endpoints: add them with add_endpoint()", 200, "saveEndpoint")
        ep = self._by_id.get(str(args["id"]))
        if not isinstance(ep, _Endpoint):
            return _gql_error(f"endpoint {args['id']} not found", 200, "saveEndpoint")
        missing = [k for k in ("gpuIds", "name", "templateId") if not isinstance(args.get(k), str) or not args[k]]
        if missing:  # RunPod's update replaces the endpoint, so these must be repeated
            return _gql_error(f"saveEndpoint needs {', '.join(missing)} when updating", 200, "saveEndpoint")
        failed = self._update_endpoint(ep, args, strict=False)
        if failed is not None:
            status, message = failed
            return _gql_error(message, 200 if status == 400 else status, "saveEndpoint")
        return JSONResponse({"data": {"saveEndpoint": self._endpoint_gql(ep)}})

    def _endpoint_gql(self, ep: _Endpoint) -> dict[str, Any]:
        self._prune(ep, time.monotonic())
        return {
            "id": ep.id,
            "name": ep.label,
            "gpuIds": ep.gpu_ids,
            "gpuCount": 1,
            "idleTimeout": ep.idle_timeout,
            "scalerType": ep.scaler_type,
            "scalerValue": ep.scaler_value,
            "templateId": ep.template_id,
            "workersMin": ep.workers_min,
            "workersMax": ep.workers_max,
            "workersStandby": 0,
            "pods": [{"desiredStatus": "RUNNING"} for _ in ep.workers],
        }

    def _pod_gql(self, pod: _Pod) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "id": pod.id,
            "name": pod.name,
            "desiredStatus": pod.desired,
            "lastStatusChange": pod.last_change,
            "uptimeSeconds": int(now - pod.started) if pod.started is not None else 0,
            "costPerHr": pod.cost_per_hour,
            "gpuCount": pod.gpu_count,
            "imageName": "ollama/ollama:latest",
            "runtime": self._runtime(pod, now),
        }

    def _runtime(self, pod: _Pod, now: float) -> dict[str, Any] | None:
        if pod.power.server is None or pod.up_since is None:
            return None  # RunPod: null until the container is up
        gpus = [
            {"id": f"GPU-{pod.id}-{i}", "gpuUtilPercent": 100 if pod.sim.active else 0, "memoryUtilPercent": 0}
            for i in range(pod.gpu_count)
        ]
        port = {
            "ip": "127.0.0.1",
            "isIpPublic": True,
            "privatePort": _OLLAMA_PORT,
            "publicPort": pod.power.server.port,
            "type": "tcp",
        }
        return {"uptimeInSeconds": int(now - pod.up_since), "ports": [port], "gpus": gpus}

    # -- REST v2 --------------------------------------------------------------------------------

    async def _patch_endpoint(self, ep: _Endpoint, request: Request, access: str) -> Response:
        body = await self._json(request)
        workers = body.get("workers", {}) if isinstance(body, dict) else None
        scaling = body.get("scaling", {}) if isinstance(body, dict) else None
        if not isinstance(workers, dict) or not isinstance(scaling, dict):
            return _rest_error(400, "the body must be a JSON object; workers and scaling objects")
        self._record_min(ep, workers.get("min"))
        if access != "write":
            return _rest_error(403, "This API key does not have permission for this operation.")
        names = {"min": "workersMin", "max": "workersMax", "idleTimeout": "idleTimeout"}
        changes = {names[k]: v for k, v in workers.items() if k in names}
        changes |= {
            {"type": "scalerType", "value": "scalerValue"}[k]: v for k, v in scaling.items() if k in ("type", "value")
        }
        if isinstance(body.get("name"), str):
            changes["name"] = body["name"]
        failed = self._update_endpoint(ep, changes, strict=True)
        return _rest_error(*failed) if failed is not None else JSONResponse(self._endpoint_rest(ep))

    def _update_endpoint(self, ep: _Endpoint, changes: dict[str, Any], *, strict: bool) -> tuple[int, str] | None:
        """Validate and apply GraphQL-named fields; (status, message) when refused."""
        problem = self._endpoint_problem(ep, changes, strict)
        if problem is not None:
            return 400, problem
        if changes.get("workersMin") == 0 and ep.stop_failures:
            return ep.stop_failures.pop(0), _INTERNAL
        ep.workers_min = changes.get("workersMin", ep.workers_min)
        ep.workers_max = changes.get("workersMax", ep.workers_max)
        ep.idle_timeout = changes.get("idleTimeout", ep.idle_timeout)
        ep.scaler_type = changes.get("scalerType", ep.scaler_type)
        ep.scaler_value = changes.get("scalerValue", ep.scaler_value)
        ep.label = changes.get("name", ep.label)
        ep.gpu_ids = changes.get("gpuIds", ep.gpu_ids)
        ep.template_id = changes.get("templateId", ep.template_id)
        self._scale(ep, time.monotonic())
        return None

    @staticmethod
    def _endpoint_problem(ep: _Endpoint, changes: dict[str, Any], strict: bool) -> str | None:
        for key in ("workersMin", "workersMax", "scalerValue"):
            if key in changes and not _count(changes[key]):
                return f"{key} must be a whole number >= 0"
        if "idleTimeout" in changes:
            idle = changes["idleTimeout"]
            if strict and not (_count(idle) and 1 <= idle <= 3600):
                return "workers.idleTimeout must be an integer from 1 to 3600"
            if not _seconds(idle):
                return "idleTimeout must be a number of seconds >= 0"
        if changes.get("workersMin", ep.workers_min) > changes.get("workersMax", ep.workers_max):
            return "workersMin must not exceed workersMax"
        if changes.get("scalerType", ep.scaler_type) not in _SCALERS:
            return f"scalerType must be one of {', '.join(_SCALERS)}"
        return None

    def _endpoint_rest(self, ep: _Endpoint) -> dict[str, Any]:
        return {
            "id": ep.id,
            "name": ep.label,
            "templateId": ep.template_id,
            "gpuIds": ep.gpu_ids.split(","),
            "gpuCount": 1,
            "scaling": {"type": ep.scaler_type, "value": ep.scaler_value},
            "workers": {"min": ep.workers_min, "max": ep.workers_max, "idleTimeout": ep.idle_timeout, "standby": 0},
        }

    def _workers_rest(self, ep: _Endpoint) -> list[dict[str, Any]]:
        now = time.monotonic()
        self._prune(ep, now)
        return [
            {"id": w.id, "status": w.state(now).upper(), "type": "ACTIVE" if w.active else "FLEX"} for w in ep.workers
        ]

    def _pod_rest(self, pod: _Pod) -> dict[str, Any]:
        runtime = self._runtime(pod, time.monotonic())
        return {
            "id": pod.id,
            "name": pod.name,
            "desiredStatus": pod.desired,
            "costPerHr": pod.cost_per_hour,
            "gpuCount": pod.gpu_count,
            "imageName": "ollama/ollama:latest",
            "lastStatusChange": pod.last_change,
            "publicIp": "127.0.0.1" if runtime else None,
            "portMappings": {str(_OLLAMA_PORT): runtime["ports"][0]["publicPort"]} if runtime else None,
        }

    async def _pod_action(self, pod: _Pod, request: Request, access: str) -> Response:
        body = await self._json(request)
        action = body.get("action") if isinstance(body, dict) else None
        if action not in _POD_ACTIONS:
            return _rest_error(400, f"action must be one of {', '.join(_POD_ACTIONS)}")
        self.calls.append((action, pod.name))
        if access != "write":
            return _rest_error(403, "This API key does not have permission for this operation.")
        if action == "start" and (refused := self._start_pod(pod)) is not None:
            return _rest_error(500, refused)
        if action == "stop" and (status := self._stop_pod(pod)) is not None:
            return _rest_error(status, _INTERNAL)
        if action == "restart":
            self._set_desired(pod, "EXITED")
            self._set_desired(pod, "RUNNING")
            self._launch(pod, partial(self._restart, pod))
        elif action == "terminate":
            self._interrupt(pod)
            self._stop_sim(pod)
            self._set_desired(pod, "TERMINATED")
            pod.removed = True
        return JSONResponse(self._pod_rest(pod))

    # -- pod lifecycle --------------------------------------------------------------------------

    def _start_pod(self, pod: _Pod) -> str | None:
        """Apply a start; the error message when it is refused."""
        plan, pod.next_start = pod.next_start, None
        if plan == "fail":
            return NO_GPUS
        if pod.desired == "RUNNING":
            return None
        pod.gpu_count = 0 if plan == "zero_gpus" else pod.gpus_asked
        self._set_desired(pod, "RUNNING")
        self._launch(pod, partial(self._boot, pod, plan == "hang"))
        return None

    def _stop_pod(self, pod: _Pod) -> int | None:
        """Apply a stop; the HTTP status when a failure was asked for. It also ends a hung start."""
        if pod.stop_failures:
            return pod.stop_failures.pop(0)
        self._set_desired(pod, "EXITED")
        self._launch(pod, partial(self._halt, pod))
        return None

    def _set_desired(self, pod: _Pod, status: str) -> None:
        if pod.desired == status:
            return
        now = time.monotonic()
        if pod.started is not None:
            pod.billed += now - pod.started
        pod.started = now if status == "RUNNING" else None
        pod.desired = status
        pod.last_change = _status_change({"RUNNING": "Rented", "EXITED": "Exited"}.get(status, "Terminated"))

    async def _boot(self, pod: _Pod, hang: bool) -> None:
        if hang:
            await anyio.sleep_forever()  # like a resume stuck waiting for its host; a stop ends it
        await anyio.sleep(self.boot_seconds)
        await self._ensure_sim(pod)

    async def _halt(self, pod: _Pod) -> None:
        await anyio.sleep(self.stop_seconds)
        self._stop_sim(pod)

    async def _restart(self, pod: _Pod) -> None:
        await self._halt(pod)
        await self._boot(pod, False)

    def _sim_address(self, pod: _Pod) -> tuple[str, int]:
        """Loopback, on the pod's old port while it is free."""
        return "127.0.0.1", pod.port if pod.port and _bindable(pod.port) else 0

    async def _ensure_sim(self, pod: _Pod) -> None:
        """Start the pod's sim unless it runs; a container that comes up keeps its port and up time."""
        started = pod.power.up
        await super()._ensure_sim(pod)
        if pod.power.server is not None and not started:
            pod.port, pod.up_since = pod.power.server.port, time.monotonic()

    def _stop_sim(self, pod: _Pod) -> None:
        pod.up_since = None
        super()._stop_sim(pod)

    # -- endpoint workers -------------------------------------------------------------------------

    def _scale(self, ep: _Endpoint, now: float, *, instant: bool = False) -> None:
        """Match the active workers to min(workersMin, workersMax): promote flex ones or start new
        ones, or demote extras to flex, which then idle out."""
        self._prune(ep, now)
        want = min(ep.workers_min, ep.workers_max)
        active = [w for w in ep.workers if w.active]
        for w in active[want:]:
            w.active = False
            w.idle_since = max(w.idle_since, now)  # a demoted worker gets a full idle timeout
        spare = [w for w in ep.workers if not w.active and not w.retired and w.fault is None]
        for _ in range(want - len(active)):
            worker = spare.pop(0) if spare else self._new_worker(ep, now, instant=instant)
            worker.active = True
        self._notify(ep)

    def _new_worker(self, ep: _Endpoint, now: float, *, instant: bool = False) -> _Worker:
        plan = None
        if not instant:  # the console's workers skip the knobs
            plan, ep.next_start = ep.next_start, None
        worker = _Worker(_new_id(), False, now, now if instant else now + self.boot_seconds, _FAULTS.get(plan or ""))
        ep.workers.append(worker)
        return worker

    def _prune(self, ep: _Endpoint, now: float) -> None:
        for w in list(ep.workers):
            gone = w.gone_at(ep.idle_timeout)
            if gone <= now:
                ep.workers.remove(w)
                if w.fault is None:  # only healthy workers are billed
                    ep.billed += max(0.0, gone - w.started)

    @staticmethod
    def _notify(ep: _Endpoint) -> None:
        ep.changed.set()
        ep.changed = anyio.Event()

    def _health(self, ep: _Endpoint) -> dict[str, Any]:
        now = time.monotonic()
        self._prune(ep, now)
        states = Counter(w.state(now) for w in ep.workers)
        workers = {"idle": states["idle"], "running": states["running"]}
        workers |= {k: states[k] for k in ("initializing", "unhealthy", "throttled") if states[k]}
        jobs = Counter(_HEALTH_KEYS.get(job.status) for job in ep.submitted.values())
        return {"jobs": {k: n + jobs[k] for k, n in ep.jobs.items()}, "workers": workers}

    async def _acquire(self, ep: _Endpoint) -> _Worker | None:
        """Hold a job until a worker can take it, starting a flex worker when there is none, like RunPod's
        queue; None when nothing could serve it for `queue_timeout` seconds and nothing is booting."""
        give_up = time.monotonic() + self.queue_timeout
        while not self._closing.is_set():
            now = time.monotonic()
            self._prune(ep, now)
            ready = [w for w in ep.workers if w.ready(now)]
            if ready:
                worker = min(ready, key=lambda w: w.busy)
                worker.busy += 1
                return worker
            if ep.workers_max > 0 and all(w.retired for w in ep.workers):
                self._new_worker(ep, now)
            booting = [w.boot_end for w in ep.workers if w.fault is None and not w.retired and w.boot_end > now]
            if not booting and now >= give_up:
                return None
            wake = min([*(booting or [give_up]), *(w.gone_at(ep.idle_timeout) for w in ep.workers)])
            changed = ep.changed
            with anyio.move_on_after(wake - now):
                await changed.wait()
        return None

    def _release(self, ep: _Endpoint, worker: _Worker) -> None:
        worker.busy -= 1
        worker.idle_since = time.monotonic()
        self._notify(ep)

    # -- serverless API -----------------------------------------------------------------------------

    async def _serverless_asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        match = _SERVERLESS.match(request.url.path)
        access = self._access(_bearer(request, bare_ok=True))
        ep = self._by_id.get(match["id"]) if match else None
        op = _JOB_OPS.get(match["op"]) if match else None
        response: Response | None = None
        if access is None:
            response = JSONResponse({"error": "Unauthorized"}, 401)
        elif match is None or not isinstance(ep, _Endpoint) or (op is not None and op.on_job != bool(match["job"])):
            response = JSONResponse({"error": "not found"}, 404)
        elif request.method != (op.method if op else _OPENAI_METHODS[match["route"]]):
            response = JSONResponse({"error": "method not allowed"}, 405)
        elif match["op"] == "health":
            response = JSONResponse(self._health(ep))
        elif op is not None:
            response = await self._job_api(ep, match["op"], match["job"] or "", request, access)
        elif access != "write":
            response = JSONResponse({"error": _READ_ONLY}, 403)
        if response is not None:
            return await response(scope, receive, send)
        assert isinstance(ep, _Endpoint) and match is not None
        await self._job(ep, match["route"], request, send)

    # -- the job API ----------------------------------------------------------------------------

    async def _job_api(self, ep: _Endpoint, op: str, job_id: str, request: Request, access: str) -> Response:
        self.job_calls.append((op, ep.name, job_id))
        if _JOB_OPS[op].writes and access != "write":
            return JSONResponse({"error": _READ_ONLY}, 403)
        self.upstream_headers[ep.name] = dict(request.headers)
        if op in ("run", "runsync"):
            return await self._submit(ep, request, sync=op == "runsync")
        if op == "purge-queue":
            queued = [job for job in ep.submitted.values() if job.status == "IN_QUEUE"]
            for each in queued:
                self._cancel(each)
            return JSONResponse({"removed": len(queued), "status": "completed"})
        job = ep.submitted.get(job_id)
        if job is None:
            return JSONResponse({"error": _NO_JOB}, 404)
        if op == "status":
            return JSONResponse(job.answer())
        if op == "stream":
            fresh, job.streamed = job.chunks[job.streamed :], len(job.chunks)
            return JSONResponse({"id": job.id, "status": job.status, "stream": [{"output": c} for c in fresh]})
        if op == "retry":
            return self._retry(ep, job)
        if self._cancel(job):
            await job.finished.wait()  # at once: the cancelled task only releases its worker
        return JSONResponse({"id": job.id, "status": job.status})

    async def _submit(self, ep: _Endpoint, request: Request, *, sync: bool) -> Response:
        wait = _wait_seconds(request.query_params.get("wait")) if sync else 0.0
        if wait is None:
            return JSONResponse({"error": "wait must be a whole number of milliseconds from 1000 to 300000"}, 400)
        body = await self._json(request)
        job_input = body.get("input") if isinstance(body, dict) else None
        if not isinstance(job_input, dict):
            return JSONResponse({"error": "the body must be a JSON object with an input object"}, 400)
        job = self._queue(ep, f"{'sync-' if sync else ''}{uuid4()}-e1", job_input)
        if not sync:
            return JSONResponse({"id": job.id, "status": job.status})
        with anyio.move_on_after(wait):
            await job.finished.wait()
        return JSONResponse(job.answer())

    def _retry(self, ep: _Endpoint, job: _Job) -> Response:
        if job.status not in ("FAILED", "TIMED_OUT"):
            message = f"job {job.id} is {job.status}: only FAILED or TIMED_OUT jobs can be retried"
            return JSONResponse({"error": message}, 400)
        origin = ep.submitted[job.origin]
        origin.retries += 1
        ep.jobs["retried"] += 1
        again = self._queue(ep, f"{origin.id}-u{origin.retries}", job.input, origin=origin.id)
        return JSONResponse({"id": again.id, "status": again.status})

    def _queue(self, ep: _Endpoint, job_id: str, job_input: dict[str, Any], *, origin: str | None = None) -> _Job:
        assert self._tg is not None
        job = ep.submitted[job_id] = _Job(job_id, job_input, origin or job_id, time.monotonic())
        self._tg.start_soon(self._work, ep, job)
        return job

    @staticmethod
    def _cancel(job: _Job) -> bool:
        """Cancel a queued or running job; False when it is final already."""
        if job.status in _FINAL:
            return False
        job.finish("CANCELLED")
        job.scope.cancel()
        return True

    async def _work(self, ep: _Endpoint, job: _Job) -> None:
        """A job's life: waiting for a worker, then running its handler there."""
        try:
            with job.scope:
                worker = await self._acquire(ep)
                if worker is None:
                    job.finish("FAILED", error=_NO_WORKERS)
                    return
                try:
                    if job.status == "IN_QUEUE":  # not cancelled as the worker came free
                        job.status, job.started, job.worker_id = "IN_PROGRESS", time.monotonic(), worker.id
                        await self._handle(job)
                finally:
                    self._release(ep, worker)
        finally:
            job.finished.set()

    @staticmethod
    async def _handle(job: _Job) -> None:
        """The handler the job's input scripts (module docstring)."""
        knobs = job.input
        if (problem := _knob_problem(knobs)) is not None:
            job.finish("FAILED", error=problem)
            return
        assert job.started is not None
        seconds, chunks = knobs.get("seconds", 0.05), knobs.get("stream", [])
        end = job.started + seconds
        cut = job.started + knobs["timeout"] if seconds > knobs.get("timeout", math.inf) else math.inf
        for i, chunk in enumerate(chunks):
            at = job.started + (i + 1) * seconds / len(chunks)
            if at > cut:
                break
            await _sleep_until(at)
            job.chunks.append(chunk)
        await _sleep_until(min(end, cut))
        if cut < math.inf:
            job.finish("TIMED_OUT")
        elif "fail" in knobs:
            job.finish("FAILED", error=knobs["fail"])
        else:
            job.finish("COMPLETED", output=list(job.chunks) if "stream" in knobs else {"echo": job.input})

    async def _job(self, ep: _Endpoint, route: str, request: Request, send: Send) -> None:
        body = await request.body()
        ep.jobs["inQueue"] += 1
        try:
            worker = await self._acquire(ep)
        finally:
            ep.jobs["inQueue"] -= 1
        if worker is None:
            ep.jobs["failed"] += 1
            return await JSONResponse({"error": _NO_WORKERS}, 503)(request.scope, request.receive, send)
        ep.jobs["inProgress"] += 1
        status = 500
        try:
            self.upstream_headers[ep.name] = dict(request.headers)
            status = await self._on_worker(ep, route, request, body, send)
        finally:
            ep.jobs["inProgress"] -= 1
            ep.jobs["completed" if status < 400 else "failed"] += 1
            self._release(ep, worker)

    async def _on_worker(self, ep: _Endpoint, route: str, request: Request, body: bytes, send: Send) -> int:
        """What the vLLM worker answers; returns the HTTP status."""
        if route == "models":
            response = JSONResponse(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": ep.model,
                            "object": "model",
                            "created": ep.created,
                            "owned_by": "vllm",
                            "root": ep.model,
                            "parent": None,
                            "max_model_len": ep.sim.context_length,
                        }
                    ],
                }
            )
        elif (wrong := self._wrong_model(ep, body)) is not None:
            response = wrong
        else:
            return await self._forward(ep, route, request, body, send)
        await response(request.scope, request.receive, send)
        return response.status_code

    @staticmethod
    def _wrong_model(ep: _Endpoint, body: bytes) -> JSONResponse | None:
        """vLLM serves only its exact model id; bad JSON or a missing model is left to the sim to refuse."""
        try:
            data = _decode(body)
        except msgspec.DecodeError:
            return None
        model = data.get("model") if isinstance(data, dict) else None
        if model is None or model == ep.model:
            return None
        error = {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "param": None, "code": 404}
        return JSONResponse({"error": error}, 404)

    @staticmethod
    async def _forward(ep: _Endpoint, route: str, request: Request, body: bytes, send: Send) -> int:
        """Run the sim's ASGI app in-process on the already read body; its messages go straight out,
        so a stream leaves chunk by chunk, and a client that leaves still reaches the sim's receive."""
        path = f"/v1/{route}"
        scope = {**request.scope, "path": path, "raw_path": path.encode(), "root_path": ""}
        replayed = False
        status = 500

        async def receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await request.receive()

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await ep.sim(scope, receive, watched)
        return status


def runpod_sdk() -> ModuleType:
    """The `runpod` SDK, imported on first use (it takes over a second) with its import's logging setup
    undone: runpod/serverless/utils/rp_upload.py calls ``logging.basicConfig(level=INFO)``, a root handler
    that would print every INFO record for the rest of the session, and the package sets the levels of
    the uvicorn, urllib3, paramiko and backoff loggers."""
    root, names = logging.getLogger(), ("uvicorn", "urllib3", "paramiko", "backoff")
    handlers, level, levels = root.handlers[:], root.level, [logging.getLogger(n).level for n in names]
    import runpod as module  # type: ignore[import-untyped]

    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in zip(names, levels, strict=True):
        logging.getLogger(name).setLevel(old)
    sdk: ModuleType = module
    return sdk

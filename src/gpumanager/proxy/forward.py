"""Streaming one request to its host and the answer back, chunk by chunk, never buffered.

`Exchange` is what one client request has been told so far (headers sent? stream or not?), so that
an error is answered as a status when it can be, and in-band at the end of a stream when the
headers already went out. `forward()` sends the original bytes upstream and writes each upstream
chunk to the client as it arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import httpx
import msgspec
from loguru import logger

from gpumanager.errors import ClientError, ClientGone, ConnectFailed, PayloadTooLarge, RequestTimeout, UpstreamFailed
from gpumanager.fleet import Lease
from gpumanager.hosts import Host
from gpumanager.proxy.dialects import Dialect, error_body, error_headers, inband_error
from gpumanager.proxy.usage import Meter

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Scope = MutableMapping[str, Any]

# Never forwarded upstream: hop-by-hop headers, and the client's own credentials.
REQUEST_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"expect",
        b"accept-encoding",  # answers come back uncompressed, so their token counts can be read
    }
)
# Never passed back: hop-by-hop headers, and those uvicorn writes itself.
RESPONSE_DROP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade", "proxy-authenticate", "date", "server"}
)
STREAM_TYPES = (b"application/x-ndjson", b"text/event-stream")


class Exchange:
    """One client request on its way through."""

    __slots__ = (
        "completed",
        "completion_tokens",
        "dialect",
        "earlier_cost_micro",
        "earlier_gpu_seconds",
        "first_byte",
        "first_byte_at",
        "host",
        "last_read",
        "lease",
        "prompt_tokens",
        "send",
        "sent",
        "silence",
        "started",
        "status",
        "stream_asked",
        "streaming",
        "upstream_done",
        "wait_ms",
        "woke",
    )

    def __init__(self, send: Send, dialect: Dialect) -> None:
        self.send, self.dialect = send, dialect
        self.started = self.streaming = self.completed = False
        self.stream_asked = False  # the client asked for a stream
        self.status = 0
        self.host = ""
        self.wait_ms = 0.0
        self.last_read = 0.0  # when the host's last chunk arrived (anyio clock); 0 before the first
        self.lease: Lease | None = None  # the slot the answer streams from, while it does
        # What the slots of earlier attempts (a host that could not be reached) were charged.
        self.earlier_gpu_seconds = 0.0
        self.earlier_cost_micro = 0
        self.prompt_tokens: int | None = None  # read from the answer as it passed (None: not sent)
        self.completion_tokens: int | None = None
        # perf_counter marks: request sent upstream, first byte to the client, last upstream byte
        self.sent = self.first_byte = self.upstream_done = 0.0
        self.first_byte_at = 0.0  # the first byte's time on the anyio clock (that of hosts' `ready_since`)
        self.woke: Host | None = None  # the host this request waited for a wake of, and got
        self.silence: SilenceWatch | None = None  # ends the answer if its host falls silent

    def mark_first_byte(self) -> None:
        """The answer's first byte went to the client now (once; later calls change nothing)."""
        if not self.first_byte:
            self.first_byte, self.first_byte_at = time.perf_counter(), anyio.current_time()

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started, self.status = True, status
        for name, value in headers:
            if name == b"content-type":
                self.streaming = value.startswith(STREAM_TYPES)
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def finish(self, chunk: bytes = b"") -> None:
        self.completed = True
        await self.send({"type": "http.response.body", "body": chunk, "more_body": False})

    async def fail(self, exc: ClientError) -> None:
        """Answer an error: as a status while nothing was sent, else in-band at the end of the stream."""
        if not self.started:
            await self.start(exc.status, error_headers(exc))
            await self.finish(error_body(self.dialect, exc))
        elif self.streaming:
            await self.finish(inband_error(self.dialect, exc.message))
        else:
            # A plain body cut short: the response is left unfinished, so the server drops the
            # connection and the client sees a truncated answer, never a complete-looking one.
            logger.warning("answer from {} cut short: {}", self.host or "the host", exc.message)


class Alarm:
    """Calls `fire` `seconds` after `arm()`, unless re-armed or stopped first: one event-loop timer.

    The request path arms one per request; a cancel scope with a deadline costs several times as much
    (it is registered with the task and re-checked on every checkpoint).
    """

    __slots__ = ("_fire", "_handle", "_loop")

    def __init__(self, fire: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, seconds: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_later(seconds, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class SilenceWatch:
    """After a host's first byte, one timer per `idle` period checks that it sent something since;
    if not, `on_silent` ends the answer. The hot path only notes when each chunk arrived."""

    __slots__ = ("_alarm", "ex", "idle", "on_silent")

    def __init__(self, ex: Exchange, idle: float, on_silent: Callable[[Exchange], None]) -> None:
        self.ex, self.idle, self.on_silent = ex, idle, on_silent
        self._alarm: Alarm | None = None

    def start(self) -> None:
        self._alarm = Alarm(self._check)
        self._alarm.arm(self.idle)

    def stop(self) -> None:
        if self._alarm is not None:
            self._alarm.stop()

    def _check(self) -> None:
        quiet = anyio.current_time() - self.ex.last_read
        if quiet >= self.idle:
            self.on_silent(self.ex)
        elif self._alarm is not None:
            self._alarm.arm(self.idle - quiet)


def refuses_usage(error_body: bytes) -> bool:
    """Whether a host's 400 refused the `stream_options` it was sent (an older Ollama's OpenAI API)."""
    return b"stream_options" in error_body


def stop_asking_usage(host: Host) -> None:
    """The host refused `stream_options`: it is not asked again, and its streams go uncounted."""
    logger.bind(host=host.name).info("{} refuses stream_options: its streams go uncounted", host.name)
    host.stream_usage = False


class UsageRefused(Exception):
    """The host refused `stream_options` (added to count a stream's tokens): send it again without."""


class Upstream:
    """The one shared way to the hosts: httpx's API over aiohttp's transport.

    Proxied requests go straight to the transport: a client's auth, redirect and cookie handling
    have no place in a proxy and cost a sixth of its CPU per request. `client` (same transport)
    serves the inventory's plain reads. The pool has no connection limit of its own: slots bound
    the requests in flight, and a limit below the fleet's slots (aiohttp and httpx both default to
    100) would queue requests invisibly. Keep-alive connections expire before Ollama or nginx
    would drop them.
    """

    def __init__(self, *, read_timeout: float, connect_timeout: float = 10.0) -> None:
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0, ttl_dns_cache=60)
            return aiohttp.ClientSession(connector=connector)

        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout)
        self.transport = AiohttpTransport(client=session)
        self.timeouts = timeout.as_dict()
        self.client = httpx.AsyncClient(transport=self.transport, timeout=timeout)

    async def send(self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes) -> httpx.Response:
        request = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": self.timeouts})
        return await self.transport.handle_async_request(request)

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()


def upstream_headers(scope: MutableMapping[str, Any], extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = [(k, v) for k, v in scope["headers"] if k not in REQUEST_DROP]
    headers.append((b"accept-encoding", b"identity"))
    headers.extend(extra)
    return headers


def routing_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """Which host answered and how long the request waited for it; and when that host will be
    paused, if that is within `pause_warning_minutes` of this answer."""
    headers = [(b"x-gpumanager-host", ex.host.encode()), (b"x-gpumanager-wait-ms", str(round(ex.wait_ms)).encode())]
    lease = ex.lease
    if lease is not None:
        until = lease.fleet.reserved_until(lease.host)
        if until is not None:
            headers.append((b"x-gpumanager-reserved-until", until.encode()))
    return headers


def response_headers(response: httpx.Response, ex: Exchange) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in RESPONSE_DROP]
    return headers + routing_headers(ex)


async def forward(
    upstream: Upstream,
    ex: Exchange,
    lease: Lease,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    on_body: Callable[[Host, bytes], None] | None = None,
    before_end: Callable[[], Awaitable[None]] | None = None,
    meter: Meter | None = None,
) -> None:
    """Send one request to the lease's host and stream the answer to the client.

    Raises `ConnectFailed` when the host cannot be reached (nothing was sent to the client yet).
    `on_body`, when given, sees the whole body of a successful non-streamed answer (for caches).
    `before_end` runs after the last upstream byte and before the client sees the answer end, so
    what the client asks next sees its effects. `meter` reads the answer's token counts as it
    passes; `UsageRefused` says the host refused the `stream_options` the meter asked for.
    """
    ex.host, ex.lease = lease.host.name, lease
    ex.sent = time.perf_counter()
    response = await send_upstream(upstream, lease.host, method, target, headers, body)
    try:
        await _relay(response, ex, lease, on_body, before_end, meter)
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()


async def send_upstream(
    upstream: Upstream, host: Host, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> httpx.Response:
    """The host's response (headers read), or `ConnectFailed` / `UpstreamFailed` saying what happened."""
    try:
        return await upstream.send(method, host.url + target, headers, body)
    except (httpx.ConnectError, httpx.ConnectTimeout):
        raise ConnectFailed(f"cannot connect to host {host.name}") from None
    except httpx.TimeoutException:
        raise UpstreamFailed(f"host {host.name} did not answer in time") from None
    except httpx.HTTPError:
        raise UpstreamFailed(f"host {host.name} closed the connection before answering") from None


def mid_answer(host: Host, exc: httpx.HTTPError) -> UpstreamFailed:
    """A failure after the host began to answer, in words (no library internals)."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFailed(f"host {host.name} stopped sending mid-answer (upstream_read_timeout_seconds)")
    return UpstreamFailed(f"host {host.name} closed the connection mid-answer")


def refused(response: httpx.Response, host: Host, body: bytes) -> UpstreamFailed:
    """A host that refuses gpumanager's own credentials is gpumanager's problem, not the client's key."""
    return UpstreamFailed(
        f"host {host.name} refused gpumanager's credentials ({response.status_code}: "
        f"{_error_message(body) or 'no reason given'}); check GPUMANAGER_UPSTREAM_TOKEN, or the "
        "provider's key"
    )


async def _relay(
    response: httpx.Response,
    ex: Exchange,
    lease: Lease,
    on_body: Callable[[Host, bytes], None] | None,
    before_end: Callable[[], Awaitable[None]] | None,
    meter: Meter | None,
) -> None:
    if response.status_code in (401, 403):
        raise refused(response, lease.host, await response.aread())
    if response.status_code == 400 and meter is not None and meter.drop_usage:
        refusal = await response.aread()
        if refuses_usage(refusal):
            raise UsageRefused(lease.host.name)
        response = httpx.Response(400, headers=response.headers, content=refusal)
    if ex.started and response.status_code != 200:
        # Heartbeats already sent a 200: the upstream's error can only be told in-band.
        detail = _error_message(await response.aread())
        raise UpstreamFailed(f"host {lease.host.name} answered {response.status_code}: {detail}")
    if not ex.started:
        await ex.start(response.status_code, response_headers(response, ex))
    kept: list[bytes] | None = [] if on_body is not None and response.status_code == 200 else None
    if meter is not None and response.status_code != 200:
        meter = None  # an error body carries no counts
    try:
        async for chunk in response.aiter_raw():
            ex.last_read = anyio.current_time()
            if meter is not None:
                chunk = meter.feed(chunk)
                if not chunk:
                    continue
            await ex.write(chunk)
            if not ex.first_byte:
                ex.mark_first_byte()
                if ex.silence is not None:
                    ex.silence.start()
            if kept is not None:
                kept.append(chunk)
    except httpx.HTTPError as exc:
        raise mid_answer(lease.host, exc) from None
    ex.upstream_done = time.perf_counter()
    if meter is not None:
        rest = meter.finish()
        ex.prompt_tokens, ex.completion_tokens = meter.prompt, meter.completion
        if rest:
            await ex.write(rest)
    if before_end is not None:
        await before_end()
    await ex.finish()
    if kept is not None and on_body is not None:
        on_body(lease.host, b"".join(kept))


class _ErrorAnswer(msgspec.Struct):
    error: Any = None


_error_decoder = msgspec.json.Decoder(_ErrorAnswer)


def _error_message(body: bytes) -> str:
    try:
        error = _error_decoder.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return body[:200].decode("utf-8", "replace")
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error) if error else body[:200].decode("utf-8", "replace")


async def read_body(scope: Scope, receive: Receive, limit: int, stall: float) -> bytes:
    """The whole request body, refused with 413 past `limit` (before reading, when the length is known),
    and with 408 when the client sends nothing for `stall` seconds between two reads (uvicorn has no
    such timer: a client that stops mid-body would hold its connection forever)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body over {limit // 2**20} MB ([server] max_body_mb)")
    body: bytes | None = None
    with anyio.CancelScope() as stalled:
        alarm = Alarm(stalled.cancel)  # re-armed with every message received
        try:
            body = await _read_body(receive, limit, stall, alarm)
        finally:
            alarm.stop()
    if body is None:
        raise RequestTimeout(f"the request body stalled for {stall:g}s ([server] client_timeout_seconds)")
    return body


async def _read_body(receive: Receive, limit: int, stall: float, alarm: Alarm) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        alarm.arm(stall)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if not message.get("more_body", False) and not chunks:
            if len(chunk) > limit:
                raise PayloadTooLarge(f"request body over {limit // 2**20} MB ([server] max_body_mb)")
            return bytes(chunk)  # the usual case: one message
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit // 2**20} MB ([server] max_body_mb)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)

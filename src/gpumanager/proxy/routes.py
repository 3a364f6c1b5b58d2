"""The proxy's routes: the Ollama API and the OpenAI API, and nothing else (not an open proxy).

Generation, embeddings and `/api/show` are routed by model to a host with a free slot; model lists,
loaded models and the version are answered by gpumanager itself from the inventory; model
management (`/api/pull`, ...) is for admins only, aimed at one host with `?host=NAME`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import anyio
import msgspec
from loguru import logger
from starlette.routing import BaseRoute, Route

from gpumanager.auth import require_admin
from gpumanager.budget import Budget
from gpumanager.errors import (
    BadRequest,
    ClientError,
    ClientGone,
    ConnectFailed,
    InternalError,
    NotFound,
    ProviderError,
    UpstreamFailed,
    WakeTimeout,
)
from gpumanager.fleet import Fleet, Lease
from gpumanager.hosts import Host
from gpumanager.inventory import Inventory
from gpumanager.logs import clean
from gpumanager.proxy import translate, usage
from gpumanager.proxy.dialects import STREAM_CONTENT_TYPE, Dialect, heartbeat, parse_fields
from gpumanager.proxy.forward import (
    Exchange,
    Receive,
    Scope,
    SilenceWatch,
    Upstream,
    UsageRefused,
    forward,
    read_body,
    stop_asking_usage,
    upstream_headers,
)
from gpumanager.proxy.local import local_routes
from gpumanager.recorder import Recorder, RequestRecord
from gpumanager.scheduler import Ask, Waiter


class Readier(Protocol):
    """Makes a host ready for an admin's operation (waking it if needed, on that admin's bill), or
    raises `WakeFailed` (`Lifecycle.ensure_ready`)."""

    async def ensure_ready(
        self, host: Host, model: str | None = None, *, by: str | None = None, admin: bool = False
    ) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ProxyParts:
    """What the proxy's routes use of the running system, and nothing more."""

    fleet: Fleet
    inventory: Inventory
    upstream: Upstream
    upstream_auth: list[tuple[bytes, bytes]]  # the fleet's own token for hosts, if one is set
    max_body: int  # bytes
    client_timeout_seconds: float  # longest stall of a request body between two reads (408 past it)
    upstream_idle_seconds: float  # longest silence of a host mid-answer
    keepalive_seconds: float  # a waiting stream's heartbeat interval
    readier: Readier  # wakes the host that model management is aimed at
    refresh: Callable[[Host], Awaitable[None]]  # re-reads a host's models after model management
    recorder: Recorder  # told of every finished request
    budget: Budget  # each key's limits and budgets, checked at admission


def _target(scope: Scope) -> str:
    """The upstream path: the client's own, and never its query string (the routes take none, and a
    key a client puts in a URL must not leave gpumanager)."""
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    return path.decode("latin-1")


class _ShowFields(msgspec.Struct):
    verbose: bool = False


_show_decoder = msgspec.json.Decoder(_ShowFields)


def _verbose(body: bytes) -> bool:
    try:
        return _show_decoder.decode(body).verbose
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequest("`verbose` must be a boolean") from None


def _record(scope: Scope, ex: Exchange, model: str, status: int, started: float) -> RequestRecord:
    end = time.perf_counter()
    wait = ex.wait_ms / 1000
    overhead = None
    if ex.sent and ex.upstream_done:  # receipt -> sent upstream (less the wait), upstream end -> client end
        overhead = max(0.0, ex.sent - started - wait) + max(0.0, end - ex.upstream_done)
    return RequestRecord(
        route=scope["path"],
        model=model,
        status=status,
        key=scope["auth"].id,
        host=ex.host if ex.host != "cache" else "",
        wait_seconds=wait,
        first_byte_seconds=ex.first_byte - started if ex.first_byte else None,
        duration_seconds=end - started,
        overhead_seconds=overhead,
        prompt_tokens=ex.prompt_tokens,
        completion_tokens=ex.completion_tokens,
        gpu_seconds=ex.earlier_gpu_seconds + (ex.lease.gpu_seconds if ex.lease is not None else 0.0),
        cost_micro=ex.earlier_cost_micro + (ex.lease.cost_micro if ex.lease is not None else 0),
    )


class ModelRoute:
    """A route forwarded to a host chosen by the request's `model` (raw ASGI: this is the hot path)."""

    def __init__(self, parts: ProxyParts, route: str, dialect: Dialect, *, streams: bool, stream_default: bool) -> None:
        self.parts, self.route, self.dialect = parts, route, dialect
        self.streams, self.stream_default = streams, stream_default

    async def __call__(self, scope: Scope, receive: Receive, send: Any) -> None:
        started = time.perf_counter()
        ex = Exchange(send, self.dialect)
        ex.silence = SilenceWatch(ex, self.parts.upstream_idle_seconds, self._silent)
        model = "-"
        try:
            body = await read_body(scope, receive, self.parts.max_body, self.parts.client_timeout_seconds)
            fields = parse_fields(body, legacy_name=self.route == "show")
            model = fields.model
            asked = fields.stream if fields.stream is not None else self.stream_default
            ex.stream_asked = self.streams and asked
            terms = self.parts.budget.admit(scope["auth"], model)  # limits and budgets: refused here, or terms
            ask = Ask(
                model,
                scope["auth"].id,
                fields.options.num_ctx if fields.options else None,
                no_wake=terms.no_wake,
                max_concurrent=terms.max_concurrent,
            )
            on_body = None
            if self.route == "show" and not _verbose(body):
                if await self._cached_show(ex, ask):
                    return
                on_body = self._remember_show(ask.model)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, receive, tg.cancel_scope)
                await self._serve(scope, ex, ask, body, on_body)
                tg.cancel_scope.cancel()
        except ClientError as exc:
            await ex.fail(exc)
        except ClientGone:
            pass
        except Exception as exc:  # a bug: logged once here, answered 500 (or in-band) in the client's dialect
            logger.opt(exception=exc).error("unexpected error on {} {}", scope["method"], scope["path"])
            await ex.fail(InternalError())
        finally:
            ex.silence.stop()
            status = ex.status if ex.completed else 499
            logger.info(
                "{} {} key={} model={} host={} status={} wait_ms={:.0f} ms={:.0f} tokens={}/{}",
                scope["method"],
                scope["path"],
                scope["auth"].id,
                clean(model, 100),
                ex.host or "-",
                status,
                ex.wait_ms,
                (time.perf_counter() - started) * 1000,
                "-" if ex.prompt_tokens is None else ex.prompt_tokens,
                "-" if ex.completion_tokens is None else ex.completion_tokens,
            )
            self.parts.recorder.request(_record(scope, ex, model, status, started))
            woke = ex.woke
            if woke is not None and woke.ready_since is not None and ex.first_byte_at:
                self.parts.recorder.wake_phase(woke.name, "first_byte", ex.first_byte_at - woke.ready_since)

    async def _watch(self, receive: Receive, done: anyio.CancelScope) -> None:
        """End the exchange when the client disconnects."""
        while (await receive())["type"] != "http.disconnect":
            pass
        done.cancel()

    def _silent(self, ex: Exchange) -> None:
        """The host sent nothing for `upstream_idle_seconds` after its first byte: end the answer
        (in-band error) and skip the host until it answers a probe again."""
        lease = ex.lease
        if lease is not None and not lease.released:
            reason = f"host {lease.host.name} sent nothing for {self.parts.upstream_idle_seconds:g}s mid-answer"
            self.parts.inventory.mark_unhealthy(lease.host, reason)
            lease.abort(reason)

    async def _serve(
        self,
        scope: Scope,
        ex: Exchange,
        ask: Ask,
        body: bytes,
        on_body: Callable[[Host, bytes], None] | None,
    ) -> None:
        try:
            await self._forward(scope, ex, ask, body, on_body)
        except ClientError as exc:
            await ex.fail(exc)

    async def _forward(
        self,
        scope: Scope,
        ex: Exchange,
        ask: Ask,
        body: bytes,
        on_body: Callable[[Host, bytes], None] | None,
    ) -> None:
        parts = self.parts
        arrived = time.perf_counter()
        lease = await self._lease(ex, ask)
        ex.wait_ms = (time.perf_counter() - arrived) * 1000
        for attempt in (1, 2):
            try:
                with lease, anyio.CancelScope() as lease.scope:
                    await self._send(scope, ex, lease, ask, body, on_body)
            except ConnectFailed as exc:
                ex.earlier_gpu_seconds += lease.gpu_seconds  # its slot was held, and billed, meanwhile
                ex.earlier_cost_micro += lease.cost_micro
                parts.inventory.mark_unhealthy(lease.host, str(exc))
                if attempt == 2:
                    raise UpstreamFailed(str(exc)) from None
                try:  # once more, on another host: the unhealthy one is skipped now
                    lease = await self._lease(ex, ask)
                except ClientError:
                    raise UpstreamFailed(str(exc)) from None
            else:
                if lease.aborted:
                    raise UpstreamFailed(lease.aborted)
                return

    async def _send(
        self,
        scope: Scope,
        ex: Exchange,
        lease: Lease,
        ask: Ask,
        body: bytes,
        on_body: Callable[[Host, bytes], None] | None,
    ) -> None:
        host, parts = lease.host, self.parts
        headers = upstream_headers(scope, host.auth if host.auth is not None else parts.upstream_auth)
        if host.api == "openai" and self.dialect is Dialect.OLLAMA:
            await translate.forward(parts.upstream, ex, lease, self.route, ask.model, headers, body)
            return
        if host.api == "openai":
            body = translate.with_listed_model(body, host.models, ask.model)
        target = _target(scope)
        streams = ex.stream_asked
        if streams and self.dialect is Dialect.OPENAI and host.stream_usage and not usage.asks_for_usage(body):
            try:  # count this stream's tokens too: ask for the usage event, and keep it from the client
                meter = usage.Meter(streaming=True, drop_usage=True)
                await forward(parts.upstream, ex, lease, "POST", target, headers, usage.with_usage(body), meter=meter)
                return
            except UsageRefused:
                stop_asking_usage(host)
        meter = usage.Meter(streaming=streams)
        await forward(parts.upstream, ex, lease, scope["method"], target, headers, body, on_body, meter=meter)

    async def _lease(self, ex: Exchange, ask: Ask) -> Lease:
        fleet = self.parts.fleet
        while True:  # again only when another replica took the slot meanwhile (the fleet then knows)
            got = fleet.admit(ask)
            lease = got if isinstance(got, Lease) else await self._wait(ex, got, ask)
            if await fleet.take(lease):
                return lease

    async def _wait(self, ex: Exchange, waiter: Waiter, ask: Ask) -> Lease:
        """Wait for a slot; a streaming client gets its headers early and a heartbeat now and then."""
        patience = self.parts.keepalive_seconds if ex.stream_asked else None
        try:
            while True:
                lease = await self.parts.fleet.wait(waiter, patience)
                if lease is not None:
                    if lease.host.name in waiter.waking:
                        ex.woke = lease.host  # the wake's last phase ends with this request's first byte
                    return lease
                if not ex.started:
                    await ex.start(
                        200, [(b"content-type", STREAM_CONTENT_TYPE[self.dialect]), (b"cache-control", b"no-cache")]
                    )
                waiting_for = next(iter(sorted(waiter.waking)), "a free slot")
                await ex.write(heartbeat(self.dialect, self.route, ask.model, waiting_for))
        except BaseException:  # gone while a heartbeat was written: leave the queue (or free the slot)
            self.parts.fleet.abandon(waiter)
            raise

    async def _cached_show(self, ex: Exchange, ask: Ask) -> bool:
        hosts = [h.name for h in self.parts.fleet.candidates(ask.model)]
        answer = self.parts.inventory.show(hosts, ask.model)
        if answer is None:
            return False
        ex.host = "cache"
        await ex.start(200, [(b"content-type", b"application/json; charset=utf-8"), (b"x-gpumanager-host", b"cache")])
        await ex.finish(msgspec.json.encode(answer))
        return True

    def _remember_show(self, model: str) -> Callable[[Host, bytes], None]:
        """Keep a host's non-verbose `/api/show` answer, so later ones need no host (nor a wake)."""

        def remember(host: Host, body: bytes) -> None:
            with contextlib.suppress(msgspec.DecodeError):  # not JSON: nothing worth keeping
                self.parts.inventory.remember_show(host, model, msgspec.json.decode(body))

        return remember


class HostRoute:
    """Model management on one host, for admins: `/api/pull?host=NAME` and friends.

    A paused host is woken first; the host is held (it is not paused meanwhile) without taking a
    slot, and its inventory is read again afterwards.
    """

    def __init__(self, parts: ProxyParts) -> None:
        self.parts = parts

    async def __call__(self, scope: Scope, receive: Receive, send: Any) -> None:
        parts, ex = self.parts, Exchange(send, Dialect.OLLAMA)
        started = time.perf_counter()
        model = "-"
        try:
            identity = require_admin(scope)
            name = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("host", [""])[0]
            if not name:
                raise BadRequest(
                    f"{scope['path']} changes one host: add ?host=NAME (hosts: {', '.join(sorted(parts.fleet.hosts))})"
                )
            host = parts.fleet.find(name)
            if host is None:
                raise NotFound(f"no host named {name!r}")
            if host.api == "openai":
                raise BadRequest(
                    f"{host.name} is an OpenAI-compatible endpoint: its models are managed by its "
                    "provider, not through the Ollama API"
                )
            body = await read_body(scope, receive, parts.max_body, parts.client_timeout_seconds)
            model = _named_model(body)
            await parts.readier.ensure_ready(host, by=identity.id, admin=True)
            with parts.fleet.hold(host, identity.id) as lease:
                await forward(
                    parts.upstream,
                    ex,
                    lease,
                    scope["method"],
                    _target(scope),
                    upstream_headers(scope, parts.upstream_auth),
                    body,
                    before_end=lambda: parts.refresh(host),
                )
        except ClientError as exc:
            await ex.fail(exc)
        except ConnectFailed as exc:
            await ex.fail(UpstreamFailed(str(exc)))
        except ProviderError as exc:
            await ex.fail(WakeTimeout(str(exc)))
        except ClientGone:
            pass
        except Exception as exc:  # a bug: logged once here, answered 500 (or in-band)
            logger.opt(exception=exc).error("unexpected error on {} {}", scope["method"], scope["path"])
            await ex.fail(InternalError())
        finally:
            status = ex.status if ex.completed else 499
            logger.info(
                "{} {} key={} host={} status={} ms={:.0f}",
                scope["method"],
                scope["path"],
                scope["auth"].id,
                ex.host or "-",
                status,
                (time.perf_counter() - started) * 1000,
            )
            parts.recorder.request(_record(scope, ex, model, status, started))  # the admin pays its GPU time


class _NamedModel(msgspec.Struct):
    model: str = ""
    name: str = ""  # the older field of /api/pull, /api/delete...


_named_model_decoder = msgspec.json.Decoder(_NamedModel)


def _named_model(body: bytes) -> str:
    """The model a model-management request names ("-" if none): only for the record, so never an error."""
    try:
        fields = _named_model_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "-"
    return fields.model or fields.name or "-"


def proxy_routes(parts: ProxyParts) -> list[BaseRoute]:
    ollama, openai = Dialect.OLLAMA, Dialect.OPENAI

    def model_route(path: str, route: str, dialect: Dialect, *, streams: bool, stream_default: bool) -> Route:
        endpoint = ModelRoute(parts, route, dialect, streams=streams, stream_default=stream_default)
        return Route(path, endpoint, methods=["POST"])

    host_route = HostRoute(parts)
    return [
        model_route("/api/chat", "chat", ollama, streams=True, stream_default=True),
        model_route("/api/generate", "generate", ollama, streams=True, stream_default=True),
        model_route("/api/embed", "embed", ollama, streams=False, stream_default=False),
        model_route("/api/embeddings", "embeddings", ollama, streams=False, stream_default=False),
        model_route("/api/show", "show", ollama, streams=False, stream_default=False),
        model_route("/v1/chat/completions", "chat", openai, streams=True, stream_default=False),
        model_route("/v1/completions", "generate", openai, streams=True, stream_default=False),
        model_route("/v1/embeddings", "embeddings", openai, streams=False, stream_default=False),
        Route("/api/pull", host_route, methods=["POST"]),
        Route("/api/push", host_route, methods=["POST"]),
        Route("/api/create", host_route, methods=["POST"]),
        Route("/api/copy", host_route, methods=["POST"]),
        Route("/api/delete", host_route, methods=["DELETE"]),
        *local_routes(parts.fleet, parts.inventory),
    ]

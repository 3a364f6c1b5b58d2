"""build_app(config): the Starlette app, whose lifespan owns one task group for every background loop."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from loguru import logger
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gpumanager.admin import admin_routes
from gpumanager.auth import PUBLIC_PATHS, AuthMiddleware
from gpumanager.config import Config
from gpumanager.dashboard import dashboard_routes
from gpumanager.errors import ClientError, InternalError, MethodNotAllowed, NoCapacity, NotFound
from gpumanager.events_api import events_route
from gpumanager.hosts import HostState
from gpumanager.logs import clean
from gpumanager.metrics import metrics_route
from gpumanager.proxy.dialects import dialect_for, error_body, error_headers
from gpumanager.proxy.jobs import job_routes
from gpumanager.proxy.routes import proxy_routes
from gpumanager.runtime import Runtime
from gpumanager.usage_api import usage_routes


def _health_route(runtime: Runtime) -> Route:
    fleet = runtime.fleet

    async def health(request: Request) -> Response:
        hosts = fleet.hosts.values()
        return JSONResponse(
            {
                "status": "draining" if runtime.draining else "ok",
                "hosts": len(hosts),
                "ready": sum(h.state is HostState.READY for h in hosts),
                "emergency": fleet.emergency,
            }
        )

    return Route("/health", health, methods=["GET", "HEAD"])


class Guard:
    """The outermost layer of the app.

    While gpumanager drains for a shutdown, new requests get 503 with `Retry-After` (`/health`
    still answers, saying so). An error that no route handled is logged once, with its traceback,
    and answered 500 in the route's dialect: Starlette's own last-resort handler re-raises after
    answering, so the server would log the same error a second time.
    """

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.runtime.draining and scope["path"] != "/health":
            await _answer(send, scope["path"], NoCapacity("gpumanager is shutting down; try again", retry_after=5))
            return
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            logger.opt(exception=exc).error("unexpected error on {} {}", scope["method"], clean(scope["path"]))
            with contextlib.suppress(Exception):  # fails when the answer had begun: the connection just ends
                await _answer(send, scope["path"], InternalError())


async def _answer(send: Send, path: str, exc: ClientError) -> None:
    await send({"type": "http.response.start", "status": exc.status, "headers": error_headers(exc)})
    await send({"type": "http.response.body", "body": error_body(dialect_for(path), exc)})


class OnlyWithOrigin:
    """Browsers send `Origin`; other clients (the most requests) skip the CORS layer entirely."""

    def __init__(self, app: ASGIApp, cors: ASGIApp) -> None:
        self.app, self.cors = app, cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, _ in scope["headers"]:
                if name == b"origin":
                    await self.cors(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def cors(origins: list[str]) -> Middleware:
    """Starlette's CORS for `[server] cors_origins`: exact origins, `*` wildcards (`http://localhost:*`
    is any port), or `["*"]`. Every request header is allowed (browser clients such as openai-node send
    `X-Stainless-*` headers besides `Authorization`); credentials never are."""
    exact = [o for o in origins if "*" not in o]
    patterns = [_origin_pattern(o) for o in origins if "*" in o and o != "*"]
    return Middleware(
        _cors_for_origins_only,
        allow_origins=["*"] if "*" in origins else exact,
        allow_origin_regex="|".join(patterns) or None,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,
        expose_headers=["x-gpumanager-host", "x-gpumanager-wait-ms", "retry-after"],
        max_age=600,
    )


def _cors_for_origins_only(app: ASGIApp, /, **options: Any) -> ASGIApp:
    return OnlyWithOrigin(app, CORSMiddleware(app, **options))


def _origin_pattern(origin: str) -> str:
    """`http://localhost:*` -> any port; `app://*` -> anything after the scheme."""
    parts = [re.escape(piece) for piece in origin.split("*")]
    pattern = parts[0]
    for piece in parts[1:]:
        pattern += ("[0-9]+" if pattern.endswith(":") else "[^/\\s]*") + piece
    return f"(?:{pattern})"


async def _client_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientError)
    return Response(
        error_body(dialect_for(request.url.path), exc),
        status_code=exc.status,
        headers={k.decode(): v.decode() for k, v in error_headers(exc)},
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    error: ClientError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"method {request.method} is not allowed on {path}")
    elif exc.status_code == 404:
        error = NotFound(f"no route {path}: gpumanager serves the Ollama API (/api/...) and the OpenAI API (/v1/...)")
    else:
        error = ClientError(str(exc.detail))
        error.status = exc.status_code
    return await _client_error(request, error)


def build_app(config: Config, *, environ: Mapping[str, str] | None = None) -> Starlette:
    """The app; `app.state.runtime` is the running system its lifespan starts and stops."""
    runtime = Runtime(config, os.environ if environ is None else environ)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            yield
            tg.cancel_scope.cancel()

    routes = [
        _health_route(runtime),
        *proxy_routes(runtime.proxy_parts()),
        *job_routes(runtime.job_parts()),
        *admin_routes(runtime.fleet, runtime.lifecycle, runtime.reconciler.reconcile, runtime.budget),
        metrics_route(runtime.metrics, public=config.metrics.public),
        events_route(
            runtime.fleet,
            runtime.events,
            heartbeat=config.events.heartbeat_seconds,
            closing=lambda: runtime.draining,
        ),
        *usage_routes(config, runtime.keys, runtime.ledger.path, runtime.budget),
        *dashboard_routes(runtime.dashboard_parts()),
    ]
    public = PUBLIC_PATHS | ({"/metrics"} if config.metrics.public else set())
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(Guard, runtime=runtime),
            cors(config.server.cors_origins),  # before the key check: a preflight carries no key
            Middleware(
                AuthMiddleware,
                keys=runtime.keys,
                public=public,
                sessions=runtime.sessions,
                public_url=config.server.public_url,
            ),
        ],
        exception_handlers={ClientError: _client_error, HTTPException: _http_error},
    )
    app.router.redirect_slashes = False  # a redirect would be built from the client's Host header
    app.state.runtime = runtime
    return app

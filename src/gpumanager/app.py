"""build_app(config): the Starlette app, whose lifespan owns one task group for every background loop."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
from loguru import logger
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpumanager.admin import admin_routes
from gpumanager.auth import AuthMiddleware
from gpumanager.config import Config
from gpumanager.errors import ClientError, MethodNotAllowed, NotFound
from gpumanager.fleet import Fleet
from gpumanager.hosts import HostState
from gpumanager.proxy.dialects import dialect_for, error_body, error_headers
from gpumanager.proxy.routes import proxy_routes
from gpumanager.runtime import Runtime


def _health_route(fleet: Fleet) -> Route:
    async def health(request: Request) -> Response:
        hosts = fleet.hosts.values()
        return JSONResponse(
            {
                "status": "ok",
                "hosts": len(hosts),
                "ready": sum(h.state is HostState.READY for h in hosts),
                "emergency": fleet.emergency,
            }
        )

    return Route("/health", health, methods=["GET", "HEAD"])


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


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.opt(exception=exc).error("unexpected error on {} {}", request.method, request.url.path)
    return JSONResponse({"error": "internal error in gpumanager; see its log"}, status_code=500)


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
        _health_route(runtime.fleet),
        *proxy_routes(runtime.proxy_parts()),
        *admin_routes(runtime.fleet, runtime.lifecycle, runtime.reconciler.reconcile),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(AuthMiddleware, keys=runtime.keys)],
        exception_handlers={ClientError: _client_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.runtime = runtime
    return app

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
from gpumanager.inventory import Inventory
from gpumanager.keys import KeyStore
from gpumanager.lifecycle import Lifecycle
from gpumanager.providers import build_providers
from gpumanager.proxy.dialects import dialect_for, error_body, error_headers
from gpumanager.proxy.forward import Upstream
from gpumanager.proxy.routes import proxy_routes

UPSTREAM_TOKEN_ENV = "GPUMANAGER_UPSTREAM_TOKEN"


class Context:
    """Everything a request handler needs, made once per app."""

    def __init__(self, config: Config, environ: Mapping[str, str]) -> None:
        self.config = config
        self.max_body = int(config.server.max_body_mb * 2**20)
        self.keys = KeyStore(config.paths.api_keys_file)
        token = environ.get(UPSTREAM_TOKEN_ENV, "")
        self.upstream_auth = [(b"authorization", b"Bearer " + token.encode())] if token else []
        self.upstream = Upstream(read_timeout=config.timing.upstream_read_timeout_seconds)
        self.inventory = Inventory(
            config.paths.state_dir,
            self.upstream.client,
            probe_timeout=config.timing.probe_timeout_seconds,
            upstream_headers={"authorization": f"Bearer {token}"} if token else None,
        )
        self.fleet = Fleet(config)
        self.providers = build_providers(config, environ, self.upstream.client)
        self.lifecycle = Lifecycle(config, self.fleet, self.providers, self.inventory)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with self.upstream, anyio.create_task_group() as tg:
            await tg.start(self.lifecycle.run)
            if not self.keys.records():
                logger.warning("no API keys in {}: make one with `gpumanager generate-key`", self.keys.path)
            logger.info(
                "gpumanager is ready: {} hosts, models: {}",
                len(self.fleet.hosts),
                ", ".join(self.fleet.models()) or "none yet",
            )
            yield
            tg.cancel_scope.cancel()


async def _health(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    hosts = ctx.fleet.hosts.values()
    return JSONResponse(
        {
            "status": "ok",
            "hosts": len(hosts),
            "ready": sum(h.state == "ready" for h in hosts),
            "emergency": ctx.fleet.emergency,
        }
    )


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
    ctx = Context(config, os.environ if environ is None else environ)
    routes = [Route("/health", _health, methods=["GET", "HEAD"]), *proxy_routes(ctx), *admin_routes(ctx)]
    app = Starlette(
        routes=routes,
        lifespan=ctx.lifespan,
        middleware=[Middleware(AuthMiddleware, keys=ctx.keys)],
        exception_handlers={ClientError: _client_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.ctx = ctx
    return app

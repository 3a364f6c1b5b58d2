"""What gpumanager answers itself, from the inventory: model lists, loaded models, the version.

`/api/tags` and `/v1/models` list every model of the fleet, paused hosts' included, so clients see
every model even when everything sleeps; a key limited to some models (`Limits.models`) sees only those.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from gpumanager.fleet import Fleet
from gpumanager.hosts import Host
from gpumanager.inventory import DEFAULT_VERSION, Inventory
from gpumanager.keys import Identity
from gpumanager.models import model_names
from gpumanager.proxy.dialects import Dialect, error_payload


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("-")[0].split("."):
        parts.append(int(part) if part.isdigit() else 0)
    return tuple(parts)


def _created(modified_at: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(modified_at).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _openai_model(tag: dict[str, Any]) -> dict[str, Any]:
    name = str(tag.get("name") or tag.get("model"))
    owner = name.split("/", 1)[0] if "/" in name else "library"
    return {"id": name, "object": "model", "created": _created(tag.get("modified_at")), "owned_by": owner}


def _mine(request: Request, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of models the caller's key may use."""
    who: Identity = request.scope["auth"]
    if who.limits.models is None:
        return entries
    return [e for e in entries if who.limits.allows(model_names(str(e.get("name") or e.get("model"))))]


def local_routes(fleet: Fleet, inventory: Inventory) -> list[BaseRoute]:
    def hosts() -> list[Host]:
        return list(fleet.hosts.values())

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        seen = [h.version for h in hosts() if h.version]
        return JSONResponse({"version": max(seen, key=_version_key) if seen else DEFAULT_VERSION})

    async def tags(request: Request) -> Response:
        return JSONResponse({"models": _mine(request, inventory.tag_entries(hosts()))})

    async def ps(request: Request) -> Response:
        return JSONResponse({"models": _mine(request, inventory.ps_entries(hosts()))})

    async def models(request: Request) -> Response:
        data = [_openai_model(tag) for tag in _mine(request, inventory.tag_entries(hosts()))]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        wanted = request.path_params["model"]
        tags = {str(t.get("name") or t.get("model")): t for t in _mine(request, inventory.tag_entries(hosts()))}
        for name in model_names(wanted):
            if name in tags:  # the id as the client asked for it (`llama3.2`, not `llama3.2:latest`), as Ollama does
                return JSONResponse({**_openai_model(tags[name]), "id": wanted})
        return JSONResponse(
            error_payload(
                Dialect.OPENAI,
                f"The model '{wanted}' does not exist",
                kind="invalid_request_error",
                code="model_not_found",
                param="model",
            ),
            status_code=404,
        )

    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
    ]

"""The management API, for admin keys only: discover, status, resume, pause, protect, emergency-off.

`GET /gpu/discover` answers `{"discovered_gpus": N, "gpus": [...]}`, the shape the first users
already script against; `status` is gpumanager's host state, with the provider's own word in
`cloud_status`. A static host's id is its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gpumanager.auth import require_admin
from gpumanager.errors import Conflict, NotFound
from gpumanager.hosts import Host, HostState

if TYPE_CHECKING:
    from gpumanager.app import Context

ASLEEP = (HostState.PAUSED, HostState.UNKNOWN, HostState.FAILED)


def admin_routes(ctx: Context) -> list[BaseRoute]:
    fleet, lifecycle = ctx.fleet, ctx.lifecycle

    def gpu(host: Host) -> dict[str, Any]:
        info = fleet.describe(host)
        info.setdefault("ip_address", host.url)
        info.setdefault("flavor", "static" if host.always_on else "")
        info["can_resume"] = not host.always_on and host.state in ASLEEP and not fleet.emergency
        info["can_pause"] = not host.always_on and host.state not in (HostState.PAUSED, HostState.PAUSING)
        return info

    def find(request: Request) -> Host:
        require_admin(request.scope)
        ident = request.path_params["id"]
        host = fleet.find(ident)
        if host is None:
            raise NotFound(f"no host with id or name {ident!r}")
        return host

    async def discover(request: Request) -> Response:
        require_admin(request.scope)
        await lifecycle.watch.reconcile()  # fresh from the clouds, as the name promises
        gpus = [gpu(h) for h in fleet.hosts.values()]
        return JSONResponse(
            {"discovered_gpus": len(gpus), "gpus": gpus, "emergency": fleet.emergency, "queued": len(fleet.queue)}
        )

    async def status(request: Request) -> Response:
        return JSONResponse(gpu(find(request)))

    async def resume(request: Request) -> Response:
        host = find(request)
        if host.always_on:
            raise Conflict(f"{host.name} is a static host: it is always on")
        if host.state is HostState.READY and not host.draining:
            return JSONResponse({**gpu(host), "message": f"{host.name} is already ready"})
        lifecycle.start_wake(host)  # Conflict under emergency-off
        return JSONResponse({**gpu(host), "message": f"waking {host.name}"}, status_code=202)

    async def pause(request: Request) -> Response:
        host = find(request)
        if host.state in (HostState.PAUSED, HostState.PAUSING) or host.pausing is not None:
            raise Conflict(f"{host.name} is {host.state}: there is nothing to pause")
        lifecycle.request_pause(host, "an admin asked")  # Conflict for static hosts
        leases = len(fleet.leases_of(host))
        message = f"pausing {host.name}" + (f" once its {leases} open requests finish" if leases else "")
        return JSONResponse({**gpu(host), "message": message}, status_code=202)

    async def protect(request: Request) -> Response:
        host = find(request)
        host.protected = request.method == "POST"
        fleet.notify()
        return JSONResponse(gpu(host))

    async def emergency_off(request: Request) -> Response:
        require_admin(request.scope)
        await lifecycle.emergency_off()
        return JSONResponse(
            {
                "emergency": True,
                "message": "pausing every host; wakes are refused until POST /gpu/emergency-on",
                "gpus": [gpu(h) for h in fleet.hosts.values()],
            },
            status_code=202,
        )

    async def emergency_on(request: Request) -> Response:
        require_admin(request.scope)
        lifecycle.emergency_on()
        return JSONResponse({"emergency": False, "message": "hosts are woken on demand again"})

    return [
        Route("/gpu/discover", discover, methods=["GET"]),
        Route("/gpu/emergency-off", emergency_off, methods=["POST"]),
        Route("/gpu/emergency-on", emergency_on, methods=["POST"]),
        Route("/gpu/{id}/status", status, methods=["GET"]),
        Route("/gpu/{id}/resume", resume, methods=["POST"]),
        Route("/gpu/{id}/pause", pause, methods=["POST"]),
        Route("/gpu/{id}/protect", protect, methods=["POST", "DELETE"]),
    ]

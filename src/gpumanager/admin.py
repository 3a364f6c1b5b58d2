"""The management API, for admin keys only: discover, status, resume, pause, protect, emergency-off,
and the fleet's budget (`GET /gpu/budget`, `POST /gpu/budget/override`).

`GET /gpu/discover` answers `{"discovered_gpus": N, "gpus": [...]}`, the shape the first users
already script against; `status` is gpumanager's host state, with the provider's own word in
`cloud_status`. A static host's id is its name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gpumanager.auth import require_admin
from gpumanager.budget import Budget
from gpumanager.errors import NotFound
from gpumanager.fleet import Fleet
from gpumanager.hosts import RESUMABLE, Host, HostState
from gpumanager.lifecycle import Lifecycle


def describe(host: Host, now: float) -> dict[str, Any]:
    """One host as the admin API and `gpumanager hosts` show it."""
    idle_left = None
    if not host.always_on and host.state is HostState.READY:
        idle_left = round(max(0.0, host.idle_deadline - now), 1)
    return {
        "id": host.id,
        "name": host.name,
        "provider": host.provider,
        "status": str(host.state),
        "cloud_status": host.cloud_status,
        "healthy": host.healthy,
        "url": host.url,
        "models": sorted(host.models),
        "loaded": sorted(host.loaded),
        "leases": host.leases,
        "slots": host.slots,
        "draining": host.draining,
        "protected": host.protected,
        "cost_per_hour": host.cost_per_hour,
        "version": host.version,
        "idle_seconds_left": idle_left,
        "last_error": host.last_error,
        **host.details,
    }


def host_view(fleet: Fleet, host: Host) -> dict[str, Any]:
    """A host as the management API and the dashboard show it: `describe()` and what may be done now."""
    info = describe(host, fleet.clock())
    info.setdefault("ip_address", host.url)
    info.setdefault("flavor", "static" if host.always_on else "")
    info["can_resume"] = not host.always_on and host.state in RESUMABLE and not fleet.emergency
    info["can_pause"] = not host.always_on and host.state not in (HostState.PAUSED, HostState.PAUSING)
    if host.jobs_url:  # a RunPod endpoint serving jobs: those queued or running now
        info["jobs"] = sum(1 for lease in fleet.leases_of(host) if lease.job)
    return info


def admin_routes(
    fleet: Fleet, lifecycle: Lifecycle, reconcile: Callable[[], Awaitable[None]], budget: Budget
) -> list[BaseRoute]:
    """The `/gpu/...` routes; `reconcile` asks the clouds for the truth before a discover answers."""

    def gpu(host: Host) -> dict[str, Any]:
        return host_view(fleet, host)

    def find(request: Request) -> tuple[Host, str]:
        """The host the path names, and the calling admin's key id."""
        admin = require_admin(request.scope)
        ident = request.path_params["id"]
        host = fleet.find(ident)
        if host is None:
            raise NotFound(f"no host with id or name {ident!r}")
        return host, admin.id

    async def discover(request: Request) -> Response:
        require_admin(request.scope)
        await reconcile()  # fresh from the clouds, as the name promises
        gpus = [gpu(h) for h in fleet.hosts.values()]
        return JSONResponse(
            {"discovered_gpus": len(gpus), "gpus": gpus, "emergency": fleet.emergency, "queued": len(fleet.queue)}
        )

    async def status(request: Request) -> Response:
        return JSONResponse(gpu(find(request)[0]))

    async def resume(request: Request) -> Response:
        host, admin = find(request)
        if not lifecycle.resume(host, admin):  # Conflict for static hosts and under emergency-off
            return JSONResponse({**gpu(host), "message": f"{host.name} is already ready"})
        return JSONResponse({**gpu(host), "message": f"waking {host.name}"}, status_code=202)

    async def pause(request: Request) -> Response:
        host, admin = find(request)
        leases = lifecycle.pause(host, "an admin asked", admin)  # Conflict when there is nothing to pause
        message = f"pausing {host.name}" + (f" once its {leases} open requests finish" if leases else "")
        return JSONResponse({**gpu(host), "message": message}, status_code=202)

    async def protect(request: Request) -> Response:
        host, _ = find(request)
        fleet.protect(host, request.method == "POST")
        return JSONResponse(gpu(host))

    async def emergency_off(request: Request) -> Response:
        admin = require_admin(request.scope)
        await lifecycle.emergency_off(admin.id)
        return JSONResponse(
            {
                "emergency": True,
                "message": "pausing every host; wakes are refused until POST /gpu/emergency-on",
                "gpus": [gpu(h) for h in fleet.hosts.values()],
            },
            status_code=202,
        )

    async def emergency_on(request: Request) -> Response:
        admin = require_admin(request.scope)
        lifecycle.emergency_on(admin.id)
        return JSONResponse({"emergency": False, "message": "hosts are woken on demand again"})

    async def budget_status(request: Request) -> Response:
        require_admin(request.scope)
        return JSONResponse(budget.status())

    async def budget_override(request: Request) -> Response:
        admin = require_admin(request.scope)
        until = budget.override(admin.id, lifecycle)
        message = f"the GPU budget cap is lifted until {budget.calendar.at(until, with_date=True)}"
        return JSONResponse({**budget.status(), "message": message})

    return [
        Route("/gpu/discover", discover, methods=["GET"]),
        Route("/gpu/budget", budget_status, methods=["GET"]),
        Route("/gpu/budget/override", budget_override, methods=["POST"]),
        Route("/gpu/emergency-off", emergency_off, methods=["POST"]),
        Route("/gpu/emergency-on", emergency_on, methods=["POST"]),
        Route("/gpu/{id}/status", status, methods=["GET"]),
        Route("/gpu/{id}/resume", resume, methods=["POST"]),
        Route("/gpu/{id}/pause", pause, methods=["POST"]),
        Route("/gpu/{id}/protect", protect, methods=["POST", "DELETE"]),
    ]

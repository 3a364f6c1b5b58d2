"""The dashboard at `/dashboard`: one static page (HTML, CSS, JS from package data, no build step,
nothing from a CDN) and the routes it uses.

- `POST /dashboard/login` takes a key from a plain HTML form (never from JavaScript) and answers
  with a session cookie (`sessions.py`): HttpOnly, `SameSite=Strict`, `Secure` behind https. Login
  and logout check `Origin` like every state-changing request of a session (`auth.py`).
- `GET /dashboard/login/{token}` spends a one-time login link (`gpumanager demo` prints one).
- `GET /dashboard/api/state`: an admin's fleet (hosts with their GPUs, queue, the last requests
  and wakes, spend), or a user's own models and usage.
- `GET /dashboard/api/history`: the last 24 h from the ledger for an admin's charts.
- `GET /dashboard/api/events`: the event bus as SSE, an admin's whole, a user's own part.
- The page's buttons call the admin API itself (`/gpu/...`) with the session.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import anyio.to_thread
import msgspec
from loguru import logger
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gpumanager.admin import host_view
from gpumanager.auth import require_admin
from gpumanager.budget import Budget
from gpumanager.config import Config
from gpumanager.errors import ClientGone, NotFound
from gpumanager.events import Bus, Envelope
from gpumanager.events_api import event_stream, fleet_snapshot
from gpumanager.fleet import Fleet
from gpumanager.hosts import HostState
from gpumanager.keys import Identity, KeyStore
from gpumanager.ledger import reader, report
from gpumanager.ledger.schema import LedgerError, Location
from gpumanager.logs import clean
from gpumanager.models import model_names
from gpumanager.proxy.forward import read_body
from gpumanager.sessions import COOKIE, LIFETIME, Sessions, cookie_value, require_same_origin

FILES = {
    "index.html": "text/html",
    "dashboard.css": "text/css",
    **{f"{name}.js": "text/javascript" for name in ("main", "stream", "hosts", "panels", "charts", "format")},
}
DAY = 86_400.0
HISTORY_CACHE_SECONDS = 5.0  # the charts' ledger reads, at most this often
LAST_REQUESTS = 50
LAST_WAKES = 10
LOGIN_BYTES = 4096  # a login form holds one key
USER_TYPES = ["host_state", "request"]  # what a user's page is told, of its own requests only
_encode = msgspec.json.Encoder().encode
# The page loads nothing but its own files, and no other site may frame it (a click on its buttons
# from inside another page is refused by the browser).
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


@dataclass(frozen=True, kw_only=True)
class DashboardParts:
    config: Config
    fleet: Fleet
    keys: KeyStore
    sessions: Sessions
    bus: Bus
    budget: Budget
    db_path: Location
    gpus: Callable[[], Mapping[str, list[Any]]]  # host name -> its GPUs' latest readings
    heartbeat: float
    closing: Callable[[], bool]


def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class Dashboard:
    def __init__(self, parts: DashboardParts) -> None:
        self.parts = parts
        self._history: tuple[float, dict[str, Any]] | None = None
        self._history_lock = anyio.Lock()

    # -- the page and the session --------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return Response(_file("index.html"), media_type="text/html", headers={**_no_store(), **PAGE_HEADERS})

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FILES:
            raise NotFound(f"no file {clean(name, 64)!r}")
        return Response(
            _file(name),
            media_type=FILES[name],
            headers={"cache-control": "no-cache", "x-content-type-options": "nosniff"},
        )

    async def login(self, request: Request) -> Response:
        require_same_origin(request.scope, self.parts.config.server.public_url)
        stall = self.parts.config.server.client_timeout_seconds
        try:
            body = await read_body(request.scope, request.receive, LOGIN_BYTES, stall)
        except ClientGone:
            return Response(status_code=499)
        key = parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0].strip()
        identity = self.parts.keys.authenticate(key) if key else None
        if identity is None:
            logger.warning("dashboard login refused from {}: unknown or revoked key", _client(request))
            return RedirectResponse("/dashboard?login=failed", status_code=303)
        return self._logged_in(request, identity)

    async def link(self, request: Request) -> Response:
        key_id = self.parts.sessions.redeem(request.path_params["token"])
        identity = self.parts.keys.identity(key_id) if key_id else None
        if identity is None:
            return RedirectResponse("/dashboard?login=expired", status_code=303)
        return self._logged_in(request, identity)

    def _logged_in(self, request: Request, identity: Identity) -> Response:
        logger.info("dashboard login of key {} ({}) from {}", identity.id, clean(identity.name, 64), _client(request))
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(
            COOKIE,
            self.parts.sessions.issue(identity.id),
            max_age=int(LIFETIME),
            path="/",
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )
        return response

    async def logout(self, request: Request) -> Response:
        require_same_origin(request.scope, self.parts.config.server.public_url)
        cookie = cookie_value(request.scope["headers"])
        if cookie:
            self.parts.sessions.end(cookie)
        response = RedirectResponse("/dashboard", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=self._secure(request))
        return response

    def _secure(self, request: Request) -> bool:
        public = self.parts.config.server.public_url
        return public.startswith("https://") if public else request.url.scheme == "https"

    # -- what the page shows -------------------------------------------------------------------

    async def state(self, request: Request) -> Response:
        who: Identity = request.scope["auth"]
        state = self._admin_state(who) if who.admin else await self._user_state(who)
        return Response(_encode(state), media_type="application/json", headers=_no_store())

    def _me(self, who: Identity) -> dict[str, Any]:
        return {"id": who.id, "name": who.name, "admin": who.admin}

    def _admin_state(self, who: Identity) -> dict[str, Any]:
        parts, fleet = self.parts, self.parts.fleet
        names = {r.id: r.name for r in parts.keys.records()}
        gpus = parts.gpus()
        hosts = []
        for host in fleet.hosts.values():
            info = host_view(fleet, host)
            info["in_use"] = len(fleet.leases_of(host))
            info["reserved_for"] = names.get(host.reserved_key or "", host.reserved_key)
            info["gpus"] = [msgspec.to_builtins(g) for g in gpus.get(host.name, [])]
            hosts.append(info)
        history = parts.bus.history()
        return {
            "me": self._me(who),
            "time": time.time(),
            "emergency": fleet.emergency,
            "hosts": hosts,
            "queue": dict(Counter(w.ask.model for w in fleet.queue)),
            "requests": _last_requests(history, names),
            "wakes": _last_wakes(history, names),
            "budget": parts.budget.status(),
            "keys": names,
        }

    async def _user_state(self, who: Identity) -> dict[str, Any]:
        fleet = self.parts.fleet
        models = []
        for model in fleet.models():
            if not who.limits.allows(model_names(model)):
                continue
            hosts = fleet.candidates(model)
            awake = [h.name for h in hosts if h.state is HostState.READY]
            waking = [h.name for h in hosts if h.state in (HostState.RESUMING, HostState.STARTING)]
            models.append({"model": model, "awake": bool(awake), "waking": bool(waking), "hosts": len(hosts)})
        usage = self.parts.budget.usage_of(who)
        db_path = self.parts.db_path
        try:
            mine = await anyio.to_thread.run_sync(lambda: reader.me(db_path, who.id, time.time()))
            totals = {"today": msgspec.to_builtins(mine.today.totals), "month": msgspec.to_builtins(mine.month.totals)}
        except LedgerError:
            totals = {"today": None, "month": None}
        return {"me": self._me(who), "time": time.time(), "models": models, "usage": usage, **totals}

    async def history(self, request: Request) -> Response:
        require_admin(request.scope)
        async with self._history_lock:
            cached = self._history
            if cached is None or time.monotonic() - cached[0] > HISTORY_CACHE_SECONDS:
                cached = self._history = (time.monotonic(), await anyio.to_thread.run_sync(self._read_history))
        return Response(_encode(cached[1]), media_type="application/json", headers=_no_store())

    def _read_history(self) -> dict[str, Any]:
        """The last 24 h for the charts, today's spend by key, this month's savings (a worker thread)."""
        parts = self.parts
        until = time.time()
        since = until - DAY
        calendar = parts.budget.calendar
        day, month = calendar.day(until), calendar.month(until)
        empty: dict[str, Any] = {"since": since, "until": until, "requests_per_minute": [], "dollars_per_hour": []}
        try:
            per_minute = reader.requests_per_minute(parts.db_path, since, until)
            hosts = reader.hosts(parts.db_path, min(since, month.start), until)
            prices = report.host_prices(parts.config, hosts)
            hourly = reader.usage(parts.db_path, since, until, "hour")
            names = {r.id: r.name for r in parts.keys.records()}
            today = reader.usage(parts.db_path, day.start, until, "key").with_names(names)
            this_month = reader.usage(parts.db_path, month.start, until, "host", prices=prices)
            awake = reader.awake_periods(parts.db_path, since, until)
        except LedgerError:
            return {**empty, "awake": {}, "spend_by_key": [], "savings": []}
        return {
            **empty,
            "requests_per_minute": per_minute,
            "dollars_per_hour": [(g.group, g.totals.cost_micro / 1e6) for g in hourly.groups],
            "awake": awake,
            "spend_today": today.total.cost_micro / 1e6,
            "spend_by_key": [
                {"key": g.group, "name": g.name, "dollars": g.totals.cost_micro / 1e6} for g in today.groups
            ],
            "spend_month": this_month.total.cost_micro / 1e6,
            "savings": [
                {
                    "host": s.host,
                    "always_on": s.always_on_micro / 1e6,
                    "billed": s.billed_micro / 1e6,
                    "saved": s.saved_micro / 1e6,
                }
                for s in this_month.savings
            ],
        }

    async def events(self, request: Request) -> Response:
        who: Identity = request.scope["auth"]
        parts = self.parts

        def snapshot() -> bytes:
            return fleet_snapshot(parts.fleet) if who.admin else b"event: snapshot\ndata: {}\n\n"

        keep = None if who.admin else _own(who.id)
        types = None if who.admin else USER_TYPES
        return event_stream(
            request, parts.bus, snapshot, heartbeat=parts.heartbeat, closing=parts.closing, keep=keep, types=types
        )


def _own(key_id: str) -> Callable[[Envelope], bool]:
    """What of the bus a user's page sees: hosts' states, and its own requests."""
    mine = b'"key":' + _encode(key_id)

    def keep(envelope: Envelope) -> bool:
        return envelope.type == "host_state" or (envelope.type == "request" and mine in envelope.data)

    return keep


def _last_requests(history: list[Envelope], names: Mapping[str, str]) -> list[dict[str, Any]]:
    found = []
    for envelope in reversed(history):
        if envelope.type == "request":
            event = msgspec.json.decode(envelope.data)
            event["time"] = envelope.time
            event["name"] = names.get(event["key"], event["key"])
            found.append(event)
            if len(found) == LAST_REQUESTS:
                break
    return found


def _last_wakes(history: list[Envelope], names: Mapping[str, str]) -> list[dict[str, Any]]:
    """The last wakes, each with its phases' times and how it ended, newest first."""
    wakes: list[dict[str, Any]] = []
    current: dict[str, dict[str, Any]] = {}
    for envelope in history:
        if envelope.type not in ("wake_started", "wake_phase", "wake_failed", "host_state"):
            continue
        event = msgspec.json.decode(envelope.data)
        host = event["host"]
        if envelope.type == "wake_started":
            key = event.get("key")
            current[host] = {
                "host": host,
                "time": envelope.time,
                "model": event.get("model"),
                "by": names.get(key, key) if key else None,
                "phases": {},
                "outcome": "waking",
            }
            wakes.append(current[host])
        elif host in current:
            wake = current[host]
            if envelope.type == "wake_phase":
                wake["phases"][event["phase"]] = event["seconds"]
            elif envelope.type == "wake_failed":
                wake["outcome"], wake["error"] = "failed", event["error"]
            elif event["new"] == "ready" and wake["outcome"] == "waking":
                wake["outcome"], wake["seconds"] = "ready", round(envelope.time - wake["time"], 3)
    return wakes[::-1][:LAST_WAKES]


def _no_store() -> dict[str, str]:
    return {"cache-control": "no-store"}


def _client(request: Request) -> str:
    return clean(request.client.host if request.client else "unknown address", 64)


def dashboard_routes(parts: DashboardParts) -> list[BaseRoute]:
    dashboard = Dashboard(parts)
    return [
        Route("/dashboard", dashboard.page, methods=["GET", "HEAD"]),
        Route("/dashboard/static/{name}", dashboard.static, methods=["GET", "HEAD"]),
        Route("/dashboard/login", dashboard.login, methods=["POST"]),
        Route("/dashboard/login/{token}", dashboard.link, methods=["GET"]),
        Route("/dashboard/logout", dashboard.logout, methods=["POST"]),
        Route("/dashboard/api/state", dashboard.state, methods=["GET"]),
        Route("/dashboard/api/history", dashboard.history, methods=["GET"]),
        Route("/dashboard/api/events", dashboard.events, methods=["GET"]),
    ]

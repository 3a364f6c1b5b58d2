"""A fake of SURF Research Cloud's workspace API (REFERENCE.md section 3), as a real HTTP server.

`FakeSurf` serves `/v1/workspace/workspaces/...` on 127.0.0.1 with the observed wire shapes: raw-token
auth, optional CSRF on POSTs, DRF pagination, workspace objects with `actions` and a `workspace_actions`
history. Every workspace gets its own loopback address 127.0.0.N (Linux routes all of 127/8 to `lo`)
and, while it is running, a `SimOllama` listens on 127.0.0.N:`ollama_port`, the same port for all of
them, like the real VMs' Ollama on 11434. Transitions run in the fake's own task group; one transition
per workspace at a time, and a new action or `set_status` interrupts the one in progress.

All state lives in one event loop and changes only in synchronous stretches of code, so a request
handler never sees a half-made change. The knobs are plain methods a test may call at any time.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from gpumanager.sim import SimOllama, SimServer, running_server
from gpumanager.sim.server import free_port_on
from tests.fakes.machine import MachineCloud, SimMachine, until

__all__ = ["FakeSurf", "free_port_for_all"]

_ROUTE = re.compile(r"^/v1/workspace/workspaces/(?:(?P<id>[^/]+)/(?:actions/(?P<action>[^/]+)/)?)?$")
_METHODS = {"list": "GET", "workspace": "GET", "action": "POST"}
# What the live API offered in these states; the update_* actions are accepted here as no-ops.
_ACTIONS = {
    "paused": ["resume", "update_nsgs", "update_storages"],
    "running": ["pause", "reboot", "update_nsgs", "update_storages"],
}
_FLAVOURS = [{"name": "Ubuntu 22.04", "category": "os"}, {"name": "A10 - 2 GPU", "category": "size"}]
_SPARE_ADDRESSES = 16  # how many 127.0.0.N a chosen ollama_port is checked free on
_TRUE = ("true", "1", "yes")


def free_port_for_all(n: int) -> int:
    """A TCP port that is free on each of 127.0.0.2 .. 127.0.0.(n+1), the addresses workspaces get."""
    return free_port_on(f"127.0.0.{i}" for i in range(2, n + 2))


def _rfc3339(moment: datetime) -> str:
    # Always six fractional digits: clients may compare these strings, and mixed precision misorders.
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status)


def _phrase(status: int) -> str:
    return "Internal server error" if status == 500 else HTTPStatus(status).phrase


def _finish(entry: dict[str, Any], error: str | None = None) -> None:
    entry["status"] = "success" if error is None else "failed"
    entry["result"] = {} if error is None else {"error": error}


def _int_param(raw: str | None, default: int, minimum: int) -> int:
    """DRF's LimitOffsetPagination: an absent or invalid value falls back to the default."""
    value = int(raw) if raw is not None and raw.isdigit() else default
    return value if value >= minimum else default


@dataclass(frozen=True)
class _ResumePlan:
    error: str | None  # None: the resume hangs in `resuming`
    after: float | None


@dataclass(eq=False)
class _Machine(SimMachine):
    record: dict[str, Any]  # the live wire object; responses are copies of it
    ip: str
    resume_s: float
    pause_s: float
    ollama_delay: float
    deleted: bool
    entry: dict[str, Any] | None = None  # the history entry of the transition in progress
    next_resume: _ResumePlan | None = None
    hanging: bool = False
    pause_failures: list[int] = field(default_factory=list)


class FakeSurf(MachineCloud[_Machine]):
    """SURF's workspace API on loopback; see the module docstring. Use as ``async with FakeSurf() as fake``."""

    def __init__(
        self,
        *,
        token: str = "tok",
        ollama_port: int | None = None,
        transition_seconds: float = 0.2,
        require_csrf: str | None = None,
        history_newest_first: bool = False,
        co_name: str = "gpumanager-tests",
    ) -> None:
        super().__init__()
        self.token, self.require_csrf, self.co_name = token, require_csrf, co_name
        self.ollama_port = ollama_port if ollama_port is not None else free_port_for_all(_SPARE_ADDRESSES)
        self.transition_seconds, self.history_newest_first = transition_seconds, history_newest_first
        self.co_id, self.wallet_id, self.owner_id = (str(uuid.uuid4()) for _ in range(3))
        self.calls: list[tuple[str, str]] = []
        self.attempts: list[tuple[str, str]] = []  # every authorised action POST, refused ones too
        self.requests: Counter[tuple[str, str]] = Counter()
        self.sims: dict[str, SimOllama] = {}
        self._machines: dict[str, _Machine] = {}
        self._by_id: dict[str, _Machine] = {}
        self._failures: list[int] = []
        self._delay = 0.0
        self._last_time = datetime.now(UTC)
        self._stack = AsyncExitStack()
        self._server: SimServer | None = None

    # -- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> FakeSurf:
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            # A bound method is not detected as ASGI 3 by uvicorn, hence the explicit interface.
            self._server = await stack.enter_async_context(
                running_server(self._asgi, host="127.0.0.1", port=0, interface="asgi3", timeout_graceful_shutdown=1)
            )
            self._tg = tg
            await self._start_wanted_sims(self._machines.values())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._close_machines(self._machines.values())  # `_closing` also cuts short the sleeps of slow_requests
        return await self._stack.__aexit__(exc_type, exc, tb)

    @property
    def url(self) -> str:
        assert self._server is not None, "use it as `async with FakeSurf() as fake`"
        return self._server.url

    @property
    def base_url(self) -> str:
        """What gpumanager's config calls `base_url` (the real one is https://gw.live.surfresearchcloud.nl/v1)."""
        return self.url + "/v1"

    # -- workspaces ---------------------------------------------------------------------------

    def add_workspace(
        self,
        name: str,
        *,
        status: str = "paused",
        models: Iterable[str] = ("llama3.2:latest",),
        slots: int = 4,
        token_delay: float = 0.0,
        resume_seconds: float | None = None,
        pause_seconds: float | None = None,
        ollama_delay: float = 0.0,
        application_type: str = "Compute",
        deleted: bool = False,
        owner_id: str | None = None,
        **sim_options: Any,
    ) -> dict[str, Any]:
        """Create a workspace and return its live record (the wire object; read it, don't change it)."""
        if name in self._machines:
            raise ValueError(f"workspace {name!r} exists already")
        ip = f"127.0.0.{len(self._machines) + 2}"
        sim = SimOllama(name=name, models=models, slots=slots, token_delay=token_delay, **sim_options)
        record = self._record(name, ip, application_type, owner_id or self.owner_id)
        m = _Machine(
            record,
            ip,
            self.transition_seconds if resume_seconds is None else resume_seconds,
            self.transition_seconds if pause_seconds is None else pause_seconds,
            ollama_delay,
            deleted,
            sim=sim,
        )
        self._machines[name], self._by_id[record["id"]], self.sims[name] = m, m, sim
        self._set_status(m, status)
        if status == "running":
            self._start_sim_soon(m)
        return record

    def _record(self, name: str, ip: str, application_type: str, owner_id: str) -> dict[str, Any]:
        created = self._now()
        return {
            "id": str(uuid.uuid4()),
            "name": name,
            "status": "paused",
            "active": False,
            "actions": [],
            "workspace_actions": [],
            "resource_meta": {"ip": ip},
            "meta": {
                "flavours": [dict(f) for f in _FLAVOURS],
                "host_name": name.lower(),
                "application_type": application_type,
                "co_name": self.co_name,
            },
            "co_id": self.co_id,
            "wallet_id": self.wallet_id,
            "owner_id": owner_id,
            "end_time": _rfc3339(created + timedelta(days=365)),
            "time_created": _rfc3339(created),
        }

    def workspace(self, name: str) -> dict[str, Any]:
        return self._machines[name].record

    def ollama_url(self, name: str) -> str:
        return f"http://{self._machines[name].ip}:{self.ollama_port}"

    def is_serving(self, name: str) -> bool:
        return self._machines[name].power.up

    async def wait_for(
        self,
        name: str,
        status: str,
        *,
        serving: bool | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Wait until the workspace has ``status`` (and its sim is up or down, if ``serving`` says)."""
        m = self._machines[name]
        with anyio.fail_after(timeout):
            await until(lambda: m.record["status"] == status and (serving is None or m.power.up == serving))

    # -- failure knobs ------------------------------------------------------------------------

    def fail_next_resume(
        self, name: str, error: str = "Timeout waiting for VM to resume.", after: float | None = None
    ) -> None:
        self._machines[name].next_resume = _ResumePlan(error, after)

    def hang_next_resume(self, name: str) -> None:
        self._machines[name].next_resume = _ResumePlan(None, None)

    def fail_pauses(self, name: str, times: int = 1, status: int = 500) -> None:
        self._machines[name].pause_failures.extend([status] * times)

    def fail_requests(self, times: int = 1, status: int = 503) -> None:
        self._failures.extend([status] * times)

    def slow_requests(self, seconds: float) -> None:
        self._delay = seconds

    async def set_status(self, name: str, status: str) -> None:
        """Change the status as the SURF portal would, at once; returns when the sim is up or down."""
        m = self._machines[name]
        self._interrupt(m, f"Interrupted: status set to {status} from outside.")
        self._set_status(m, status)
        if status == "running":
            await self._ensure_sim(m)
        elif status == "paused":
            self._stop_sim(m)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = await self._answer(Request(scope, receive))
            await response(scope, receive, send)

    async def _answer(self, request: Request) -> JSONResponse:
        match = _ROUTE.match(request.url.path)
        kind = "unknown" if match is None else "action" if match["action"] else ("workspace" if match["id"] else "list")
        self.requests[(request.method, kind)] += 1
        if self._delay > 0:
            with anyio.move_on_after(self._delay):
                await self._closing.wait()
        if self._failures:
            status = self._failures.pop(0)
            return _error(status, _phrase(status))
        refused = self._refuse(request)
        if refused is not None or match is None:
            return refused or _error(404, "Not found.")
        if request.method != _METHODS[kind]:
            return _error(405, f'Method "{request.method}" not allowed.')
        if kind == "list":
            return self._list(request)
        m = self._by_id.get(match["id"])
        if m is None:
            return _error(404, "Not found.")
        if kind == "workspace":
            return JSONResponse(self._render(m))
        return self._action(m, match["action"])

    def _refuse(self, request: Request) -> JSONResponse | None:
        """DRF's answers for a missing or wrong token, then Django's for a missing or wrong CSRF token."""
        given = request.headers.get("authorization")
        if not given:
            return _error(401, "Authentication credentials were not provided.")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _error(401, "Invalid token.")
        if request.method == "POST" and self.require_csrf is not None:
            csrf = request.headers.get("x-csrftoken")
            if not csrf:
                return _error(403, "CSRF Failed: CSRF token missing.")
            if not hmac.compare_digest(csrf.encode(), self.require_csrf.encode()):
                return _error(403, "CSRF Failed: CSRF token incorrect.")
        return None

    def _list(self, request: Request) -> JSONResponse:
        query = request.query_params
        found = [m for m in self._machines.values() if self._listed(m, query)]
        limit = _int_param(query.get("limit"), 100, 1)
        offset = _int_param(query.get("offset"), 0, 0)
        url = request.url.include_query_params(limit=limit)
        following = url.include_query_params(offset=offset + limit) if offset + limit < len(found) else None
        # As DRF does: the first page's link drops `offset` rather than saying offset=0.
        preceding = (
            None
            if offset <= 0
            else url.remove_query_params("offset")
            if offset <= limit
            else (url.include_query_params(offset=offset - limit))
        )
        return JSONResponse(
            {
                "count": len(found),
                "next": str(following) if following else None,
                "previous": str(preceding) if preceding else None,
                "results": [self._render(m) for m in found[offset : offset + limit]],
            }
        )

    def _listed(self, m: _Machine, query: QueryParams) -> bool:
        """The filters clients send; without them the list has deleted and non-Compute workspaces too."""
        kind, deleted, co_id = query.get("application_type"), query.get("deleted"), query.get("co_id")
        return (
            (not kind or m.record["meta"]["application_type"] == kind)
            and (deleted is None or m.deleted == (deleted.lower() in _TRUE))
            and (query.get("by_owner", "").lower() not in _TRUE or m.record["owner_id"] == self.owner_id)
            and (not co_id or m.record["co_id"] == co_id)
        )

    def _render(self, m: _Machine) -> dict[str, Any]:
        history = [dict(e) for e in m.record["workspace_actions"]]
        return {**m.record, "workspace_actions": history[::-1] if self.history_newest_first else history}

    def _action(self, m: _Machine, action: str) -> JSONResponse:
        # The body (clients send `{}`) is not read: nothing in it is known to matter.
        self.attempts.append((action, m.record["name"]))
        if action == "pause" and m.pause_failures:
            status = m.pause_failures.pop(0)
            return _error(status, _phrase(status))
        if action not in m.record["actions"]:
            return _error(409, f"Action {action} is not allowed in state {m.record['status']}.")
        self.calls.append((action, m.record["name"]))
        self._accept(m, action)
        return JSONResponse({"detail": "action accepted", "action": action, "id": m.record["id"]}, 202)

    # -- lifecycle ----------------------------------------------------------------------------

    def _accept(self, m: _Machine, action: str) -> None:
        entry = self._entry(m, action)
        if action == "resume":
            plan, m.next_resume = m.next_resume, None
            self._run_action(m, entry, lambda: self._resume(m, entry, plan))
            m.hanging = plan is not None and plan.error is None
            self._set_status(m, "resuming")
        elif action == "pause":
            self._run_action(m, entry, lambda: self._pause(m, entry))
            self._set_status(m, "pausing")
        elif action == "reboot":
            self._run_action(m, entry, lambda: self._reboot(m, entry))
            self._set_status(m, "rebooting")
        else:
            _finish(entry)  # update_nsgs / update_storages change nothing a test can see

    async def _resume(self, m: _Machine, entry: dict[str, Any], plan: _ResumePlan | None) -> None:
        if plan is not None and plan.error is None:
            await anyio.sleep_forever()  # like a resume waiting for a free GPU; ends by pause or set_status
        await anyio.sleep(plan.after if plan is not None and plan.after is not None else m.resume_s)
        if plan is not None and plan.error is not None:
            _finish(entry, plan.error)
            self._set_status(m, "paused")
            return
        if m.ollama_delay <= 0:
            await self._ensure_sim(m)  # before the flip, so a client that sees `running` finds Ollama
            await anyio.lowlevel.checkpoint_if_cancelled()  # an interruption during the shielded start wins
        _finish(entry)
        self._set_status(m, "running")
        if m.ollama_delay > 0:  # a VM whose Docker and Ollama are still booting
            await anyio.sleep(m.ollama_delay)
            await self._ensure_sim(m)

    async def _pause(self, m: _Machine, entry: dict[str, Any]) -> None:
        await anyio.sleep(m.pause_s)
        self._stop_sim(m)
        _finish(entry)
        self._set_status(m, "paused")

    async def _reboot(self, m: _Machine, entry: dict[str, Any]) -> None:
        await anyio.sleep(m.pause_s)  # the wiki: a reboot is a pause followed by a resume
        self._stop_sim(m)
        await anyio.sleep(m.resume_s)
        await self._ensure_sim(m)
        await anyio.lowlevel.checkpoint_if_cancelled()
        _finish(entry)
        self._set_status(m, "running")

    def _run_action(self, m: _Machine, entry: dict[str, Any], job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` as the workspace's only transition, recorded in ``entry``; the one before it fails."""
        self._interrupt(m, f"Interrupted by {entry['type']}.")
        self._launch(m, job)
        m.entry = entry

    def _interrupt(self, m: _Machine, why: str = "The fake stopped.") -> None:
        """End the transition in progress; its history entry, if still running, fails with ``why``
        (by default, the reason given as the fake closes)."""
        super()._interrupt(m)
        if m.entry is not None and m.entry["status"] == "running":
            _finish(m.entry, why)
        m.entry, m.hanging = None, False

    def _set_status(self, m: _Machine, status: str) -> None:
        hung = ["pause"] if m.hanging and status == "resuming" else []  # else a hung resume could never end
        m.record.update(status=status, active=status == "running", actions=list(_ACTIONS.get(status, hung)))

    def _entry(self, m: _Machine, action: str) -> dict[str, Any]:
        entry = {
            "type": action,
            "status": "running",
            "reason": "API",
            "result": {},
            "time_created": _rfc3339(self._now()),
        }
        m.record["workspace_actions"].append(entry)
        return entry

    def _now(self) -> datetime:
        # Strictly increasing, so "newest by time_created" is always well defined.
        self._last_time = max(datetime.now(UTC), self._last_time + timedelta(microseconds=1))
        return self._last_time

    # -- the simulated Ollama of each workspace ------------------------------------------------

    def _sim_address(self, m: _Machine) -> tuple[str, int]:
        return m.ip, self.ollama_port

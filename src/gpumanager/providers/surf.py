"""SURF Research Cloud: workspaces found by name, resumed and paused through the workspace API.

Auth is the raw API token in the `authorization` header (no `Bearer`), plus `X-CSRFToken` on
actions when `CLOUD_CSRF_TOKEN` is set. A resume can hang for about ten minutes when no GPU is
free; the newest `workspace_actions` entry tells a failed resume early, so waiting requests can go
to another host. Polling is rate-limit friendly (the API allows 1000 requests a minute per key):
one request per `poll_seconds` per host in transition, one paged list per reconcile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import SurfProviderConfig
from gpumanager.errors import ProviderRejected
from gpumanager.providers.base import cloud_call, http_json, require_secret

STATES = {
    "running": CloudState.RUNNING,
    "paused": CloudState.PAUSED,
    "stopped": CloudState.PAUSED,
    "resuming": CloudState.RESUMING,
    "rebooting": CloudState.RESUMING,
    "pausing": CloudState.PAUSING,
    "failed": CloudState.FAILED,
}
MAX_PAGES = 50
AWAKE = (CloudState.RESUMING, CloudState.RUNNING)  # its IP is its own: Ollama may be probed there


class SurfProvider:
    def __init__(self, config: SurfProviderConfig, environ: Mapping[str, str]) -> None:
        token = require_secret(environ, "CLOUD_API_TOKEN", f"the SURF provider {config.name!r}")
        self.name = config.name
        self.config = config
        self.poll_seconds = config.poll_seconds
        headers = {"authorization": token, "accept": "application/json"}
        self._csrf = environ.get("CLOUD_CSRF_TOKEN", "")
        self._http = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/workspace/",
            headers=headers,
            timeout=config.api_timeout_seconds,
            trust_env=False,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the HTTP client for as long as the fleet runs."""
        async with self._http:
            task_status.started()
            await anyio.sleep_forever()

    # -- the Provider protocol ---------------------------------------------------------------------

    async def list(self) -> list[HostInfo]:
        params: dict[str, Any] | None = {
            "application_type": "Compute",
            "deleted": "false",
            "by_owner": "true",
            "limit": 100,
            "offset": 0,
        }
        url: str | None = "workspaces/"
        found: list[HostInfo] = []
        for _ in range(MAX_PAGES):
            if url is None:
                break
            page = await self._call("GET", url, params=params, action="list")
            for workspace in page.get("results", []):
                if self.config.machine_name_filter in str(workspace.get("name", "")):
                    found.append(self._info(workspace))
            url, params = page.get("next"), None  # `next` already carries the query
        return found

    async def inspect(self, host_id: str) -> HostInfo:
        return self._info(await self._call("GET", f"workspaces/{host_id}/", host=host_id, action="inspect"))

    async def resume(self, host_id: str) -> None:
        """Resume; a workspace already resuming or running is success, one still pausing is waited for
        (it may finish pausing between the refusal and the look that follows: then it is asked again)."""
        refused_paused = 0
        while True:
            try:
                await self._call("POST", f"workspaces/{host_id}/actions/resume/", host=host_id, action="resume")
                return
            except ProviderRejected as exc:
                info = await self.inspect(host_id)
                if info.state in (CloudState.RESUMING, CloudState.RUNNING):
                    return
                refused_paused += info.state is CloudState.PAUSED
                if info.state not in (CloudState.PAUSING, CloudState.PAUSED) or refused_paused > 2:
                    raise ProviderRejected(
                        f"resume refused in state {info.cloud_status}: {exc.message}",
                        provider=self.name,
                        host=host_id,
                        action="resume",
                    ) from None
            await anyio.sleep(self.poll_seconds)

    async def pause(self, host_id: str) -> None:
        """Pause; a workspace already pausing or paused is success."""
        try:
            await self._call("POST", f"workspaces/{host_id}/actions/pause/", host=host_id, action="pause")
        except ProviderRejected as exc:
            info = await self.inspect(host_id)
            if info.state not in (CloudState.PAUSING, CloudState.PAUSED):
                raise ProviderRejected(
                    f"pause refused in state {info.cloud_status}: {exc.message}",
                    provider=self.name,
                    host=host_id,
                    action="pause",
                ) from None

    # -- the wire ----------------------------------------------------------------------------------

    async def _call(
        self, method: str, url: str, *, host: str = "", action: str, params: dict[str, Any] | None = None
    ) -> Any:
        async def once() -> Any:
            return await self._request(method, url, host=host, action=action, params=params)

        return await cloud_call(self.config, once, what=f"SURF {action} {host}".strip())

    async def _request(self, method: str, url: str, *, host: str, action: str, params: dict[str, Any] | None) -> Any:
        headers = {"X-CSRFToken": self._csrf} if method == "POST" and self._csrf else {}
        return await http_json(
            self._http,
            method,
            url,
            params=params,
            headers=headers,
            json={} if method == "POST" else None,
            cloud="SURF",
            hint="check CLOUD_API_TOKEN (and CLOUD_CSRF_TOKEN)",
            context={"provider": self.name, "host": host, "action": action},
        )

    def _info(self, workspace: dict[str, Any]) -> HostInfo:
        status = str(workspace.get("status", "unknown"))
        state = STATES.get(status, CloudState.UNKNOWN)
        ip = (workspace.get("resource_meta") or {}).get("ip")
        meta = workspace.get("meta") or {}
        flavours = meta.get("flavours") or []
        size = next((f.get("name") for f in flavours if isinstance(f, dict) and f.get("category") == "size"), "")
        return HostInfo(
            id=str(workspace["id"]),
            name=str(workspace.get("name", workspace["id"])),
            state=state,
            cloud_status=status,
            address=f"http://{ip}:{self.config.ollama_port}" if ip and state in AWAKE else None,
            error=_failed_resume(workspace) if state is not CloudState.RUNNING else "",
            details={
                "flavor": size,
                "ip_address": ip or "",
                "host_name": meta.get("host_name", ""),
                "can_resume": "resume" in (workspace.get("actions") or []),
                "can_pause": "pause" in (workspace.get("actions") or []),
            },
        )


def _failed_resume(workspace: dict[str, Any]) -> str:
    """The error of the newest action, if it is a resume that failed ("" otherwise)."""
    actions = [a for a in workspace.get("workspace_actions") or [] if isinstance(a, dict)]
    if not actions:
        return ""
    newest = max(actions, key=lambda a: str(a.get("time_created", "")))
    if newest.get("type") != "resume" or newest.get("status") != "failed":
        return ""
    result = newest.get("result") or {}
    return str(result.get("error") or result.get("message") or newest.get("message") or "the resume failed")

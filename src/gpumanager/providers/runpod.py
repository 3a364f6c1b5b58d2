"""RunPod: serverless endpoints (OpenAI-compatible, warm = min workers 1, cold = 0) and pods.

A serverless endpoint is a host whose upstream is its OpenAI-compatible URL, authorised with the
RunPod key (which clients never see); it is ready when its `/health` shows a worker up and its
`/models` lists the model. An endpoint that RunPod cut to max workers 0 (it does so after a week
without requests) is reported as such instead of being woken forever. A pod running Ollama is a
host like an EC2 instance, started and stopped, reached through RunPod's proxy or its public port.
Writes use REST v2 where RunPod documents them; reads use GraphQL, which alone documents them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import RunpodProviderConfig
from gpumanager.errors import HostNotFound, ProviderRejected, WakeFailed
from gpumanager.models import model_names
from gpumanager.providers.base import cloud_call, http_json, require_secret

ENDPOINT_FIELDS = "id name gpuIds idleTimeout templateId workersMin workersMax workersStandby"
POD_FIELDS = (
    "id name desiredStatus costPerHr lastStatusChange "
    "runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } }"
)
MAX_WORKERS_ZERO = (
    "RunPod set this endpoint's max workers to 0 (it does so after a week without requests): "
    "raise max workers in the RunPod console"
)


class RunpodProvider:
    def __init__(self, config: RunpodProviderConfig, environ: Mapping[str, str]) -> None:
        key = require_secret(environ, "RUNPOD_API_KEY", f"the RunPod provider {config.name!r}")
        self.name, self.config, self.poll_seconds = config.name, config, config.poll_seconds
        self._auth = [(b"authorization", b"Bearer " + key.encode())]
        self._http = httpx.AsyncClient(
            headers={"authorization": f"Bearer {key}"}, timeout=config.api_timeout_seconds, trust_env=False
        )
        self._kinds: dict[str, str] = {i: "endpoint" for i in config.endpoints} | {i: "pod" for i in config.pods}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with self._http:
            task_status.started()
            await anyio.sleep_forever()

    def upstream_auth(self, host_id: str) -> list[tuple[bytes, bytes]] | None:
        """Endpoints take the RunPod key; pods run Ollama behind the fleet's own door (its token)."""
        return self._auth if self._kinds.get(host_id) == "endpoint" else None

    def job_url(self, host_id: str) -> str | None:
        """An endpoint's job API (`/run`, `/status/{id}`...); a pod has none."""
        if self._kinds.get(host_id, "endpoint") != "endpoint":
            return None
        return f"{self.config.serverless_url.rstrip('/')}/{host_id}"

    # -- the Provider protocol ---------------------------------------------------------------------

    async def list(self) -> list[HostInfo]:
        me = (
            await self._graphql(
                f"query {{ myself {{ endpoints {{ {ENDPOINT_FIELDS} }} pods {{ {POD_FIELDS} }} }} }}", action="list"
            )
        ).get("myself") or {}
        wanted = set(self.config.endpoints) | set(self.config.pods)
        found = []
        for kind, items in (("endpoint", me.get("endpoints") or []), ("pod", me.get("pods") or [])):
            for item in items:
                if item["id"] in wanted or (not wanted and self.config.name_filter in str(item.get("name", ""))):
                    self._kinds[item["id"]] = kind
                    found.append(self._endpoint(item) if kind == "endpoint" else self._pod(item))
        return found

    async def inspect(self, host_id: str) -> HostInfo:
        if self._kind(host_id) == "pod":
            pod = (
                await self._graphql(
                    f'query {{ pod(input: {{podId: "{host_id}"}}) {{ {POD_FIELDS} }} }}', host=host_id, action="inspect"
                )
            ).get("pod")
            if not pod:
                raise HostNotFound("RunPod does not know this pod", provider=self.name, host=host_id)
            return self._pod(pod)
        return self._endpoint(await self._rest("GET", f"/v2/serverless/{host_id}", host=host_id, action="inspect"))

    async def resume(self, host_id: str) -> None:
        if self._kind(host_id) == "pod":
            await self._rest("POST", f"/v2/pods/{host_id}/action", {"action": "start"}, host=host_id, action="start")
            return
        info = await self.inspect(host_id)
        if info.error:
            raise ProviderRejected(info.error, provider=self.name, host=host_id, action="resume")
        await self._rest(
            "PATCH",
            f"/v2/serverless/{host_id}",
            {"workers": {"min": self.config.warm_workers}},
            host=host_id,
            action="warm",
        )

    async def pause(self, host_id: str) -> None:
        if self._kind(host_id) == "pod":
            await self._rest("POST", f"/v2/pods/{host_id}/action", {"action": "stop"}, host=host_id, action="stop")
        else:
            await self._rest("PATCH", f"/v2/serverless/{host_id}", {"workers": {"min": 0}}, host=host_id, action="cool")

    async def ready(self, info: HostInfo, model: str | None) -> bool | None:
        """An endpoint: a worker is up (`/health`) and `/models` lists the model. A pod runs Ollama:
        None leaves it to the fleet's usual Ollama probe."""
        if self._kind(info.id) == "pod":
            return None
        try:
            workers = (await self._get(f"{self.config.serverless_url}/{info.id}/health")).get("workers") or {}
            up = sum(int(workers.get(state, 0) or 0) for state in ("idle", "running"))
            if not up and int(workers.get("unhealthy", 0) or 0) and not int(workers.get("initializing", 0) or 0):
                # Tell a failed warm-up early, as SURF's failed actions are, instead of waiting it out.
                raise WakeFailed(
                    "RunPod reports the endpoint's worker unhealthy", provider=self.name, host=info.id, action="warm"
                )
            if not up:
                return False
            listed = (await self._get(f"{info.address}/v1/models")).get("data") or []
            return model is None or bool(set(model_names(model)) & {m.get("id") for m in listed})
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    # -- the wire ----------------------------------------------------------------------------------

    def _kind(self, host_id: str) -> str:
        return self._kinds.get(host_id, "endpoint")

    async def _get(self, url: str) -> Any:
        response = await self._http.get(url)
        response.raise_for_status()
        return response.json()

    async def _graphql(self, query: str, *, host: str = "", action: str) -> Any:
        data = await self._call(
            "POST", self.config.api_url.rstrip("/") + "/graphql", {"query": query}, host=host, action=action
        )
        if data.get("errors"):
            message = "; ".join(str(e.get("message", e)) for e in data["errors"])
            raise ProviderRejected(f"RunPod GraphQL error: {message}", provider=self.name, host=host, action=action)
        return data.get("data") or {}

    async def _rest(self, method: str, path: str, body: Any = None, *, host: str, action: str) -> Any:
        return await self._call(method, self.config.api_url.rstrip("/") + path, body, host=host, action=action)

    async def _call(self, method: str, url: str, body: Any, *, host: str, action: str) -> Any:
        async def once() -> Any:
            return await self._request(method, url, body, host=host, action=action)

        return await cloud_call(self.config, once, what=f"RunPod {action} {host}".strip())

    async def _request(self, method: str, url: str, body: Any, *, host: str, action: str) -> Any:
        return await http_json(
            self._http,
            method,
            url,
            json=body,
            cloud="RunPod",
            capacity=_no_capacity,
            hint="check RUNPOD_API_KEY, and that it may write (not a read-only key)",
            context={"provider": self.name, "host": host, "action": action},
        )

    def _endpoint(self, endpoint: dict[str, Any]) -> HostInfo:
        workers = endpoint.get("workers") or {}
        low = int(endpoint.get("workersMin", workers.get("min", 0)) or 0)
        high = int(endpoint.get("workersMax", workers.get("max", 1)) or 0)
        state = CloudState.FAILED if high == 0 else CloudState.RUNNING if low >= 1 else CloudState.PAUSED
        return HostInfo(
            id=str(endpoint["id"]),
            name=str(endpoint.get("name") or endpoint["id"]),
            state=state,
            cloud_status=f"serverless, workers {low}..{high}",
            api="openai",
            address=f"{self.config.serverless_url.rstrip('/')}/{endpoint['id']}/openai",
            error=MAX_WORKERS_ZERO if high == 0 else "",
            details={
                "flavor": ",".join(str(g) for g in endpoint.get("gpuIds") or [])
                if isinstance(endpoint.get("gpuIds"), list)
                else str(endpoint.get("gpuIds") or ""),
                "kind": "serverless endpoint",
                "workers_min": low,
                "workers_max": high,
            },
        )

    def _pod(self, pod: dict[str, Any]) -> HostInfo:
        status = str(pod.get("desiredStatus", "UNKNOWN"))
        runtime = pod.get("runtime") or {}
        port = next((p for p in runtime.get("ports") or [] if p.get("privatePort") == self.config.ollama_port), None)
        if status == "RUNNING":
            state = CloudState.RUNNING if port else CloudState.RESUMING
        elif status in ("EXITED", "STOPPED"):  # the container may still be shutting down (and billing)
            state = CloudState.PAUSING if pod.get("runtime") else CloudState.PAUSED
        else:
            state = CloudState.UNKNOWN
        address = None
        if self.config.pod_address == "proxy" and state in (CloudState.RESUMING, CloudState.RUNNING):
            address = self.config.pod_proxy_url.format(pod_id=pod["id"], port=self.config.ollama_port)
        elif state is CloudState.RUNNING and port is not None and port.get("isIpPublic"):
            address = f"http://{port['ip']}:{port['publicPort']}"
        return HostInfo(
            id=str(pod["id"]),
            name=str(pod.get("name") or pod["id"]),
            state=state,
            cloud_status=status,
            address=address,
            cost_per_hour=float(pod["costPerHr"]) if pod.get("costPerHr") else None,
            details={"kind": "pod", "flavor": "pod"},
        )


def _no_capacity(text: str) -> bool:
    """RunPod tells a capacity failure only in words ("There are not enough free GPUs on the host
    machine...", "no instances available"); such a failure must move requests on, not be retried."""
    text = text.lower()
    return any(word in text for word in ("gpu", "instance", "capacity")) and any(
        word in text
        for word in (
            "not enough",
            "no longer",
            "no free",
            "not available",
            "unavailable",
            "no gpu",
            "no instance",
            "insufficient",
        )
    )

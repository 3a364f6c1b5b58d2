"""The Provider protocol: how gpumanager lists, inspects, resumes and pauses the machines of one cloud.

Contract for implementations:
- `resume` and `pause` are idempotent. Resuming a host that is resuming or running is success;
  resuming a host that is still pausing waits until it is paused, then resumes it. `resume` returns
  once the cloud accepted the action; the fleet then polls `inspect` until the host runs.
- Every call is bounded by a timeout. Timeouts and 5xx are retried with backoff, 4xx never.
- Cloud errors are translated at the boundary into `ProviderError` subclasses naming the host.
Optional capabilities are separate Protocols, so a provider that lacks them never fakes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import httpx
from anyio.abc import TaskStatus
from loguru import logger

from gpumanager.cloud import HostInfo
from gpumanager.errors import (
    CapacityError,
    ConfigError,
    HostNotFound,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)


@runtime_checkable
class Provider(Protocol):
    name: str

    async def list(self) -> list[HostInfo]: ...

    async def inspect(self, host_id: str) -> HostInfo: ...

    async def resume(self, host_id: str) -> None: ...

    async def pause(self, host_id: str) -> None: ...


@runtime_checkable
class ReadinessProbe(Protocol):
    """A provider whose hosts are not plain Ollama brings its own probe (RunPod endpoints).
    None means "a plain Ollama host": the fleet's own probe decides."""

    async def ready(self, info: HostInfo, model: str | None) -> bool | None: ...


@runtime_checkable
class UpstreamAuth(Protocol):
    """A provider whose hosts take its own credentials (RunPod's key), never the client's."""

    def upstream_auth(self, host_id: str) -> list[tuple[bytes, bytes]] | None: ...


@runtime_checkable
class JobApi(Protocol):
    """A provider whose hosts may serve a job API (RunPod's serverless `/run`, `/status/{id}`...)."""

    def job_url(self, host_id: str) -> str | None:
        """The base URL of the host's job API (`.../v2/{endpoint_id}`), or None when it has none (a pod)."""


@runtime_checkable
class Polling(Protocol):
    """A provider with its own pace for reading a host in transition (a cloud's rate limits)."""

    @property
    def poll_seconds(self) -> float: ...


@runtime_checkable
class Service(Protocol):
    """A provider with background work (simulated hosts' servers) runs it in the fleet's task group."""

    async def run(self, *, task_status: TaskStatus[None]) -> None: ...


T = TypeVar("T")

RETRYABLE = (ProviderTimeout, ProviderUnavailable)


async def with_retries(
    call: Callable[[], Awaitable[T]], *, what: str, attempts: int = 3, per_attempt: float = 30.0, backoff: float = 1.0
) -> T:
    """Run `call`, each attempt bounded by `per_attempt` seconds, retrying timeouts and 5xx
    (`ProviderUnavailable`) with backoff.

    4xx (`ProviderRejected`) and every other error go straight to the caller.
    """
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            with anyio.fail_after(per_attempt):
                return await call()
        except TimeoutError:
            error: ProviderError = ProviderTimeout(f"{what}: no answer within {per_attempt:g}s")
        except RETRYABLE as exc:
            error = exc
        if attempt == attempts:
            raise error
        logger.warning("{} failed ({}), attempt {}/{}; retrying in {:g}s", what, error, attempt, attempts, delay)
        await anyio.sleep(delay)
        delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


class CloudSettings(Protocol):
    """A cloud provider's call settings (its frozen config block)."""

    @property
    def api_timeout_seconds(self) -> float: ...

    @property
    def retries(self) -> int: ...

    @property
    def retry_seconds(self) -> float: ...


async def cloud_call(settings: CloudSettings, call: Callable[[], Awaitable[T]], *, what: str) -> T:
    """`with_retries` with a cloud provider's configured timeout, attempts and backoff."""
    return await with_retries(
        call,
        what=what,
        attempts=settings.retries,
        per_attempt=settings.api_timeout_seconds,
        backoff=settings.retry_seconds,
    )


async def http_json(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    cloud: str,
    hint: str,
    context: dict[str, str],
    capacity: Callable[[str], bool] | None = None,
    **kwargs: Any,
) -> Any:
    """One call to a cloud's JSON API, its failures translated: timeouts and 5xx (retried by the
    caller's `cloud_call`), capacity (when `capacity` recognises the words), unknown host, refused
    credentials (with `hint`: which variable to check), and other 4xx."""
    try:
        response = await http.request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(f"{cloud} timed out: {exc or type(exc).__name__}", **context) from exc
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(f"{cloud} unreachable: {exc or type(exc).__name__}", **context) from exc
    status, detail = response.status_code, _detail(response)
    if status >= 500:
        if capacity is not None and capacity(detail):
            raise CapacityError(f"{cloud} has no capacity for this host now: {detail}", **context)
        raise ProviderUnavailable(f"{cloud} answered {status}: {detail}", **context)
    if status == 404:
        raise HostNotFound(f"{cloud} does not know this host: {detail}", **context)
    if status in (401, 403):
        raise ProviderRejected(f"{cloud} refused the credentials ({status}: {detail}); {hint}", **context)
    if status >= 400:
        raise ProviderRejected(f"{cloud} answered {status}: {detail}", **context)
    try:
        return response.json() if response.content else {}
    except ValueError as exc:
        raise ProviderError(f"{cloud} answered something that is not JSON", **context) from exc


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body.get("message") or body)[:300]
    return str(body)[:300]


def require_secret(environ: Mapping[str, str], variable: str, provider: str) -> str:
    """A provider's secret from the environment (or `.env`), or a start-up error naming the variable."""
    value = environ.get(variable, "")
    if not value:
        raise ConfigError("", "", f"{variable} is not set: put it in .env or the environment (needed by {provider})")
    return value

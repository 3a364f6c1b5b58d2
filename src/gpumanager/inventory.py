"""What each host serves: models on disk (`/api/tags`), in VRAM (`/api/ps`), `/api/show` answers.

Read from the hosts' Ollama, kept in memory, and cached on disk in `state_dir` so that the models of
paused hosts are listed and routable after a restart. Also the readiness probe of a waking host,
and whether an awake host answers (`Host.healthy`): a host that does not is skipped by the policy
until a probe finds it answering again.

Owns: the inventory records and their cache file, and `Host.models`, `loaded`, `version` and
`healthy`. Calls: the hosts' Ollama over HTTP. Runs on the event loop; one read per host at a time.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
from loguru import logger

from gpumanager.errors import ProbeFailed
from gpumanager.hosts import Host, HostState
from gpumanager.models import listed_name, model_names

DEFAULT_VERSION = "0.32.0"  # answered by /api/version before any host was seen


class Probe(Enum):
    """What one readiness probe saw."""

    SILENT = "silent"  # no answer (yet)
    ANSWERS = "answers"  # Ollama answers, without the model wanted (still pulling it)
    READY = "ready"  # Ollama answers and lists the model


class TagsAnswer(msgspec.Struct):
    models: list[dict[str, Any]] = []


class VersionAnswer(msgspec.Struct):
    version: str = ""


class HostRecord(msgspec.Struct, omit_defaults=True):
    """One host's inventory, as cached on disk."""

    tags: list[dict[str, Any]] = []
    ps: list[dict[str, Any]] = []
    show: dict[str, Any] = {}  # model -> raw /api/show answer (non-verbose)
    version: str = ""


class OpenAIModel(msgspec.Struct):
    id: str
    created: int = 0


class ModelsAnswer(msgspec.Struct):
    data: list[OpenAIModel] | None = None


def _iso(created: int) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")


_models = msgspec.json.Decoder(ModelsAnswer)
_tags = msgspec.json.Decoder(TagsAnswer)
_version = msgspec.json.Decoder(VersionAnswer)
_cache_decoder = msgspec.json.Decoder(dict[str, HostRecord])
_encoder = msgspec.json.Encoder()


class Inventory:
    def __init__(
        self,
        state_dir: str,
        http: httpx.AsyncClient,
        *,
        probe_timeout: float,
        upstream_headers: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(state_dir) / "inventory.json"
        self.http = http
        self.probe_timeout = probe_timeout
        self.headers = upstream_headers or {}
        self.records: dict[str, HostRecord] = self._load()
        self._locks: dict[str, anyio.Lock] = {}

    # -- reading hosts -----------------------------------------------------------------------------

    async def _get(self, host: Host, path: str) -> bytes:
        try:
            with anyio.fail_after(self.probe_timeout):
                response = await self.http.get(host.url + path, headers=host.read_headers(self.headers))
        except (httpx.HTTPError, TimeoutError) as exc:
            raise ProbeFailed(f"{path}: {type(exc).__name__} {exc}".strip()) from None
        if response.status_code != 200:
            raise ProbeFailed(f"{path}: HTTP {response.status_code}")
        return response.content

    async def refresh(self, host: Host) -> None:
        """Read tags, loaded models and version of an awake host into `host` and the cache.

        One read per host at a time: a slow background read must not land after (and undo) a
        fresher one, such as the read right after an admin pulled a model.
        """
        if host.jobs_url:  # a job endpoint has no model list to read: its models are the config's
            return
        lock = self._locks.setdefault(host.name, anyio.Lock())
        async with lock:
            if host.api == "openai":
                self.apply(host, await self._openai_models(host), [], "")
                return
            version = _decode(_version, await self._get(host, "/api/version"), "/api/version").version
            tags = _decode(_tags, await self._get(host, "/api/tags"), "/api/tags").models
            ps = _decode(_tags, await self._get(host, "/api/ps"), "/api/ps").models
            self.apply(host, tags, ps, version)

    def apply(self, host: Host, tags: list[dict[str, Any]], ps: list[dict[str, Any]], version: str) -> None:
        record = self.records.setdefault(host.name, HostRecord())
        old_models = host.models
        record.tags, record.ps, record.version = tags, ps, version
        host.models = frozenset(str(m.get("name") or m.get("model")) for m in tags)
        host.loaded = {str(m.get("name") or m.get("model")): m.get("context_length") for m in ps}
        host.version = version
        for gone in set(record.show) - host.models:
            del record.show[gone]
        if host.models != old_models:
            logger.bind(host=host.name).info(
                "host {} serves {}", host.name, ", ".join(sorted(host.models)) or "no models"
            )
        self.save()

    async def check(self, host: Host) -> bool:
        """Read an awake host's inventory again; whether it answers decides its health."""
        try:
            await self.refresh(host)
        except ProbeFailed as exc:
            self.mark_unhealthy(host, str(exc))
            return False
        if not host.healthy:
            logger.bind(host=host.name).info("{} answers again", host.name)
            host.healthy = True
        return True

    def mark_unhealthy(self, host: Host, reason: str) -> None:
        """`host` does not answer: new requests skip it until a probe finds it answering again."""
        if host.healthy:
            logger.bind(host=host.name).warning("{} does not answer ({}); skipping it until it does", host.name, reason)
        host.healthy = False
        host.last_error = reason

    async def _openai_models(self, host: Host) -> list[dict[str, Any]]:
        """An OpenAI-compatible upstream's `/v1/models`, in the shape of Ollama's tags."""
        listed = _decode(_models, await self._get(host, "/v1/models"), "/v1/models").data or []
        return [
            {
                "name": m.id,
                "model": m.id,
                "modified_at": _iso(m.created),
                "size": 0,
                "digest": "",
                "details": {"format": "", "family": "", "parameter_size": "", "quantization_level": ""},
            }
            for m in listed
        ]

    async def probe(self, host: Host, model: str | None) -> Probe:
        """One readiness probe: does Ollama answer, and list `model` (when one is wanted)?"""
        try:
            if host.api == "openai":
                tags = await self._openai_models(host)
            else:
                await self._get(host, "/api/version")
                tags = _decode(_tags, await self._get(host, "/api/tags"), "/api/tags").models
        except ProbeFailed:
            return Probe.SILENT
        names = {str(m.get("name") or m.get("model")) for m in tags}
        return Probe.READY if model is None or names & set(model_names(model)) else Probe.ANSWERS

    # -- answers gpumanager gives itself -----------------------------------------------------------

    def restore(self, host: Host) -> None:
        """Give a host that is not awake the models it had when last seen."""
        record = self.records.get(host.name)
        if record is not None and record.tags:
            host.models = frozenset(str(m.get("name") or m.get("model")) for m in record.tags)
            host.loaded = {str(m.get("name") or m.get("model")): m.get("context_length") for m in record.ps}
            host.version = record.version

    def tag_entries(self, hosts: list[Host]) -> list[dict[str, Any]]:
        """Every model of the fleet once, with the details the host that has it reported."""
        entries: dict[str, dict[str, Any]] = {}
        for host in hosts:
            record = self.records.get(host.name)
            for tag in record.tags if record else ():
                entries.setdefault(str(tag.get("name") or tag.get("model")), tag)
            for model in host.models:
                entries.setdefault(
                    model,
                    {
                        "name": model,
                        "model": model,
                        "modified_at": "1970-01-01T00:00:00Z",
                        "size": 0,
                        "digest": "",
                        "details": {},
                    },
                )
        return [entries[name] for name in sorted(entries)]

    def ps_entries(self, hosts: list[Host]) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for host in hosts:
            record = self.records.get(host.name)
            if record is not None and host.state is HostState.READY:  # loaded models answer only when ready
                entries.extend(record.ps)
        return entries

    def show(self, host_names: list[str], model: str) -> Any | None:
        for name in host_names:
            record = self.records.get(name)
            if record is None:
                continue
            for listed in model_names(model):
                if listed in record.show:
                    return record.show[listed]
        return None

    def remember_show(self, host: Host, model: str, answer: Any) -> None:
        """Keep it under the name the host lists, so the next refresh of its models keeps it too."""
        self.records.setdefault(host.name, HostRecord()).show[listed_name(host.models, model)] = answer
        self.save()

    # -- disk --------------------------------------------------------------------------------------

    def _load(self) -> dict[str, HostRecord]:
        try:
            return _cache_decoder.decode(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("ignoring the inventory cache {}: {}", self.path, exc)
            return {}

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".inventory.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(_encoder.encode(self.records))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.error("cannot write the inventory cache {}: {}", self.path, exc)


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes, path: str) -> Any:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProbeFailed(f"{path}: unexpected answer: {exc}") from None

"""Static hosts: always-on servers listed with a `url` in `[[hosts]]`. Resume and pause do nothing.

A static host is an Ollama server, or with `api = "openai"` an OpenAI-compatible one (vLLM,
llama.cpp's llama-server, SGLang, TGI, LM Studio): its models come from `/v1/models`, and Ollama
clients are served through translation. A host with `api_key_env` is sent the bearer token held in
that variable, and only that; the others get the fleet's own token (GPUMANAGER_UPSTREAM_TOKEN).
"""

from __future__ import annotations

from collections.abc import Mapping

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import HostConfig
from gpumanager.errors import HostNotFound
from gpumanager.providers.base import require_secret


class StaticProvider:
    name = "static"

    def __init__(self, hosts: list[HostConfig], environ: Mapping[str, str]) -> None:
        self._hosts = {h.name: h for h in hosts if h.url}
        self._auth: dict[str, list[tuple[bytes, bytes]]] = {}
        for host in self._hosts.values():
            if host.api_key_env is not None:
                token = require_secret(environ, host.api_key_env, f"the static host {host.name!r}")
                self._auth[host.name] = [(b"authorization", b"Bearer " + token.encode())]

    def upstream_auth(self, host_id: str) -> list[tuple[bytes, bytes]] | None:
        """The host's own bearer token when it names one; else None (the fleet's token)."""
        return self._auth.get(host_id)

    async def list(self) -> list[HostInfo]:
        return [self._info(h) for h in self._hosts.values()]

    async def inspect(self, host_id: str) -> HostInfo:
        try:
            return self._info(self._hosts[host_id])
        except KeyError:
            raise HostNotFound("no such static host", provider=self.name, host=host_id) from None

    async def resume(self, host_id: str) -> None:
        await self.inspect(host_id)

    async def pause(self, host_id: str) -> None:
        await self.inspect(host_id)

    @staticmethod
    def _info(host: HostConfig) -> HostInfo:
        assert host.url is not None
        address = host.url.rstrip("/")
        if host.api == "openai":  # the server's root: OpenAI clients' base URLs end in /v1, paths here add it
            address = address.removesuffix("/v1")
        return HostInfo(
            id=host.name,
            name=host.name,
            state=CloudState.RUNNING,
            cloud_status="static",
            address=address,
            api=host.api,
            details={"api": host.api},
        )

"""Static hosts: always-on Ollama servers listed with a `url` in `[[hosts]]`. Resume and pause do nothing."""

from __future__ import annotations

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import HostConfig
from gpumanager.errors import HostNotFound


class StaticProvider:
    name = "static"

    def __init__(self, hosts: list[HostConfig]) -> None:
        self._hosts = {h.name: h for h in hosts if h.url}

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
        return HostInfo(
            id=host.name, name=host.name, state=CloudState.RUNNING, cloud_status="static", address=host.url.rstrip("/")
        )

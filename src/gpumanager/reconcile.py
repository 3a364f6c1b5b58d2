"""Keeping the fleet true to the clouds: discovery, reconcile, inventory refresh and host health.

Every `reconcile_interval_seconds` each provider is asked for the truth (someone may pause or start
a machine in a cloud console) and local state is fixed; hosts found running get a readiness probe
and the fallback window. Awake hosts' models are read every `inventory_refresh_seconds`, and hosts
that stopped answering are probed often until they answer again.

Owns: discovery (adding hosts to the fleet) and the state changes that the clouds' truth makes.
Calls: the providers, the inventory, the fleet, and the `Waker` for hosts found running or
resuming. Runs on the event loop; one reconcile at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
from loguru import logger

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import Config
from gpumanager.errors import ProviderError
from gpumanager.fleet import Fleet, Waker
from gpumanager.hosts import Host, HostEvent, HostState
from gpumanager.inventory import Inventory
from gpumanager.providers.base import JobApi, Provider, UpstreamAuth
from gpumanager.tasks import forever

EV, ST = HostEvent, HostState
FOLLOWER_EVERY = 5  # a replica that is not the leader reconciles this many times less often


class Reconciler:
    def __init__(
        self,
        config: Config,
        fleet: Fleet,
        providers: Mapping[str, Provider],
        inventory: Inventory,
        waker: Waker,
        *,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.config, self.timing = config, config.timing
        self.fleet, self.providers, self.inventory, self.waker = fleet, providers, inventory, waker
        self.clock = clock
        self._lock: anyio.Lock | None = None

    async def run(self) -> None:
        """The reconcile and inventory loops, each restarted if it ever fails, until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(forever, self.reconcile_loop)
            tg.start_soon(forever, self.inventory_loop)

    async def reconcile_loop(self) -> None:
        """Reconcile every `reconcile_interval_seconds` on the leader; another replica only looks
        for new hosts, every `FOLLOWER_EVERY` intervals (the leader's fixes reach it as events)."""
        rounds = 0
        while True:
            await anyio.sleep(self.timing.reconcile_interval_seconds)
            rounds += 1
            if self.fleet.shared.leader or rounds % FOLLOWER_EVERY == 0:
                await self.reconcile()

    async def reconcile(self) -> None:
        """Ask each provider for the truth and fix local state. One reconcile at a time, so a host
        found by two concurrent ones is not made twice."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            for name, provider in self.providers.items():
                try:
                    infos = await provider.list()
                except ProviderError as exc:
                    logger.error("listing the hosts of {} failed: {}", name, exc)
                    continue
                except Exception as exc:  # an answer no one foresaw must not stop the loop
                    logger.opt(exception=exc).error("listing the hosts of {} failed unexpectedly", name)
                    continue
                for info in infos:
                    host = next((h for h in self.fleet.hosts.values() if h.provider == name and h.id == info.id), None)
                    if host is None:
                        host = self._new_host(name, info)
                        self.fleet.add(host)
                    self._observe(host, info)
        self.fleet.notify()

    def _new_host(self, provider: str, info: HostInfo) -> Host:
        config = self.config
        static = next((h for h in config.hosts if h.url and h.name == info.name), None)
        override = static or self.fleet.overrides.get(info.name)
        if override is not None and override.provider not in (None, provider, "static"):
            override = None
        pconf = next((p for p in config.all_providers() if p.name == provider), None)
        slots = override.slots if override and override.slots else info.slots or config.scheduler.default_slots
        cost = override.cost_per_hour if override and override.cost_per_hour is not None else info.cost_per_hour
        host = Host(
            id=info.id,
            name=info.name,
            provider=provider,
            url=info.address or "",
            slots=slots,
            cost_per_hour=cost if cost is not None else getattr(pconf, "cost_per_hour", 0.0),
            protected=bool(override and override.protected),
            always_on=provider == "static",
            models=frozenset(override.models if override and override.models else info.models),
        )
        host.api = info.api
        host.stream_usage = override.stream_usage if override is not None else True
        source = self.providers.get(provider)
        if isinstance(source, UpstreamAuth):
            host.auth = source.upstream_auth(info.id)
        if isinstance(source, JobApi) and (getattr(pconf, "jobs", False) or (override is not None and override.jobs)):
            host.jobs_url = source.job_url(info.id) or ""
            if not host.jobs_url:
                logger.bind(host=info.name).warning("{} is not a serverless endpoint: it serves no jobs", info.name)
        self.inventory.restore(host)
        if host.always_on:  # always running, and answering or not: health decides, not the lifecycle
            host.apply(EV.CLOUD_RUNNING)
            host.apply(EV.OLLAMA_READY)
        found = "a static host" if host.always_on else f"{provider}, {info.cloud_status}"
        logger.bind(host=host.name).info("found host {} ({})", host.name, found)
        return host

    def _observe(self, host: Host, info: HostInfo) -> None:
        host.adopt(info)
        if info.error:
            host.last_error = info.error  # shown by the admin API before anyone tries to wake it
        if host.always_on or host.wake is not None or host.pausing is not None or host.state is ST.FAILED:
            return  # an operation in progress owns the state
        log = logger.bind(host=host.name)
        if info.state is CloudState.RUNNING and host.state in (ST.PAUSED, ST.UNKNOWN):
            log.info("{} is running without a wake (found at start-up, or started outside)", host.name)
            host.apply(EV.CLOUD_RUNNING)
            self.waker.start_wake(host)
        elif info.state is CloudState.RESUMING and host.state in (ST.PAUSED, ST.UNKNOWN):
            host.apply(EV.RESUME)
            self.waker.start_wake(host)
        elif host.state is ST.PAUSING and not host.draining:  # paused through a replica that died meanwhile
            if info.state is CloudState.RUNNING:
                log.warning("{} still runs: the replica pausing it is gone", host.name)
                host.apply(EV.CLOUD_RUNNING)
                self.waker.start_wake(host)
            elif info.state is CloudState.PAUSED:
                host.apply(EV.CLOUD_PAUSED)
                self.fleet.dispatch()
        elif info.state is CloudState.PAUSED and host.state in (ST.READY, ST.STARTING, ST.UNKNOWN):
            if host.state is not ST.UNKNOWN:
                log.warning("{} was paused outside gpumanager", host.name)
            host.apply(EV.CLOUD_PAUSED)
            for lease in list(self.fleet.leases_of(host)):
                if not lease.job:  # RunPod runs an endpoint's queued jobs on flex workers even so
                    lease.abort(f"host {host.name} was paused")
            self.fleet.dispatch()

    # -- inventory and health ----------------------------------------------------------------------

    async def inventory_loop(self) -> None:
        """Re-read awake hosts' models every `inventory_refresh_seconds`; re-probe unhealthy ones often."""
        tick = min(self.timing.inventory_refresh_seconds, 5.0)
        last = self.clock()
        while True:
            await anyio.sleep(tick)
            if self.clock() - last >= self.timing.inventory_refresh_seconds:
                last = self.clock()
                await self.refresh_all()
            else:
                await self.refresh_all(only_unhealthy=True)

    async def refresh_all(self, *, only_unhealthy: bool = False) -> None:
        hosts = [h for h in self.fleet.hosts.values() if h.state is ST.READY and (not only_unhealthy or not h.healthy)]
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(self.refresh, host)

    async def refresh(self, host: Host) -> None:
        """Read an awake host's models again (its health follows), then route by what it now serves."""
        await self.inventory.check(host)
        self.fleet.reindex()

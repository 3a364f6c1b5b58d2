"""Waking and pausing hosts, and the background loops that keep the fleet true to the clouds.

`ensure_ready(host)` starts a wake or joins the one in progress (single flight: one resume call
however many requests wait). A wake runs in the fleet's task group, so it goes on when the request
that started it leaves. A failed wake marks the host `failed` for `failed_cooldown_seconds` and
attempts a pause: a half-woken machine must never go on billing. A pause that fails is retried with
backoff until it succeeds, each failure logged as an error.

Loops (all in one task group, owned by the app's lifespan): reconcile against each provider's truth,
refresh the inventory of awake hosts and re-probe unhealthy ones, and pause hosts idle past their
window (the same loop ends the cooldown of failed hosts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from gpumanager.config import Config
from gpumanager.errors import Conflict, ProviderError, WakeFailed
from gpumanager.fleet import Fleet
from gpumanager.hosts import AWAKE, Host, HostEvent, HostState, InvalidTransition, Wake
from gpumanager.inventory import Inventory, ProbeFailed
from gpumanager.providers.base import CloudState, HostInfo, Provider, ReadinessProbe, Service, UpstreamAuth

EV, ST = HostEvent, HostState


class Lifecycle:
    def __init__(self, config: Config, fleet: Fleet, providers: Mapping[str, Provider], inventory: Inventory) -> None:
        self.config, self.timing = config, config.timing
        self.fleet, self.providers, self.inventory = fleet, providers, inventory
        self._tg: TaskGroup | None = None
        fleet.lifecycle = self

    @property
    def tg(self) -> TaskGroup:
        assert self._tg is not None, "the fleet is not running"
        return self._tg

    def now(self) -> float:
        return self.fleet.clock()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start services, discover and probe every host, then run the loops until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for provider in self.providers.values():
                if isinstance(provider, Service):
                    await tg.start(provider.run)
            await self.reconcile()
            with anyio.move_on_after(self.timing.probe_timeout_seconds * 4):
                await self._refresh_all()
            tg.start_soon(self._reconcile_loop)
            tg.start_soon(self._inventory_loop)
            tg.start_soon(self._idle_loop)
            task_status.started()

    # -- waking ------------------------------------------------------------------------------------

    def _option(self, host: Host, name: str) -> float:
        """A timing value, overridden per provider where the provider sets it."""
        value = getattr(self._provider_config(host), name, None)
        return float(value if value is not None else getattr(self.timing, name))

    def _provider_config(self, host: Host) -> Any:
        return next((p for p in self.config.all_providers() if p.name == host.provider), None)

    def start_wake(self, host: Host, model: str | None = None) -> Wake:
        if host.wake is None:
            if self.fleet.emergency:
                raise Conflict("emergency-off is on: hosts are not woken until an admin turns it off")
            now = self.now()
            host.wake = Wake(anyio.Event(), deadline=now + self._option(host, "startup_timeout_seconds"), started=now)
            self.tg.start_soon(self._wake, host, host.wake)
        if model is not None:
            host.wake.models.add(model)
        return host.wake

    async def ensure_ready(self, host: Host, model: str | None = None) -> None:
        """Return once `host` is ready (waking it if needed), or raise `WakeFailed`."""
        if host.state is ST.READY and not host.draining:
            return
        wake = self.start_wake(host, model)
        await wake.done.wait()
        if wake.error:
            raise WakeFailed(wake.error, provider=host.provider, host=host.name, action="resume")

    async def _wake(self, host: Host, wake: Wake) -> None:
        log = logger.bind(host=host.name)
        provider = self.providers[host.provider]
        try:
            with anyio.CancelScope() as wake.scope, anyio.fail_after(wake.deadline - self.now()):
                if host.pausing is not None:
                    log.info("{} is pausing; it is resumed once the pause is done", host.name)
                    await host.pausing.wait()
                if host.state is ST.FAILED:  # only an admin's resume gets here: it ends the cooldown
                    host.state = ST.PAUSED
                if host.state in (ST.PAUSED, ST.UNKNOWN):
                    host.apply(EV.RESUME)
                    log.info("resuming {} for {}", host.name, ", ".join(sorted(wake.models)) or "an admin")
                    await provider.resume(host.id)
                info = await self._until_running(host, provider)
                cloud_done = self.now()
                await self._until_ollama(host, provider, info, wake)
            if wake.scope.cancel_called:
                raise WakeFailed("the wake was cancelled by emergency-off")
        except (TimeoutError, ProviderError, InvalidTransition) as exc:
            wake.error = _describe(exc, self._option(host, "startup_timeout_seconds"))
            if not self.fleet.emergency:  # under emergency-off the host is being paused already
                self._failed(host, wake.error)
        else:
            host.apply(EV.OLLAMA_READY)
            now = self.now()
            host.ready_since, host.healthy, host.last_error = now, True, ""
            host.idle_deadline = max(host.idle_deadline, now + self.timing.fallback_reservation_minutes * 60)
            log.info("{} is ready after {:.1f}s (cloud {:.1f}s, Ollama {:.1f}s)", host.name, now - wake.started,
                     cloud_done - wake.started, now - cloud_done)
        finally:
            host.wake = None
            wake.done.set()
            self.fleet.reindex()  # models may have changed; hands the new slots to waiters
            self.fleet.notify()

    async def _until_running(self, host: Host, provider: Provider) -> HostInfo:
        poll = float(getattr(provider, "poll_seconds", self._option(host, "ollama_readiness_wait_seconds")))
        while True:
            info = await provider.inspect(host.id)
            self._adopt(host, info)
            if info.state is CloudState.RUNNING and info.address:
                if host.state is ST.RESUMING:
                    host.apply(EV.CLOUD_RUNNING)
                return info
            if info.error and info.state in (CloudState.PAUSED, CloudState.FAILED):
                raise WakeFailed(f"the cloud reports: {info.error}", provider=host.provider, host=host.name)
            if info.state is CloudState.FAILED:
                raise WakeFailed(f"the cloud reports the host {info.cloud_status}", provider=host.provider,
                                 host=host.name)
            await anyio.sleep(poll)

    async def _until_ollama(self, host: Host, provider: Provider, info: HostInfo, wake: Wake) -> None:
        interval = self._option(host, "ollama_readiness_wait_seconds")
        model = next(iter(wake.models), None)
        while True:
            ready = await provider.ready(info, model) if isinstance(provider, ReadinessProbe) else None
            if ready is None:
                ready = await self.inventory.probe(host, model)
            if ready:
                try:
                    await self.inventory.refresh(host)
                except ProbeFailed:
                    continue
                return
            await anyio.sleep(interval)

    def _failed(self, host: Host, error: str) -> None:
        host.last_error = error
        host.state = ST.FAILED if host.state is not ST.FAILED else host.state
        host.failed_until = self.now() + self.timing.failed_cooldown_seconds
        logger.bind(host=host.name).error("waking {} failed: {}; pausing it, and not trying it again for {:g}s",
                                          host.name, error, self.timing.failed_cooldown_seconds)
        self.tg.start_soon(self._pause_call, host)

    # -- pausing -----------------------------------------------------------------------------------

    def request_pause(self, host: Host, reason: str, *, drain: bool = True) -> None:
        """Pause `host` in the background: no new leases, open streams finish (unless not `drain`)."""
        if host.always_on:
            raise Conflict(f"{host.name} is a static host: it is always on and cannot be paused")
        if host.pausing is not None:
            return
        host.pausing = anyio.Event()
        host.draining = True
        self.tg.start_soon(self._pause, host, reason, drain)

    async def _pause(self, host: Host, reason: str, drain: bool) -> None:
        log = logger.bind(host=host.name)
        assert host.pausing is not None
        try:
            while drain and self.fleet.leases_of(host):
                changed = self.fleet.changed
                if self.fleet.leases_of(host):
                    await changed.wait()
            if host.state is not ST.FAILED:
                host.apply(EV.PAUSE)
            log.info("pausing {} ({})", host.name, reason)
            await self._pause_call(host)
            await self._until_paused(host)
            if host.state is not ST.FAILED:
                host.apply(EV.CLOUD_PAUSED)
            host.reserved_key, host.ready_since = None, None
            log.info("{} is paused", host.name)
        finally:
            done, host.pausing, host.draining = host.pausing, None, False
            done.set()
            self.fleet.dispatch()

    async def _pause_call(self, host: Host) -> None:
        """Ask the cloud to pause, until it accepts: billing must never continue silently."""
        delay = self.timing.pause_retry_seconds
        while True:
            try:
                await self.providers[host.provider].pause(host.id)
                return
            except ProviderError as exc:
                logger.bind(host=host.name).error("pausing {} failed: {}; it may still be billing; retrying in {:g}s",
                                                  host.name, exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def _until_paused(self, host: Host) -> None:
        """Poll until the cloud says paused; ask again if it still runs after `startup_timeout_seconds`."""
        provider = self.providers[host.provider]
        poll = float(getattr(provider, "poll_seconds", self._option(host, "ollama_readiness_wait_seconds")))
        patience = self._option(host, "startup_timeout_seconds")
        asked = self.now()
        while True:
            try:
                info = await provider.inspect(host.id)
                self._adopt(host, info)
                if info.state is CloudState.PAUSED:
                    return
                if info.state is CloudState.RUNNING and self.now() - asked > patience:
                    logger.bind(host=host.name).error("{} still runs {:g}s after the pause; asking again",
                                                      host.name, patience)
                    await self._pause_call(host)
                    asked = self.now()
            except ProviderError as exc:
                logger.bind(host=host.name).error("checking that {} paused failed: {}", host.name, exc)
            await anyio.sleep(poll)

    async def emergency_off(self) -> None:
        """Pause every host now, protected ones too, ending open streams; refuse wakes until `emergency_on`."""
        self.fleet.emergency = True
        logger.warning("emergency-off: pausing every host and refusing wakes")
        for host in list(self.fleet.hosts.values()):
            if host.always_on:
                continue
            if host.wake is not None and host.wake.scope is not None:
                host.wake.scope.cancel()
            for lease in list(self.fleet.leases_of(host)):
                lease.abort(f"host {host.name} was paused by an administrator (emergency-off)")
            await anyio.lowlevel.checkpoint()  # let cancelled wakes and streams unwind first
            self.request_pause(host, "emergency-off", drain=False)
        self.fleet.dispatch()

    def emergency_on(self) -> None:
        self.fleet.emergency = False
        logger.warning("emergency-on: hosts are woken on demand again")
        self.fleet.dispatch()

    # -- loops -------------------------------------------------------------------------------------

    async def _idle_loop(self) -> None:
        """Pause hosts idle past their deadline, end failed hosts' cooldowns: sleeps until the next is due."""
        while True:
            changed = self.fleet.changed
            now, due = self.now(), math.inf
            for host in list(self.fleet.hosts.values()):
                if host.state is ST.FAILED:
                    if now < host.failed_until:
                        due = min(due, host.failed_until)
                    elif host.pausing is None:
                        host.apply(EV.COOLDOWN_OVER)
                        self.fleet.dispatch()
                elif self._idle(host):
                    if now >= host.idle_deadline:
                        self.request_pause(host, f"idle {now - host.idle_deadline + self._window(host):.1f}s")
                    else:
                        due = min(due, host.idle_deadline)
            with anyio.move_on_after(due - now):
                await changed.wait()

    def _idle(self, host: Host) -> bool:
        return (host.state is ST.READY and not host.always_on and not host.protected and host.pausing is None
                and not self.fleet.leases_of(host))

    def _window(self, host: Host) -> float:
        return self.timing.reservation_minutes * 60 if host.reserved_key else self.timing.fallback_reservation_minutes * 60

    async def _reconcile_loop(self) -> None:
        while True:
            await anyio.sleep(self.timing.reconcile_interval_seconds)
            await self.reconcile()

    async def reconcile(self) -> None:
        """Ask each provider for the truth and fix local state (someone may use the cloud console)."""
        for name, provider in self.providers.items():
            try:
                infos = await provider.list()
            except ProviderError as exc:
                logger.error("listing the hosts of {} failed: {}", name, exc)
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
        host = Host(id=info.id, name=info.name, provider=provider, url=info.address or "", slots=slots,
                    cost_per_hour=cost if cost is not None else getattr(pconf, "cost_per_hour", 0.0),
                    protected=bool(override and override.protected), always_on=provider == "static",
                    models=frozenset(override.models if override and override.models else info.models))
        host.api = info.api
        source = self.providers.get(provider)
        if isinstance(source, UpstreamAuth):
            host.auth = source.upstream_auth(info.id)
        self.inventory.restore(host)
        if host.always_on:
            host.state = ST.READY
        logger.bind(host=host.name).info("found host {} ({}, {})", host.name, provider, info.cloud_status)
        return host

    def _adopt(self, host: Host, info: HostInfo) -> None:
        host.cloud_status = info.cloud_status
        host.details = dict(info.details)
        if info.address:
            host.url = info.address

    def _observe(self, host: Host, info: HostInfo) -> None:
        self._adopt(host, info)
        if info.error:
            host.last_error = info.error  # shown by the admin API before anyone tries to wake it
        if host.always_on or host.wake is not None or host.pausing is not None or host.state is ST.FAILED:
            return  # an operation in progress owns the state
        log = logger.bind(host=host.name)
        if info.state is CloudState.RUNNING and host.state in (ST.PAUSED, ST.UNKNOWN):
            log.info("{} is running without a wake (found at start-up, or started outside)", host.name)
            host.apply(EV.CLOUD_RUNNING)
            self.start_wake(host)
        elif info.state is CloudState.RESUMING and host.state in (ST.PAUSED, ST.UNKNOWN):
            host.apply(EV.RESUME)
            self.start_wake(host)
        elif info.state is CloudState.PAUSED and host.state in (ST.READY, ST.STARTING, ST.UNKNOWN):
            if host.state is not ST.UNKNOWN:
                log.warning("{} was paused outside gpumanager", host.name)
            host.apply(EV.CLOUD_PAUSED)
            for lease in list(self.fleet.leases_of(host)):
                lease.abort(f"host {host.name} was paused")
            self.fleet.dispatch()

    async def _inventory_loop(self) -> None:
        """Re-read awake hosts' models every `inventory_refresh_seconds`; re-probe unhealthy ones often."""
        tick = min(self.timing.inventory_refresh_seconds, 5.0)
        last = self.now()
        while True:
            await anyio.sleep(tick)
            if self.now() - last >= self.timing.inventory_refresh_seconds:
                last = self.now()
                await self._refresh_all()
            else:
                await self._refresh_all(only_unhealthy=True)

    async def _refresh_all(self, *, only_unhealthy: bool = False) -> None:
        hosts = [h for h in self.fleet.hosts.values() if h.state is ST.READY and (not only_unhealthy or not h.healthy)]
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(self.refresh, host)

    async def refresh(self, host: Host) -> None:
        try:
            await self.inventory.refresh(host)
        except ProbeFailed as exc:
            self.unhealthy(host, str(exc))
            return
        if not host.healthy:
            logger.bind(host=host.name).info("{} answers again", host.name)
            host.healthy = True
        self.fleet.reindex()

    def unhealthy(self, host: Host, reason: str) -> None:
        if host.healthy:
            logger.bind(host=host.name).warning("{} does not answer ({}); skipping it until it does", host.name, reason)
        host.healthy = False
        host.last_error = reason

    def awake_hosts(self) -> list[Host]:
        return [h for h in self.fleet.hosts.values() if h.state in AWAKE]


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"not ready within startup_timeout_seconds ({timeout:g}s)"
    if isinstance(exc, ProviderError):
        return exc.message if exc.message else str(exc)
    return str(exc)

"""The running system: what the app's lifespan builds, wires and runs, and what the routes receive.

This is the one place where the core pieces meet: the fleet is given the lifecycle as its `Waker`,
the reconciler is given the fleet, the providers, the inventory and the waker, and the routes are
given only the parts they use. `run()` opens the one task group that every background loop lives in.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from gpumanager.budget import Budget
from gpumanager.cluster import CachedKeys, RedisShared, prefix, shared_secret
from gpumanager.config import Config, redis_url
from gpumanager.dashboard import DashboardParts
from gpumanager.errors import KeyStoreError, NoCapacity
from gpumanager.events import Bus, KeyChanged, Publisher, RequestDone, WakePhase
from gpumanager.fleet import Fleet
from gpumanager.gpu_metrics import GpuScraper
from gpumanager.inventory import Inventory
from gpumanager.keys import KeyRecord, KeyStore
from gpumanager.ledger.reader import jobs_since
from gpumanager.ledger.recording import LedgerRecorder
from gpumanager.ledger.schema import LedgerError, database_path
from gpumanager.ledger.writer import LedgerWriter
from gpumanager.lifecycle import Lifecycle
from gpumanager.metrics import Metrics
from gpumanager.providers import build_providers
from gpumanager.providers.base import Service
from gpumanager.proxy.forward import Upstream
from gpumanager.proxy.jobs import REMEMBER_SECONDS, JobParts, Jobs
from gpumanager.proxy.routes import ProxyParts
from gpumanager.reconcile import Reconciler
from gpumanager.recorder import NoopRecorder, Recorders, RequestRecord
from gpumanager.sessions import SECRET_ENV, Sessions, load_secret
from gpumanager.tasks import forever
from gpumanager.webhooks import Webhooks

UPSTREAM_TOKEN_ENV = "GPUMANAGER_UPSTREAM_TOKEN"
KEYS_COPY = "keys_from_redis.json"  # with several replicas: the keys as last read from Redis
KEYS_RELOAD_SECONDS = 1.0  # key file changes (new, revoked, limits) become `key` events this soon


class Announcer(NoopRecorder):
    """The `Recorder` calls that are events too: each finished request, each wake phase."""

    def __init__(self, events: Publisher) -> None:
        self.events = events

    def request(self, record: RequestRecord) -> None:
        self.events.publish(
            RequestDone(
                key=record.key,
                route=record.route,
                model=record.model,
                host=record.host,
                status=record.status,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
                seconds=round(record.duration_seconds, 6),
            )
        )

    def wake_phase(self, host: str, phase: str, seconds: float) -> None:
        self.events.publish(WakePhase(host=host, phase=phase, seconds=round(seconds, 6)))


class Runtime:
    """Everything the app runs, built once per app from the config and the environment."""

    def __init__(self, config: Config, environ: Mapping[str, str]) -> None:
        self.config = config
        self.redis_url = redis_url(config, environ)
        # Several replicas: the keys are Redis's (read by `cluster.RedisShared`), not the file's.
        self.key_cache = (
            CachedKeys(f"Redis ({prefix(config.cluster.name)}keys)", str(Path(config.paths.state_dir) / KEYS_COPY))
            if self.redis_url
            else None
        )
        self.keys = KeyStore(config.paths.api_keys_file, source=self.key_cache)
        state_dir = config.paths.state_dir
        secret = None
        if self.redis_url and not environ.get(SECRET_ENV):  # one secret for every replica
            secret = shared_secret(self.redis_url, config.cluster.name)
        secret = secret or load_secret(environ, state_dir)
        self.sessions = Sessions(secret, self.keys, state_dir=state_dir)  # the dashboard's
        token = environ.get(UPSTREAM_TOKEN_ENV, "")
        self.upstream_auth = [(b"authorization", b"Bearer " + token.encode())] if token else []
        self.upstream = Upstream(read_timeout=config.timing.upstream_read_timeout_seconds)
        self.inventory = Inventory(
            config.paths.state_dir,
            self.upstream.client,
            probe_timeout=config.timing.probe_timeout_seconds,
            upstream_headers={"authorization": f"Bearer {token}"} if token else None,
        )
        self.providers = build_providers(config, environ, self.upstream.client)
        self.events = Bus(history=config.events.history, buffer=config.events.buffer)
        self.fleet = Fleet(config, events=self.events)
        self.ledger = LedgerWriter(database_path(config), retention_days=config.usage.retention_days)
        self.metrics = Metrics(self.fleet, ledger=self.ledger)
        self.gpus = GpuScraper(
            self.fleet,
            self.upstream.client,
            interval=config.metrics.gpu_scrape_seconds,
            headers=self.inventory.headers,  # the fleet's token, as the inventory's reads send it
        )
        self.metrics.registry.register(self.gpus.collector())
        self.webhooks = Webhooks(config.webhooks, self.events, environ, on_failure=self.metrics.webhook_failed)
        self.keys.on_change = self._key_changed
        self.budget = Budget(config, self.fleet)
        # The core's Recorder: Prometheus, the ledger, the budgets' counters, the fleet's pace, the events.
        self.recorder = Recorders(
            self.metrics, LedgerRecorder(self.ledger), self.budget, self.fleet.pace, Announcer(self.events)
        )
        self.fleet.billing.recorder = self.recorder  # the metrics read the fleet: it is built first
        self.lifecycle = Lifecycle(config, self.fleet, self.providers, self.inventory, self.recorder)
        self.fleet.waker = self.lifecycle  # the fleet starts wakes through this seam alone
        self.reconciler = Reconciler(
            config, self.fleet, self.providers, self.inventory, self.lifecycle, clock=self.fleet.clock
        )
        self.jobs = Jobs(
            self.fleet,
            self.lifecycle,
            self.upstream.client,
            self.recorder,
            poll_seconds=config.timing.job_poll_seconds,
            clock=self.fleet.clock,
        )
        self.ledger.before_flush = self._checkpoint
        self.shared: RedisShared | None = None
        if self.key_cache is not None:
            self.shared = RedisShared(
                config, self.redis_url, self.fleet, self.lifecycle, self.events, self.budget, self.keys, self.key_cache
            )
            self.webhooks.sends = lambda: self.fleet.shared.leader  # the leader alone sends them
            self.shared.sessions = self.sessions
            self.sessions.on_end = self.shared.session_ended
        self.draining = False  # a shutdown has begun: new requests are refused with 503

    def _checkpoint(self) -> None:
        """Before every ledger flush, the last included: open intervals, and running jobs' GPU time
        so far, so a killed process loses at most the last second of either."""
        self.fleet.billing.checkpoint()
        self.jobs.checkpoint()

    def _key_changed(self, record: KeyRecord, change: str) -> None:
        self.events.publish(KeyChanged(key=record.id, name=record.name, change=change))

    async def _reload_keys(self) -> None:
        await anyio.sleep(KEYS_RELOAD_SECONDS)
        try:
            self.keys.reload()
        except KeyStoreError as exc:
            logger.error("{}; keeping the keys loaded before", exc)

    async def drain(self, grace: float) -> None:
        """Refuse new requests, give open streams `grace` seconds to finish, then end the rest with an
        in-band error ("gpumanager is shutting down") and wait (briefly) until they have said so."""
        self.draining = True
        fleet = self.fleet

        def busy() -> int:
            return fleet.lease_count() + len(fleet.queue)

        with anyio.move_on_after(grace):
            while busy():  # noqa: ASYNC110 - leases end and waiters leave by many paths; a shutdown can poll
                await anyio.sleep(0.05)
        if busy():
            logger.warning("ending {} open requests: shutdown_grace_seconds ({:g}s) passed", busy(), grace)
            fleet.fail_waiters(NoCapacity("gpumanager is shutting down; try again", retry_after=5))
            for lease in fleet.all_leases():
                if not lease.job:  # a job runs on at RunPod; the next start watches it again
                    lease.abort("gpumanager is shutting down")
            with anyio.move_on_after(2):
                while busy():  # noqa: ASYNC110 - as above
                    await anyio.sleep(0.05)

    def proxy_parts(self) -> ProxyParts:
        return ProxyParts(
            fleet=self.fleet,
            inventory=self.inventory,
            upstream=self.upstream,
            upstream_auth=self.upstream_auth,
            max_body=int(self.config.server.max_body_mb * 2**20),
            client_timeout_seconds=self.config.server.client_timeout_seconds,
            upstream_idle_seconds=self.config.timing.upstream_idle_seconds,
            keepalive_seconds=self.config.timing.wake_keepalive_seconds,
            readier=self.lifecycle,
            recorder=self.recorder,
            refresh=self.reconciler.refresh,
            budget=self.budget,
        )

    def dashboard_parts(self) -> DashboardParts:
        return DashboardParts(
            config=self.config,
            fleet=self.fleet,
            keys=self.keys,
            sessions=self.sessions,
            bus=self.events,
            budget=self.budget,
            db_path=self.ledger.path,
            gpus=self.gpus.readings,
            heartbeat=self.config.events.heartbeat_seconds,
            closing=lambda: self.draining,
        )

    def job_parts(self) -> JobParts:
        return JobParts(
            fleet=self.fleet,
            lifecycle=self.lifecycle,
            jobs=self.jobs,
            client=self.upstream.client,
            budget=self.budget,
            max_body=int(self.config.server.max_body_mb * 2**20),
            client_timeout_seconds=self.config.server.client_timeout_seconds,
        )

    async def _adopt_jobs(self) -> None:
        """The RunPod jobs of the ledger: their owners, and those still running are watched again
        (with several replicas, those no other replica watches)."""
        if not any(host.jobs_url for host in self.fleet.hosts.values()):
            return
        try:
            since = time.time() - REMEMBER_SECONDS
            records = await anyio.to_thread.run_sync(jobs_since, self.ledger.path, since)
        except LedgerError as exc:
            logger.warning("RunPod jobs of before the restart are not known: {}", exc)
            return
        shared, known = self.fleet.shared, self.jobs.jobs
        self.jobs.adopt([r for r in records if r.id not in known and (r.ended or await shared.adopt_job(r.id))])

    async def _adopt_orphans(self) -> None:
        """With several replicas: the leader watches the running jobs of a replica that is gone."""
        while True:
            await anyio.sleep(max(self.config.cluster.lease_ttl_seconds, self.config.timing.job_poll_seconds))
            if self.fleet.shared.leader:
                await self._adopt_jobs()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the providers' services and the lifecycle, discover and probe every host, start the
        loops, then say ready; everything runs until cancelled."""
        async with self.upstream, anyio.create_task_group() as tg:
            await tg.start(self.ledger.run)  # cancelled last of all: its final flush is shielded
            await anyio.to_thread.run_sync(self.budget.seed, self.ledger.path)  # today's use, recent timings
            for provider in self.providers.values():
                if isinstance(provider, Service):
                    await tg.start(provider.run)
            await tg.start(self.lifecycle.run)  # wakes that discovery starts run in its task group
            if self.shared is not None:
                await tg.start(self.shared.run)  # the keys, emergency and counters of the other replicas
            await self.reconciler.reconcile()
            with anyio.move_on_after(self.config.timing.probe_timeout_seconds * 4):
                await self.reconciler.refresh_all()
            tg.start_soon(self.reconciler.run)
            await self._adopt_jobs()
            tg.start_soon(forever, self.jobs.run)
            if self.shared is not None:
                tg.start_soon(forever, self._adopt_orphans)
            tg.start_soon(self.gpus.run)  # restarts itself if it fails
            if self.config.budget.daily_dollars is not None or self.config.budget.monthly_dollars is not None:
                tg.start_soon(forever, functools.partial(self.budget.run, self.lifecycle))
            tg.start_soon(forever, self._reload_keys)
            if self.webhooks.hooks:
                tg.start_soon(forever, functools.partial(self.webhooks.run, self.upstream.client))
            if not self.keys.records():
                logger.warning("no API keys in {}: make one with `gpumanager generate-key`", self.keys.path)
            task_status.started()

"""Waking and pausing hosts, emergency-off, and the idle loop that pauses hosts past their window.

`ensure_ready(host)` starts a wake or joins the one in progress (single flight: one resume call
however many requests wait). A wake runs in the lifecycle's task group, so it goes on when the request
that started it leaves. A failed wake marks the host `failed` for `failed_cooldown_seconds` and
pauses it: a half-woken machine must never go on billing. A pause that fails is retried with
backoff until it succeeds, each failure logged as an error. A pause asked for during a wake (by an
admin, or emergency-off) stops the wake first.

Every background task is guarded (`tasks.guarded`): an error nobody foresaw is logged and that
task ends, but the fleet's other tasks and loops go on.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import Config, HostTiming
from gpumanager.errors import Conflict, ProbeFailed, ProviderError, ProviderTimeout, ProviderUnavailable, WakeFailed
from gpumanager.events import Emergency, Paused, PauseWarning, WakeStarted
from gpumanager.events import WakeFailed as WakeFailedEvent
from gpumanager.fleet import Fleet
from gpumanager.hosts import Host, HostEvent, HostState, Wake
from gpumanager.inventory import Inventory, Probe
from gpumanager.providers.base import Polling, Provider, ReadinessProbe
from gpumanager.recorder import NoopRecorder, Recorder
from gpumanager.scheduler import pause_at, reserve
from gpumanager.tasks import forever, guarded

EV, ST = HostEvent, HostState
MAX_PROBES = 8  # readiness probes of one wake in flight at once, at most


class Lifecycle:
    """Wakes and pauses hosts: the `Waker` of the fleet.

    Owns: each host's wake (`Host.wake`) and pause (`Host.pausing`, `Host.draining`), the state
    changes they make (through `Host.apply`), emergency-off, and the idle loop. Calls: the
    providers, the inventory (readiness probes) and the fleet (leases, dispatch). Wakes and pauses
    run as tasks of the task group that `run()` opens, so they outlive the request that asked for
    them; every method runs on the event loop, so no lock is needed.
    """

    def __init__(
        self,
        config: Config,
        fleet: Fleet,
        providers: Mapping[str, Provider],
        inventory: Inventory,
        recorder: Recorder | None = None,
    ) -> None:
        self.config, self.timing = config, config.timing
        self.recorder: Recorder = recorder or NoopRecorder()
        self.fleet, self.providers, self.inventory = fleet, providers, inventory
        self._host_timing = {name: config.host_timing(name) for name in providers}
        self._tg: TaskGroup | None = None

    @property
    def tg(self) -> TaskGroup:
        assert self._tg is not None, "the lifecycle is not running"
        return self._tg

    def now(self) -> float:
        return self.fleet.clock()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the task group of wakes and pauses, and run the idle loop, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(forever, self._idle_loop)
            task_status.started()

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        self.tg.start_soon(guarded, fn, *args)

    # -- waking ------------------------------------------------------------------------------------

    def host_timing(self, host: Host) -> HostTiming:
        """`[timing]` for this host, with its provider's overrides (resolved once, at start)."""
        timing = self._host_timing.get(host.provider)
        if timing is None:
            timing = self._host_timing[host.provider] = self.config.host_timing(host.provider)
        return timing

    def _poll(self, host: Host) -> float:
        """How often the cloud is asked about a host in transition: the provider's own pace, if it has one."""
        provider = self.providers[host.provider]
        if isinstance(provider, Polling):
            return provider.poll_seconds
        return self.host_timing(host).ollama_readiness_wait_seconds

    def start_wake(self, host: Host, model: str | None = None, *, by: str | None = None, admin: bool = False) -> Wake:
        """Start a wake of `host` (or join the one under way). `by` is the key whose request (or, if
        `admin`, whose resume) starts it: it pays for the wake; None when gpumanager found the host
        starting or running."""
        if host.wake is None:
            if self.fleet.emergency:
                raise Conflict("emergency-off is on: hosts are not woken until an admin turns it off")
            now = self.now()
            deadline = now + self.host_timing(host).startup_timeout_seconds
            host.wake = Wake(anyio.Event(), deadline=deadline, started=now, by=by, admin=admin)
            self.fleet.billing.settle(host)
            self.fleet.events.publish(WakeStarted(host=host.name, model=model, key=by))
            self.spawn(self._wake, host, host.wake)
        if model is not None:
            host.wake.models.add(model)
        return host.wake

    def resume(self, host: Host, by: str) -> bool:
        """The resume of admin key `by`: start a wake (True), or nothing when the host is ready
        (False). `Conflict` for a static host, or under emergency-off. A failed host's cooldown ends."""
        if host.always_on:
            raise Conflict(f"{host.name} is a static host: it is always on")
        if host.state is ST.READY and not host.draining:
            return False
        self.start_wake(host, by=by, admin=True)
        return True

    async def ensure_ready(
        self, host: Host, model: str | None = None, *, by: str | None = None, admin: bool = False
    ) -> None:
        """Return once `host` is ready (waking it if needed, on the bill of `by`), or raise `WakeFailed`."""
        if host.state is ST.READY and not host.draining:
            return
        wake = self.start_wake(host, model, by=by, admin=admin)
        await wake.done.wait()
        if wake.error:
            raise WakeFailed(wake.error, provider=host.provider, host=host.name, action="resume")

    def stop_wake(self, host: Host, reason: str) -> None:
        """End a wake in progress (a pause was asked for): its waiters are served elsewhere or told why."""
        wake = host.wake
        if wake is not None and not wake.error:
            wake.stopped_by = reason  # a wake whose task has not run yet stops as it starts
            if wake.scope is not None:
                wake.scope.cancel()

    async def _wake(self, host: Host, wake: Wake) -> None:
        log = logger.bind(host=host.name)
        progress = _Progress()
        try:
            with anyio.CancelScope() as wake.scope, anyio.fail_after(wake.deadline - self.now()):
                if wake.stopped_by:  # stopped before it began: the pause that stopped it waits for this
                    raise WakeFailed(wake.stopped_by)
                await self._resume(host, wake, progress)
                host.apply(EV.OLLAMA_READY)
            if wake.scope.cancel_called:
                raise WakeFailed(wake.stopped_by or "the wake was stopped")
        except (TimeoutError, ProviderError) as exc:
            outcome = "stopped" if wake.stopped_by else "failed"
            self.recorder.wake(host.name, outcome, self.now() - wake.started)
            self._wake_failed(host, wake, _describe(exc, self.host_timing(host).startup_timeout_seconds))
        except Exception as exc:  # a bug, or an answer no one foresaw: the host must not be left half-woken
            log.opt(exception=exc).error("waking {} failed unexpectedly", host.name)
            self.recorder.wake(host.name, "failed", self.now() - wake.started)
            self._wake_failed(host, wake, f"unexpected error: {exc!r}")
        else:
            now = self.now()
            asked = progress.asked if progress.asked is not None else wake.started
            answered = progress.answered if progress.answered is not None else now
            running = min(progress.running if progress.running is not None else answered, answered)
            # From the resume call: the end of a pause it waited for is no part of a cold start.
            if not wake.followed:  # a wake another replica resumed is timed there, once
                self.recorder.wake(host.name, "ready", now - asked)
                self.recorder.wake_phase(host.name, "resume", running - asked)
                self.recorder.wake_phase(host.name, "boot", answered - running)
                self.recorder.wake_phase(host.name, "model", now - answered)
            host.ready_since, host.healthy, host.last_error = now, True, ""
            fallback = self.timing.fallback_reservation_minutes * 60
            host.idle_deadline = reserve(host.idle_deadline, now, fallback)
            self.fleet.shared.touched(host, None, fallback)
            log.info(
                "{} is ready after {:.1f}s (cloud {:.1f}s, Ollama {:.1f}s, model {:.1f}s)",
                host.name,
                now - asked,
                running - asked,
                answered - running,
                now - answered,
            )
        finally:
            host.wake = None
            self.fleet.shared.wake_over(host)
            wake.done.set()
            self.fleet.wake_ended(host)
            self.fleet.reindex()  # models may have changed; hands the new slots to waiters
            self.fleet.notify()

    async def _resume(self, host: Host, wake: Wake, progress: _Progress) -> None:
        """Resume (if needed), then wait for Ollama, watching the cloud meanwhile (`progress` notes
        when the cloud said running and when Ollama first answered)."""
        provider = self.providers[host.provider]
        if host.pausing is not None:
            logger.bind(host=host.name).info("{} is pausing; it is resumed once the pause is done", host.name)
            await host.pausing.wait()
        elif host.state is ST.PAUSING:  # paused through another replica: resumed once the cloud says paused
            logger.bind(host=host.name).info("{} is pausing; it is resumed once the pause is done", host.name)
            await self._after_pause_elsewhere(host)
        progress.asked = self.now()
        if host.state is ST.FAILED:  # only an admin's resume gets here: it ends the cooldown
            host.apply(EV.COOLDOWN_OVER)
        if host.state in (ST.PAUSED, ST.UNKNOWN):
            host.apply(EV.RESUME)
            await self._resume_call(host, provider, wake)
        await self._until_ready(host, provider, wake, progress)

    async def _resume_call(self, host: Host, provider: Provider, wake: Wake) -> None:
        """Ask the cloud to resume `host`, once across replicas: the replica holding the wake's lock
        asks (unless the cloud already reports it resuming or running); the others watch, and take
        the wake over if its holder dies before the host is up."""
        shared, log = self.fleet.shared, logger.bind(host=host.name)
        if shared.alone or await shared.claim_wake(host):
            log.info("resuming {} for {}", host.name, ", ".join(sorted(wake.models)) or _for_whom(host, wake))
            if shared.alone:
                await provider.resume(host.id)
            else:
                await self._resume_unless_started(host, provider)
        else:
            log.info("{} is being resumed through another replica", host.name)
            wake.followed = True
            self.spawn(self._take_over, host, provider, wake)

    async def _resume_unless_started(self, host: Host, provider: Provider) -> None:
        info = await provider.inspect(host.id)
        while info.state is CloudState.PAUSING:  # another replica's pause ends first
            await anyio.sleep(self._poll(host))
            info = await provider.inspect(host.id)
        if info.state in (CloudState.PAUSED, CloudState.UNKNOWN):
            await provider.resume(host.id)
        else:
            logger.bind(host=host.name).info("{} is {} already: no resume call", host.name, info.cloud_status)

    async def _take_over(self, host: Host, provider: Provider, wake: Wake) -> None:
        """Watch another replica's wake of `host`; once its lock expires (its holder died), hold it
        and resume the host if the cloud does not report it resuming already."""
        while host.wake is wake and not wake.done.is_set():
            await anyio.sleep(self.config.cluster.retry_seconds)
            if host.wake is wake and not wake.done.is_set() and await self.fleet.shared.claim_wake(host):
                logger.bind(host=host.name).warning("taking over the wake of {} from a replica gone", host.name)
                wake.followed = False
                await self._resume_unless_started(host, provider)
                return

    async def _after_pause_elsewhere(self, host: Host) -> None:
        """Wait until the cloud says `host` is paused (then it is resumed), or runs (the replica
        that was pausing it died before its pause call: it is ready again, with no resume)."""
        provider = self.providers[host.provider]
        while True:
            info = await self._look(host, provider)
            if info is not None and info.state is CloudState.PAUSED:
                host.apply(EV.CLOUD_PAUSED)
                return
            if info is not None and info.state is CloudState.RUNNING and not host.draining:
                host.apply(EV.CLOUD_RUNNING)
                return
            await anyio.sleep(self._poll(host))

    async def _look(self, host: Host, provider: Provider) -> HostInfo | None:
        """What the cloud says of `host` now (taken in), or None after a blip (timeout, 5xx): ask again."""
        try:
            info = await provider.inspect(host.id)
        except (ProviderTimeout, ProviderUnavailable) as exc:
            logger.bind(host=host.name).warning("checking on {} failed: {}; asking again", host.name, exc)
            return None
        host.adopt(info)
        return info

    def _wake_failed(self, host: Host, wake: Wake, error: str) -> None:
        wake.error = error
        if wake.stopped_by:
            return  # whoever stopped the wake is pausing the host
        host.last_error = error
        host.apply(EV.WAKE_FAILED)
        self.fleet.events.publish(WakeFailedEvent(host=host.name, error=error))
        host.failed_until = self.now() + self.timing.failed_cooldown_seconds
        logger.bind(host=host.name).error(
            "waking {} failed: {}; pausing it, and not trying it again for {:g}s",
            host.name,
            error,
            self.timing.failed_cooldown_seconds,
        )
        self.request_pause(host, "its wake failed", drain=False, kind="failed_wake")

    async def _until_ready(self, host: Host, provider: Provider, wake: Wake, progress: _Progress) -> None:
        """Poll the cloud and, as soon as it gave the host's address, probe Ollama alongside, so that
        readiness is seen within one `ollama_readiness_wait_seconds` however slowly the cloud is polled.

        The cloud's half ends the wake when the cloud reports a failure; Ollama's half ends it when
        Ollama answers with the model, which proves the machine runs even if the cloud has not said
        so yet.
        """
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._until_running, host, provider, progress)
                await self._until_ollama(host, provider, progress, wake)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # one half failed (the other was cancelled): its error alone
            raise _first(group) from None
        if host.state is ST.RESUMING:
            host.apply(EV.CLOUD_RUNNING)

    async def _until_running(self, host: Host, provider: Provider, progress: _Progress) -> None:
        """Poll the cloud every `poll_seconds` until it says the host runs and gives its address.

        Every address it gives for the host while it resumes or runs goes to the Ollama probe: some
        clouds know it before the machine runs. A failure the cloud reports raises `WakeFailed`; a
        blip (timeout, 5xx) is asked about again, within the wake's deadline.
        """
        while True:
            info = await self._look(host, provider)
            if info is not None:
                if info.address and info.state in (CloudState.RESUMING, CloudState.RUNNING):
                    progress.located(info)
                if info.state is CloudState.RUNNING and info.address:
                    progress.running = self.now()
                    if host.state is ST.RESUMING:
                        host.apply(EV.CLOUD_RUNNING)
                    return
                if info.error and info.state in (CloudState.PAUSED, CloudState.FAILED):
                    raise WakeFailed(f"the cloud reports: {info.error}", provider=host.provider, host=host.name)
                if info.state is CloudState.FAILED:
                    raise WakeFailed(
                        f"the cloud reports the host {info.cloud_status}", provider=host.provider, host=host.name
                    )
            await anyio.sleep(self._poll(host))

    async def _until_ollama(self, host: Host, provider: Provider, progress: _Progress, wake: Wake) -> None:
        """Once the host's address is known, probe it every `ollama_readiness_wait_seconds` until it
        answers with the model, then read its inventory.

        A probe starts on time even while earlier ones still wait out `probe_timeout_seconds` (a
        machine not yet on the network drops packets rather than refusing them); a few at most are
        in flight, so a host that never answers is not flooded.
        """
        await progress.address_known.wait()
        interval = self.host_timing(host).ollama_readiness_wait_seconds
        most = min(MAX_PROBES, math.ceil(self.inventory.probe_timeout / interval) + 1)
        model = next(iter(wake.models), None)
        ready = anyio.Event()
        in_flight = 0

        async def probe(info: HostInfo) -> None:
            nonlocal in_flight
            in_flight += 1
            try:
                seen = await self._probe(host, provider, info, model)
                if seen is not Probe.SILENT and progress.answered is None:
                    progress.answered = self.now()
                if seen is Probe.READY:
                    await self.inventory.refresh(host)
                    ready.set()
            except ProbeFailed:
                pass
            finally:
                in_flight -= 1

        async with anyio.create_task_group() as probes:
            while not ready.is_set():
                if in_flight < most:
                    assert progress.info is not None
                    probes.start_soon(probe, progress.info)
                with anyio.move_on_after(interval):
                    await ready.wait()
            probes.cancel_scope.cancel()

    async def _probe(self, host: Host, provider: Provider, info: HostInfo, model: str | None) -> Probe:
        """One readiness probe: the provider's own (RunPod endpoints), else Ollama's. A job endpoint
        woken for jobs is ready once its workers are set: RunPod queues the jobs meanwhile."""
        if host.jobs_url and model is None:
            return Probe.READY
        ready = await provider.ready(info, model) if isinstance(provider, ReadinessProbe) else None
        if ready is None:
            return await self.inventory.probe(host, model)
        return Probe.READY if ready else Probe.SILENT

    # -- pausing -----------------------------------------------------------------------------------

    def pause(self, host: Host, reason: str, by: str) -> int:
        """The pause of admin key `by`: drain (open requests finish), then pause. Returns the open
        requests it waits for. `Conflict` when the host is paused or pausing already, or is static."""
        if host.state in (ST.PAUSED, ST.PAUSING) or host.pausing is not None:
            raise Conflict(f"{host.name} is {host.state}: there is nothing to pause")
        if host.draining:
            raise Conflict(f"{host.name} is being paused through another replica")
        self.request_pause(host, reason, kind="admin", by=by)
        return len(self.fleet.leases_of(host))

    def request_pause(
        self, host: Host, reason: str, *, drain: bool = True, kind: str = "idle", by: str | None = None
    ) -> None:
        """Pause `host` in the background: no new leases, open streams finish (unless not `drain`).
        A wake in progress is stopped first. `kind` is why, for the metrics: "idle", "admin",
        "emergency", "failed_wake" or "budget"; `by` is the admin key that asked (it pays for the
        host's time from now until the cloud says paused)."""
        if host.always_on:
            raise Conflict(f"{host.name} is a static host: it is always on and cannot be paused")
        if host.pausing is not None:
            return
        stopped = host.wake
        self.stop_wake(host, f"{host.name} is being paused ({reason})")
        host.pausing = anyio.Event()
        host.draining = True
        host.paused_by = by
        self.fleet.billing.settle(host)
        self.recorder.paused(host.name, kind)
        self.spawn(self._pause, host, reason, drain, stopped, kind)

    async def _pause(self, host: Host, reason: str, drain: bool, stopped: Wake | None, kind: str) -> None:
        log = logger.bind(host=host.name)
        assert host.pausing is not None
        try:
            await self.fleet.shared.drain(host)
            while drain and self.fleet.busy(host):
                changed = self.fleet.changed
                if self.fleet.busy(host):
                    await changed.wait()
            if stopped is not None:  # the wake this pause stopped unwinds first (a later one waits for us)
                await stopped.done.wait()
            if host.state is not ST.FAILED:  # a failed host keeps its cooldown through the pause
                host.apply(EV.PAUSE)
            log.info("pausing {} ({})", host.name, reason)
            await self._pause_call(host)
            await self._until_paused(host)
            if host.state is not ST.FAILED:
                host.apply(EV.CLOUD_PAUSED)
            host.reserved_key, host.ready_since = None, None
            host.recent_keys.clear()
            log.info("{} is paused", host.name)
            self.fleet.events.publish(Paused(host=host.name, reason=kind))
        finally:
            self.fleet.shared.drained(host)
            done, host.pausing, host.draining = host.pausing, None, False
            host.paused_by, host.pause_failing = None, False
            self.fleet.billing.settle(host)
            done.set()
            self.fleet.dispatch()
            self.fleet.notify()

    async def _pause_call(self, host: Host) -> None:
        """Ask the cloud to pause, until it accepts: billing must never continue silently."""
        delay = self.timing.pause_retry_seconds
        while True:
            try:
                await self.providers[host.provider].pause(host.id)
            except Exception as exc:  # every failure, foreseen or not, is retried
                logger.bind(host=host.name).error(
                    "pausing {} failed: {}; it may still be billing; retrying in {:g}s", host.name, exc, delay
                )
                if not host.pause_failing:  # nobody pays for the time the cloud refuses to pause it
                    host.pause_failing = True
                    self.fleet.billing.settle(host)
            else:
                if host.pause_failing:
                    host.pause_failing = False
                    self.fleet.billing.settle(host)
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def _until_paused(self, host: Host) -> None:
        """Poll until the cloud says paused; ask again if it still runs after `startup_timeout_seconds`."""
        provider = self.providers[host.provider]
        patience = self.host_timing(host).startup_timeout_seconds
        asked = self.now()
        while True:
            try:
                info = await provider.inspect(host.id)
                host.adopt(info)
                if info.state is CloudState.PAUSED:
                    return
                if info.state is CloudState.RUNNING and self.now() - asked > patience:
                    logger.bind(host=host.name).error(
                        "{} still runs {:g}s after the pause; asking again", host.name, patience
                    )
                    await self._pause_call(host)
                    asked = self.now()
            except Exception as exc:
                logger.bind(host=host.name).error("checking that {} paused failed: {}", host.name, exc)
            await anyio.sleep(self._poll(host))

    async def emergency_off(self, by: str) -> None:
        """Admin key `by` pauses every host now, protected ones too, ending open streams; wakes are
        refused until `emergency_on`."""
        self.fleet.emergency = True
        logger.warning("emergency-off by key {}: pausing every host and refusing wakes", by)
        self.fleet.events.publish(Emergency(on=True, key=by))
        for host in list(self.fleet.hosts.values()):
            if host.always_on:
                continue
            for lease in list(self.fleet.leases_of(host)):
                lease.abort(f"host {host.name} was paused by an administrator (emergency-off)")
            self.request_pause(host, "emergency-off", drain=False, kind="emergency", by=by)
        await anyio.lowlevel.checkpoint()  # let the stopped wakes and streams unwind
        self.fleet.dispatch()

    def emergency_on(self, by: str) -> None:
        """Admin key `by` lets hosts be woken on demand again."""
        self.fleet.emergency = False
        logger.warning("emergency-on by key {}: hosts are woken on demand again", by)
        self.fleet.events.publish(Emergency(on=False, key=by))
        self.fleet.dispatch()

    # -- idle --------------------------------------------------------------------------------------

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
                else:
                    at = self._pause_at(host)
                    if at is None or not self.fleet.shared.leader:
                        continue  # only the leader pauses idle hosts (one replica: always)
                    if now >= at:
                        self.request_pause(host, f"idle {now - at + self._window(host):.1f}s")
                    else:
                        due = min(due, at, self._warn(host, at, now))
            with anyio.move_on_after(due - now):
                await changed.wait()

    def _warn(self, host: Host, at: float, now: float) -> float:
        """Publish a `pause_warning` once `pause_warning_minutes` before `at` (once per deadline);
        return when the next warning of the host is due."""
        warn_at = at - self.timing.pause_warning_minutes * 60
        if host.warned_for == at:
            return math.inf
        if now < warn_at:
            return warn_at
        host.warned_for = at
        window = self._window(host)
        keys = sorted(k for k, ended in host.recent_keys.items() if ended >= at - window)
        self.fleet.events.publish(PauseWarning(host=host.name, seconds_left=round(at - now, 3), keys=keys))
        return math.inf

    def _pause_at(self, host: Host) -> float | None:
        return pause_at(
            host.state,
            always_on=host.always_on,
            protected=host.protected,
            pausing=host.pausing is not None or host.draining,  # draining elsewhere: another replica pauses it
            leases=len(self.fleet.leases_of(host)) + host.others,
            deadline=host.idle_deadline,
        )

    def _window(self, host: Host) -> float:
        return (
            self.timing.reservation_minutes * 60 if host.reserved_key else self.timing.fallback_reservation_minutes * 60
        )


class _Progress:
    """What the cloud has told of a waking host so far, shared by the two halves of its wake."""

    def __init__(self) -> None:
        self.address_known = anyio.Event()  # set once the cloud gave the host's address
        self.info: HostInfo | None = None  # the cloud's newest answer with the address
        self.running: float | None = None  # when the cloud was first seen to say the host runs
        self.answered: float | None = None  # when Ollama first answered a probe
        self.asked: float | None = None  # when the resume was asked (after any pause it waited for)

    def located(self, info: HostInfo) -> None:
        self.info = info
        self.address_known.set()


def _for_whom(host: Host, wake: Wake) -> str:
    """Who a wake that names no model is for, in the log."""
    if wake.admin:
        return "an admin"
    return "jobs" if host.jobs_url else "a request"


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error in a (nested) exception group of a task group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"not ready within startup_timeout_seconds ({timeout:g}s)"
    if isinstance(exc, ProviderError):
        return exc.message if exc.message else str(exc)
    return str(exc)

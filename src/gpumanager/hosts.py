"""Hosts, their lifecycle states, and the pure transition table.

    unknown ──▶ paused ──resume──▶ resuming ──cloud running──▶ starting ──Ollama ready──▶ ready
                  ▲                   │                           │                        │
                  └──cloud paused── pausing ◀────────pause────────┴────────────────────────┘
    any state ──wake failed──▶ failed ──cooldown over (or an admin's resume)──▶ paused
    static hosts: unknown ──cloud running──▶ starting ──Ollama ready──▶ ready, and stay there

"Full" (every slot leased) is not a state: it is derived from leases. Whether a static host answers
is `healthy`, kept apart from the lifecycle: it is skipped while it does not answer, never paused.
`transition()` is the only writer of `Host.state` (through `Host.apply`): every change is an event of
the table, and an event the table does not allow is a bug (`InvalidTransition`, logged loudly by
whoever runs the operation). Callers never inspect the state and then act; they go through
`Lifecycle.ensure_ready`, `Lifecycle.resume` and `Lifecycle.pause`, which apply the events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gpumanager.errors import InvalidTransition

if TYPE_CHECKING:
    import anyio

    from gpumanager.cloud import HostInfo


class HostState(StrEnum):
    UNKNOWN = "unknown"
    PAUSED = "paused"
    RESUMING = "resuming"
    STARTING = "starting"
    READY = "ready"
    PAUSING = "pausing"
    FAILED = "failed"


class HostEvent(StrEnum):
    RESUME = "resume"  # a wake asked the cloud to resume the host
    CLOUD_RUNNING = "cloud_running"  # the cloud reports the machine running
    OLLAMA_READY = "ollama_ready"  # Ollama answers and lists its models
    PAUSE = "pause"  # a pause was asked of the cloud
    CLOUD_PAUSED = "cloud_paused"  # the cloud reports the machine paused or stopped
    WAKE_FAILED = "wake_failed"  # the resume failed, or the host did not become ready in time
    COOLDOWN_OVER = "cooldown_over"  # a failed host may be tried again


S, E = HostState, HostEvent
TRANSITIONS: dict[tuple[HostState, HostEvent], HostState] = {
    (S.UNKNOWN, E.CLOUD_PAUSED): S.PAUSED,
    (S.UNKNOWN, E.CLOUD_RUNNING): S.STARTING,
    (S.UNKNOWN, E.RESUME): S.RESUMING,
    (S.UNKNOWN, E.PAUSE): S.PAUSING,
    (S.PAUSED, E.RESUME): S.RESUMING,
    (S.PAUSED, E.CLOUD_RUNNING): S.STARTING,  # started from outside (a cloud console)
    (S.PAUSED, E.CLOUD_PAUSED): S.PAUSED,
    (S.PAUSED, E.PAUSE): S.PAUSING,  # emergency-off confirms even paused hosts
    (S.RESUMING, E.CLOUD_RUNNING): S.STARTING,
    (S.RESUMING, E.WAKE_FAILED): S.FAILED,
    (S.RESUMING, E.PAUSE): S.PAUSING,  # emergency-off during a wake
    (S.STARTING, E.OLLAMA_READY): S.READY,
    (S.STARTING, E.WAKE_FAILED): S.FAILED,
    (S.STARTING, E.CLOUD_PAUSED): S.PAUSED,
    (S.STARTING, E.PAUSE): S.PAUSING,
    (S.READY, E.OLLAMA_READY): S.READY,
    (S.READY, E.CLOUD_RUNNING): S.READY,
    (S.READY, E.PAUSE): S.PAUSING,
    (S.READY, E.CLOUD_PAUSED): S.PAUSED,  # paused from outside
    (S.PAUSING, E.CLOUD_PAUSED): S.PAUSED,
    (S.PAUSING, E.PAUSE): S.PAUSING,
    (S.PAUSING, E.CLOUD_RUNNING): S.STARTING,  # another replica's pause that never happened (it died)
    (S.FAILED, E.PAUSE): S.FAILED,  # the pause attempt after a failed wake keeps the cooldown
    (S.FAILED, E.CLOUD_PAUSED): S.FAILED,
    (S.FAILED, E.CLOUD_RUNNING): S.FAILED,
    (S.FAILED, E.COOLDOWN_OVER): S.PAUSED,
    # A wake can fail whatever the state it reached: the resume call was refused, the cloud
    # reports a failure, or the deadline passed while it waited (even for a pause to finish).
    **{(state, E.WAKE_FAILED): S.FAILED for state in S},
}


def transition(state: HostState, event: HostEvent) -> HostState:
    """The state after `event`, or `InvalidTransition`. Pure: no I/O, no clock."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(str(state), str(event)) from None


AWAKE = frozenset({S.RESUMING, S.STARTING, S.READY})  # billing, or about to
WAKING = frozenset({S.RESUMING, S.STARTING})  # a wake is under way
WAKEABLE = frozenset({S.UNKNOWN, S.PAUSED, S.PAUSING})  # the policy may wake it (after the pause ends)
RESUMABLE = frozenset({S.UNKNOWN, S.PAUSED, S.FAILED})  # an admin may resume it (a failed host's cooldown ends)


@dataclass(eq=False)
class Host:
    """One machine with Ollama, and what gpumanager knows of it at run time."""

    id: str
    name: str
    provider: str
    url: str
    slots: int
    cost_per_hour: float = 0.0
    protected: bool = False
    always_on: bool = False  # static hosts: never resumed or paused
    api: str = "ollama"  # "openai": an OpenAI-compatible upstream only (a RunPod serverless endpoint)
    auth: list[tuple[bytes, bytes]] | None = None  # upstream credentials of its own (else the fleet's token)
    stream_usage: bool = True  # takes `stream_options.include_usage` (OpenAI API); False once it refused it
    jobs_url: str = ""  # a RunPod endpoint serving jobs: its job API (ready once its workers are set)
    models: frozenset[str] = frozenset()  # on disk, from /api/tags (or the config before first seen)
    loaded: dict[str, int | None] = field(default_factory=dict)  # in VRAM: model -> context length
    state: HostState = HostState.UNKNOWN
    cloud_status: str = ""  # the provider's own word for the state
    healthy: bool = True
    leases: int = 0
    others: int = 0  # slots that other replicas hold (several replicas, DESIGN.md §12)
    draining: bool = False
    idle_deadline: float = 0.0  # monotonic (anyio clock) time past which an idle host is paused
    reserved_key: str | None = None  # the key that used it last, preferred within the window
    ready_since: float | None = None
    failed_until: float = 0.0
    last_error: str = ""
    version: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # provider extras for the admin API
    wake: Wake | None = None
    pausing: anyio.Event | None = None  # while a pause runs: set when it ends
    paused_by: str | None = None  # the admin key whose pause or emergency-off runs (it pays meanwhile)
    pause_failing: bool = False  # the pause call failed and is being retried
    recent_keys: dict[str, float] = field(default_factory=dict)  # key id -> when its last request ended here
    warned_for: float = 0.0  # the idle deadline a pause warning was last given for
    # Told of every state change (the fleet: its billing meter, and the event bus): the host, the
    # state before, and the lifecycle event.
    on_change: Callable[[Host, HostState, HostEvent], None] | None = None

    def apply(self, event: HostEvent) -> HostState:
        """Move to the state the table gives for `event`: the only write of `state`."""
        old, self.state = self.state, transition(self.state, event)
        if self.on_change is not None:
            self.on_change(self, old, event)
        return self.state

    def adopt(self, info: HostInfo) -> None:
        """Take what the cloud says of the host: its own status word, details and (new) address."""
        self.cloud_status = info.cloud_status
        self.details = dict(info.details)
        if info.address:
            self.url = info.address

    @property
    def awake(self) -> bool:
        return self.state in AWAKE

    def read_headers(self, fleet: dict[str, str]) -> dict[str, str]:
        """The headers of gpumanager's own reads of the host: its own credentials (a RunPod key),
        else the fleet's (`fleet`: the upstream token, if one is set)."""
        return fleet if self.auth is None else {k.decode(): v.decode() for k, v in self.auth}


@dataclass(eq=False)
class Wake:
    """One wake in progress: every request that needs the host waits on `done` (single flight)."""

    done: anyio.Event
    deadline: float
    started: float
    models: set[str] = field(default_factory=set)  # what the waiting requests need the host to list
    error: str = ""
    scope: anyio.CancelScope | None = None  # a pause asked for meanwhile cancels it
    stopped_by: str = ""  # why it was stopped, if it was
    by: str | None = None  # the key whose request (or admin's resume) started it; None: found running
    admin: bool = False  # an admin's resume
    followed: bool = False  # another replica made its resume call: it times the wake, not this one

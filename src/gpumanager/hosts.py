"""Hosts, their lifecycle states, and the pure transition table.

    unknown ──▶ paused ──resume──▶ resuming ──cloud running──▶ starting ──Ollama ready──▶ ready
                  ▲                   │                           │                        │
                  └──cloud paused── pausing ◀────────pause────────┴────────────────────────┘
    resuming/starting ──wake failed──▶ failed ──cooldown over──▶ paused

"Full" (every slot leased) is not a state: it is derived from leases. Whether a static host answers
is `healthy`, kept apart from the lifecycle: it is skipped while it does not answer, never paused.
Callers never inspect the state and then act; they go through `Fleet.ensure_ready` and `Fleet.pause`,
which apply `transition()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anyio

    from gpumanager.providers.base import HostInfo


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
    (S.FAILED, E.PAUSE): S.FAILED,  # the pause attempt after a failed wake keeps the cooldown
    (S.FAILED, E.CLOUD_PAUSED): S.FAILED,
    (S.FAILED, E.CLOUD_RUNNING): S.FAILED,
    (S.FAILED, E.COOLDOWN_OVER): S.PAUSED,
}


class InvalidTransition(ValueError):
    def __init__(self, state: HostState, event: HostEvent) -> None:
        super().__init__(f"no transition from {state} on {event}")
        self.state, self.event = state, event


def transition(state: HostState, event: HostEvent) -> HostState:
    """The state after `event`, or `InvalidTransition`. Pure: no I/O, no clock."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None


AWAKE = frozenset({S.RESUMING, S.STARTING, S.READY})
WAKING = frozenset({S.RESUMING, S.STARTING})
ASLEEP = frozenset({S.UNKNOWN, S.PAUSED, S.PAUSING})


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
    models: frozenset[str] = frozenset()  # on disk, from /api/tags (or the config before first seen)
    loaded: dict[str, int | None] = field(default_factory=dict)  # in VRAM: model -> context length
    state: HostState = HostState.UNKNOWN
    cloud_status: str = ""  # the provider's own word for the state
    healthy: bool = True
    leases: int = 0
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

    def apply(self, event: HostEvent) -> HostState:
        self.state = transition(self.state, event)
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

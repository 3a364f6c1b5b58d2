"""What a cloud reports of one machine: the record every provider returns and the fleet reads.

It lives apart from `providers/` so that the policy layer (hosts, fleet, reconcile) can read what
clouds report without importing any provider.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class CloudState(StrEnum):
    """A provider's state words, mapped onto the few the fleet acts on."""

    RUNNING = "running"
    PAUSED = "paused"  # also: stopped, exited, scaled to zero
    RESUMING = "resuming"  # also: pending, starting
    PAUSING = "pausing"  # also: stopping
    FAILED = "failed"
    UNKNOWN = "unknown"  # creating, updating, deleting, anything not understood


class HostInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    state: CloudState
    cloud_status: str  # the provider's own word
    address: str | None = None  # base URL of its Ollama (or OpenAI API), as soon as the cloud resumes it
    details: dict[str, Any] = {}  # flavour, region, last action error... shown by the admin API
    error: str = ""  # the newest failure the cloud reports for this host
    slots: int | None = None  # what the cloud knows of the host's parallelism, if anything
    cost_per_hour: float | None = None  # what the cloud says the host costs, if it says
    models: tuple[str, ...] = ()  # what the cloud says the host serves, if it knows (before it is seen)
    api: str = "ollama"  # "openai" when the address is an OpenAI-compatible API, not Ollama

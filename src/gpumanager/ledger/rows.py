"""What the usage ledger stores (DESIGN.md §10): one row per request, one per non-serving billed
interval of a host, one per RunPod job (`JobRow`: who owns it, and what it used). Money is integer
micro-dollars; times are Unix seconds (UTC)."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from gpumanager.recorder import JobRecord as JobRow

__all__ = ["MICRO", "IntervalRow", "JobRow", "Reason", "RequestRow"]

MICRO = 1_000_000  # micro-dollars per dollar


class Reason(StrEnum):
    """Why a host was billed while it served no request, and so who pays for that time."""

    WAKE = "wake"  # resume asked -> ready (or -> failed and paused): the key whose request woke it
    RESERVE = "reserve"  # idle before its deadline: the key whose finished request set the deadline
    DRAIN = "drain"  # idle past its deadline, draining and pausing: that same key
    FALLBACK = "fallback"  # the window after a wake whose request left: the key that started the wake
    ADMIN = "admin"  # an admin's resume, pause or emergency-off: that admin
    FOUND = "found"  # found running at start-up, or started outside gpumanager: unattributed
    PROTECTED = "protected"  # idle past its deadline because protected or static: unattributed
    PAUSE_RETRY = "pause_retry"  # after a pause call failed, while it is retried: unattributed


class RequestRow(msgspec.Struct, frozen=True, kw_only=True):
    ts: float  # when the request finished
    key_id: str
    route: str  # "/api/chat", "/v1/chat/completions", ...
    model: str
    host: str  # "" when no host served it (refused, queue timeout)
    status: int
    wait_ms: float  # queue wait (a wake included)
    ttfb_ms: float | None  # time to the first byte sent to the client
    duration_ms: float
    prompt_tokens: int | None  # None: the host sent no counts (never guessed)
    completion_tokens: int | None
    gpu_seconds: float  # its share of the host's serving time
    cost_micro: int  # its share of the host's cost while serving


class IntervalRow(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    start: float
    end: float
    reason: Reason
    key_id: str | None  # the owner; None = unattributed
    cost_micro: int  # (end - start) x the host's price
    gpu_seconds: float  # end - start

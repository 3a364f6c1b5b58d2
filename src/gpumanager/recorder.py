"""The seam through which the core reports what happened: requests, billed intervals, wakes and pauses.

The core is given a `Recorder` and calls it on its own task, never awaiting: an implementation
must return at once (count, enqueue) and must not raise. `NoopRecorder` records nothing; the
Prometheus series (`metrics.py`) and the ledger (`ledger/recording.py`) implement it.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class RequestRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One finished request, as the proxy saw it."""

    route: str  # "/api/chat", "/v1/chat/completions", ...
    model: str
    status: int  # 499: the client went away first
    key: str  # the key's id, never the key
    host: str  # "" when no host served it
    wait_seconds: float  # in the queue (a wake included)
    first_byte_seconds: float | None  # receipt -> first body byte to the client
    duration_seconds: float
    overhead_seconds: float | None  # gpumanager's own time: receipt -> sent upstream, upstream end -> client end
    prompt_tokens: int | None
    completion_tokens: int | None
    gpu_seconds: float = 0.0  # its share of the host's serving time
    cost_micro: int = 0  # ...priced at the host's cost_per_hour, in micro-dollars


class IntervalRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A host's billed time that served no request, all of it one owner's (DESIGN.md §10), as it
    stands: an interval still open is recorded again as it grows, with the same `host` and `start`."""

    host: str
    start: float  # Unix seconds
    end: float
    reason: str  # "wake", "reserve", "drain", "fallback", "admin", "found", "protected", "pause_retry"
    key: str | None  # the owner's key id; None: unattributed
    gpu_seconds: float  # end - start
    cost_micro: int  # ...priced at the host's cost_per_hour, in micro-dollars
    added_seconds: float  # since this interval was last recorded
    added_micro: int


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A RunPod job as gpumanager last saw it: recorded when it is submitted and when it ends (and
    again as its state changes), always whole: a later record of the same `id` replaces the earlier."""

    id: str  # RunPod's job id
    ts: float  # submitted (Unix seconds)
    key_id: str  # the key that submitted it: it owns it
    host: str  # the endpoint's host name
    endpoint: str  # RunPod's endpoint id
    route: str  # "run", "runsync" or "retry"
    status: str  # RunPod's: IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT
    ended: float | None = None  # when gpumanager saw it end (Unix seconds)
    delay_ms: int | None = None  # RunPod's delayTime: queued, and a worker starting
    execution_ms: int | None = None  # RunPod's executionTime: what the work itself took
    gpu_seconds: float = 0.0  # its share of the endpoint's billed time while it was queued or running
    cost_micro: int = 0  # ...priced at the host's cost_per_hour, in micro-dollars


class Recorder(Protocol):
    def request(self, record: RequestRecord) -> None: ...

    def job(self, record: JobRecord) -> None:
        """A RunPod job was submitted, changed state or ended."""

    def interval(self, record: IntervalRecord) -> None:
        """A non-serving billed interval began, grew or ended."""

    def wake(self, host: str, outcome: str, seconds: float) -> None:
        """A wake ended after `seconds`: `outcome` is "ready", "failed" or "stopped"."""

    def wake_phase(self, host: str, phase: str, seconds: float) -> None:
        """One phase of a wake took `seconds`: "resume", "boot", "model" or "first_byte"."""

    def paused(self, host: str, reason: str) -> None:
        """A pause was asked of the cloud: "idle", "admin", "emergency", "failed_wake" or "budget"."""


class Recorders:
    """Several recorders as one (the metrics and the ledger)."""

    def __init__(self, *recorders: Recorder) -> None:
        self.recorders = recorders

    def request(self, record: RequestRecord) -> None:
        for recorder in self.recorders:
            recorder.request(record)

    def interval(self, record: IntervalRecord) -> None:
        for recorder in self.recorders:
            recorder.interval(record)

    def job(self, record: JobRecord) -> None:
        for recorder in self.recorders:
            recorder.job(record)

    def wake(self, host: str, outcome: str, seconds: float) -> None:
        for recorder in self.recorders:
            recorder.wake(host, outcome, seconds)

    def wake_phase(self, host: str, phase: str, seconds: float) -> None:
        for recorder in self.recorders:
            recorder.wake_phase(host, phase, seconds)

    def paused(self, host: str, reason: str) -> None:
        for recorder in self.recorders:
            recorder.paused(host, reason)


class NoopRecorder:
    def request(self, record: RequestRecord) -> None:
        pass

    def job(self, record: JobRecord) -> None:
        pass

    def interval(self, record: IntervalRecord) -> None:
        pass

    def wake(self, host: str, outcome: str, seconds: float) -> None:
        pass

    def wake_phase(self, host: str, phase: str, seconds: float) -> None:
        pass

    def paused(self, host: str, reason: str) -> None:
        pass

"""The ledger as a `Recorder`: each finished request, each billed interval and each RunPod job becomes
a row, written off the request path (an open interval's or a job's records are written over its one row)."""

from __future__ import annotations

import time

from gpumanager.ledger.rows import IntervalRow, Reason, RequestRow
from gpumanager.ledger.writer import LedgerWriter
from gpumanager.recorder import IntervalRecord, JobRecord, NoopRecorder, RequestRecord


class LedgerRecorder(NoopRecorder):
    """Hands each finished request and each interval to the batched writer (which never blocks)."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    def request(self, record: RequestRecord) -> None:
        self.writer.add(
            RequestRow(
                ts=time.time(),
                key_id=record.key,
                route=record.route,
                model=record.model,
                host=record.host,
                status=record.status,
                wait_ms=record.wait_seconds * 1000,
                ttfb_ms=None if record.first_byte_seconds is None else record.first_byte_seconds * 1000,
                duration_ms=record.duration_seconds * 1000,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
                gpu_seconds=record.gpu_seconds,
                cost_micro=record.cost_micro,
            )
        )

    def job(self, record: JobRecord) -> None:
        self.writer.add(record)

    def interval(self, record: IntervalRecord) -> None:
        self.writer.add(
            IntervalRow(
                host=record.host,
                start=record.start,
                end=record.end,
                reason=Reason(record.reason),
                key_id=record.key,
                cost_micro=record.cost_micro,
                gpu_seconds=record.gpu_seconds,
            )
        )

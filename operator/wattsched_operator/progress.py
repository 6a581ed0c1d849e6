"""Job progress: how much of a Training/FineTuning/BatchInference workload's work is done.

For: the arithmetic of `status.progress`, shared by the operator (which persists it in the
LLMWorkload's status every accounting interval, so a restarted or failed-over operator goes on from
it) and the simulator's `wattsched` policy (which keeps it from its simulated telemetry), and the
reading back of that status into the work the optimizer is given (remaining = total - done).
Every unit of `spec.slo.totalWork` reduces to tokens: tokens as written, steps x tokensPerStep,
GPU-hours x the tokens one reference GPU (H100-80GB at its maximum limit, bf16, by the catalogue
model) processes in an hour.

Work done is measured when the user names a Prometheus counter (`spec.progress.prometheusQuery`,
read by the operator's telemetry reader) and it answered, else modelled: the last known total plus
the placed replicas' rate (the calibrated model's tokens/s) times the seconds they ran.

Pure: no Kubernetes, kopf, Prometheus or HTTP client; the current time comes in as `now`.
Not for: reading telemetry, writing status, or deciding plans.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from wattsched_api.meta import format_time, read_timestamp
from wattsched_api.vocabulary import Source
from wattsched_optimizer.problem import WorkAmount, WorkUnit


@dataclass(frozen=True)
class JobTerms:
    """What a job's spec says about its progress: its total in tokens (None: no
    `spec.slo.totalWork`, best effort) and the PromQL that measures tokens done, if any."""

    total_tokens: float | None
    prometheus_query: str | None = None


def total_tokens(work: WorkAmount, tokens_per_gpu_hour: float) -> float:
    """`spec.slo.totalWork` in tokens (`tokens_per_gpu_hour` converts GPU-hours)."""
    if work.unit is WorkUnit.TOKENS:
        return work.amount
    if work.unit is WorkUnit.STEPS:
        if work.tokens_per_step is None:
            raise ValueError("spec.slo.totalWork.steps needs tokensPerStep")
        return work.amount * work.tokens_per_step
    return work.amount * tokens_per_gpu_hour


def remaining_tokens(total: float, completed: float) -> float:
    """Tokens left of `total` once `completed` are done (never below zero)."""
    return max(0.0, total - completed)


def completed_since(
    completed_tokens: float, rate_tokens_per_second: float, seconds: float
) -> float:
    """Tokens done after running `seconds` more at `rate_tokens_per_second` (modelled)."""
    return completed_tokens + max(0.0, rate_tokens_per_second) * max(0.0, seconds)


@dataclass(frozen=True)
class Progress:
    """`status.progress` of one job.

    `total_tokens` is None for a job without `spec.slo.totalWork` (best effort: no fraction and no
    estimated completion, only tokens done and the seconds it ran).
    """

    completed_tokens: float
    source: str
    updated_at: datetime
    running_seconds: float = 0.0
    total_tokens: float | None = None
    rate_tokens_per_second: float = 0.0

    @property
    def fraction(self) -> float | None:
        if self.total_tokens is None or self.total_tokens <= 0:
            return None
        return min(1.0, self.completed_tokens / self.total_tokens)

    @property
    def remaining_tokens(self) -> float | None:
        if self.total_tokens is None:
            return None
        return remaining_tokens(self.total_tokens, self.completed_tokens)

    @property
    def estimated_completion(self) -> datetime | None:
        """When the rest is done at the current rate (None without a total or a rate)."""
        remaining = self.remaining_tokens
        if remaining is None or self.rate_tokens_per_second <= 0:
            return None
        return self.updated_at + timedelta(seconds=remaining / self.rate_tokens_per_second)

    def to_status(self) -> dict[str, Any]:
        """The `status.progress` object (a merge patch: None removes an earlier figure)."""
        fraction = self.fraction
        completion = self.estimated_completion
        return {
            "completedTokens": round(self.completed_tokens, 1),
            "totalTokens": None if self.total_tokens is None else round(self.total_tokens, 1),
            "fraction": None if fraction is None else round(fraction, 6),
            "source": self.source,
            "runningSeconds": round(self.running_seconds, 1),
            "tokensPerSecond": round(self.rate_tokens_per_second, 3),
            "updatedAt": format_time(self.updated_at),
            "estimatedCompletionTime": None if completion is None else format_time(completion),
        }


def read_status(progress: Mapping[str, Any] | None) -> Progress | None:
    """`status.progress` as stored (None when absent or without a readable `updatedAt`)."""
    if not progress:
        return None
    updated_at = read_timestamp(progress.get("updatedAt"))
    if updated_at is None:
        return None
    total = progress.get("totalTokens")
    return Progress(
        completed_tokens=max(0.0, float(progress.get("completedTokens") or 0.0)),
        source=str(progress.get("source") or Source.MODELLED),
        updated_at=updated_at,
        running_seconds=max(0.0, float(progress.get("runningSeconds") or 0.0)),
        total_tokens=None if total is None else float(total),
        rate_tokens_per_second=max(0.0, float(progress.get("tokensPerSecond") or 0.0)),
    )


def advance(
    previous: Progress | None,
    *,
    now: datetime,
    running_seconds: float,
    rate_tokens_per_second: float,
    total: float | None,
    measured_tokens: float | None = None,
) -> Progress:
    """Progress at `now`: `measured_tokens` when the counter answered, else the previous total
    plus `rate_tokens_per_second` x `running_seconds` (the seconds the whole gang ran since the
    previous update). A job that finished its work stays at its total."""
    before = previous.completed_tokens if previous else 0.0
    if measured_tokens is not None and measured_tokens >= 0:
        completed, source = measured_tokens, Source.MEASURED
    else:
        completed = completed_since(before, rate_tokens_per_second, running_seconds)
        source = Source.MODELLED
    if total is not None:
        completed = min(completed, total)
    return Progress(
        completed_tokens=completed,
        source=source,
        updated_at=now,
        running_seconds=(previous.running_seconds if previous else 0.0) + max(0.0, running_seconds),
        total_tokens=total,
        rate_tokens_per_second=max(0.0, rate_tokens_per_second),
    )


def remaining_work(
    work: WorkAmount | None, completed: float, tokens_per_gpu_hour: float
) -> WorkAmount | None:
    """What the optimizer is given for a job: its total less what is done, in tokens (the whole
    total, as written, when nothing is recorded as done)."""
    if work is None or completed <= 0:
        return work
    return WorkAmount(
        unit=WorkUnit.TOKENS,
        amount=remaining_tokens(total_tokens(work, tokens_per_gpu_hour), completed),
    )

"""Inference demand: what a service's replicas are sized for in the next interval.

For: the forecast shared by the operator and the simulator's `wattsched` policy: the highest
tokens/s measured over a recent window times a headroom, plus any backlog spread over the next
interval; and the operator's bounded per-service history of measured tokens/s it is made from.
Without measurements (no Prometheus, no fresh reading of every running replica, or none within
the window), a service's demand is its declared `spec.slo.tokensPerSecond`.

Pure: no Kubernetes, kopf, Prometheus or HTTP client; times come in as seconds.
Not for: reading telemetry or sizing replicas (the optimizer does, from the demand).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable

from wattsched_optimizer.problem import Workload, WorkloadType

# Defaults: the highest reading of the last 5 minutes, with 20% headroom.
WINDOW_SECONDS = 300.0
HEADROOM = 1.2
# Readings kept per service (a few windows' worth at one reading per round).
MAX_SAMPLES = 64


def forecast(
    tokens_per_second: Iterable[float],
    *,
    headroom: float = HEADROOM,
    backlog_tokens: float = 0.0,
    interval_seconds: float = 60.0,
) -> float | None:
    """Tokens/s to size for: the peak of the readings times `headroom`, plus `backlog_tokens`
    served over `interval_seconds`; None without readings."""
    readings = list(tokens_per_second)
    if not readings:
        return None
    return max(readings) * headroom + max(0.0, backlog_tokens) / interval_seconds


class DemandHistory:
    """Measured tokens/s per service, kept in memory (a restarted operator starts from the
    declared demand until its first readings)."""

    def __init__(self, window_seconds: float = WINDOW_SECONDS, headroom: float = HEADROOM) -> None:
        self.window_seconds = window_seconds
        self.headroom = headroom
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def record(self, key: str, at_seconds: float, tokens_per_second: float) -> None:
        samples = self._samples.setdefault(key, deque(maxlen=MAX_SAMPLES))
        samples.append((at_seconds, max(0.0, tokens_per_second)))

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the history of services not in `keep` (deleted or finished)."""
        wanted = set(keep)
        for key in [k for k in self._samples if k not in wanted]:
            del self._samples[key]

    def demand(self, key: str, now_seconds: float, declared: float | None) -> float | None:
        """The forecast from readings within the window, else `declared`."""
        recent = [
            value
            for at, value in self._samples.get(key, ())
            if now_seconds - self.window_seconds <= at <= now_seconds
        ]
        predicted = forecast(recent, headroom=self.headroom)
        return declared if predicted is None else predicted


def with_forecast_demand(
    workloads: Iterable[Workload], history: DemandHistory, now_seconds: float
) -> tuple[Workload, ...]:
    """The optimizer's workloads with every Inference demand replaced by its forecast, where
    `history` has readings within its window (the declared demand otherwise)."""
    return tuple(
        dataclasses.replace(
            workload,
            tokens_per_second=history.demand(workload.key, now_seconds, workload.tokens_per_second),
        )
        if workload.type is WorkloadType.INFERENCE
        else workload
        for workload in workloads
    )

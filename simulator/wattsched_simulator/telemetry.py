"""What the planner can observe: periodic, noisy samples that arrive late.

The engine closes one `Sample` per scrape interval (default 15 s, Prometheus' usual) from the true
state: per-service demand, served tokens/s, utilisation of the ready replicas and backlog, and per
job the tokens processed so far. Each rate and level gets multiplicative Gaussian noise (the
counters, a job's tokens done and a node's energy, are read exact, as a counter is), and a
sample only becomes visible `delay_seconds` after its window closes (scrape + rule evaluation +
query lag).
Policies read `visible(now)`; none may look at the engine's true state. Not for: energy accounting
(the engine integrates true power; telemetry is only what decisions are based on).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TelemetryConfig:
    scrape_interval_seconds: float = 15.0
    delay_seconds: float = 30.0
    noise_fraction: float = 0.02


@dataclass(frozen=True)
class Sample:
    """One scrape window, as the monitoring system reports it."""

    window_end_seconds: float
    demand_tokens_per_second: Mapping[str, float]
    served_tokens_per_second: Mapping[str, float]
    # Served / capacity of the service's ready replicas (what vLLM-style batch occupancy shows).
    utilisation: Mapping[str, float]
    backlog_tokens: Mapping[str, float]
    # Each job's tokens processed since it began: a counter, read without noise (with 2% read
    # noise on a counter of millions, a job near its end read as done while 1-2% was left, and
    # the operator stopped counting it as pressing: seed 4's miss in docs/evaluation.md).
    job_tokens_done: Mapping[str, float]
    # Mean draw per GPU of each workload's ready replicas over the window (what DCGM's
    # per-pod power shows, summed over the workload's pods and divided by their GPUs).
    workload_watts_per_gpu: Mapping[str, float] = field(default_factory=dict)
    # Each node's energy counter at the window's end, joules since the run began (DCGM's
    # DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION summed over the node's GPUs): the true draw integrated,
    # without read noise, as a counter is.
    node_joules: Mapping[str, float] = field(default_factory=dict)


class Telemetry:
    """An append-only series of samples with a visibility delay."""

    def __init__(self, config: TelemetryConfig, seed: int) -> None:
        self.config = config
        self._rng = np.random.default_rng(seed)
        # Power readings draw their noise from their own stream, so the other series are the
        # same with or without them.
        self._power_rng = np.random.default_rng([seed, 1])
        self._samples: list[Sample] = []
        self._ends: list[float] = []

    def _noisy(
        self, values: Mapping[str, float], rng: np.random.Generator | None = None
    ) -> dict[str, float]:
        sigma = self.config.noise_fraction
        draw = rng or self._rng
        return {
            key: max(0.0, value * (1.0 + sigma * float(draw.standard_normal())))
            for key, value in values.items()
        }

    def record(
        self,
        *,
        window_end_seconds: float,
        demand_tokens_per_second: Mapping[str, float],
        served_tokens_per_second: Mapping[str, float],
        utilisation: Mapping[str, float],
        backlog_tokens: Mapping[str, float],
        job_tokens_done: Mapping[str, float],
        workload_watts_per_gpu: Mapping[str, float] | None = None,
        node_joules: Mapping[str, float] | None = None,
    ) -> None:
        sample = Sample(
            window_end_seconds=window_end_seconds,
            demand_tokens_per_second=self._noisy(demand_tokens_per_second),
            served_tokens_per_second=self._noisy(served_tokens_per_second),
            utilisation={k: min(1.0, v) for k, v in self._noisy(utilisation).items()},
            backlog_tokens=self._noisy(backlog_tokens),
            job_tokens_done=dict(job_tokens_done),
            workload_watts_per_gpu=self._noisy(workload_watts_per_gpu or {}, self._power_rng),
            node_joules=dict(node_joules or {}),
        )
        self._samples.append(sample)
        self._ends.append(window_end_seconds)

    def visible(self, now_seconds: float) -> list[Sample]:
        """Samples whose window closed at least `delay_seconds` before now, oldest first."""
        cut = bisect.bisect_right(self._ends, now_seconds - self.config.delay_seconds)
        return self._samples[:cut]

    def recent(self, now_seconds: float, window_seconds: float) -> list[Sample]:
        """Visible samples whose window closed within `window_seconds` of the newest visible one."""
        visible = self.visible(now_seconds)
        if not visible:
            return []
        newest = visible[-1].window_end_seconds
        start = bisect.bisect_left(self._ends, newest - window_seconds + 1e-9)
        return visible[start:]

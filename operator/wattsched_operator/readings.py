"""What telemetry reads, as plain values, and what the controller learns from them.

The readings (power, token rates and energy of nodes and pods, each measured or not) and the
calibration of the performance model from them. Pure: the Prometheus client that produces the
readings is in `telemetry`; the decision core (`core`) and the status and accounting functions
use these types without it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from wattsched_api.vocabulary import Source
from wattsched_optimizer.model import (
    Calibration,
    CalibrationPoint,
    CatalogueModel,
    bounded_factor,
    calibration_point,
    product_spec,
    sm_clock_effect,
)
from wattsched_optimizer.problem import Placement, WorkloadType

PodKey = tuple[str, str]  # (namespace, name)


# ----- the readings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """A measured value and the metric it came from."""

    value: float
    metric: str


@dataclass(frozen=True)
class TelemetrySnapshot:
    """Power, token rates and queues at `time`.

    pod_peak_tokens_per_second: each serving pod's highest tokens/s over a short window (a scrape
    interval or two) within the rate window, where measured: the demand signal, as a mean over
    the whole window hides bursts of seconds (`pod_tokens_per_second` stays the window's mean, for
    tokens/J and calibration).
    pod_queued_tokens: the tokens waiting in each serving pod's queue at `time` (demand it has not
    served yet; from the reader's queue query), where measured. A gauge of one instant: with
    the rate window's mean near its peak it says the pod served at capacity (calibration).

    stale: Prometheus did not answer (`unavailable`), or none of the requested nodes has a fresh
    series; `reason` says which. `source` is MEASURED when at least one requested node was
    measured. Nodes and pods without data are absent from the maps (and listed in
    `missing_nodes`): use the model for them.
    """

    time: datetime
    source: Source
    stale: bool
    reason: str
    node_watts: Mapping[str, Measurement] = field(default_factory=dict)
    pod_watts: Mapping[PodKey, Measurement] = field(default_factory=dict)
    pod_tokens_per_second: Mapping[PodKey, float] = field(default_factory=dict)
    pod_peak_tokens_per_second: Mapping[PodKey, float] = field(default_factory=dict)
    pod_queued_tokens: Mapping[PodKey, float] = field(default_factory=dict)
    missing_nodes: frozenset[str] = frozenset()
    unavailable: bool = False

    def tokens_per_joule(self, pod: PodKey) -> float | None:
        """Tokens per joule of a pod (tokens/s over W), when both are measured."""
        tokens = self.pod_tokens_per_second.get(pod)
        power = self.pod_watts.get(pod)
        if tokens is None or power is None or power.value <= 0:
            return None
        return tokens / power.value


@dataclass(frozen=True)
class EnergyReading:
    """Energy (J) used between `start` and `end`; same staleness rules as `TelemetrySnapshot`."""

    start: datetime
    end: datetime
    source: Source
    stale: bool
    reason: str
    node_joules: Mapping[str, Measurement] = field(default_factory=dict)
    pod_joules: Mapping[PodKey, Measurement] = field(default_factory=dict)
    missing_nodes: frozenset[str] = frozenset()


# ----- calibration ------------------------------------------------------------------------------

CalibrationKey = tuple[str, WorkloadType]  # (normalised product, workload type)


@dataclass(frozen=True)
class CalibrationSample:
    """One replica's measured figures next to what the *uncalibrated* model predicted for it.

    Compare with the uncalibrated model (`CatalogueModel()`), not the corrected one, or each
    correction would be applied on top of the last. Per GPU: watts; per replica: tokens/s.
    """

    product: str
    workload_type: WorkloadType
    modelled_watts_per_gpu: float | None
    measured_watts_per_gpu: float | None
    modelled_tokens_per_second: float | None = None
    measured_tokens_per_second: float | None = None
    # Where the replica ran: its per-GPU power limit (W) and locked SM clock (MHz; None:
    # unlocked). Its tokens/s also calibrate that operating point.
    power_limit_watts: float | None = None
    sm_clock_mhz: int | None = None


class Calibrator:
    """Exponentially smoothed, bounded correction factors per (product, workload type), and
    throughput factors per operating point (`calibration_point`: product, type, limit, clock).

    Each reading moves a factor `smoothing` of the way towards the median measured/modelled of
    its samples; factors stay in the optimizer's CALIBRATION_BOUNDS, so one bad reading cannot
    make the model absurd. A point's factor starts from its (product, type) factor and moves with
    the point's own samples: the catalogue's throughput curves are one shape per type, and a
    product's true curve differs from it more at some limits and clocks than at others (docs/
    telemetry.md). A sample from stale telemetry must not be given (the caller checks
    `TelemetrySnapshot.stale`).
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"calibration smoothing={smoothing}: must be in (0, 1]")
        self.smoothing = smoothing
        self._factors: dict[CalibrationKey, Calibration] = {}
        self._points: dict[CalibrationPoint, float] = {}
        self._samples: dict[CalibrationKey, int] = {}

    @staticmethod
    def _bounded_ratio(measured: float | None, modelled: float | None) -> float | None:
        if measured is None or modelled is None or modelled <= 0 or measured < 0:
            return None
        return bounded_factor(measured / modelled)

    def _smoothed(self, old: float, ratios: list[float]) -> float:
        return old if not ratios else old + self.smoothing * (statistics.median(ratios) - old)

    def observe(self, samples: Iterable[CalibrationSample]) -> dict[CalibrationKey, Calibration]:
        """Fold one reading's samples in: per (product, type), the median of its samples'
        measured/modelled ratios moves each factor `smoothing` of the way, once per reading (a
        reading of many replicas is one step, and one odd replica does not set it). Returns the
        new corrections of the keys it sampled."""
        # (product, type) -> (power ratios, throughput ratios) of this reading
        by_key: dict[CalibrationKey, tuple[list[float], list[float]]] = {}
        at_point: dict[CalibrationPoint, list[float]] = {}
        for sample in samples:
            key = (sample.product, sample.workload_type)
            self._samples[key] = self._samples.get(key, 0) + 1
            power, throughput = by_key.setdefault(key, ([], []))
            watts = self._bounded_ratio(
                sample.measured_watts_per_gpu, sample.modelled_watts_per_gpu
            )
            tokens = self._bounded_ratio(
                sample.measured_tokens_per_second, sample.modelled_tokens_per_second
            )
            if watts is not None:
                power.append(watts)
            if tokens is not None:
                throughput.append(tokens)
                if sample.power_limit_watts is not None:
                    point = calibration_point(
                        sample.product,
                        sample.workload_type,
                        sample.power_limit_watts,
                        sample.sm_clock_mhz,
                    )
                    at_point.setdefault(point, []).append(tokens)
        for point, ratios in at_point.items():
            start = self._points.get(point)
            if start is None:
                start = self._factors.get(point[:2], Calibration()).throughput_factor
            self._points[point] = bounded_factor(self._smoothed(start, ratios))
        for key, (power, throughput) in by_key.items():
            old = self._factors.get(key, Calibration())
            self._factors[key] = Calibration(
                throughput_factor=self._smoothed(old.throughput_factor, throughput),
                power_factor=self._smoothed(old.power_factor, power),
            ).bounded()
        return {key: self._factors[key] for key in by_key}

    def corrections(self) -> dict[CalibrationKey, Calibration]:
        """The current (product, type) factors, for metrics."""
        return dict(self._factors)

    def model(self) -> CatalogueModel:
        """The catalogue with the current factors: what a plan made now is made with."""
        return CatalogueModel().calibrated(self._factors, self._points)

    def sample_count(self, key: CalibrationKey) -> int:
        return self._samples.get(key, 0)


# An Inference replica is saturated when at least this many seconds of its serving wait in its
# queue (a request or two waiting for a moment, or a fluid model's residue, are not a backlog)
# and its rate window's mean is at least this share of its short-window peak: it served at
# capacity through the window, not in one burst.
SATURATED_QUEUE_SECONDS = 1.0
SATURATED_SHARE_OF_PEAK = 0.9

# A GPU drawing this close to its limit is held by the limit, not by its work: its draw says
# nothing about the model's demand, so it is no power sample.
_LIMIT_BOUND_FRACTION = 0.97


def calibration_samples(
    placements: Iterable[Placement],
    *,
    pods: Mapping[tuple[str, int], PodKey],
    products: Mapping[str, str],
    types: Mapping[str, WorkloadType],
    snapshot: TelemetrySnapshot,
    model: CatalogueModel,
) -> list[CalibrationSample]:
    """One sample per placed single-node replica whose running pod a fresh reading measured.

    pods: (workload key, replica) -> the replica's running pod; products: node -> normalised
    product; types: workload key -> type; model: the calibrated model the plan was made with (the
    modelled throughput is divided by its factor at each placement's operating point to compare
    with the uncalibrated model).
    Power is sampled only when neither the draw nor the model is held by the power limit, and for
    an Inference replica only where it is busy (where its throughput is sampled, below). A replica
    with locked SM clocks is compared with the model's locked draw (the unlocked busy draw times
    the clock curve's draw fraction, as the optimizer planned it), so the correction stays one of
    the unlocked model, and a clock curve that is off shows up in it for that (product, type).
    Throughput (measured tokens/s, from the token query) is sampled where it shows capacity:
    Training, FineTuning and BatchInference run flat out, always. An Inference replica serves its
    share of the demand, not what it could, so only (a) when it is saturated: at least
    `SATURATED_QUEUE_SECONDS` of its serving wait in its queue while it serves no less than
    `SATURATED_SHARE_OF_PEAK` of its short-window peak (busy through the window, not in one
    burst), or (b) when it serves more than the calibrated model says it can (a lower bound on
    its capacity above the model). Otherwise low traffic would read as slow GPUs. (A service's
    declared tokens/s is no sign of saturation: it is the most it may ask, and a service sized
    below it for its measured demand would read as slow all night.)
    """
    if snapshot.stale:
        return []
    placed = list(placements)
    base = CatalogueModel()
    samples: list[CalibrationSample] = []
    for placement in placed:
        if placement.nodes_per_replica > 1:
            continue  # a replica spanning nodes: its pods share its work (no per-pod sample)
        pod = pods.get((placement.workload, placement.replica))
        product = products.get(placement.node)
        workload_type = types.get(placement.workload)
        measured = snapshot.pod_watts.get(pod) if pod else None
        if pod is None or product is None or workload_type is None or measured is None:
            continue
        limit = placement.power_limit_watts
        modelled = base.expected_power_watts(product, workload_type, limit)
        if placement.sm_clock_mhz is not None:
            unlocked = base.expected_power_watts(
                product, workload_type, product_spec(product).max_watts.value
            )
            _, draw_fraction = sm_clock_effect(product, workload_type, placement.sm_clock_mhz)
            modelled = max(base.idle_power_watts(product), unlocked * draw_fraction)
        per_gpu = measured.value / max(placement.gpus, 1)
        bound = _LIMIT_BOUND_FRACTION * limit
        power_sampled = per_gpu < bound and modelled < bound
        tokens = snapshot.pod_tokens_per_second.get(pod)
        if tokens is not None and not workload_type.is_gang:
            peak = snapshot.pod_peak_tokens_per_second.get(pod)
            queued = snapshot.pod_queued_tokens.get(pod, 0.0)
            saturated = queued >= SATURATED_QUEUE_SECONDS * tokens > 0 and (
                peak is None or tokens >= SATURATED_SHARE_OF_PEAK * peak
            )
            if not saturated and tokens <= placement.expected_throughput:
                tokens = None
        if not workload_type.is_gang and tokens is None:
            # The model's draw is a busy GPU's: a replica serving less than its capacity draws
            # less, which would read as a lower busy draw (and let the optimizer believe a
            # locked clock fits under a limit that in fact throttles it).
            power_sampled = False
        if not power_sampled and tokens is None:
            continue
        # Compared with the uncalibrated model: divided by the factor the plan used at its point.
        modelled_tokens = None
        if tokens is not None:
            factor = model.throughput_factor(product, workload_type, limit, placement.sm_clock_mhz)
            modelled_tokens = placement.expected_throughput / factor
        samples.append(
            CalibrationSample(
                product=product,
                workload_type=workload_type,
                modelled_watts_per_gpu=modelled if power_sampled else None,
                measured_watts_per_gpu=per_gpu if power_sampled else None,
                modelled_tokens_per_second=modelled_tokens,
                measured_tokens_per_second=tokens,
                power_limit_watts=limit,
                sm_clock_mhz=placement.sm_clock_mhz,
            )
        )
    return samples

"""Which measurements become calibration samples: a running replica's measured draw against the
uncalibrated model when no power limit holds it, and throughput where it shows capacity (work that
runs flat out, a saturated Inference replica, or a replica serving more than the model allows);
then the calibrated model the next plan uses moves toward what was measured."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from wattsched_api.vocabulary import Source
from wattsched_operator.telemetry import (
    CalibrationSample,
    Calibrator,
    Measurement,
    TelemetrySnapshot,
    calibration_samples,
)
from wattsched_optimizer.model import (
    CALIBRATION_BOUNDS,
    Calibration,
    CatalogueModel,
    sm_clock_effect,
)
from wattsched_optimizer.problem import Placement, WorkloadType

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
POD = ("ns", "w-0")
PRODUCT = "H100-80GB"


def placement(limit_watts: float, workload: str = "ns/w") -> Placement:
    return Placement(workload, 0, "node-a", 2, "bf16", limit_watts, 0.0, 1000.0)


def reading(
    pod_watts: float,
    tokens: float | None = None,
    stale: bool = False,
    queued: float | None = None,
) -> TelemetrySnapshot:
    """One pod's reading; `queued`: tokens waiting in its queue (None: not measured)."""
    return TelemetrySnapshot(
        time=NOW,
        source=Source.MODELLED if stale else Source.MEASURED,
        stale=stale,
        reason="",
        pod_watts={POD: Measurement(pod_watts, "rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION)")},
        pod_tokens_per_second={} if tokens is None else {POD: tokens},
        pod_queued_tokens={} if queued is None else {POD: queued},
    )


def samples(
    snapshot: TelemetrySnapshot,
    workload_type: WorkloadType,
    limit_watts: float = 700,
    model: CatalogueModel | None = None,
) -> list[CalibrationSample]:
    """Samples of one replica (1000 tokens/s planned with `model`) of `ns/w`."""
    return list(
        calibration_samples(
            [placement(limit_watts)],
            pods={("ns/w", 0): POD},
            products={"node-a": PRODUCT},
            types={"ns/w": workload_type},
            snapshot=snapshot,
            model=model or CatalogueModel(),
        )
    )


def test_an_unconstrained_replica_gives_a_power_sample_per_gpu_against_the_plain_model() -> None:
    modelled = CatalogueModel().expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    [sample] = samples(
        reading(2 * 0.8 * modelled, tokens=900.0, queued=5000.0),  # saturated: busy
        WorkloadType.INFERENCE,
    )
    assert sample.measured_watts_per_gpu == pytest.approx(0.8 * modelled)
    assert sample.modelled_watts_per_gpu == pytest.approx(modelled)
    assert sample.measured_tokens_per_second == 900.0


def test_an_inference_replica_below_capacity_is_no_power_sample() -> None:
    """The model's draw is a busy GPU's; a replica serving part of its capacity draws less, and
    sampling it would lower the busy draw the optimizer plans with (so a locked clock would seem
    to fit under a limit that in fact throttles it)."""
    modelled = CatalogueModel().expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    partial = samples(
        reading(2 * 0.6 * modelled, tokens=500.0, queued=0.0),  # nothing waits: not saturated
        WorkloadType.INFERENCE,
    )
    assert partial == []


def test_a_draw_held_by_its_power_limit_is_no_power_sample() -> None:
    assert samples(reading(2 * 395.0), WorkloadType.INFERENCE, limit_watts=400) == []


def test_stale_readings_and_unknown_pods_give_nothing() -> None:
    assert samples(reading(500.0, stale=True), WorkloadType.INFERENCE) == []
    no_pod = calibration_samples(
        [placement(700)],
        pods={},
        products={"node-a": PRODUCT},
        types={"ns/w": WorkloadType.INFERENCE},
        snapshot=reading(500.0),
        model=CatalogueModel(),
    )
    assert no_pod == []


def test_training_throughput_is_compared_with_the_uncorrected_model() -> None:
    corrected = {(PRODUCT, WorkloadType.TRAINING): Calibration(throughput_factor=2.0)}
    [sample] = samples(
        reading(2 * 399.0, tokens=450.0),
        WorkloadType.TRAINING,
        limit_watts=400,
        model=CatalogueModel().calibrated(corrected),
    )
    assert sample.measured_watts_per_gpu is None  # at its limit
    assert sample.modelled_tokens_per_second == pytest.approx(500.0)  # 1000 planned / 2.0
    assert sample.measured_tokens_per_second == 450.0


def test_the_next_plans_model_moves_toward_the_measured_draw_and_stays_bounded() -> None:
    modelled = CatalogueModel().expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    calibrator = Calibrator(smoothing=0.5)
    for _ in range(20):
        calibrator.observe(
            samples(
                reading(2 * 0.8 * modelled, tokens=1000.0, queued=5000.0),  # saturated: busy
                WorkloadType.INFERENCE,
                model=calibrator.model(),
            )
        )
    model = calibrator.model()
    predicted = model.expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    assert predicted == pytest.approx(0.8 * modelled, rel=1e-3)
    absurd = Calibrator(smoothing=1.0)
    absurd.observe(
        samples(reading(2 * 0.01 * modelled, tokens=1000.0, queued=5000.0), WorkloadType.INFERENCE)
    )
    assert absurd.corrections()[PRODUCT, WorkloadType.INFERENCE].power_factor == 0.5


def inference_samples(
    tokens: float,
    queued: float | None,
    corrections: dict[tuple[str, WorkloadType], Calibration] | None = None,
    limit_watts: float = 400,
    peak: float | None = None,
) -> list[CalibrationSample]:
    """Samples of two Inference replicas (1000 tokens/s planned each) of one workload, each
    serving `tokens` (mean over the rate window; `peak`: over a short window) with `queued`
    tokens waiting (None: queues not measured)."""
    pods = {("ns/w", 0): POD, ("ns/w", 1): ("ns", "w-1")}
    snapshot = TelemetrySnapshot(
        time=NOW,
        source=Source.MEASURED,
        stale=False,
        reason="",
        pod_watts={pod: Measurement(2 * 399.0, "rate(DCGM)") for pod in pods.values()},
        pod_tokens_per_second={pod: tokens for pod in pods.values()},
        pod_peak_tokens_per_second={} if peak is None else {pod: peak for pod in pods.values()},
        pod_queued_tokens={} if queued is None else {pod: queued for pod in pods.values()},
    )
    return calibration_samples(
        [
            Placement("ns/w", replica, "node-a", 2, "bf16", limit_watts, 0.0, 1000.0)
            for replica in (0, 1)
        ],
        pods=pods,
        products={"node-a": PRODUCT},
        types={"ns/w": WorkloadType.INFERENCE},
        snapshot=snapshot,
        model=CatalogueModel().calibrated(corrections or {}),
    )


def test_a_saturated_inference_service_gives_throughput_samples_per_replica() -> None:
    # Tokens wait in both replicas' queues while they serve 800 tokens/s steadily: capacity.
    replicas = inference_samples(tokens=800.0, queued=20_000.0, peak=840.0)
    assert [(s.measured_tokens_per_second, s.modelled_tokens_per_second) for s in replicas] == [
        (800.0, 1000.0),
        (800.0, 1000.0),
    ]
    assert all(s.measured_watts_per_gpu is None for s in replicas)  # held by the 400 W limit


def test_an_inference_service_below_capacity_gives_no_throughput_sample() -> None:
    """Below the model's capacity a replica is sampled only with evidence that it was busy."""
    assert inference_samples(tokens=700.0, queued=0.0) == []  # serving its share of demand
    assert inference_samples(tokens=700.0, queued=None) == []  # queues not measured
    # Tokens queued at the reading after a burst: the window's mean (700) is far below its
    # peak (1,000), so the replica was not busy through the window.
    assert inference_samples(tokens=700.0, queued=20_000.0, peak=1000.0) == []
    # A fraction of a second of serving in the queue (a request waiting for a moment) is no
    # backlog: 300 tokens against 700 tokens/s.
    assert inference_samples(tokens=700.0, queued=300.0, peak=720.0) == []
    # Busy through the window: a sample, whatever the service's spec declares.
    assert len(inference_samples(tokens=700.0, queued=20_000.0, peak=720.0)) == 2


def test_an_inference_replica_serving_more_than_the_calibrated_model_allows_is_sampled() -> None:
    slow = {(PRODUCT, WorkloadType.INFERENCE): Calibration(throughput_factor=0.5)}
    [first, _] = inference_samples(tokens=1200.0, queued=0.0, corrections=slow)
    assert first.measured_tokens_per_second == 1200.0
    assert first.modelled_tokens_per_second == pytest.approx(2000.0)  # 1000 planned / 0.5


def test_inference_throughput_correction_moves_toward_measured_capacity_and_stays_bounded() -> None:
    base = CatalogueModel()

    def planned_tokens_per_second(model: CatalogueModel) -> float:
        return model.throughput_tokens_per_second(PRODUCT, WorkloadType.INFERENCE, 8, 2, 1.0, 400)

    uncalibrated = planned_tokens_per_second(base)
    calibrator = Calibrator(smoothing=0.5)
    for _ in range(20):
        model = calibrator.model()
        planned = planned_tokens_per_second(model)
        pods = {("ns/w", 0): POD}
        # The GPUs are 30% slower; tokens wait in the queue (saturated).
        snapshot = reading(2 * 399.0, tokens=0.7 * uncalibrated, queued=50_000.0)
        calibrator.observe(
            calibration_samples(
                [Placement("ns/w", 0, "node-a", 2, "bf16", 400, 0.0, planned)],
                pods=pods,
                products={"node-a": PRODUCT},
                types={"ns/w": WorkloadType.INFERENCE},
                snapshot=snapshot,
                model=calibrator.model(),
            )
        )
    model = calibrator.model()
    assert planned_tokens_per_second(model) == pytest.approx(0.7 * uncalibrated, rel=1e-3)
    absurd = Calibrator(smoothing=1.0)
    absurd.observe(inference_samples(tokens=1.0, queued=1e9))
    low, _ = CALIBRATION_BOUNDS
    assert absurd.corrections()[PRODUCT, WorkloadType.INFERENCE].throughput_factor == low


def test_a_replica_with_locked_clocks_is_compared_with_the_models_locked_draw() -> None:
    """A clocked replica drawing exactly what the plan expected leaves the power factor at 1:
    without the clock in the comparison its low draw would read as an over-estimating model."""
    unlocked = CatalogueModel().expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    _, draw_fraction = sm_clock_effect(PRODUCT, WorkloadType.INFERENCE, 990)
    locked = unlocked * draw_fraction
    clocked = Placement("ns/w", 0, "node-a", 2, "bf16", 450.0, locked, 1000.0, sm_clock_mhz=990)
    [sample] = calibration_samples(
        [clocked],
        pods={("ns/w", 0): POD},
        products={"node-a": PRODUCT},
        types={"ns/w": WorkloadType.INFERENCE},
        snapshot=reading(2 * locked, tokens=1000.0, queued=5000.0),  # saturated: busy
        model=CatalogueModel(),
    )
    assert sample.modelled_watts_per_gpu == pytest.approx(locked)
    calibrator = Calibrator()
    [observed] = calibrator.observe([sample]).values()
    assert observed.power_factor == pytest.approx(1.0)


def test_each_operating_point_learns_its_own_throughput_factor() -> None:
    """The true curve is steeper than the catalogue's at the lowest limits: the GPUs deliver 0.7
    of the catalogue at 175 W unlocked and at 450 W with the clock locked at 990 MHz, 1.1 at
    450 W unlocked. One factor per (product, type) would plan all three at the median of the
    readings (0.7), and 450 W unlocked a third too slow: each point converges to its own, and a
    point never run is planned with the (product, type) factor."""
    truth = {(175.0, None): 0.7, (450.0, None): 1.1, (450.0, 990): 0.7}
    base = CatalogueModel()

    def tokens_per_second(model: CatalogueModel, limit: float, clock: int | None) -> float:
        return model.throughput_tokens_per_second(
            PRODUCT, WorkloadType.INFERENCE, 8, 2, 1.0, limit, sm_clock_mhz=clock
        )

    calibrator = Calibrator(smoothing=0.5)
    points = list(truth)
    pods = {("ns/w", replica): ("ns", f"w-{replica}") for replica in range(len(points))}
    for _ in range(20):
        model = calibrator.model()
        placements = [
            Placement(
                "ns/w",
                replica,
                "node-a",
                2,
                "bf16",
                limit,
                0.0,
                tokens_per_second(model, limit, clock),
                sm_clock_mhz=clock,
            )
            for replica, (limit, clock) in enumerate(points)
        ]
        measured = {
            pods["ns/w", replica]: truth[point] * tokens_per_second(base, *point)
            for replica, point in enumerate(points)
        }
        snapshot = TelemetrySnapshot(
            time=NOW,
            source=Source.MEASURED,
            stale=False,
            reason="",
            pod_watts={pod: Measurement(2 * 440.0, "rate(DCGM)") for pod in pods.values()},
            pod_tokens_per_second=measured,
            pod_queued_tokens={pod: 50_000.0 for pod in pods.values()},  # saturated
        )
        calibrator.observe(
            calibration_samples(
                placements,
                pods=pods,
                products={"node-a": PRODUCT},
                types={"ns/w": WorkloadType.INFERENCE},
                snapshot=snapshot,
                model=model,
            )
        )
    model = calibrator.model()
    for (limit, clock), share in truth.items():
        assert tokens_per_second(model, limit, clock) == pytest.approx(
            share * tokens_per_second(base, limit, clock), rel=1e-3
        )
    # 325 W was never run: the (product, type) factor, the median of the readings (0.7).
    type_factor = calibrator.corrections()[PRODUCT, WorkloadType.INFERENCE].throughput_factor
    assert type_factor == pytest.approx(0.7, rel=1e-3)
    assert tokens_per_second(model, 325.0, None) == pytest.approx(
        type_factor * tokens_per_second(base, 325.0, None)
    )

"""Which measurements become calibration samples: a running replica's measured draw against the
uncalibrated model when no power limit holds it, and throughput only for work that runs flat out;
then the calibrated model the next plan uses moves toward what was measured."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from wattsched_operator.telemetry import (
    CalibrationSample,
    Calibrator,
    Measurement,
    Source,
    TelemetrySnapshot,
    calibration_samples,
)
from wattsched_optimizer.model import Calibration, CatalogueModel
from wattsched_optimizer.problem import Placement, WorkloadType

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
POD = ("ns", "w-0")
PRODUCT = "H100-80GB"


def placement(limit_watts: float, workload: str = "ns/w") -> Placement:
    return Placement(workload, 0, "node-a", 2, "bf16", limit_watts, 0.0, 1000.0)


def reading(
    pod_watts: float, tokens: float | None = None, stale: bool = False
) -> TelemetrySnapshot:
    return TelemetrySnapshot(
        time=NOW,
        source=Source.MODELLED if stale else Source.MEASURED,
        stale=stale,
        reason="",
        pod_watts={POD: Measurement(pod_watts, "rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION)")},
        pod_tokens_per_second={} if tokens is None else {POD: tokens},
    )


def samples(
    snapshot: TelemetrySnapshot,
    workload_type: WorkloadType,
    limit_watts: float = 700,
    corrections: dict[tuple[str, WorkloadType], Calibration] | None = None,
) -> list[CalibrationSample]:
    return list(
        calibration_samples(
            [placement(limit_watts)],
            pods={("ns/w", 0): POD},
            products={"node-a": PRODUCT},
            types={"ns/w": workload_type},
            snapshot=snapshot,
            corrections=corrections or {},
        )
    )


def test_an_unconstrained_replica_gives_a_power_sample_per_gpu_against_the_plain_model() -> None:
    modelled = CatalogueModel().expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    [sample] = calibration_samples(
        [placement(700)],
        pods={("ns/w", 0): POD},
        products={"node-a": PRODUCT},
        types={"ns/w": WorkloadType.INFERENCE},
        snapshot=reading(2 * 0.8 * modelled, tokens=500.0),
        corrections={},
    )
    assert sample.measured_watts_per_gpu == pytest.approx(0.8 * modelled)
    assert sample.modelled_watts_per_gpu == pytest.approx(modelled)
    assert sample.measured_tokens_per_second is None  # Inference serves demand, not capacity


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
        corrections={},
    )
    assert no_pod == []


def test_training_throughput_is_compared_with_the_uncorrected_model() -> None:
    corrected = {(PRODUCT, WorkloadType.TRAINING): Calibration(throughput_factor=2.0)}
    [sample] = calibration_samples(
        [placement(400)],
        pods={("ns/w", 0): POD},
        products={"node-a": PRODUCT},
        types={"ns/w": WorkloadType.TRAINING},
        snapshot=reading(2 * 399.0, tokens=450.0),
        corrections=corrected,
    )
    assert sample.measured_watts_per_gpu is None  # at its limit
    assert sample.modelled_tokens_per_second == pytest.approx(500.0)  # 1000 planned / 2.0
    assert sample.measured_tokens_per_second == 450.0


def test_the_next_plans_model_moves_toward_the_measured_draw_and_stays_bounded() -> None:
    modelled = CatalogueModel().expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    calibrator = Calibrator(smoothing=0.5)
    for _ in range(20):
        for sample in calibration_samples(
            [placement(700)],
            pods={("ns/w", 0): POD},
            products={"node-a": PRODUCT},
            types={"ns/w": WorkloadType.INFERENCE},
            snapshot=reading(2 * 0.8 * modelled),
            corrections=calibrator.corrections(),
        ):
            calibrator.observe(sample)
    model = CatalogueModel().calibrated(calibrator.corrections())
    predicted = model.expected_power_watts(PRODUCT, WorkloadType.INFERENCE, 700)
    assert predicted == pytest.approx(0.8 * modelled, rel=1e-3)
    absurd = Calibrator(smoothing=1.0)
    for sample in samples(reading(2 * 0.01 * modelled), WorkloadType.INFERENCE):
        absurd.observe(sample)
    assert absurd.corrections()[PRODUCT, WorkloadType.INFERENCE].power_factor == 0.5

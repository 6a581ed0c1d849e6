"""Telemetry without a Prometheus: configuration errors, an unreachable server, calibration."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from tests.telemetry.conftest import free_loopback_port
from wattsched_api.vocabulary import Source
from wattsched_operator.telemetry import (
    CalibrationSample,
    Calibrator,
    TelemetryConfig,
    TelemetryReader,
)
from wattsched_optimizer.model import CatalogueModel
from wattsched_optimizer.problem import WorkloadType


def test_config_rejects_a_url_that_is_not_http_naming_the_field() -> None:
    with pytest.raises(ValueError, match="telemetry prometheusUrl='prometheus:9090'"):
        TelemetryConfig("prometheus:9090")
    with pytest.raises(ValueError, match="rateWindowSeconds=0"):
        TelemetryConfig("http://p:9090", rate_window_seconds=0)


def test_unreachable_prometheus_is_stale_and_modelled_quickly() -> None:
    url = f"http://127.0.0.1:{free_loopback_port()}"
    reader = TelemetryReader(TelemetryConfig(url, timeout_seconds=1))
    began = time.monotonic()
    snapshot = reader.read(["gpu-h100-00"], [("ns", "pod")])
    assert time.monotonic() - began < 5
    assert (snapshot.source, snapshot.stale) == (Source.MODELLED, True)
    assert url in snapshot.reason
    assert snapshot.node_watts == {}
    assert snapshot.tokens_per_joule(("ns", "pod")) is None
    energy = reader.energy(["gpu-h100-00"], start=datetime(2026, 1, 1, tzinfo=UTC))
    assert (energy.source, energy.stale) == (Source.MODELLED, True)
    assert reader.scalar("up") is None


def sample(measured_watts: float, measured_tps: float | None = None) -> CalibrationSample:
    return CalibrationSample(
        product="H100-80GB",
        workload_type=WorkloadType.INFERENCE,
        modelled_watts_per_gpu=500.0,
        measured_watts_per_gpu=measured_watts,
        modelled_tokens_per_second=1000.0 if measured_tps is not None else None,
        measured_tokens_per_second=measured_tps,
    )


def test_calibration_moves_a_step_towards_the_measured_ratio() -> None:
    calibrator = Calibrator(smoothing=0.5)
    [first] = calibrator.observe([sample(400.0, measured_tps=1200.0)]).values()
    assert first.power_factor == pytest.approx(0.9)  # 1 + 0.5 * (0.8 - 1)
    assert first.throughput_factor == pytest.approx(1.1)
    for _ in range(30):
        calibrator.observe([sample(400.0)])
    settled = calibrator.corrections()["H100-80GB", WorkloadType.INFERENCE]
    assert settled.power_factor == pytest.approx(0.8, abs=1e-3)
    assert settled.throughput_factor == pytest.approx(1.1)  # no token figures since
    assert calibrator.sample_count(("H100-80GB", WorkloadType.INFERENCE)) == 31


def test_calibration_is_bounded_against_absurd_readings() -> None:
    calibrator = Calibrator(smoothing=1.0)
    key = ("H100-80GB", WorkloadType.INFERENCE)
    assert calibrator.observe([sample(50_000.0)])[key].power_factor == 2.0
    assert calibrator.observe([sample(0.0)])[key].power_factor == 0.5


def test_calibrated_model_predicts_the_measured_power() -> None:
    model = CatalogueModel()
    modelled = model.expected_power_watts("H100-80GB", WorkloadType.INFERENCE, 700)
    calibrator = Calibrator(smoothing=1.0)
    calibrator.observe(
        [CalibrationSample("H100-80GB", WorkloadType.INFERENCE, modelled, modelled * 0.9)]
    )
    calibrated = model.calibrated(calibrator.corrections())
    predicted = calibrated.expected_power_watts("H100-80GB", WorkloadType.INFERENCE, 700)
    assert predicted == pytest.approx(modelled * 0.9)


def test_a_reading_of_many_replicas_moves_a_factor_once_by_their_median() -> None:
    """Ten replicas at 0.6 of the model move the factor one step (1 -> 0.92 at smoothing 0.2),
    as one replica would: not ten steps (0.64). One replica reading nothing in its window (a
    restart) among five does not move it."""
    key = ("H100-80GB", WorkloadType.TRAINING)

    def replica(measured_tps: float) -> CalibrationSample:
        return CalibrationSample(
            "H100-80GB", WorkloadType.TRAINING, None, None, 1000.0, measured_tps
        )

    calibrator = Calibrator(smoothing=0.2)
    factors = calibrator.observe([replica(600.0)] * 10)
    assert factors[key].throughput_factor == pytest.approx(0.92)
    assert calibrator.sample_count(key) == 10
    steady = Calibrator(smoothing=0.2)
    odd = [replica(0.0), replica(950.0), replica(1000.0), replica(1000.0), replica(1050.0)]
    assert steady.observe(odd)[key].throughput_factor == pytest.approx(1.0)

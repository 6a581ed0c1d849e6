"""Inference demand (`wattsched_operator.demand`): services are sized for the recent peak of their
measured tokens/s with headroom, and for their declared tokens/s until there are readings."""

from __future__ import annotations

from wattsched_operator.demand import DemandHistory, forecast, with_forecast_demand
from wattsched_optimizer.problem import Precision, Variant, Workload, WorkloadType

BF16 = (Variant("bf16", Precision.BF16, 0),)


def service(key: str, declared: float) -> Workload:
    return Workload(key, WorkloadType.INFERENCE, 8, 1, BF16, tokens_per_second=declared)


def test_the_forecast_is_the_recent_peak_with_headroom_plus_the_backlog_over_an_interval() -> None:
    assert forecast([100.0, 300.0, 200.0], headroom=1.2) == 360.0
    assert forecast([100.0], headroom=1.0, backlog_tokens=6000, interval_seconds=60) == 200.0
    assert forecast([], headroom=1.2) is None


def test_readings_replace_the_declared_demand_only_within_the_window() -> None:
    history = DemandHistory(window_seconds=300, headroom=1.2)
    assert history.demand("ns/chat", 1000.0, declared=5000.0) == 5000.0
    history.record("ns/chat", 900.0, 1000.0)
    history.record("ns/chat", 990.0, 2000.0)
    assert history.demand("ns/chat", 1000.0, declared=5000.0) == 2400.0
    # Ten minutes later the readings are too old: the declared demand again.
    assert history.demand("ns/chat", 1600.0, declared=5000.0) == 5000.0


def test_only_inference_services_with_readings_get_a_forecast() -> None:
    history = DemandHistory(window_seconds=300, headroom=1.5)
    history.record("ns/busy", 10.0, 4000.0)
    job = Workload("ns/job", WorkloadType.TRAINING, 8, 8, BF16)
    sized = with_forecast_demand(
        [service("ns/busy", 1000.0), service("ns/quiet", 1000.0), job], history, 20.0
    )
    assert [w.tokens_per_second for w in sized] == [6000.0, 1000.0, None]


def test_a_forgotten_service_starts_again_from_its_declared_demand() -> None:
    history = DemandHistory()
    history.record("ns/gone", 0.0, 10.0)
    history.forget(["ns/other"])
    assert history.demand("ns/gone", 1.0, declared=7.0) == 7.0

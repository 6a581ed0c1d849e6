"""Inference demand (`wattsched_operator.demand`): services are sized for the recent peak of their
measured demand (served tokens/s plus the backlog drained within one re-plan interval) with
headroom and a margin for the readings' spread, and for their declared tokens/s until there are
readings; a reading above what the plan gave a service asks for a re-plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from wattsched_operator.demand import (
    DemandHistory,
    HourlyDemand,
    exceeds_plan,
    forecast,
    with_forecast_demand,
)
from wattsched_operator.learning import record_hourly
from wattsched_optimizer.problem import Precision, Variant, Workload, WorkloadType

BF16 = (Variant("bf16", Precision.BF16, 0),)


def service(key: str, declared: float) -> Workload:
    return Workload(key, WorkloadType.INFERENCE, 8, 1, BF16, tokens_per_second=declared)


def test_the_forecast_is_the_recent_peak_with_headroom() -> None:
    assert forecast([100.0, 300.0, 200.0], headroom=1.2, spread=0.0) == 360.0
    assert forecast([], headroom=1.2) is None


def test_the_forecast_adds_a_margin_that_grows_with_the_readings_spread() -> None:
    """Same peak, same headroom: the bursty service (readings far apart) is sized above the
    steady one (readings close together); one reading has no spread."""
    steady = forecast([950.0, 1000.0, 1050.0], headroom=1.0, spread=2.0)
    bursty = forecast([200.0, 1000.0, 1050.0], headroom=1.0, spread=2.0)
    assert steady is not None
    assert bursty is not None
    assert steady == pytest.approx(1050.0 + 2.0 * 40.8248, rel=1e-5)  # pstdev 40.82
    assert bursty == pytest.approx(1050.0 + 2.0 * 389.4440, rel=1e-5)  # pstdev 389.44
    assert forecast([1000.0], headroom=1.0, spread=2.0) == 1000.0
    history = DemandHistory(window_seconds=300, headroom=1.0, spread=2.0)
    for at, tokens in ((100.0, 200.0), (115.0, 1000.0), (130.0, 1050.0)):
        history.record("ns/code", at, tokens)
    assert history.demand("ns/code", 140.0, declared=None) == pytest.approx(bursty)


def test_a_queue_adds_its_backlog_drained_within_one_interval() -> None:
    # A saturated service: it served 1000 tokens/s (all it could) with 30,000 tokens waiting.
    history = DemandHistory(window_seconds=300, headroom=1.2, interval_seconds=60)
    history.record("ns/chat", 100.0, 1000.0, backlog_tokens=30_000)
    # (1000 + 30000 / 60) * 1.2: served alone would say 1200.
    assert history.demand("ns/chat", 110.0, declared=None) == 1800.0


def test_a_drained_backlog_keeps_its_peak_for_the_window() -> None:
    history = DemandHistory(window_seconds=300, headroom=1.0, interval_seconds=60, spread=0.0)
    history.record("ns/chat", 100.0, 1000.0, backlog_tokens=60_000)
    history.record("ns/chat", 160.0, 1500.0, backlog_tokens=0)
    # The queue drained once the service had capacity; it is not sized down a reading later.
    assert history.demand("ns/chat", 170.0, declared=None) == 2000.0
    assert history.demand("ns/chat", 450.0, declared=None) == 1500.0


def test_a_reading_above_the_plans_capacity_asks_for_a_re_plan() -> None:
    history = DemandHistory(window_seconds=300, headroom=1.2, interval_seconds=60)
    history.record("ns/chat", 100.0, 1000.0, backlog_tokens=0)
    # Served all it was sized for, no queue: nothing to do.
    assert not exceeds_plan(history, "ns/chat", 100.0, sized_for=1200.0, capacity=1250.0)
    # At capacity with a queue: its demand is above what its replicas serve.
    history.record("ns/chat", 115.0, 1250.0, backlog_tokens=12_000)
    assert exceeds_plan(history, "ns/chat", 115.0, sized_for=1200.0, capacity=1250.0)


def test_a_budget_limited_service_does_not_ask_again_while_its_demand_holds() -> None:
    # Sized for 3000 tokens/s, the budget gave it 1250: its queue is no news until demand grows.
    history = DemandHistory(window_seconds=300, headroom=1.2, interval_seconds=60)
    history.record("ns/chat", 100.0, 1250.0, backlog_tokens=60_000)
    assert not exceeds_plan(history, "ns/chat", 100.0, sized_for=3000.0, capacity=1250.0)
    history.record("ns/chat", 115.0, 1250.0, backlog_tokens=180_000)
    assert exceeds_plan(history, "ns/chat", 115.0, sized_for=3000.0, capacity=1250.0)


def test_no_reading_no_re_plan() -> None:
    assert not exceeds_plan(DemandHistory(), "ns/chat", 0.0, sized_for=None, capacity=0.0)


def test_readings_replace_the_declared_demand_only_within_the_window() -> None:
    history = DemandHistory(window_seconds=300, headroom=1.2, spread=0.0)
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


def test_a_service_whose_demand_stays_is_not_copied() -> None:
    # 10,000 services without readings: the round's input holds each once, not a copy of each.
    history = DemandHistory(window_seconds=300, headroom=1.5)
    history.record("ns/busy", 10.0, 4000.0)
    busy, quiet = service("ns/busy", 1000.0), service("ns/quiet", 1000.0)
    sized = with_forecast_demand([busy, quiet], history, 20.0)
    assert sized[1] is quiet
    assert sized[0].tokens_per_second == 6000.0
    assert busy.tokens_per_second == 1000.0  # a changed demand is a copy


def test_a_forgotten_service_starts_again_from_its_declared_demand() -> None:
    history = DemandHistory()
    history.record("ns/gone", 0.0, 10.0)
    history.forget(["ns/other"])
    assert history.demand("ns/gone", 1.0, declared=7.0) == 7.0


def test_the_hours_keep_what_a_service_needed_not_a_queue_draining() -> None:
    # 10:00-10:02: 1,000 tokens/s; then a queue left by a restart drains at 5,000 tokens/s for a
    # minute; then 1,100. The hour's peak is 1,100: served tokens/s with a queue are no demand.
    hourly = HourlyDemand(days=2, headroom=1.0)
    ten = datetime(2026, 1, 1, 10, tzinfo=UTC)
    for minute, served, backlog in ((0, 1000.0, 0.0), (1, 5000.0, 2e6), (2, 1100.0, 0.0)):
        record_hourly(hourly, {"t/chat": (served, backlog)}, ten + timedelta(minutes=minute))
    starts = [(ten + timedelta(hours=h)).timestamp() for h in range(4)]
    # Now: the recent forecast (which counts the backlog, drained within one interval). The
    # hours ahead, unknown: the busiest recorded hour, not that recent forecast.
    assert hourly.per_slot("t/chat", starts, recent=6000.0) == (6000.0, 1100.0, 1100.0, 1100.0)
    declared = hourly.per_slot("t/chat", starts, recent=6000.0, declared=1500.0)
    assert declared == (6000.0, 1500.0, 1500.0, 1500.0)
    # Its energy: the peak of the current hour.
    assert hourly.expected_per_slot("t/chat", starts, recent=6000.0) == (6000.0,) + (1100.0,) * 3
    # With no hour recorded, the recent forecast is all there is.
    assert HourlyDemand().per_slot("t/new", starts, recent=700.0) == (700.0,) * 4
    assert HourlyDemand().expected_per_slot("t/new", starts, recent=700.0) == (700.0,) * 4


def steady(history: DemandHistory, key: str, start: float, end: float, tokens: float) -> None:
    """A reading every 15 s from `start` to before `end`."""
    at = start
    while at < end:
        history.record(key, at, tokens)
        at += 15.0


def test_a_burst_sizes_the_service_for_the_next_one_in_proportion_for_an_hour() -> None:
    """A burst at three times the forecast before it: once it has left the window, the
    service is still sized at three times its demand, and an hour later no longer."""
    history = DemandHistory(window_seconds=300, headroom=1.0, spread=0.0)
    steady(history, "ns/code", 0.0, 300.0, 1000.0)
    history.record("ns/code", 300.0, 3000.0)
    steady(history, "ns/code", 315.0, 900.0, 1000.0)
    # The window (600-900 s) holds only 1,000s: the burst's ratio sizes it at 3,000.
    assert history.demand("ns/code", 900.0, declared=None) == 3000.0
    steady(history, "ns/code", 900.0, 1500.0, 500.0)
    # Half the demand: half the burst.
    assert history.demand("ns/code", 1500.0, declared=None) == 1500.0
    steady(history, "ns/code", 1500.0, 2100.0, 2000.0)
    # Four times the demand (a step up, no burst): three times 2,000.
    assert history.demand("ns/code", 2100.0, declared=None) == 6000.0
    steady(history, "ns/code", 2100.0, 3900.0, 1000.0)
    # An hour after the burst: the window's forecast alone.
    assert history.demand("ns/code", 3900.0, declared=None) == 1000.0


def test_a_step_up_holds_no_margin_above_the_new_level() -> None:
    """A launch from a trickle, and traffic moved over: the first readings at the new level
    outran the forecast a hundred and five times, but are the most the service needed."""
    history = DemandHistory(window_seconds=300, headroom=1.0, spread=0.0)
    steady(history, "ns/launch", 0.0, 300.0, 10.0)
    steady(history, "ns/launch", 300.0, 900.0, 1000.0)
    assert history.demand("ns/launch", 900.0, declared=None) == 1000.0
    steady(history, "ns/moved", 0.0, 300.0, 1000.0)
    steady(history, "ns/moved", 300.0, 900.0, 5000.0)
    assert history.demand("ns/moved", 900.0, declared=None) == 5000.0


def test_a_forgotten_service_forgets_its_bursts() -> None:
    history = DemandHistory(window_seconds=300, headroom=1.0, spread=0.0)
    steady(history, "ns/code", 0.0, 300.0, 1000.0)
    history.record("ns/code", 300.0, 3000.0)
    history.forget([])
    steady(history, "ns/code", 315.0, 900.0, 1000.0)
    assert history.demand("ns/code", 900.0, declared=None) == 1000.0

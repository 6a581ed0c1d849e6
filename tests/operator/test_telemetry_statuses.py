"""Measured watts, `energy` and `TelemetryFresh` in statuses, and a telemetry read that
never holds up or breaks a planning round (Prometheus refusing, or accepting and never answering).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from wattsched_api.vocabulary import Source
from wattsched_operator.cache import ClusterCache
from wattsched_operator.loop import LoopSettings, PlanningLoop
from wattsched_operator.statuses import (
    budget_status,
    budget_telemetry,
    without_nones,
    workload_measured_watts,
    workload_status,
    workload_telemetry,
)
from wattsched_operator.telemetry import (
    Measurement,
    TelemetryConfig,
    TelemetryReader,
    TelemetrySnapshot,
)
from wattsched_optimizer.problem import (
    BudgetAllocation,
    Plan,
    PlanStatus,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DCGM = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
PLAN = Plan(PlanStatus.OPTIMAL, 1.0, 1.0, 0.0, 0.1, (), {}, (), ())


def fresh(nodes: dict[str, float], pods: dict[tuple[str, str], float] | None = None) -> Any:
    return TelemetrySnapshot(
        time=NOW,
        source=Source.MEASURED,
        stale=False,
        reason="",
        node_watts={n: Measurement(w, DCGM) for n, w in nodes.items()},
        pod_watts={k: Measurement(w, DCGM) for k, w in (pods or {}).items()},
    )


def budget(telemetry: TelemetrySnapshot | None, scope: tuple[str, ...], **kw: Any) -> Any:
    return budget_status(
        kw.get("previous", {}),
        generation=1,
        allocation=BudgetAllocation("rack", 4000, 3000.0, 2500.0),
        cap_watts=4000,
        node_count=len(scope),
        plan=PLAN,
        now=kw.get("now", NOW),
        telemetry=telemetry,
        scope_nodes=scope,
    )


def cond(result: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in result["conditions"] if c["type"] == type_), None)


def test_budget_measured_watts_is_the_sum_of_the_nodes_in_scope_only() -> None:
    reading = fresh({"a": 700.25, "b": 300.0, "outside": 999.0})
    result = budget(reading, ("a", "b"))
    assert result["measuredWatts"] == 1000.2
    telemetry = cond(result, "TelemetryFresh")
    assert telemetry is not None
    assert (telemetry["status"], telemetry["reason"]) == ("True", "Measured")
    assert DCGM in telemetry["message"]


def test_a_node_in_scope_without_samples_leaves_measured_watts_out() -> None:
    result = budget(fresh({"a": 700.0}), ("a", "b"))
    assert result["measuredWatts"] is None
    assert "measuredWatts" not in without_nones(result)
    telemetry = cond(result, "TelemetryFresh")
    assert telemetry is not None
    assert (telemetry["status"], telemetry["reason"]) == ("False", "NoSamples")
    assert "b" in telemetry["message"]


def test_prometheus_down_says_prometheus_unavailable_with_the_readers_reason() -> None:
    down = TelemetrySnapshot(
        NOW, Source.MODELLED, True, "Prometheus at http://p did not answer", unavailable=True
    )
    result = budget(down, ("a",))
    assert result["measuredWatts"] is None
    telemetry = cond(result, "TelemetryFresh")
    assert telemetry is not None
    assert (telemetry["status"], telemetry["reason"]) == ("False", "PrometheusUnavailable")
    assert "http://p did not answer" in telemetry["message"]
    assert cond(result, "Ready") is not None


def test_no_fresh_series_anywhere_says_no_samples() -> None:
    empty = TelemetrySnapshot(NOW, Source.MODELLED, True, "no GPU power series in the last 60s")
    watts, is_fresh, reason, message = budget_telemetry(empty, ["a"])
    assert (watts, is_fresh, reason) == (None, False, "NoSamples")
    assert "no GPU power series" in message


def test_without_prometheus_a_budget_has_no_telemetry_condition_or_figure() -> None:
    result = budget(None, ("a",))
    assert result["measuredWatts"] is None
    assert cond(result, "TelemetryFresh") is None


def test_the_telemetry_condition_keeps_its_transition_time_while_stale() -> None:
    down = TelemetrySnapshot(NOW, Source.MODELLED, True, "down", unavailable=True)
    first = budget(down, ("a",))
    later = budget(down, ("a",), previous=first, now=NOW.replace(hour=13))
    before, after = cond(first, "TelemetryFresh"), cond(later, "TelemetryFresh")
    assert before is not None
    assert after is not None
    assert after["lastTransitionTime"] == before["lastTransitionTime"] == "2026-11-25T12:00:00Z"


def test_workload_measured_watts_needs_every_running_pod_measured() -> None:
    reading = fresh({"a": 1.0}, {("ns", "w-0"): 350.0, ("ns", "w-1"): 340.0})
    assert workload_measured_watts(reading, [("ns", "w-0"), ("ns", "w-1")]) == 690.0
    assert workload_measured_watts(reading, [("ns", "w-0"), ("ns", "w-2")]) is None
    assert workload_measured_watts(reading, []) is None
    assert workload_measured_watts(None, [("ns", "w-0")]) is None
    stale = TelemetrySnapshot(NOW, Source.MODELLED, True, "down", unavailable=True)
    assert workload_measured_watts(stale, [("ns", "w-0")]) is None


def workload(
    previous: dict[str, Any] | None = None, now: datetime = NOW, **kw: Any
) -> dict[str, Any]:
    """An unplaced workload's status, from `previous` (default: none yet)."""
    return workload_status(
        previous or {},
        generation=1,
        is_gang=False,
        gang_size=1,
        placements=[],
        unplaced=None,
        pods=[],
        failure_message=None,
        now=now,
        **kw,
    )


def test_workload_status_carries_the_accounted_energy_and_the_measured_watts() -> None:
    energy = {"joules": 10.0, "kilowattHours": 0.0, "source": "measured", "accountedUntil": "x"}
    measured = workload(measured_watts=690.04, energy=energy)
    assert measured["power"]["measuredWatts"] == 690.0
    assert measured["energy"] == energy
    modelled = workload()
    assert modelled["energy"] == {"source": "modelled"}
    assert "measuredWatts" not in without_nones(modelled)["power"]


DOWN = TelemetrySnapshot(
    NOW, Source.MODELLED, True, "Prometheus at http://p did not answer", unavailable=True
)
PODS = [("ns", "w-0"), ("ns", "w-1")]


def test_a_workload_without_any_budget_shows_prometheus_down_as_stale_telemetry() -> None:
    result = workload(telemetry=workload_telemetry(DOWN, PODS))
    telemetry = cond(result, "TelemetryFresh")
    assert telemetry is not None
    assert (telemetry["status"], telemetry["reason"]) == ("False", "PrometheusUnavailable")
    assert "http://p did not answer" in telemetry["message"]
    assert telemetry["observedGeneration"] == 1


def test_a_workload_whose_running_pods_were_all_measured_has_fresh_telemetry() -> None:
    reading = fresh({"a": 1.0}, {("ns", "w-0"): 350.0, ("ns", "w-1"): 340.0})
    telemetry = cond(workload(telemetry=workload_telemetry(reading, PODS)), "TelemetryFresh")
    assert telemetry is not None
    assert (telemetry["status"], telemetry["reason"]) == ("True", "Measured")
    assert DCGM in telemetry["message"]


def test_a_running_pod_without_samples_makes_a_workloads_telemetry_stale_naming_it() -> None:
    reading = fresh({"a": 1.0}, {("ns", "w-0"): 350.0})
    status, reason, message = workload_telemetry(reading, PODS)
    assert (status, reason) == (False, "NoSamples")
    assert "ns/w-1" in message
    assert "ns/w-0" not in message


def test_no_fresh_series_anywhere_is_no_samples_on_a_workload_too() -> None:
    empty = TelemetrySnapshot(NOW, Source.MODELLED, True, "no GPU power series in the last 60s")
    status, reason, message = workload_telemetry(empty, [])
    assert (status, reason) == (False, "NoSamples")
    assert "no GPU power series" in message


def test_a_workload_with_no_running_pod_has_unknown_telemetry_while_prometheus_answers() -> None:
    telemetry = cond(
        workload(telemetry=workload_telemetry(fresh({"a": 1.0}), [])), "TelemetryFresh"
    )
    assert telemetry is not None
    assert (telemetry["status"], telemetry["reason"]) == ("Unknown", "NotRunning")


def test_without_prometheus_a_workload_has_no_telemetry_condition() -> None:
    assert cond(workload(), "TelemetryFresh") is None


def test_a_workloads_telemetry_condition_moves_its_transition_time_only_when_it_changes() -> None:
    first = workload(telemetry=workload_telemetry(DOWN, PODS))
    later_now = NOW.replace(hour=13)
    still_down = workload(first, later_now, telemetry=workload_telemetry(DOWN, PODS))
    back = fresh({"a": 1.0}, {("ns", "w-0"): 350.0, ("ns", "w-1"): 340.0})
    recovered = workload(still_down, later_now, telemetry=workload_telemetry(back, PODS))
    times = [cond(r, "TelemetryFresh") or {} for r in (first, still_down, recovered)]
    assert [t.get("lastTransitionTime") for t in times] == [
        "2026-11-25T12:00:00Z",
        "2026-11-25T12:00:00Z",
        "2026-11-25T13:00:00Z",
    ]


# -- the loop's read: never blocks or breaks a round -------------------------------------------


def loop_with(reader: TelemetryReader | None, timeout_seconds: float = 10.0) -> PlanningLoop:
    return PlanningLoop(
        cache=ClusterCache(),
        kube=cast(Any, None),
        settings=LoopSettings(telemetry_timeout_seconds=timeout_seconds, workers=2),
        build_input=cast(Any, None),
        plan_function=cast(Any, None),
        metrics=None,
        is_leader=cast(Any, None),
        telemetry=reader,
    )


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung Prometheus)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def test_without_a_reader_the_loop_reads_nothing() -> None:
    assert asyncio.run(loop_with(None)._read_snapshot(["gpu-a"], [])) is None


def test_a_refused_prometheus_gives_a_stale_unavailable_reading() -> None:
    reader = TelemetryReader(TelemetryConfig(f"http://127.0.0.1:{closed_port()}"))
    reading = asyncio.run(loop_with(reader)._read_snapshot(["gpu-a"], []))
    assert reading is not None
    assert (reading.stale, reading.unavailable, reading.source) == (True, True, Source.MODELLED)
    assert "did not answer" in reading.reason


def test_a_hung_prometheus_is_dropped_after_the_loops_timeout(silent_port: int) -> None:
    reader = TelemetryReader(
        TelemetryConfig(f"http://127.0.0.1:{silent_port}", timeout_seconds=3.0)
    )
    started = time.monotonic()
    reading = asyncio.run(loop_with(reader, 0.5)._read_snapshot(["gpu-a"], []))
    elapsed = time.monotonic() - started
    assert reading is not None
    assert reading.stale
    assert reading.unavailable
    assert "took over 0.5 s" in reading.reason
    assert elapsed < 5.0


# -- the loop's demand check between plans ----------------------------------------------------


class QueueReader(TelemetryReader):
    """A reader whose every read shows the chat pod serving `tokens` with `queued` waiting (the
    Prometheus side is tested in tests/telemetry)."""

    def __init__(self, tokens: float, queued: float) -> None:
        super().__init__(TelemetryConfig("http://127.0.0.1:1"))
        self.tokens, self.queued = tokens, queued

    def read(self, nodes: Any, pods: Any = ()) -> TelemetrySnapshot:
        pod = ("team", "chat-0")
        return TelemetrySnapshot(
            datetime.now(UTC),
            Source.MEASURED,
            False,
            "",
            pod_tokens_per_second={pod: self.tokens},
            pod_queued_tokens={pod: self.queued},
        )


def _checked(queued_seconds: float) -> tuple[bool, float]:
    """Plan one running chat replica, then run the loop's demand check with a reading at the
    plan's capacity and `queued_seconds` of it waiting: (whether the next round is a plan, the
    service's demand the check recorded)."""
    from tests.operator.test_core import NOW as PLANNED_AT  # noqa: PLC0415
    from tests.operator.test_core import node, profile, replica_pod, service  # noqa: PLC0415
    from wattsched_operator import core  # noqa: PLC0415
    from wattsched_operator.cache import (  # noqa: PLC0415
        BUDGETS,
        NODES,
        PODS,
        PROFILES,
        WORKLOADS,
        slim,
    )

    loop = loop_with(None)
    cache = loop.cache
    cache.replace(NODES, [slim(NODES, node("l40s-0"))])
    cache.replace(PROFILES, [slim(PROFILES, profile("l40s-0"))])
    cache.replace(BUDGETS, [])
    cache.replace(WORKLOADS, [slim(WORKLOADS, service(status={"phase": "Running"}))])
    cache.replace(PODS, [slim(PODS, replica_pod("chat", "l40s-0", annotations=None))])
    # (At the time of the profile's heartbeat, so the agent counts as ready.)
    planned = core.decide(
        core.Observed(cache.view(), monotonic=time.monotonic()), PLANNED_AT
    ).memory
    assert planned.last_round is not None
    capacity = sum(p.expected_throughput for p in planned.last_round.plan.placements)
    loop.memory = planned
    loop.telemetry = QueueReader(capacity, capacity * queued_seconds)
    cache.dirty.clear()
    asyncio.run(loop.check_demand_once())
    recorded = loop.memory.demand.demand("team/chat", time.monotonic(), None)
    # One reading: its peak times the headroom, no spread to add.
    return cache.dirty.is_set(), (recorded or 0.0) / loop.memory.demand.headroom - capacity


def test_the_loops_demand_check_re_plans_a_service_with_a_queue_beyond_its_capacity() -> None:
    replan, _ = _checked(queued_seconds=12.0)
    assert replan


def test_the_loops_demand_check_records_the_reading_and_leaves_a_service_at_capacity_alone() -> (
    None
):
    replan, above_capacity = _checked(queued_seconds=0.0)
    assert not replan
    # The reading is in the loop's memory for the next plan (served = capacity, no backlog).
    assert above_capacity == pytest.approx(0.0, abs=1e-6)

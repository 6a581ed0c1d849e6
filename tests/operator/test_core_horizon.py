"""The horizon in the decision core: a budget near its allowance defers flexible work (Schedulable
False, reason Deferred, one Event per deferral), says so in its status (remaining and projected
allowance, the AllowanceExhausted condition and its Event), and the shell is told to read each
budget's carbon forecast query; `horizon_hours=0` plans one instant at a time as before."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.operator.test_core import node, profile, replica_pod, service
from wattsched_api import vocabulary
from wattsched_operator import core, statuses
from wattsched_operator.readings import CalibrationSample, Calibrator
from wattsched_optimizer.model import PerformanceModel
from wattsched_optimizer.planner import plan
from wattsched_optimizer.problem import MoveReason, Plan, PlanInput, WorkloadType

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
# 420 g/kWh except from 15:00 to 18:00 UTC, 140 g/kWh.
EVENING_CLEAN = [140.0 if 15 <= hour < 18 else 420.0 for hour in range(24)]


def job(name: str = "tune") -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "type": "FineTuning",
            "model": {"name": "m", "parametersBillions": 8},
            "gpu": {"count": 1},
            "slo": {"totalWork": {"gpuHours": 4}},
            "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}},
        },
    }


def budget(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": "cluster", "uid": "uid-cluster", "generation": 1},
        "spec": {"nodeSelector": {}, "powerCapWatts": 20000, **spec},
    }
    if status is not None:
        body["status"] = status
    return body


NEAR_ALLOWANCE = budget(
    {"energy": {"kilowattHours": 10, "period": "Day"}},
    {"energyUsedKilowattHours": 9.99, "periodStart": "2026-12-05T00:00:00Z"},
)


def cluster(
    budget_body: dict[str, Any],
    workloads: list[dict[str, Any]],
    pods: tuple[dict[str, Any], ...] = (),
) -> core.ClusterView:
    nodes = [node("l40s-0"), node("l40s-1")]
    return core.ClusterView(
        workloads={f"team/{w['metadata']['name']}": w for w in workloads},
        budgets={budget_body["metadata"]["name"]: budget_body},
        nodes={n["metadata"]["name"]: n for n in nodes},
        profiles={n["metadata"]["name"]: profile(n["metadata"]["name"]) for n in nodes},
        pods={f"team/{p['metadata']['name']}": p for p in pods},
    )


def statuses_by_key(round_: core.Round) -> dict[str, core.WorkloadStatus]:
    return {s.key: s for s in round_.workload_statuses}


def budget_write(round_: core.Round) -> core.StatusWrite:
    (write,) = round_.budget_statuses
    return write


def applied(body: dict[str, Any], write: core.StatusWrite | None) -> dict[str, Any]:
    """The body as the API server has it after the round's status write."""
    if write is None:
        return body
    return {**body, "status": {**(body.get("status") or {}), **write.status}}


def test_a_budget_near_its_allowance_defers_the_job_and_keeps_the_service() -> None:
    observed = core.Observed(cluster(NEAR_ALLOWANCE, [service(), job()]), monotonic=100.0)
    round_ = core.decide(observed, NOW)

    assert round_.plan is not None
    placed = {p.workload for p in round_.plan.placements}
    assert placed == {"team/chat"}  # inference keeps serving
    assert "team/tune" not in {u.workload for u in round_.plan.unplaced}
    assert [p["metadata"]["name"] for p in round_.create] == ["chat-0"]
    tune = statuses_by_key(round_)["team/tune"]
    assert tune.phase == vocabulary.Phase.PENDING
    assert tune.write is not None
    schedulable = statuses.find_condition(tune.write.status["conditions"], "Schedulable")
    assert schedulable is not None
    assert (schedulable["status"], schedulable["reason"]) == (
        "False",
        vocabulary.Reason.DEFERRED,
    )
    message = (
        "Deferred until 00:00 UTC: EnergyBudget cluster has no allowance left for it this day "
        "(10.0 of 10 kWh used)"
    )
    assert schedulable["message"] == message
    assert tune.write.status["message"] == message
    events = [(e.type, e.reason, e.message) for e in tune.write.events]
    assert ("Normal", vocabulary.Reason.DEFERRED, message) in events
    assert not [e for e in events if e[1] == "Unschedulable"]

    write = budget_write(round_)
    assert write.status["remainingKilowattHours"] == 0.01
    assert write.status["projectedKilowattHoursAtPeriodEnd"] > 10
    exhausted = statuses.find_condition(write.status["conditions"], "AllowanceExhausted")
    assert exhausted is not None
    assert (exhausted["status"], exhausted["reason"]) == ("True", "EnergyAllowance")
    assert "team/tune: " + message in exhausted["message"]
    assert [e.reason for e in write.events] == ["AllowanceExhausted"]
    # The memory keeps what was deferred (accounting rounds between plans keep saying so).
    assert round_.memory.last_round is not None
    assert round_.memory.last_round.over_time is not None
    assert [d.workload for d in round_.memory.last_round.over_time.deferred] == ["team/tune"]


def test_a_deferral_and_an_exhausted_allowance_post_one_event_not_one_per_round() -> None:
    workloads = [service(), job()]
    first = core.decide(core.Observed(cluster(NEAR_ALLOWANCE, workloads), monotonic=100.0), NOW)
    tune_write = statuses_by_key(first)["team/tune"].write
    workloads = [workloads[0], applied(workloads[1], tune_write)]
    budget_body = applied(NEAR_ALLOWANCE, budget_write(first))
    later = NOW + timedelta(minutes=5)
    second = core.decide(
        core.Observed(cluster(budget_body, workloads), memory=first.memory, monotonic=400.0),
        later,
    )
    tune = statuses_by_key(second)["team/tune"]
    assert tune.phase == vocabulary.Phase.PENDING
    assert tune.write is None or not [
        e for e in tune.write.events if e.reason == vocabulary.Reason.DEFERRED
    ]
    assert budget_write(second).events == ()
    # An accounting round between plans keeps the condition and the deferral.
    between = core.account(
        core.Observed(cluster(budget_body, workloads), memory=second.memory, monotonic=450.0),
        later + timedelta(minutes=1),
    )
    (between_budget,) = between.budget_statuses
    # Accounting advanced the period's energy (idle GPUs and the service): what is left with it.
    used = between_budget.status["energyUsedKilowattHours"]
    assert used > 9.99
    assert between_budget.status["remainingKilowattHours"] == round(10 - used, 3)
    kept = statuses.find_condition(between_budget.status["conditions"], "AllowanceExhausted")
    assert kept is not None
    assert kept["status"] == "True"
    assert between_budget.events == ()
    # Its status is written again only to advance the figures; it still says Deferred.
    between_tune = statuses_by_key(between)["team/tune"]
    assert between_tune.phase == vocabulary.Phase.PENDING
    if between_tune.write is not None:
        again = statuses.find_condition(between_tune.write.status["conditions"], "Schedulable")
        assert again is not None
        assert again["reason"] == vocabulary.Reason.DEFERRED
        assert not between_tune.write.events


def test_a_running_preemptible_job_deferred_by_its_allowance_is_preempted_and_says_why() -> None:
    tune = job()
    tune["spec"]["preemptible"] = True
    tune["status"] = {"phase": vocabulary.Phase.RUNNING}
    pod = replica_pod("tune", "l40s-0", annotations=None)
    observed = core.Observed(cluster(NEAR_ALLOWANCE, [tune], (pod,)), monotonic=100.0)
    round_ = core.decide(observed, NOW)
    assert [(e.namespace, e.name) for e in round_.evict] == [("team", "tune-0")]
    assert statuses_by_key(round_)["team/tune"].phase == vocabulary.Phase.PREEMPTED
    report = round_.disruptions.report([("team", "tune-0")])
    (event,) = [e for e in report.events if e.reason == "Preempted"]
    assert "Deferred until 00:00 UTC" in event.message
    assert event.message.startswith("1 replica(s), cause Deferred: ")
    assert report.preemptions == {"Deferred": 1}
    assert [e.cause for e in round_.evict] == [MoveReason.DEFERRED]
    # Running work that may not be preempted keeps running (the horizon does not defer it).
    tune["spec"]["preemptible"] = False
    kept = core.decide(observed, NOW)
    assert kept.evict == ()
    assert kept.plan is not None
    assert {p.workload for p in kept.plan.placements} == {"team/tune"}


def test_with_room_in_the_allowance_nothing_waits_and_the_status_says_within() -> None:
    roomy = budget(
        {"energy": {"kilowattHours": 10000, "period": "Day"}},
        {"energyUsedKilowattHours": 1.0, "periodStart": "2026-12-05T00:00:00Z"},
    )
    round_ = core.decide(core.Observed(cluster(roomy, [service(), job()]), monotonic=1.0), NOW)
    assert round_.plan is not None
    assert {p.workload for p in round_.plan.placements} == {"team/chat", "team/tune"}
    write = budget_write(round_)
    exhausted = statuses.find_condition(write.status["conditions"], "AllowanceExhausted")
    assert exhausted is not None
    assert (exhausted["status"], exhausted["reason"]) == ("False", "WithinAllowance")
    assert write.status["remainingKilowattHours"] == 9999.0
    assert write.events == ()


def test_horizon_hours_zero_plans_one_instant_as_before() -> None:
    settings = core.Settings(horizon_hours=0)
    observed = core.Observed(
        cluster(NEAR_ALLOWANCE, [service(), job()]), monotonic=1.0, settings=settings
    )
    round_ = core.decide(observed, NOW)
    assert round_.plan is not None
    assert {p.workload for p in round_.plan.placements} == {"team/chat", "team/tune"}
    write = budget_write(round_)
    assert "remainingKilowattHours" not in write.status
    assert statuses.find_condition(write.status["conditions"], "AllowanceExhausted") is None


def test_the_shell_reads_each_forecast_query_and_the_core_plans_with_its_samples() -> None:
    carbon_budget = budget(
        {
            "carbon": {
                "intensityGramsPerKilowattHour": 420,
                "forecastPrometheusQuery": "carbon_forecast_g_per_kwh",
            }
        }
    )
    deadline = job()
    deadline["spec"]["slo"] = {
        "totalWork": {"gpuHours": 2},
        "deadline": (NOW + timedelta(hours=33)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    observed = core.Observed(cluster(carbon_budget, [deadline]), monotonic=1.0)
    requests = core.telemetry_requests(observed, NOW)
    assert requests.forecast_queries == {"cluster": "carbon_forecast_g_per_kwh"}
    # None when the horizon is off.
    off = dataclasses.replace(observed, settings=core.Settings(horizon_hours=0))
    assert core.telemetry_requests(off, NOW).forecast_queries == {}

    # The forecast: 420 g/kWh for the next hours, 140 from 15:00 UTC (3 hours ahead).
    forecast = {ahead: EVENING_CLEAN[(12 + ahead) % 24] for ahead in range(30)}
    readings = core.Readings(carbon_forecasts={"cluster": forecast})
    round_ = core.decide(dataclasses.replace(observed, telemetry=readings), NOW)
    tune = statuses_by_key(round_)["team/tune"]
    assert tune.write is not None
    schedulable = statuses.find_condition(tune.write.status["conditions"], "Schedulable")
    assert schedulable is not None
    assert schedulable["message"] == "Deferred until 15:00 UTC: 140 g/kWh then vs 420 now"
    # The horizon runs it later: its deadline is neither met nor missed yet.
    slo = statuses.find_condition(tune.write.status["conditions"], vocabulary.ConditionType.SLO_MET)
    assert slo is not None
    assert (slo["status"], slo["reason"]) == ("Unknown", "Deferred")
    assert not [e for e in tune.write.events if e.reason == "SLORisk"]


def test_a_gang_whose_planned_start_passed_without_a_start_waits_for_no_cleaner_hour() -> None:
    # Pods of 4 GPUs on 4-GPU nodes: each takes a whole node. 140 g/kWh from 15:00 to 16:00
    # UTC, 300 from 06:00 to 07:00, 420 otherwise; due at 08:00 the next day.
    only_clean = [140.0 if hour == 15 else 300.0 if hour == 6 else 420.0 for hour in range(24)]
    carbon_budget = budget(
        {"carbon": {"intensityGramsPerKilowattHour": 420, "forecastPrometheusQuery": "forecast"}}
    )
    gang = job()
    gang["spec"]["gpu"] = {"count": 4}
    gang["spec"]["slo"] = {
        "totalWork": {"gpuHours": 0.5},
        "deadline": (NOW + timedelta(hours=20)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }

    def observed_at(now: datetime, memory: core.Memory) -> core.Observed:
        forecast = {ahead: only_clean[(now.hour + ahead) % 24] for ahead in range(30)}
        view = cluster(carbon_budget, [gang])
        for body in view.profiles.values():  # the agents' heartbeats are fresh
            body["status"]["agent"]["heartbeatTime"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        return core.Observed(
            view,
            memory=memory,
            monotonic=(now - NOW).total_seconds(),
            telemetry=core.Readings(carbon_forecasts={"cluster": forecast}),
        )

    def no_room_for_the_gang(plan_input: PlanInput, model: PerformanceModel) -> Plan:
        """The one-instant planner finds no whole node for the gang (smaller work holds them)."""
        others = tuple(w for w in plan_input.workloads if w.key != "team/tune")
        return plan(dataclasses.replace(plan_input, workloads=others), model)

    first = core.decide(observed_at(NOW, core.Memory()), NOW)
    three = NOW.replace(hour=15)
    assert first.memory.planned_starts == {"team/tune": three}
    assert not first.create
    # 15:00: handed to the one-instant planner, which finds no room; its planned start is kept.
    at_three = three + timedelta(seconds=30)
    second = core.decide(
        observed_at(at_three, first.memory), at_three, plan_function=no_room_for_the_gang
    )
    assert not second.create
    assert second.memory.planned_starts == {"team/tune": three}
    # 16:10, dirty again: overdue, it is placed now rather than deferred to 06:00.
    later = NOW.replace(hour=16, minute=10)
    third = core.decide(observed_at(later, second.memory), later)
    assert [p["metadata"]["name"] for p in third.create] == ["tune-0"]
    # Without the kept start (an operator that just started), it waits for 06:00.
    fresh = dataclasses.replace(second.memory, planned_starts={})
    waiting = core.decide(observed_at(later, fresh), later)
    assert not waiting.create
    tune = statuses_by_key(waiting)["team/tune"]
    assert tune.write is not None
    assert tune.write.status["message"].startswith("Deferred until 06:00 UTC")


def test_the_horizon_plans_a_job_at_the_speed_the_calibration_measured() -> None:
    """The horizon and the one-instant planner use one model: where telemetry measured half
    the catalogue's tokens/s, a job's work takes three clean hours of the horizon, not two."""
    carbon_budget = budget(
        {"carbon": {"intensityGramsPerKilowattHour": 420, "forecastPrometheusQuery": "forecast"}}
    )
    deadline = job()
    deadline["spec"]["slo"] = {
        "totalWork": {"tokens": 10_000_000},
        "deadline": (NOW + timedelta(hours=33)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    forecast = {ahead: EVENING_CLEAN[(12 + ahead) % 24] for ahead in range(30)}

    def planned_slots(measured_share: float) -> tuple[str, ...]:
        calibrator = Calibrator(smoothing=1.0)
        calibrator.observe(
            [
                CalibrationSample(
                    "L40S", WorkloadType.FINE_TUNING, None, None, 1000.0, 1000.0 * measured_share
                )
            ]
        )
        observed = core.Observed(
            cluster(carbon_budget, [deadline]),
            memory=core.Memory(calibrator=calibrator),
            monotonic=1.0,
            telemetry=core.Readings(carbon_forecasts={"cluster": forecast}),
        )
        round_ = core.decide(observed, NOW)
        assert round_.memory.last_round is not None
        assert round_.memory.last_round.over_time is not None
        [deferred] = round_.memory.last_round.over_time.deferred
        assert deferred.until == "2026-12-05T15:00:00Z"
        return deferred.planned_slots

    hours = [f"2026-12-05T{hour}:00:00Z" for hour in (15, 16, 17)]
    assert planned_slots(1.0) == tuple(hours[:2])
    assert planned_slots(0.5) == tuple(hours)

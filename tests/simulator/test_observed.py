"""The simulated cluster as the operator observes it (`observed`), both ways: the bodies it builds
are read by the operator's own snapshot as the simulator's state, its telemetry reading splits the
simulated samples per pod, and the operator's pods and limits come back as the engine's Decision."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from wattsched_api import parse_llmworkload
from wattsched_operator import core, desired, snapshot
from wattsched_operator.handover import is_ready
from wattsched_operator.transition import NodeLimits
from wattsched_optimizer.problem import EnergyPolicy, Placement, Plan, PlanStatus, WorkloadType
from wattsched_simulator import observed
from wattsched_simulator.carbon import CarbonIntensity
from wattsched_simulator.cluster import SimBudget, SimNode
from wattsched_simulator.controller import PlannerPolicy
from wattsched_simulator.engine import RunningReplica, Scenario, Simulation, View
from wattsched_simulator.telemetry import Sample, Telemetry, TelemetryConfig
from wattsched_simulator.trace import ServiceTrace
from wattsched_simulator.truth import GroundTruth
from wattsched_simulator.workloads import JobSpec, ServiceSpec, model_variants


def node(name: str, gpus: int = 8, rack: str = "rack-a") -> SimNode:
    return SimNode(
        name=name,
        labels={"nvidia.com/gpu.memory": "81559", "wattsched.io/rack": rack},
        product_label="NVIDIA-H100-80GB-HBM3",
        planner_product="H100-80GB",
        truth_product="H100-80GB",
        gpu_count=gpus,
    )


def service(name: str = "chat", demand: float = 1000.0) -> ServiceSpec:
    return ServiceSpec(
        key=f"azure/{name}",
        model_parameters_billions=8.0,
        gpus_per_replica=1,
        variants=model_variants(8.0),
        min_replicas=1,
        max_replicas=6,
        min_quality=0.95,
        priority=100,
        trace=ServiceTrace(name, "test", 10, 1.0, np.full(10, demand)),
    )


def job(deadline_seconds: float | None = 3600.0) -> JobSpec:
    return JobSpec(
        key="batch/training-001",
        type=WorkloadType.TRAINING,
        model_parameters_billions=8.0,
        gpus_per_replica=2,
        replicas=2,
        variants=model_variants(8.0)[:1],
        work_tokens=1e9,
        arrival_seconds=0.0,
        deadline_seconds=deadline_seconds,
        priority=50,
        preemptible=False,
    )


def objects(
    nodes: list[SimNode],
    budgets: list[SimBudget],
    workloads: list[dict[str, Any]],
    pods: tuple[dict[str, Any], ...] = (),
) -> snapshot.ClusterObjects:
    return snapshot.ClusterObjects(
        nodes=tuple(observed.node_body(n) for n in nodes),
        workloads=tuple(workloads),
        budgets=tuple(observed.budget_body(b) for b in budgets),
        profiles=tuple(observed.profile_body(n.name, None, observed.EPOCH) for n in nodes),
        pods=tuple(pods),
    )


def test_the_operators_snapshot_reads_nodes_budgets_and_workloads_as_the_simulator_has_them() -> (
    None
):
    nodes = [node("h0"), node("h1", 4), node("h2", rack="rack-b")]
    budget = SimBudget("rack-a", 5000.0, frozenset({"h0", "h1"}), 1.2, None)
    now = observed.at(600.0)
    done = {"completedTokens": 4e8, "source": "measured", "updatedAt": "2026-01-01T00:09:30Z"}
    built = snapshot.build_snapshot(
        objects(
            nodes,
            [budget],
            [
                observed.service_body(service(), EnergyPolicy.EFFICIENCY, 1234.5),
                observed.job_body(job(), EnergyPolicy.EFFICIENCY, done),
            ],
        ),
        now=now,
        agents_required=True,
    )
    plan_input = built.plan_input
    assert [(n.name, n.product, n.gpu_count, n.agent_ready) for n in plan_input.nodes] == [
        ("h0", "H100-80GB", 8, True),
        ("h1", "H100-80GB", 4, True),
        ("h2", "H100-80GB", 8, True),
    ]
    assert [(b.name, b.power_cap_watts, b.node_names) for b in plan_input.budgets] == [
        ("rack-a", 5000.0, frozenset({"h0", "h1"}))
    ]
    chat, training = plan_input.workloads
    assert (chat.key, chat.type, chat.tokens_per_second) == (
        "azure/chat",
        WorkloadType.INFERENCE,
        1234.5,
    )
    assert (chat.min_replicas, chat.max_replicas, chat.priority) == (1, 6, 100)
    assert [v.name for v in chat.variants] == ["bf16", "fp8"]
    assert chat.policy is EnergyPolicy.EFFICIENCY
    # The job: what is left of its work after the persisted progress, its deadline from now.
    assert training.key == "batch/training-001"
    assert training.remaining_work is not None
    assert training.remaining_work.amount == pytest.approx(6e8)
    assert training.deadline_seconds == pytest.approx(3000.0)
    assert (training.replicas, training.gpus_per_replica, training.preemptible) == (2, 2, False)


def test_a_workload_body_is_a_valid_llmworkload() -> None:
    body = observed.job_body(job(deadline_seconds=None), EnergyPolicy.BALANCED, None)
    workload = parse_llmworkload(body)
    assert workload.spec.slo.deadline_time is None
    assert workload.spec.progress_query is not None
    assert workload.status.progress is None


def test_running_replicas_are_pods_the_snapshot_pins_where_they_run() -> None:
    spec = service()
    body = observed.service_body(spec, EnergyPolicy.BALANCED, 500.0)
    replica = RunningReplica(spec.key, "h1", 1, "fp8", 250.0, ready_at_seconds=120.0)
    starting = observed.pod_body(
        observed.workload_object(body), replica, 3, now_seconds=100.0, startup_seconds=60.0
    )
    ready = observed.pod_body(
        observed.workload_object(body), replica, 3, now_seconds=130.0, startup_seconds=60.0
    )
    assert not is_ready(starting)
    assert is_ready(ready)
    assert starting["status"]["startTime"] == "2026-01-01T00:01:00Z"
    assert ready["metadata"]["name"] == "chat-3"
    built = snapshot.build_snapshot(
        objects([node("h1")], [], [body], (ready,)), now=observed.at(130.0)
    )
    [current] = built.plan_input.current
    assert (current.workload, current.replica, current.node, current.variant) == (
        "azure/chat",
        3,
        "h1",
        "fp8",
    )
    assert current.power_limit_watts == 250.0


def sample(end: float, **series: dict[str, float]) -> Sample:
    return Sample(
        window_end_seconds=end,
        demand_tokens_per_second=series.get("demand", {}),
        served_tokens_per_second=series.get("served", {}),
        utilisation={},
        backlog_tokens=series.get("backlog", {}),
        job_tokens_done=series.get("done", {}),
        workload_watts_per_gpu=series.get("watts", {}),
    )


def test_the_reading_splits_tokens_over_ready_pods_and_gives_watts_to_settled_pods() -> None:
    samples = [
        sample(end, served={"azure/chat": served}, watts={"azure/chat": 300.0})
        for end, served in [
            (15.0, 100.0),
            (30.0, 900.0),
            (45.0, 900.0),
            (60.0, 900.0),
            (75.0, 900.0),
        ]
    ]
    pods = [
        observed.PodReplica(("azure", "chat-0"), "azure/chat", 2, ready_at_seconds=0.0),
        observed.PodReplica(("azure", "chat-1"), "azure/chat", 2, ready_at_seconds=40.0),
        observed.PodReplica(("azure", "chat-2"), "azure/chat", 2, ready_at_seconds=500.0),
    ]
    reading = observed.telemetry_reading(samples, pods, scrape_interval_seconds=15.0)
    assert reading is not None
    assert reading.time == observed.at(75.0)
    # The rate window is the newest 60 s (30..75): 900 tokens/s over the two Ready pods;
    # the one still starting has no reading (its server is not up).
    assert reading.pod_tokens_per_second == {
        ("azure", "chat-0"): pytest.approx(450.0),
        ("azure", "chat-1"): pytest.approx(450.0),
    }
    drained = observed.telemetry_reading(
        samples, pods, scrape_interval_seconds=15.0, draining={"azure/chat": 1}
    )
    assert drained is not None
    assert drained.pod_tokens_per_second[("azure", "chat-0")] == pytest.approx(300.0)
    # Watts per GPU x the pod's GPUs, only for the pod Ready before the window began (at 15 s).
    assert {pod: m.value for pod, m in reading.pod_watts.items()} == {
        ("azure", "chat-0"): pytest.approx(600.0)
    }
    assert observed.telemetry_reading([], pods, scrape_interval_seconds=15.0) is None


def test_the_reading_shows_each_pods_queue_and_short_window_peak() -> None:
    samples = [
        sample(end, served={"azure/chat": served}, backlog={"azure/chat": backlog})
        for end, served, backlog in [
            (15.0, 100.0, 0.0),
            (30.0, 600.0, 0.0),
            (45.0, 1800.0, 9000.0),
            (60.0, 600.0, 3000.0),
            (75.0, 600.0, 1200.0),
        ]
    ]
    pods = [
        observed.PodReplica(("azure", "chat-0"), "azure/chat", 1, ready_at_seconds=0.0),
        observed.PodReplica(("azure", "chat-1"), "azure/chat", 1, ready_at_seconds=0.0),
        observed.PodReplica(("azure", "chat-2"), "azure/chat", 1, ready_at_seconds=500.0),
    ]
    reading = observed.telemetry_reading(samples, pods, scrape_interval_seconds=15.0)
    assert reading is not None
    # The window's mean (30..75: 900 tokens/s) and its highest scrape interval (1800), each
    # split over the two Ready pods; the queue is the gauge's newest value (1200 tokens).
    assert reading.pod_tokens_per_second[("azure", "chat-0")] == pytest.approx(450.0)
    assert reading.pod_peak_tokens_per_second == {
        ("azure", "chat-0"): pytest.approx(900.0),
        ("azure", "chat-1"): pytest.approx(900.0),
    }
    assert reading.pod_queued_tokens == {
        ("azure", "chat-0"): pytest.approx(600.0),
        ("azure", "chat-1"): pytest.approx(600.0),
    }


def test_a_jobs_pods_read_its_progress_rate_and_the_counter_is_the_last_scrape() -> None:
    samples = [
        sample(end, done={"batch/training-001": 1000.0 * end})
        for end in (15.0, 30.0, 45.0, 60.0, 75.0, 90.0)
    ]
    pods = [
        observed.PodReplica(("batch", f"training-001-{i}"), "batch/training-001", 2, 0.0)
        for i in range(2)
    ]
    reading = observed.telemetry_reading(samples, pods, scrape_interval_seconds=15.0)
    assert reading is not None
    assert reading.pod_tokens_per_second[("batch", "training-001-0")] == pytest.approx(500.0)
    assert observed.progress_counter(samples, "batch/training-001") == 90000.0
    assert observed.progress_counter(samples, "batch/other") is None


def test_the_operators_pods_and_limits_come_back_as_the_engines_decision() -> None:
    spec = service()
    workloads = {
        spec.key: observed.workload_object(observed.service_body(spec, EnergyPolicy.BALANCED, 1.0))
    }
    placements = (
        Placement(spec.key, 0, "h0", 1, "bf16", 300.0, 280.0, 900.0),
        Placement(spec.key, 1, "h1", 1, "fp8", 200.0, 190.0, 1100.0, sm_clock_mhz=1410),
    )
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0.0,
        bound=0.0,
        gap=0.0,
        solve_seconds=0.0,
        placements=placements,
        node_power_limits_watts={"h0": (300.0,) + (150.0,) * 7, "h1": (200.0,) + (150.0,) * 7},
        budgets=(),
        unplaced=(),
        node_idle_limits_watts={"h0": 150.0, "h1": 150.0},
    )
    limits = desired.planned_limits(plan)
    pods = desired.desired_pods(workloads, plan.placements)
    decision = observed.decision_from_pods(pods.values(), limits, plan_seconds=0.5, status="ok")
    assert sorted(
        (r.workload, r.node, r.gpus, r.variant, r.power_limit_watts, r.sm_clock_mhz)
        for r in decision.replicas
    ) == [
        ("azure/chat", "h0", 1, "bf16", 300.0, None),
        ("azure/chat", "h1", 1, "fp8", 200.0, 1410),
    ]
    assert decision.idle_power_limit_watts == {"h0": 150.0, "h1": 150.0}
    assert (decision.plan_seconds, decision.status) == (0.5, "ok")
    # A profile's limit wins over the pod's annotation (the agent applies the profile).
    lowered = {"h0": NodeLimits(idle_watts=100.0, pods={("azure", "chat-0"): 250.0})}
    again = observed.decision_from_pods(
        [pods[("azure", "chat-0")]], lowered, plan_seconds=0, status="ok"
    )
    assert [r.power_limit_watts for r in again.replicas] == [250.0]


def test_the_wattsched_policy_runs_the_operators_core_and_keeps_what_it_writes() -> None:
    """The pods and statuses come from `core.decide` (the simulator writes neither itself): the
    job's pods are created and bound, its phase is the core's, and its progress is the core's
    accounting of the scraped counter."""
    policy = PlannerPolicy("wattsched")
    spec = replace(job(), work_tokens=5e7)
    telemetry = Telemetry(TelemetryConfig(noise_fraction=0.0), seed=0)
    scenario = Scenario(
        nodes=(node("h0"),),
        budgets=(),
        services=(),
        jobs=(spec,),
        duration_seconds=600.0,
        carbon=CarbonIntensity.constant(400.0, "test"),
    )
    first = policy.decide(View(0.0, scenario, (spec,), (), telemetry, ("start",)))
    assert [(r.workload, r.node, r.gpus) for r in first.replicas] == [
        (spec.key, "h0", 2),
        (spec.key, "h0", 2),
    ]
    # The engine starts them (Ready after 60 s); the operator sees its pods, starting.
    running = tuple(
        RunningReplica(r.workload, r.node, r.gpus, r.variant, r.power_limit_watts, 60.0)
        for r in first.replicas
    )
    cluster, _ = policy.observe(View(0.0, scenario, (spec,), running, telemetry, ()))
    assert sorted(cluster.pods) == ["batch/training-001-0", "batch/training-001-1"]
    assert not is_ready(cluster.pods["batch/training-001-0"])
    assert cluster.workloads[spec.key]["status"]["phase"] == "Placed"
    for end in range(15, 181, 15):
        telemetry.record(
            window_end_seconds=float(end),
            demand_tokens_per_second={},
            served_tokens_per_second={},
            utilisation={},
            backlog_tokens={},
            job_tokens_done={spec.key: 1e5 * max(0, end - 60)},
        )
    policy.decide(View(150.0, scenario, (spec,), running, telemetry, ("periodic",)))
    cluster, matched = policy.observe(View(150.0, scenario, (spec,), running, telemetry, ()))
    status = cluster.workloads[spec.key]["status"]
    assert status["phase"] == "Running"
    # Visible at 150 s: samples closed by 120 s (30 s late): the counter at 120 s.
    assert status["progress"]["completedTokens"] == 6e6
    assert status["progress"]["source"] == "measured"
    assert len(matched) == 2


def test_a_created_pod_stays_pending_until_its_nodes_gpus_are_free_and_its_gang_waits() -> None:
    policy = PlannerPolicy("wattsched")
    spec = job()  # 2 GPUs per replica
    body = observed.job_body(spec, EnergyPolicy.BALANCED, None)
    workload = observed.workload_object(body)
    scenario = Scenario(
        nodes=(node("h0", gpus=3),),
        budgets=(),
        services=(),
        jobs=(spec,),
        duration_seconds=600.0,
        carbon=CarbonIntensity.constant(400.0, "test"),
    )
    view = View(0.0, scenario, (spec,), (), Telemetry(TelemetryConfig(), 0), ())
    for index in range(2):
        pod = desired.build_pod(
            workload, Placement(spec.key, index, "h0", 2, "bf16", 300.0, 0.0, 0.0)
        )
        policy._pods[("batch", pod["metadata"]["name"])] = pod
    policy._bind(view)
    assert [pod["spec"].get("nodeName") for _, pod in sorted(policy._pods.items())] == [
        "h0",
        None,
    ]
    # The gang does not run while one of its two pods waits for GPUs.
    assert policy.running_pods(view) == []
    del policy._pods[("batch", "training-001-0")]
    policy._bind(view)
    assert policy._pods[("batch", "training-001-1")]["spec"]["nodeName"] == "h0"


def test_with_the_carbon_curve_as_its_forecast_the_wattsched_policy_waits_for_clean_hours() -> None:
    """The scenario's hourly curve is the budgets' forecast (their forecast query, answered from
    the curve): a job due in 20 hours waits out a dirty first hour; with `--horizon-hours 0` (or
    no forecast) it starts at once."""
    spec = replace(job(deadline_seconds=20 * 3600.0), work_tokens=5e7)
    scenario = Scenario(
        nodes=(node("h0"),),
        budgets=(SimBudget("rack", 10000.0, frozenset({"h0"}), 1.0, None),),
        services=(),
        jobs=(spec,),
        duration_seconds=24 * 3600.0,
        carbon=CarbonIntensity((800.0, *([50.0] * 23)), "test"),
    )

    def first_decision(policy: PlannerPolicy) -> list[str]:
        telemetry = Telemetry(TelemetryConfig(noise_fraction=0.0), seed=0)
        decision = policy.decide(View(0.0, scenario, (spec,), (), telemetry, ("start",)))
        return [r.workload for r in decision.replicas]

    forecasting = PlannerPolicy("wattsched", carbon_forecast=True)
    assert first_decision(forecasting) == []
    cluster, _ = forecasting.observe(
        View(0.0, scenario, (spec,), (), Telemetry(TelemetryConfig(), 0), ())
    )
    schedulable = next(
        c for c in cluster.workloads[spec.key]["status"]["conditions"] if c["type"] == "Schedulable"
    )
    assert schedulable["reason"] == "Deferred"
    assert schedulable["message"] == "Deferred until 01:00 UTC: 50 g/kWh then vs 800 now"
    # By hours ahead of the current hour, over the horizon and one hour more.
    assert observed.carbon_forecast(scenario.carbon, 1800.0, 3) == {
        0: 800.0,
        1: 50.0,
        2: 50.0,
        3: 50.0,
    }
    one_instant = PlannerPolicy(
        "wattsched", carbon_forecast=True, settings=core.Settings(horizon_hours=0)
    )
    assert first_decision(one_instant) == [spec.key, spec.key]
    assert first_decision(PlannerPolicy("wattsched")) == [spec.key, spec.key]


def _burst(
    queue_seconds: float, replan_interval_seconds: float = 60.0
) -> tuple[bool, float, float]:
    """A service sized for its declared demand, then at capacity for a minute with a queue worth
    `queue_seconds` of that capacity: (whether the check between plans asks for a re-plan, the
    planned tokens/s before, the planned tokens/s of the plan that follows)."""
    policy = PlannerPolicy("wattsched")
    chat = service(demand=1000.0)
    telemetry = Telemetry(TelemetryConfig(noise_fraction=0.0), seed=0)
    scenario = Scenario(
        nodes=(node("h0"),),
        budgets=(),
        services=(chat,),
        jobs=(),
        duration_seconds=600.0,
        carbon=CarbonIntensity.constant(400.0, "test"),
        replan_interval_seconds=replan_interval_seconds,
    )
    first = policy.decide(View(0.0, scenario, (), (), telemetry, ("start",)))
    assert first.check_interval_seconds == 15.0
    running = tuple(
        RunningReplica(r.workload, r.node, r.gpus, r.variant, r.power_limit_watts, 0.0)
        for r in first.replicas
    )
    last = policy._memory.last_round
    assert last is not None
    capacity = sum(p.expected_throughput for p in last.plan.placements)
    for end in range(15, 91, 15):
        telemetry.record(
            window_end_seconds=float(end),
            demand_tokens_per_second={chat.key: capacity * 2},
            served_tokens_per_second={chat.key: capacity},
            utilisation={chat.key: 1.0},
            backlog_tokens={chat.key: capacity * queue_seconds},
            job_tokens_done={},
        )
    asked = policy.check(View(90.0, scenario, (), running, telemetry, ()))
    policy.decide(View(90.0, scenario, (), running, telemetry, ("demand",)))
    replanned = policy._memory.last_round
    assert replanned is not None
    return asked, capacity, sum(p.expected_throughput for p in replanned.plan.placements)


def test_a_burst_above_capacity_is_scaled_up_from_the_queue_before_the_periodic_re_plan() -> None:
    asked, before, after = _burst(queue_seconds=30.0)
    # Served at capacity with half an interval's worth waiting: the check between plans asks
    # for a re-plan, and the plan sizes for the backlog too (by more replicas or higher limits).
    assert asked
    assert after >= before * 1.5


def test_the_queue_is_sized_to_drain_within_the_scenarios_re_plan_interval() -> None:
    # The operator sizes a service's queue to drain within its --replan-seconds; the simulated
    # controller is the operator's, with the scenario's re-plan interval as that setting. A
    # queue of 120 s of capacity: within 60 s the plan that follows needs 3x the capacity,
    # within 300 s 1.4x.
    _, before, after = _burst(queue_seconds=120.0)
    assert after >= before * 3
    _, before, after = _burst(queue_seconds=120.0, replan_interval_seconds=300.0)
    assert before * 1.4 <= after < before * 2


def test_served_tokens_alone_at_capacity_ask_for_nothing() -> None:
    asked, _, _ = _burst(queue_seconds=0.0)
    # Without a queue, a service serving all it was sized for shows no demand above that.
    assert not asked


def test_the_run_starts_warm_from_the_demand_before_t0_for_every_policy() -> None:
    """The trace's history (4,000 tokens/s before t = 0, 1,000 after) is the telemetry a run
    starts with, and the operator's demand history holds it as an operator that had been running
    would: its first plan sizes `chat` for the recent 4,000, not the declared mean of the run."""
    chat = replace(
        service(demand=1000.0),
        trace=ServiceTrace("chat", "test", 10, 1.0, np.full(600, 1000.0), np.full(600, 4000.0)),
    )
    scenario = Scenario(
        nodes=(node("h0"),),
        budgets=(),
        services=(chat,),
        jobs=(),
        duration_seconds=600.0,
        carbon=CarbonIntensity.constant(400.0, "test"),
        telemetry=TelemetryConfig(noise_fraction=0.0),
    )
    policy = PlannerPolicy("wattsched")
    simulation = Simulation(scenario, GroundTruth(), policy)
    before = simulation.telemetry.visible(0.0)
    assert len(before) == 20
    assert {s.demand_tokens_per_second[chat.key] for s in before} == {4000.0}
    policy.decide(simulation._view(0.0, ("start",)))
    first = policy._memory.last_round
    assert first is not None
    assert first.demands[chat.key] == pytest.approx(4000.0)
    # Without a history (a trace that keeps none), the first five minutes' mean, as before.
    cold = Simulation(replace(scenario, services=(service(demand=1000.0),)), GroundTruth(), policy)
    assert {s.demand_tokens_per_second[chat.key] for s in cold.telemetry.visible(0.0)} == {1000.0}


def test_a_jobs_tokens_done_is_a_counter_read_without_noise() -> None:
    """Rates and levels are read with noise; a job's tokens done is a counter, read exact: with
    2% read noise a job near its end read as done with 1-2% of its work left (seed 4 of the
    48-hour evaluation)."""
    telemetry = Telemetry(TelemetryConfig(noise_fraction=0.02), seed=0)
    for end in range(15, 301, 15):
        telemetry.record(
            window_end_seconds=float(end),
            demand_tokens_per_second={"ns/chat": 1000.0},
            served_tokens_per_second={"ns/chat": 1000.0},
            utilisation={},
            backlog_tokens={},
            job_tokens_done={"batch/job": 1e6 * end},
        )
    samples = telemetry.visible(1000.0)
    assert [s.job_tokens_done["batch/job"] for s in samples] == [
        1e6 * end for end in range(15, 301, 15)
    ]
    # The rates still carry their noise.
    assert len({s.served_tokens_per_second["ns/chat"] for s in samples}) > 1

"""The simulation engine: SLO on hand-computed traces, energy = integral of power dt, budgets,
determinism, and ground truth versus the planner's prior. Small scenarios, built here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.simulator.conftest import FixedPolicy, flat_truth, gpu_node, h100_node, job, scenario
from wattsched_operator.core import PlanFunction
from wattsched_optimizer.model import PerformanceModel
from wattsched_optimizer.problem import Plan, PlanInput
from wattsched_simulator.baselines import Packing, choose_node
from wattsched_simulator.carbon import CarbonIntensity
from wattsched_simulator.cli import PolicySettings, make_policy
from wattsched_simulator.cluster import SimBudget, SimNode
from wattsched_simulator.controller import PlannerPolicy
from wattsched_simulator.engine import (
    JOULES_PER_KWH,
    Decision,
    Policy,
    ReplicaAssignment,
    Scenario,
    Simulation,
    SimulationError,
    View,
    simulate,
)
from wattsched_simulator.report import policy_metrics
from wattsched_simulator.trace import ServiceTrace
from wattsched_simulator.truth import GroundTruth
from wattsched_simulator.workloads import JobSpec, ServiceSpec, model_variants

IDLE_H100_WATTS = 75.0


def service(
    name: str, demand: Sequence[float] | np.ndarray[Any, Any], step_seconds: float = 1.0
) -> ServiceSpec:
    trace = ServiceTrace(name, "test", len(demand), step_seconds, np.array(demand, dtype=float))
    return ServiceSpec(
        key=f"azure/{name}",
        model_parameters_billions=8.0,
        gpus_per_replica=1,
        variants=model_variants(8.0)[:1],
        min_replicas=1,
        max_replicas=8,
        min_quality=0.95,
        priority=1000,
        trace=trace,
    )


def test_tokens_served_within_the_latency_target_count_as_on_time() -> None:
    # 100 tok/s of capacity, 250 tokens arrive at t=0, target 1 s: 100 served at t=0 (waited 0 s),
    # 100 at t=1 (1 s, on time), 50 at t=2 (2 s, late) -> 200 / 250.
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        services=[service("chat", [250, 0, 0, 0, 0, 0])],
        duration_seconds=6,
        latency_target_seconds=1.0,
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("azure/chat", "n0")]))
    assert result.on_time_tokens["azure/chat"] == pytest.approx(200.0)
    assert result.judged_tokens["azure/chat"] == pytest.approx(250.0)
    assert result.slo_attainment == pytest.approx(0.8)
    assert result.inference_tokens_served == pytest.approx(250.0)


def test_demand_within_capacity_is_all_on_time() -> None:
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        services=[service("chat", [50, 100, 0, 80])],
        duration_seconds=4,
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("azure/chat", "n0")]))
    assert result.slo_attainment == pytest.approx(1.0)


def test_tokens_still_within_target_at_the_end_are_not_judged() -> None:
    # 500 tokens arrive in the last step with 100 tok/s and a 2 s target: 100 are served on
    # time; the other 400 arrived 1 s before the end, so nobody can say yet whether they are late.
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        services=[service("chat", [0, 0, 0, 0, 500])],
        duration_seconds=5,
        latency_target_seconds=2.0,
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("azure/chat", "n0")]))
    assert result.judged_tokens["azure/chat"] == pytest.approx(100.0)
    assert result.slo_attainment == pytest.approx(1.0)


def test_a_service_without_replicas_serves_nothing_on_time() -> None:
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        services=[service("chat", [10, 10, 10, 0, 0, 0])],
        duration_seconds=6,
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([]))
    assert result.slo_attainment == 0.0
    assert result.inference_tokens_served == 0.0


def test_an_idle_node_uses_idle_power_times_time() -> None:
    sim = scenario(nodes=[h100_node("n0", gpus=8)], duration_seconds=100)
    result = simulate(sim, flat_truth(), FixedPolicy([]))
    assert result.gpu_energy_joules == pytest.approx(8 * IDLE_H100_WATTS * 100)
    metrics = policy_metrics(result)
    assert metrics["gpuEnergyKWh"] == pytest.approx(8 * IDLE_H100_WATTS * 100 / JOULES_PER_KWH)
    # Facility energy and carbon follow from PUE 1.5 and 500 g/kWh.
    assert metrics["facilityEnergyKWh"] == pytest.approx(1.5 * metrics["gpuEnergyKWh"])
    assert metrics["carbonKg"] == pytest.approx(0.5 * metrics["facilityEnergyKWh"])


def test_carbon_follows_the_hourly_intensity_curve_and_repeats_it() -> None:
    # An idle 8-GPU H100 node draws 8 x 75 W = 600 W: 0.6 kWh per hour on the GPUs, x PUE 1.5 =
    # 0.9 kWh at the facility. Over 2.5 h of the curve 100, 300 (then 100 again, repeated):
    # 0.9 x 100 + 0.9 x 300 + 0.45 x 100 = 405 g. (A mean of the curve would give 450 g, the first
    # hour's figure throughout 225 g.)
    sim = replace(
        scenario(nodes=[h100_node("n0", gpus=8)], duration_seconds=9000, step_seconds=60.0),
        carbon=CarbonIntensity((100.0, 300.0), "test"),
    )
    result = simulate(sim, flat_truth(), FixedPolicy([]))
    assert policy_metrics(result)["carbonKg"] == pytest.approx(0.405)


def test_energy_is_the_integral_of_power_over_time() -> None:
    # A job at full load on one GPU for 50 s (5,000 tokens at 100 tok/s), then idle for 50 s.
    sim = scenario(
        nodes=[h100_node("n0", gpus=2), h100_node("n1", gpus=1)],
        jobs=[job("batch/train", 5000.0)],
        duration_seconds=100,
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("batch/train", "n0")]))
    busy_watts = 0.97 * 700.0  # full-load fraction x max, below the 700 W limit
    expected = 50 * busy_watts + (2 * 100 - 50) * IDLE_H100_WATTS + 100 * IDLE_H100_WATTS
    assert result.gpu_energy_joules == pytest.approx(expected)
    assert result.gpu_energy_joules == pytest.approx(float(result.cluster_power_watts.sum()) * 1.0)
    assert result.gpu_energy_joules == pytest.approx(sum(result.node_energy_joules.values()))
    assert result.jobs_finished == 1


def test_a_power_limit_caps_draw_and_slows_work() -> None:
    sim = scenario(nodes=[h100_node("n0", gpus=1)], jobs=[job("batch/t", 1e9)], duration_seconds=10)
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("batch/t", "n0")], 300.0))
    assert np.all(result.cluster_power_watts <= 300.0 + 1e-9)
    assert result.cluster_power_watts[-1] == pytest.approx(300.0)


def test_energy_integral_holds_with_noise_and_a_coarser_step() -> None:
    truth = flat_truth(100.0)
    noisy = replace(truth, node_power_spread=0.05, power_noise=0.05)
    sim = scenario(
        nodes=[h100_node("n0", gpus=4)],
        services=[service("chat", [30.0] * 20, step_seconds=5.0)],
        jobs=[job("batch/t", 1e6)],
        duration_seconds=100,
        step_seconds=5.0,
    )
    result = simulate(sim, noisy, FixedPolicy([("azure/chat", "n0"), ("batch/t", "n0")]))
    assert len(result.cluster_power_watts) == 20
    assert result.gpu_energy_joules == pytest.approx(float(result.cluster_power_watts.sum()) * 5.0)


def test_a_jobs_deadline_is_missed_when_it_finishes_late() -> None:
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        jobs=[
            job("batch/late", 2000.0, deadline_seconds=10.0),
            job("batch/early", 500.0, deadline_seconds=10.0, arrival_seconds=1.0),
        ],
        duration_seconds=30,
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("batch/late", "n0")]))
    # batch/late needs 20 s at 100 tok/s; batch/early is never placed.
    assert result.deadline_misses == 2
    assert result.jobs_with_deadline == 2


def test_going_over_a_budget_is_counted_in_seconds() -> None:
    budget = SimBudget("rack", 1000.0, frozenset({"n0"}), 1.0, None)
    sim = scenario(
        nodes=[h100_node("n0", gpus=2)],
        jobs=[job("batch/a", 1e9), job("batch/b", 1e9)],
        budgets=[budget],
        duration_seconds=20,
    )
    placements = [("batch/a", "n0"), ("batch/b", "n0")]
    result = simulate(sim, flat_truth(100.0), FixedPolicy(placements))
    # Two GPUs at 679 W draw 1,358 W > 1,000 W every step; limits 2 x 700 W > 1,000 W too.
    assert result.seconds_over_budget == 20
    assert result.seconds_limits_over_budget == 20
    capped = simulate(sim, flat_truth(100.0), FixedPolicy(placements, 450.0))
    assert capped.seconds_over_budget == 0
    assert capped.seconds_limits_over_budget == 0


def test_a_decision_that_overfills_a_node_is_rejected() -> None:
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        jobs=[job("batch/a", 10.0), job("batch/b", 10.0)],
        duration_seconds=5,
    )
    with pytest.raises(SimulationError, match="Node n0: decision uses 2 GPUs, it has 1"):
        simulate(sim, flat_truth(), FixedPolicy([("batch/a", "n0"), ("batch/b", "n0")]))


# -- policies on small realistic scenarios (default ground truth, optimizer in the loop) -------


def a100_node(name: str, gpus: int = 8) -> SimNode:
    return gpu_node(name, "NVIDIA-A100-SXM4-80GB", "A100-80GB", gpus)


def small_cluster_scenario(*, seed: int, cap_watts: float | None = None) -> Scenario:
    nodes = [h100_node("h0", 4), h100_node("h1", 4), a100_node("a0", 4)]
    rng = np.random.default_rng(7)
    demand = rng.poisson(3000.0, size=60).astype(float) * 5.0  # tokens per 5-s step
    budgets = []
    if cap_watts is not None:
        budgets = [SimBudget("all", cap_watts, frozenset(n.name for n in nodes), 1.2, None)]
    return scenario(
        nodes=nodes,
        services=[service("chat", demand, step_seconds=5.0)],
        jobs=[
            job("batch/a", 3e6, arrival_seconds=20.0, deadline_seconds=280.0),
            job("batch/b", 2e6, arrival_seconds=60.0, gpus=2, priority=50),
        ],
        budgets=budgets,
        duration_seconds=300,
        step_seconds=5.0,
        latency_target_seconds=5.0,
        seed=seed,
    )


def policy(name: str, truth: GroundTruth) -> Policy:
    return make_policy(name, truth, PolicySettings())


@pytest.mark.parametrize("name", ["spread-max", "wattsched"])
def test_the_same_seed_gives_the_same_results(name: str) -> None:
    first = simulate(small_cluster_scenario(seed=3), GroundTruth(), policy(name, GroundTruth()))
    second = simulate(small_cluster_scenario(seed=3), GroundTruth(), policy(name, GroundTruth()))
    timing = {"planSecondsP50", "planSecondsMax", "simulatedSecondsPerWallSecond"}
    first_metrics = {k: v for k, v in policy_metrics(first).items() if k not in timing}
    assert first_metrics == {k: v for k, v in policy_metrics(second).items() if k not in timing}
    assert np.array_equal(first.cluster_power_watts, second.cluster_power_watts)
    assert first.slo_attainment == second.slo_attainment
    assert first.migrations == second.migrations


def test_a_different_seed_gives_different_noise() -> None:
    first = simulate(
        small_cluster_scenario(seed=3), GroundTruth(), policy("spread-max", GroundTruth())
    )
    other = simulate(
        small_cluster_scenario(seed=4), GroundTruth(), policy("spread-max", GroundTruth())
    )
    assert first.gpu_energy_joules != other.gpu_energy_joules


def test_changing_the_ground_truth_changes_results_but_not_the_planners_prior() -> None:
    slow = GroundTruth().with_throughput_scale(0.6)
    sim = small_cluster_scenario(seed=1)
    planner_a = PlannerPolicy("wattsched")
    planner_b = PlannerPolicy("wattsched")
    start = Simulation(sim, GroundTruth(), planner_a)
    start_slow = Simulation(sim, slow, planner_b)
    # What the operator observes at t = 0 does not depend on the ground truth ...
    assert (
        planner_a.observe(start._view(0.0, ("start",)))[0]
        == planner_b.observe(start_slow._view(0.0, ("start",)))[0]
    )
    # ... but what happens does.
    normal = simulate(sim, GroundTruth(), PlannerPolicy("wattsched"))
    slower = simulate(sim, slow, PlannerPolicy("wattsched"))
    assert slower.job_tokens_processed != normal.job_tokens_processed
    assert slower.gpu_energy_joules != normal.gpu_energy_joules


def test_spread_picks_the_emptiest_node_and_binpack_the_fullest() -> None:
    nodes = [h100_node("h0", 8), h100_node("h1", 8)]
    free = {"h0": 3, "h1": 8}
    truth = GroundTruth()
    spread = choose_node(
        nodes=nodes,
        free_gpus=free,
        gpus=2,
        memory_gib_per_gpu=20,
        truth=truth,
        packing=Packing.SPREAD,
    )
    binpack = choose_node(
        nodes=nodes,
        free_gpus=free,
        gpus=2,
        memory_gib_per_gpu=20,
        truth=truth,
        packing=Packing.BINPACK,
    )
    too_big = choose_node(
        nodes=nodes,
        free_gpus=free,
        gpus=2,
        memory_gib_per_gpu=100,
        truth=truth,
        packing=Packing.BINPACK,
    )
    assert (spread and spread.name, binpack and binpack.name, too_big) == ("h1", "h0", None)


def test_binpack_max_opens_fewer_nodes_than_spread_max_for_the_same_replicas() -> None:
    nodes = [h100_node(f"n{i}", 4) for i in range(4)]
    sim = scenario(nodes=nodes, services=[service("chat", [500.0] * 30)], duration_seconds=30)
    truth = flat_truth(100.0)
    view = Simulation(sim, truth, FixedPolicy([]))._view(0.0, ("start",))
    spread = policy("spread-max", truth).decide(view)
    binpack = policy("binpack-max", truth).decide(view)
    replicas = len(spread.replicas)
    # Both size the service alike (same ground-truth capacity on equal nodes) ...
    assert len(binpack.replicas) == replicas > len(nodes)
    # ... and with one-GPU replicas on equal nodes MostAllocated fills a node before it opens
    # the next, while LeastAllocated uses every empty node first.
    assert len({r.node for r in binpack.replicas}) == math.ceil(replicas / 4)
    assert len({r.node for r in spread.replicas}) == len(nodes)
    # Both leave every GPU, idle ones included, at the default (maximum) limit.
    for decision in (spread, binpack):
        assert {r.power_limit_watts for r in decision.replicas} == {700.0}
        assert decision.idle_power_limit_watts == {node.name: 700.0 for node in nodes}


def test_static_cap_limits_every_gpu_to_the_fraction_and_max_policies_to_the_maximum() -> None:
    sim = small_cluster_scenario(seed=0)
    capped = simulate(sim, GroundTruth(), policy("static-cap", GroundTruth()))
    full = simulate(sim, GroundTruth(), policy("spread-max", GroundTruth()))
    all_max = 8 * 700.0 + 4 * 400.0
    assert capped.seconds_limits_over_budget == 0  # no budget in this scenario
    assert np.all(capped.cluster_power_watts <= 0.7 * all_max + 1e-6)
    assert full.cluster_power_watts.max() > 0.7 * all_max * 0.5


def test_baselines_ignore_a_budget_that_wattsched_keeps() -> None:
    sim = small_cluster_scenario(seed=2, cap_watts=3500.0)
    spread = simulate(sim, GroundTruth(), policy("spread-max", GroundTruth()))
    watts = simulate(sim, GroundTruth(), policy("wattsched", GroundTruth()))
    assert spread.seconds_limits_over_budget > 0
    assert watts.seconds_limits_over_budget == 0
    assert watts.seconds_over_budget == 0


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h100s=st.integers(0, 2),
    a100s=st.integers(0, 2),
    cap_share=st.floats(0.3, 1.0),
    demand_tokens_per_second=st.floats(100.0, 8000.0),
    job_gpus=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
def test_wattsched_never_exceeds_a_budget(
    *,
    h100s: int,
    a100s: int,
    cap_share: float,
    demand_tokens_per_second: float,
    job_gpus: int,
    seed: int,
) -> None:
    nodes = [h100_node(f"h{i}", 4) for i in range(h100s)] + [
        a100_node(f"a{i}", 4) for i in range(a100s)
    ]
    if not nodes:
        nodes = [a100_node("a0", 2)]
    truth = GroundTruth()
    lowest = sum(truth.product(n.truth_product).min_watts * n.gpu_count for n in nodes)
    highest = sum(truth.product(n.truth_product).max_watts * n.gpu_count for n in nodes)
    cap = lowest + cap_share * (highest - lowest)
    budget = SimBudget("all", cap, frozenset(n.name for n in nodes), 1.0, None)
    rng = np.random.default_rng(seed)
    demand = rng.poisson(demand_tokens_per_second * 10, size=24).astype(float)
    sim = scenario(
        nodes=nodes,
        services=[service("chat", demand, step_seconds=10.0)],
        jobs=[
            job("batch/x", 5e6, arrival_seconds=30.0, gpus=job_gpus, deadline_seconds=200.0),
            job("batch/y", 5e6, arrival_seconds=90.0, priority=100),
        ],
        budgets=[budget],
        duration_seconds=240,
        step_seconds=10.0,
        seed=seed,
    )
    result = simulate(sim, truth, policy("wattsched", truth))
    assert result.seconds_over_budget == 0
    assert result.seconds_limits_over_budget == 0
    assert np.all(result.budget_limits_watts["all"] <= cap + 1e-6)


@dataclass
class MovingPolicy:
    """Serves `azure/chat` from n0, then from `move_at` on from n1."""

    move_at: float
    name: str = "moving"

    def decide(self, view: View) -> Decision:
        node = "n0" if view.now_seconds < self.move_at else "n1"
        replica = ReplicaAssignment("azure/chat", node, 1, "bf16", 700.0)
        return Decision((replica,), {"n0": 200.0, "n1": 200.0}, 0.0)


def moving_scenario(cap_watts: float | None) -> Scenario:
    nodes = [h100_node("n0", gpus=1), h100_node("n1", gpus=1)]
    budgets = []
    if cap_watts is not None:
        budgets = [SimBudget("all", cap_watts, frozenset({"n0", "n1"}), 1.0, None)]
    sim = scenario(
        nodes=nodes,
        services=[service("chat", [50.0] * 120)],
        budgets=budgets,
        duration_seconds=120,
    )
    return replace(sim, replan_interval_seconds=30.0)


def test_a_moved_replica_keeps_serving_until_its_replacement_is_ready() -> None:
    result = simulate(moving_scenario(None), flat_truth(100.0), MovingPolicy(move_at=30.0))
    capacity = result.service_capacity_tokens_per_second["azure/chat"]
    # The move is decided at t=30; the new replica is ready at t=90 (60 s start-up). Meanwhile
    # the old one serves, then stops.
    assert np.all(capacity == 100.0)
    assert result.migrations == 1
    assert result.slo_attainment == 1.0


def test_a_move_the_budget_cannot_hold_twice_breaks_before_it_makes() -> None:
    # Plans use 700 + 200 W (idle GPU at its minimum). Both GPUs at 700 W would need 1,400 W;
    # with a 1,000 W cap the old replica stops at once.
    result = simulate(moving_scenario(1000.0), flat_truth(100.0), MovingPolicy(move_at=30.0))
    capacity = result.service_capacity_tokens_per_second["azure/chat"]
    assert np.all(capacity[30:90] == 0.0)
    assert np.all(capacity[90:] == 100.0)
    assert result.seconds_limits_over_budget == 0
    assert result.slo_attainment < 0.6


def test_telemetry_is_sampled_every_scrape_interval_and_seen_late() -> None:
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        services=[service("chat", [60.0] * 90)],
        duration_seconds=90,
    )
    engine = Simulation(sim, flat_truth(100.0), FixedPolicy([("azure/chat", "n0")]))
    engine.run()
    after_start = [s for s in engine.telemetry.visible(90.0) if s.window_end_seconds > 0]
    # Windows close at 15, 30, 45, 60 s; with a 30 s delay the 75 s and 90 s ones are not visible.
    assert [s.window_end_seconds for s in after_start] == [15.0, 30.0, 45.0, 60.0]
    assert after_start[0].demand_tokens_per_second["azure/chat"] == pytest.approx(60.0, rel=0.1)
    assert after_start[0].utilisation["azure/chat"] == pytest.approx(0.6, rel=0.1)


@dataclass
class CheckingPolicy:
    """A fixed placement that asks for telemetry checks every `every` seconds and for a decision
    at the check times in `ask_at`; records when each check and decision happened."""

    inner: FixedPolicy
    every: float | None
    ask_at: frozenset[float] = frozenset()
    checks: list[float] = field(default_factory=list)
    decisions: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)
    name: str = "checking"

    def decide(self, view: View) -> Decision:
        self.decisions.append((view.now_seconds, view.reasons))
        return replace(self.inner.decide(view), check_interval_seconds=self.every)

    def check(self, view: View) -> bool:
        self.checks.append(view.now_seconds)
        return view.now_seconds in self.ask_at


def test_a_policy_that_checks_between_decisions_is_asked_each_interval_and_decides_on_request() -> (
    None
):
    sim = scenario(
        nodes=[h100_node("n0", gpus=1)],
        services=[service("chat", [60.0] * 150)],
        duration_seconds=150,
    )
    policy = CheckingPolicy(
        FixedPolicy([("azure/chat", "n0")]), every=15.0, ask_at=frozenset({45.0})
    )
    Simulation(sim, flat_truth(100.0), policy).run()
    # Decisions at 0 and the periodic 60 and 120 s; checks every 15 s after each decision; the
    # check at 45 s asked for a decision, and the checks restart 15 s after it.
    assert [(t, reasons) for t, reasons in policy.decisions] == [
        (0.0, ("start", "periodic")),
        (45.0, ("demand",)),
        (60.0, ("periodic",)),
        (120.0, ("periodic",)),
    ]
    assert policy.checks == [15.0, 30.0, 45.0, 75.0, 90.0, 105.0, 135.0]

    silent = CheckingPolicy(FixedPolicy([("azure/chat", "n0")]), every=None)
    Simulation(sim, flat_truth(100.0), silent).run()
    assert silent.checks == []


# -- replicas that span nodes ---------------------------------------------------------------


@dataclass
class Watching:
    """A policy that records, per decision, the nodes of one workload's pods."""

    inner: Policy
    workload: str
    seen: list[tuple[str, ...]] = field(default_factory=list)
    name: str = "watching"

    def decide(self, view: View) -> Decision:
        decision = self.inner.decide(view)
        pods = tuple(sorted(r.node for r in decision.replicas if r.workload == self.workload))
        if pods:
            self.seen.append(pods)
        return decision


def spanning_job(key: str, work_tokens: float) -> JobSpec:
    """A 70B training run whose one replica is 2 whole nodes of 4 GPUs."""
    return replace(
        job(key, work_tokens, gpus=4, priority=100),
        model_parameters_billions=70.0,
        # Weights and KV headroom spread over the replica's 8 GPUs.
        variants=tuple(
            replace(v, min_memory_gib=v.min_memory_gib / 8) for v in model_variants(70)[:1]
        ),
        nodes_per_replica=2,
    )


@pytest.mark.parametrize("name", ["wattsched", "binpack-max", "spread-max"])
def test_a_job_whose_replica_spans_two_nodes_runs_on_two_whole_nodes_and_finishes(
    name: str,
) -> None:
    nodes = [h100_node("h0", 4), h100_node("h1", 4), a100_node("a0", 4)]
    sim = scenario(nodes=nodes, jobs=[spanning_job("batch/big", 2e5)], duration_seconds=600)
    watching = Watching(policy(name, GroundTruth()), "batch/big")
    result = simulate(sim, GroundTruth(), watching)
    seen = watching.seen
    assert seen, "the job was never placed"
    # Both pods together, on the two H100 nodes (never one H100 and the A100), every time.
    assert set(seen) == {("h0", "h1")}
    assert result.jobs_finished == 1


def test_a_spanning_job_that_cannot_have_two_whole_nodes_never_runs() -> None:
    nodes = [h100_node("h0", 4), a100_node("a0", 4)]
    sim = scenario(nodes=nodes, jobs=[spanning_job("batch/big", 2e5)], duration_seconds=120)
    for name in ("wattsched", "binpack-max"):
        result = simulate(sim, GroundTruth(), policy(name, GroundTruth()))
        assert result.jobs_finished == 0
        assert result.job_tokens_processed == 0


@dataclass
class LeavingN0(PlannerPolicy):
    """wattsched (the operator's core) whose plans may use only n0 before `move_at` and only n1
    from then on (as if the service's spec stopped allowing n0); records the pod names the
    simulated API server holds after each decision."""

    move_at: float = 30.0
    pod_names: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)

    def _plan_function(self, view: View) -> PlanFunction:
        inner = super()._plan_function(view)
        unusable = "n1" if view.now_seconds < self.move_at else "n0"

        def plan(plan_input: PlanInput, model: PerformanceModel) -> Plan:
            nodes = tuple(n for n in plan_input.nodes if n.name != unusable)
            return inner(replace(plan_input, nodes=nodes), model)

        return plan

    def decide(self, view: View) -> Decision:
        decision = super().decide(view)
        self.pod_names.append((view.now_seconds, tuple(sorted(name for _, name in self._pods))))
        return decision


def test_the_cores_make_before_break_move_plays_out_on_the_simulated_cluster() -> None:
    chosen = LeavingN0(name="wattsched")
    result = simulate(moving_scenario(None), flat_truth(100.0), chosen)
    # t=30: the replacement is created next to the old pod, which keeps serving; t=60: the
    # replacement is still starting (60 s); t=90: it is Ready and the old pod is evicted.
    assert chosen.pod_names == [
        (0.0, ("chat-0",)),
        (30.0, ("chat-0", "chat-0-h")),
        (60.0, ("chat-0", "chat-0-h")),
        (90.0, ("chat-0-h",)),
    ]
    capacity = result.service_capacity_tokens_per_second["azure/chat"]
    assert np.all(capacity == 100.0)
    assert result.migrations == 1
    assert result.slo_attainment == 1.0

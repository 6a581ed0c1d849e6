"""The plan over a horizon: clean hours, allowances, cap schedules, priority, and the first slot
handed to the one-instant planner; Hypothesis invariants checked against an independent PuLP model
of the same slots (caps in every slot, allowance never exceeded, deadlines met when feasible)."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pulp
import pytest
from hypothesis import HealthCheck, given, settings

from wattsched_optimizer.horizon import (
    SHARE_EPSILON,
    AllowancePeriod,
    BudgetHorizon,
    DeferralCause,
    HorizonInput,
    HorizonInputError,
    HorizonPlan,
    HorizonStatus,
    Objective,
    deferrals,
    first_slot_input,
    hourly_slots,
    is_urgent,
    margin_seconds,
    operating_point,
    plan_horizon,
    planned_starts,
    point_at_limit,
)
from wattsched_optimizer.model import CatalogueModel, product_spec
from wattsched_optimizer.options import remaining_tokens
from wattsched_optimizer.planner import plan
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    PlanInput,
    Precision,
    Variant,
    WorkAmount,
    Workload,
    WorkloadType,
    WorkUnit,
)

BF16 = Variant("bf16", Precision.BF16, min_memory_gib=0)
HOUR = 3600.0
H100 = product_spec("H100-80GB")
MODEL = CatalogueModel()


def nodes(count: int) -> tuple[GpuNode, ...]:
    return tuple(GpuNode(f"h{i}", "H100-80GB", 8) for i in range(count))


def job(
    key: str, hours_of_work: float | None, deadline_hours: float | None, **changes: object
) -> Workload:
    """An 8-GPU training job with `hours_of_work` at its horizon operating point."""
    base = Workload(
        key=key,
        type=WorkloadType.TRAINING,
        model_parameters_billions=8,
        gpus_per_replica=8,
        variants=(BF16,),
        policy=EnergyPolicy.PERFORMANCE,
    )
    base = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
    if hours_of_work is None:
        return base
    rate = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.TRAINING, 8, 8, 1.0, H100.max_watts.value
    )
    return dataclasses.replace(
        base,
        remaining_work=WorkAmount(WorkUnit.TOKENS, rate * base.replicas * hours_of_work * HOUR),
        deadline_seconds=None if deadline_hours is None else deadline_hours * HOUR,
    )


def service(key: str, tokens_per_second: float) -> Workload:
    return Workload(
        key=key,
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        max_replicas=8,
        tokens_per_second=tokens_per_second,
    )


def budget(cap_watts: float, node_count: int, name: str = "b") -> Budget:
    return Budget(name, cap_watts, frozenset(f"h{i}" for i in range(node_count)))


# A solar-shaped day: 420 g/kWh at night, 140 g/kWh from 10:00 to 15:00.
SOLAR = tuple(140.0 if 10 <= hour < 15 else 420.0 for hour in range(24))


def horizon_input(
    workloads: tuple[Workload, ...],
    *,
    node_count: int = 2,
    cap_watts: float = 1e6,
    carbon: tuple[float, ...] = SOLAR,
    energy_kwh_left: float | None = None,
    carbon_kg_left: float | None = None,
    caps: tuple[float, ...] | None = None,
    objective: Objective = Objective.CARBON,
    slots: tuple[float, ...] | None = None,
) -> HorizonInput:
    """One budget "b" over the nodes; hourly slots, one per value of `carbon`, unless `slots`
    (then `carbon` and `caps` have one value per slot)."""
    slots = slots if slots is not None else hourly_slots(0, len(carbon))
    plan_input = PlanInput(nodes(node_count), workloads, (budget(cap_watts, node_count),))
    period = AllowancePeriod(0, len(slots), energy_kwh_left, carbon_kg_left)
    setting = BudgetHorizon(
        "b",
        caps if caps is not None else (cap_watts,) * len(slots),
        carbon,
        periods=(period,),
        objective=objective,
    )
    return HorizonInput(plan_input, slots, {"b": setting})


def busy_kw_and_idle_kwh() -> tuple[float, float]:
    """One job's draw above idle (kW) and the idle draw of two 8-GPU nodes over 24 h (kWh)."""
    watts = MODEL.expected_power_watts("H100-80GB", WorkloadType.TRAINING, H100.max_watts.value)
    idle = MODEL.idle_power_watts("H100-80GB")
    return 8 * (watts - idle) / 1000, 16 * idle / 1000 * 24


def running_slots(result: HorizonPlan, key: str) -> list[int]:
    return [s for s, x in enumerate(result.schedules[key].share_by_slot) if x > SHARE_EPSILON]


def test_hourly_slots_end_at_full_hours_and_grow_coarser_further_out() -> None:
    assert hourly_slots(1800, 3) == (1800.0, 3600.0, 3600.0, 1800.0)
    assert hourly_slots(0, 8, fine_hours=4, coarse_slot_hours=3) == (
        (3600.0,) * 4 + (10800.0, 3600.0)
    )
    with pytest.raises(HorizonInputError, match="horizon hours"):
        hourly_slots(0, 0)


def test_deadline_work_runs_in_the_clean_hours() -> None:
    result = plan_horizon(horizon_input((job("t/a", 4, 24),)))
    assert result.status is HorizonStatus.OPTIMAL
    assert running_slots(result, "t/a") == [10, 11, 12, 13]
    assert result.schedules["t/a"].missed_tokens == 0
    assert result.deferred == ("t/a",)


def test_the_energy_objective_runs_work_as_soon_as_it_can() -> None:
    result = plan_horizon(horizon_input((job("t/a", 4, 24),), objective=Objective.ENERGY))
    assert running_slots(result, "t/a") == [0, 1, 2, 3]
    assert result.deferred == ()


def test_a_deadline_before_the_clean_hours_is_kept() -> None:
    # Every hour before the deadline is as dirty as the next: the earliest win the tie.
    result = plan_horizon(horizon_input((job("t/a", 4, 6),)))
    assert running_slots(result, "t/a") == [0, 1, 2, 3]
    assert result.schedules["t/a"].missed_tokens == 0


def test_a_deadline_beyond_the_horizon_takes_the_clean_hours_and_leaves_the_rest() -> None:
    # 10 h of work due in 30 h, horizon 24 h: the plan aims 2.5 h before the deadline (its
    # margin, a quarter of the work), so 3.5 h may wait past the horizon (valued at the horizon's
    # mean intensity, below the 420 g/kWh of the other hours); the 5 clean hours, and 1.5 h of
    # the earliest dirty ones.
    result = plan_horizon(horizon_input((job("t/a", 10, 30),)))
    schedule = result.schedules["t/a"]
    assert sum(schedule.share_by_slot) == pytest.approx(6.5)
    assert running_slots(result, "t/a") == [0, 1, 10, 11, 12, 13, 14]
    assert schedule.missed_tokens == 0


def test_work_planned_into_its_last_hours_keeps_its_margin_before_the_deadline() -> None:
    # 3 h of work due in 13 h: the clean hours 10-12 would finish it at the deadline, with
    # nothing to spare if it starts late or is preempted. The plan aims an hour earlier (the
    # margin of `is_urgent`): clean hours 10 and 11, and the earliest dirty hour.
    result = plan_horizon(horizon_input((job("t/a", 3, 13),)))
    assert running_slots(result, "t/a") == [0, 10, 11]
    assert result.schedules["t/a"].missed_tokens == 0
    assert not result.schedules["t/a"].urgent


def test_a_lower_cap_window_moves_flexible_work_out_of_it() -> None:
    # The cap leaves no room for the job in hours 10-14 (demand response): it runs elsewhere,
    # in the cleanest hours the cap leaves (all 420 g/kWh: the earliest).
    floor = 16 * H100.min_watts.value
    caps = tuple(floor + (0.0 if 10 <= h < 15 else 1e6) for h in range(24))
    result = plan_horizon(horizon_input((job("t/a", 4, 24),), caps=caps))
    assert running_slots(result, "t/a") == [0, 1, 2, 3]


def test_work_without_a_deadline_runs_while_the_allowance_lasts_then_in_clean_hours() -> None:
    unlimited = plan_horizon(horizon_input((job("t/a", None, None),)))
    assert running_slots(unlimited, "t/a") == list(range(24))
    busy_kw, idle_kwh = busy_kw_and_idle_kwh()
    # Room for exactly 3 hours of the job on top of the idle GPUs.
    short = plan_horizon(
        horizon_input((job("t/a", None, None),), energy_kwh_left=idle_kwh + 3 * busy_kw)
    )
    assert running_slots(short, "t/a") == [10, 11, 12]
    assert short.budgets["b"].energy_short
    assert sum(short.budgets["b"].energy_kwh_by_period) == pytest.approx(idle_kwh + 3 * busy_kw)
    (deferral,) = deferrals(horizon_input((job("t/a", None, None),)), short)
    assert deferral.cause is DeferralCause.ALLOWANCE
    assert deferral.until_seconds == 10 * HOUR


def test_priority_decides_who_gets_a_short_allowance() -> None:
    busy_kw, idle_kwh = busy_kw_and_idle_kwh()
    jobs = (job("t/low", 4, 24, priority=0), job("t/high", 4, 24, priority=100))
    result = plan_horizon(horizon_input(jobs, energy_kwh_left=idle_kwh + 5 * busy_kw))
    assert result.schedules["t/high"].missed_tokens == 0
    assert result.schedules["t/low"].missed_tokens > 0
    assert sum(result.schedules["t/low"].share_by_slot) == pytest.approx(1)
    # Short of the allowance, the work that misses waits all the same (for the clean hours).
    assert result.schedules["t/low"].allowance_short
    assert result.deferred == ("t/high", "t/low")


def test_inference_keeps_its_minimum_energy_setting_when_the_allowance_is_short() -> None:
    workloads = (service("t/chat", 5000), job("t/a", None, None))
    loose = horizon_input(workloads)
    assert plan_horizon(loose).thrifty_inference == frozenset()
    tight = horizon_input(workloads, energy_kwh_left=1.0)
    result = plan_horizon(tight)
    assert result.thrifty_inference == {"t/chat"}
    # Inference and idle GPUs alone need more than 1 kWh: the excess is reported.
    assert result.budgets["b"].energy_over_kwh > 0
    first = first_slot_input(tight, result)
    assert {w.key: w.policy for w in first.workloads} == {"t/chat": EnergyPolicy.EFFICIENCY}


def test_a_peak_that_may_come_holds_its_gpus_and_its_energy_counts_as_expected() -> None:
    # Two 8-GPU nodes. The service may need all 16 GPUs in every hour, even at its highest
    # limit (it has no history of them), and is expected to need 1: beside the 16, no room is
    # left for the 8-GPU job.
    chat = dataclasses.replace(service("t/chat", 100.0), max_replicas=16)
    work = (chat, job("t/a", 2, 24, preemptible=True))
    # Tokens/s of one replica at the service's minimum-energy point, as the horizon sizes it.
    per_replica = operating_point(
        chat, "H100-80GB", MODEL, 5, replicas=1, efficient=True
    ).tokens_per_second
    at_max = point_at_limit(chat, "H100-80GB", H100.max_watts.value, model=MODEL)
    may = (15.5 * at_max.tokens_per_second,) * 24
    likely = (0.5 * per_replica,) * 24
    result = plan_horizon(
        dataclasses.replace(
            horizon_input(work),
            inference_demand={"t/chat": may},
            inference_expected_demand={"t/chat": likely},
        )
    )
    assert result.schedules["t/a"].missed_tokens > 0  # the GPUs are held for the peak
    # Found no room by its deadline, and no allowance is short: it is not held back, the
    # one-instant planner places it if there is room now (the peak may not come).
    assert result.deferred == ()
    # The energy is counted at the expected demand: an allowance with room for the expected
    # draw and the job is not short, although the peak's draw would exhaust it.
    busy_kw, idle_kwh = busy_kw_and_idle_kwh()
    room = horizon_input(work, energy_kwh_left=idle_kwh + 2.5 * busy_kw + 3.0)
    seven = (6.5 * per_replica,) * 24  # 7 GPUs: room for the job beside them
    split = dataclasses.replace(
        room, inference_demand={"t/chat": seven}, inference_expected_demand={"t/chat": likely}
    )
    planned = plan_horizon(split)
    assert planned.schedules["t/a"].missed_tokens == 0
    assert not planned.budgets["b"].energy_short
    peak_energy = dataclasses.replace(room, inference_demand={"t/chat": seven})
    assert plan_horizon(peak_energy).budgets["b"].energy_short


def with_current(horizon: HorizonInput, current: tuple[CurrentPlacement, ...]) -> HorizonInput:
    """The same horizon with these replicas running now."""
    return dataclasses.replace(
        horizon, plan_input=dataclasses.replace(horizon.plan_input, current=current)
    )


def test_a_service_runs_on_fewer_gpus_at_a_higher_limit_to_leave_work_room() -> None:
    # Two 8-GPU nodes. At its least energy per token (the lowest limits) the service needs more
    # than 8 GPUs, at the H100's highest limit 8: the horizon plans it on 8 for the hours the
    # 8-GPU job runs (the clean ones), as the one-instant planner runs a service when work needs
    # its GPUs, and counts the energy that costs. Whatever limit the service runs at now, the
    # plan is the same: sized at the limit of the moment, a job started (the service then at its
    # highest limit) found room and was stopped, and stopped found none and was started again.
    chat = dataclasses.replace(service("t/chat", 100.0), max_replicas=16)
    at_max = point_at_limit(chat, "H100-80GB", H100.max_watts.value, model=MODEL)
    efficient = operating_point(chat, "H100-80GB", MODEL, 5, replicas=1, efficient=True)
    demand = (7.5 * at_max.tokens_per_second,) * 24
    assert demand[0] / efficient.tokens_per_second > 8  # more than one node at the lowest limits
    work = (chat, job("t/a", 2, 24, preemptible=True))
    horizon = dataclasses.replace(horizon_input(work), inference_demand={"t/chat": demand})
    result = plan_horizon(horizon)
    assert result.schedules["t/a"].missed_tokens == 0
    assert set(running_slots(result, "t/a")) <= set(range(10, 15))  # the clean hours
    for watts in (H100.min_watts.value, H100.max_watts.value):
        current = tuple(CurrentPlacement("t/chat", r, "h0", "bf16", watts) for r in range(8))
        again = plan_horizon(with_current(horizon, current))
        assert again.schedules["t/a"].share_by_slot == result.schedules["t/a"].share_by_slot
    # The service's two hours on fewer GPUs cost energy beyond the job's own.
    alone = dataclasses.replace(horizon_input((chat,)), inference_demand={"t/chat": demand})
    job_kwh = busy_kw_and_idle_kwh()[0] * 2
    energy = [plan_horizon(h).budgets["b"].energy_kwh_by_period[0] for h in (horizon, alone)]
    assert energy[0] - energy[1] > job_kwh + 0.01


def test_services_that_need_more_gpus_than_there_are_leave_work_none_and_the_plan_stands() -> None:
    # Two 8-GPU nodes. At its least energy per token the service needs more than the 16 GPUs;
    # at its highest limit 10 (the job's 8 do not fit beside them) or 17 (it does not fit even
    # there): the plan is still found, gives the job no room, and does not hold it back (the
    # one-instant planner places it if the peak does not come).
    chat = dataclasses.replace(service("t/chat", 100.0), max_replicas=32)
    at_max = point_at_limit(chat, "H100-80GB", H100.max_watts.value, model=MODEL)
    for replicas_at_max in (9.5, 16.5):
        demand = (replicas_at_max * at_max.tokens_per_second,) * 24
        horizon = dataclasses.replace(
            horizon_input((chat, job("t/a", 2, 24, preemptible=True))),
            inference_demand={"t/chat": demand},
        )
        result = plan_horizon(horizon)
        assert result.status is HorizonStatus.OPTIMAL
        assert result.schedules["t/a"].planned_tokens == 0
        assert result.deferred == ()


def test_a_running_service_counts_its_energy_at_its_least_whatever_limit_it_runs_at() -> None:
    # The limit a service runs at follows the cap room the jobs leave it: counted at that limit
    # over the period, one round that raised it would seem to spend the allowance. Its energy
    # counts at its least energy per token, as if it did not run now.
    chat = dataclasses.replace(service("t/chat", 100.0), max_replicas=16)
    at_max = point_at_limit(chat, "H100-80GB", H100.max_watts.value, model=MODEL)
    horizon = dataclasses.replace(
        horizon_input((chat,)), inference_demand={"t/chat": (6.5 * at_max.tokens_per_second,) * 24}
    )
    energy = {}
    for watts in (None, 400.0, H100.max_watts.value):
        current = (
            ()
            if watts is None
            else tuple(CurrentPlacement("t/chat", r, "h0", "bf16", watts) for r in range(7))
        )
        energy[watts] = plan_horizon(with_current(horizon, current)).budgets["b"]
    assert len({outlook.energy_kwh_by_period for outlook in energy.values()}) == 1
    # At the limit it runs at, it would have counted more.
    idle_kwh = busy_kw_and_idle_kwh()[1]
    at_limit_kwh = 7 * (at_max.busy_watts_per_gpu - MODEL.idle_power_watts("H100-80GB")) * 24 / 1000
    assert energy[None].energy_kwh_by_period[0] < idle_kwh + at_limit_kwh


def test_old_pods_leaving_in_a_move_hold_their_gpus_and_cap_in_the_first_slot_only() -> None:
    # Two 8-GPU nodes; the old pods of a make-before-break move still hold h1's GPUs, at the
    # highest limit. They leave within minutes: a 16-GPU job with 2 h of work due in 3 h runs
    # on h0's 8 GPUs for the first slot (half its replicas' share), on all 16 from the second,
    # and their draw does not count against the day's allowance (room for the idle GPUs and the
    # job's two hours).
    gone = 8 * H100.max_watts.value
    leaving = GpuNode(
        "h1",
        "H100-80GB",
        0,
        unmanaged_gpus=8,
        unmanaged_watts=gone,
        leaving_gpus=8,
        leaving_watts=gone,
    )
    busy_kw, idle_kwh = busy_kw_and_idle_kwh()
    base = horizon_input(
        (job("t/a", 2, 3, preemptible=True, replicas=2),),
        energy_kwh_left=idle_kwh + 4 * busy_kw + 1.0,
    )
    nodes_now = (base.plan_input.nodes[0], leaving)
    horizon = dataclasses.replace(
        base, plan_input=dataclasses.replace(base.plan_input, nodes=nodes_now)
    )
    result = plan_horizon(horizon)
    assert result.schedules["t/a"].share_by_slot[0] <= 0.5 + 1e-9
    assert result.schedules["t/a"].missed_tokens == 0
    assert not result.budgets["b"].energy_short
    # Pods that stay (not leaving) hold h1 in every slot: the job misses, and the allowance
    # counts their draw.
    staying = dataclasses.replace(leaving, leaving_gpus=0, leaving_watts=0.0)
    held = plan_horizon(
        dataclasses.replace(
            horizon,
            plan_input=dataclasses.replace(horizon.plan_input, nodes=(nodes_now[0], staying)),
        )
    )
    assert held.schedules["t/a"].missed_tokens > 0
    assert held.budgets["b"].energy_short


def test_deadline_work_with_less_than_its_margin_to_spare_is_not_deferred() -> None:
    # The first hour is dirty, every later one clean. 4 h of work due in 6 h has 2 h to spare:
    # it waits for the clean hours. Due in 5 h, it has no more to spare than its margin (an hour,
    # or a quarter of the work): the plan would have it finish at its deadline, but it is handed
    # to the one-instant planner now.
    carbon = (420.0,) + (140.0,) * 23
    roomy = plan_horizon(horizon_input((job("t/a", 4, 6),), carbon=carbon))
    assert running_slots(roomy, "t/a") == [1, 2, 3, 4]
    assert roomy.deferred == ("t/a",)
    tight = plan_horizon(horizon_input((job("t/a", 4, 5),), carbon=carbon))
    assert running_slots(tight, "t/a") == [1, 2, 3, 4]
    assert tight.schedules["t/a"].missed_tokens == 0
    assert tight.schedules["t/a"].urgent
    assert tight.deferred == ()
    assert not is_urgent(6 * HOUR, 4 * HOUR)
    assert is_urgent(5 * HOUR, 4 * HOUR)  # 1 h to spare: the margin
    assert not is_urgent(10.5 * HOUR, 8 * HOUR)  # 2.5 h to spare; a quarter of 8 h is 2 h
    assert is_urgent(9.5 * HOUR, 8 * HOUR)


def test_deadline_work_that_cannot_wait_goes_first_among_work_of_its_priority() -> None:
    # Three 8-GPU nodes; two 4-GPU jobs with a day to spare run on h0 and h1. A job of two
    # 8-GPU replicas with no time to spare needs two whole nodes: the horizon counts 16 free
    # GPUs, but only h2 is whole. One above its priority, the one-instant planner preempts the
    # jobs that can wait to place it; at its own priority it would wait behind them.
    small = tuple(
        dataclasses.replace(job(f"t/s{i}", 4, 24, preemptible=True), gpus_per_replica=4)
        for i in range(2)
    )
    urgent = job("t/u", 2, 2.5, replicas=2)
    horizon = with_current(
        horizon_input((*small, urgent), node_count=3, carbon=(420.0,) * 24),
        tuple(CurrentPlacement(f"t/s{i}", 0, f"h{i}", "bf16", 700.0) for i in range(2)),
    )
    result = plan_horizon(horizon)
    assert result.schedules["t/u"].urgent
    first = first_slot_input(horizon, result)
    assert {w.key: w.priority for w in first.workloads} == {"t/s0": 0, "t/s1": 0, "t/u": 1}
    assert "t/u" in {p.workload for p in plan(first).placements}
    as_declared = dataclasses.replace(first, workloads=(*small, urgent))
    assert "t/u" not in {p.workload for p in plan(as_declared).placements}


def test_deadline_work_is_planned_at_one_point_wherever_it_runs() -> None:
    # An H100 node and an L4 node; a 1-GPU batch job may use either. The point decides how much
    # of the time left it needs: running on the product that is not its least-energy one, it is
    # still planned at the same point, and so runs now or waits as it would not running.
    work = dataclasses.replace(
        job("t/a", 6, 12, preemptible=True),
        type=WorkloadType.BATCH_INFERENCE,
        gpus_per_replica=1,
        policy=EnergyPolicy.BALANCED,
    )
    base = horizon_input((work,))
    two = (GpuNode("h0", "H100-80GB", 8), GpuNode("l0", "L4", 8))
    budget_two = Budget("b", 1e6, frozenset({"h0", "l0"}))
    horizon = dataclasses.replace(
        base,
        plan_input=dataclasses.replace(base.plan_input, nodes=two, budgets=(budget_two,)),
    )
    waiting = plan_horizon(horizon).schedules["t/a"]
    other = "l0" if waiting.point.product == "H100-80GB" else "h0"
    running = plan_horizon(
        with_current(horizon, (CurrentPlacement("t/a", 0, other, "bf16", 100.0),))
    ).schedules["t/a"]
    assert running.point == waiting.point
    assert running.runs_now or not waiting.runs_now


def test_a_replica_that_spans_nodes_is_planned_like_any_other() -> None:
    # One replica of 16 GPUs on two whole 8-GPU nodes: the horizon plans it into the clean hours
    # (it was left out, as if no node could run it, and so never deferred nor counted).
    spanning = job("t/span", 2, 24, gpus_per_replica=16, nodes_per_replica=2)
    result = plan_horizon(horizon_input((spanning,)))
    assert running_slots(result, "t/span") == [10, 11]
    assert result.schedules["t/span"].point.gpus == 16


def test_a_gang_of_whole_nodes_is_planned_where_whole_nodes_are_left() -> None:
    # Three 8-GPU H100 nodes and two 4-GPU L4 nodes. A gang of two 8-GPU pods needs two whole
    # H100 nodes. In the clean hours the service's forecast takes 9 GPUs even at its highest
    # limit: 31 GPUs are left, but only one whole H100 node, so the gang runs in hours where
    # the service leaves two.
    chat = dataclasses.replace(
        service("t/chat", 100.0), max_replicas=16, allowed_products=frozenset({"H100-80GB"})
    )
    # Tokens/s of a replica at the highest limit: the service's fewest GPUs.
    per_replica = point_at_limit(
        chat, "H100-80GB", H100.max_watts.value, model=MODEL
    ).tokens_per_second
    demand = tuple((8.5 if 10 <= hour < 15 else 0.5) * per_replica for hour in range(24))
    gang = job("t/gang", 2, 24, replicas=2)
    base = horizon_input((chat, gang))
    mixed = tuple(GpuNode(f"h{i}", "H100-80GB", 8) for i in range(3)) + tuple(
        GpuNode(f"l{i}", "L4", 4) for i in range(2)
    )
    everywhere = Budget("b", 1e6, frozenset(node.name for node in mixed))
    horizon = dataclasses.replace(
        base,
        plan_input=dataclasses.replace(base.plan_input, nodes=mixed, budgets=(everywhere,)),
        inference_demand={"t/chat": demand},
    )
    result = plan_horizon(horizon)
    assert result.schedules["t/gang"].missed_tokens == 0
    assert running_slots(result, "t/gang")
    assert not set(running_slots(result, "t/gang")) & set(range(10, 15))
    # With the service's forecast at one GPU all day, the gang takes the clean hours.
    light = plan_horizon(
        dataclasses.replace(horizon, inference_demand={"t/chat": (0.5 * per_replica,) * 24})
    )
    assert running_slots(light, "t/gang") == [10, 11]
    # Another team's pod on an H100 node leaves it not whole, in every hour.
    shared = dataclasses.replace(
        horizon,
        plan_input=dataclasses.replace(
            horizon.plan_input,
            nodes=(dataclasses.replace(mixed[0], unmanaged_gpus=1), *mixed[1:]),
        ),
        inference_demand={"t/chat": (0.5 * per_replica,) * 24},
    )
    assert plan_horizon(shared).schedules["t/gang"].missed_tokens > 0


def test_the_first_slot_leaves_deferred_work_out_and_says_why() -> None:
    workloads = (job("t/a", 4, 24), job("t/now", 4, 4))
    horizon = horizon_input(workloads)
    result = plan_horizon(horizon)
    (deferral,) = deferrals(horizon, result)
    assert deferral.workload == "t/a"
    assert deferral.cause is DeferralCause.CARBON
    assert (deferral.grams_per_kwh_now, deferral.grams_per_kwh_then) == (420.0, 140.0)
    assert deferral.until_seconds == 10 * HOUR
    first = first_slot_input(horizon, result)
    assert [w.key for w in first.workloads] == ["t/now"]
    assert [p.workload for p in plan(first).placements] == ["t/now"]


def test_a_whole_node_gang_whose_planned_start_passed_waits_for_no_cleaner_hour() -> None:
    # Three 8-GPU nodes. A gang of two 8-GPU pods is planned into the clean hours (10:00) and a
    # 4-GPU job into the dirty ones; the 4-GPU job is not whole-node work and has no planned start.
    gang = job("t/gang", 2, 24, replicas=2)
    small = dataclasses.replace(job("t/small", 4, 30), gpus_per_replica=4)
    horizon = horizon_input((gang, small), node_count=3)
    result = plan_horizon(horizon)
    assert planned_starts(horizon, result) == {"t/gang": 10 * HOUR}
    assert [w.key for w in first_slot_input(horizon, result).workloads] == []
    # Overdue (its start came and it did not start): handed to the one-instant planner now, one
    # above its priority, though the clean hours are still ahead; the small job still waits.
    overdue = dataclasses.replace(horizon, overdue=frozenset({"t/gang"}))
    result = plan_horizon(overdue)
    first = first_slot_input(overdue, result)
    assert {w.key: w.priority for w in first.workloads} == {"t/gang": 1}
    assert {p.workload for p in plan(first).placements} == {"t/gang"}
    # ... but not past an allowance that is short.
    short = dataclasses.replace(
        horizon_input((gang, small), node_count=3, energy_kwh_left=1.0),
        overdue=frozenset({"t/gang"}),
    )
    result = plan_horizon(short)
    assert result.schedules["t/gang"].allowance_short
    assert "t/gang" not in {w.key for w in first_slot_input(short, result).workloads}
    # Running work has no planned start; work handed over now starts now.
    assert (
        planned_starts(running_now(horizon, "t/gang"), plan_horizon(running_now(horizon, "t/gang")))
        == {}
    )
    urgent = horizon_input((job("t/gang", 2, 2.5, replicas=2),), node_count=3)
    assert planned_starts(urgent, plan_horizon(urgent)) == {"t/gang": 0.0}


def running_now(horizon: HorizonInput, *keys: str) -> HorizonInput:
    """The same horizon with these 8-GPU jobs running now, on nodes h0, h1, ..."""
    return with_current(
        horizon,
        tuple(
            CurrentPlacement(key, 0, f"h{n}", "bf16", H100.max_watts.value)
            for n, key in enumerate(keys)
        ),
    )


def test_running_work_keeps_its_gpus_when_another_job_would_do_as_well() -> None:
    # One node, two alike jobs of 3 h due in 7 h (6 h with the margin of the second), every
    # hour as dirty: one runs now, the other after it, and which is a tie. The one that runs now
    # keeps running, whichever it is: a swap would restart both for nothing.
    jobs = (job("t/a", 3, 7, preemptible=True), job("t/b", 3, 7, preemptible=True))
    for runner, waiter in (("t/a", "t/b"), ("t/b", "t/a")):
        result = plan_horizon(running_now(horizon_input(jobs, node_count=1), runner))
        assert result.schedules[runner].runs_now, runner
        assert not result.schedules[waiter].runs_now, runner
        assert result.schedules[waiter].missed_tokens == 0


def test_running_work_stops_for_a_saving_larger_than_a_restart() -> None:
    # Three times cleaner in 10 h: the running job stops (it is preemptible) and waits.
    result = plan_horizon(running_now(horizon_input((job("t/a", 4, 24, preemptible=True),)), "t/a"))
    assert running_slots(result, "t/a") == [10, 11, 12, 13]
    # Not preemptible: it keeps running now, however clean the later hours.
    kept = plan_horizon(running_now(horizon_input((job("t/a", 4, 24),)), "t/a"))
    assert kept.schedules["t/a"].runs_now
    # 1% cleaner later is less than the churn threshold's 5%: it keeps running.
    flat = (420.0,) * 10 + (416.0,) * 14
    close = plan_horizon(
        running_now(horizon_input((job("t/a", 4, 24, preemptible=True),), carbon=flat), "t/a")
    )
    assert close.schedules["t/a"].runs_now


def test_an_optimum_of_zero_has_no_gap() -> None:
    # Found by the property test below: two jobs without a deadline, one node, an allowance that
    # leaves them nothing; the optimum is 0 and HiGHS's dual bound -1.8e-15 (round-off), which a
    # gap relative to the objective alone made 1.8e-6.
    workloads = (job("t/j0", None, None), job("t/j1", None, None))
    horizon = horizon_input(
        workloads,
        node_count=1,
        carbon=(20.0, 20.0, 20.0, 295.0),
        caps=(1600.0, 1600.0, 1600.0, 5600.0),
        cap_watts=5600.0,
        energy_kwh_left=2.4,
        slots=(HOUR,) * 4,
    )
    result = plan_horizon(horizon)
    assert result.status is HorizonStatus.OPTIMAL
    assert abs(result.objective) < 1e-9
    assert result.gap <= 1e-6


def test_bad_input_names_the_budget_and_field() -> None:
    horizon = horizon_input((job("t/a", 4, 24),))
    wrong = dataclasses.replace(
        horizon, budgets={"b": dataclasses.replace(horizon.budgets["b"], cap_watts_by_slot=(1.0,))}
    )
    with pytest.raises(HorizonInputError, match=r"EnergyBudget b: cap_watts_by_slot needs 24"):
        plan_horizon(wrong)


def test_operating_points_from_the_per_plan_cache_are_those_computed_afresh() -> None:
    # Workloads that differ in one thing a point depends on each: the cache (keyed by what the
    # model's figures depend on) must never hand one the point of another.
    fp8 = Variant("fp8", Precision.FP8, min_memory_gib=0, relative_throughput=1.6, quality=0.97)
    base = job("t/a", 4, 24, policy=EnergyPolicy.BALANCED)
    alike = [
        base,
        dataclasses.replace(base, policy=EnergyPolicy.PERFORMANCE),
        dataclasses.replace(base, max_power_watts_per_gpu=400.0),
        dataclasses.replace(base, variants=(fp8,)),
        dataclasses.replace(base, variants=(BF16, fp8), min_quality=0.99),
        dataclasses.replace(base, type=WorkloadType.FINE_TUNING),
        dataclasses.replace(base, model_parameters_billions=70),
        dataclasses.replace(base, gpus_per_replica=4),
        dataclasses.replace(base, replicas=3),
    ]
    cache: dict[tuple[object, ...], tuple[float, float, float]] = {}
    for product in ("H100-80GB", "L40S"):
        for efficient in (False, True):
            for workload in alike:
                fresh = operating_point(
                    workload, product, MODEL, 5, replicas=workload.replicas, efficient=efficient
                )
                cached = operating_point(
                    workload,
                    product,
                    MODEL,
                    5,
                    replicas=workload.replicas,
                    efficient=efficient,
                    cache=cache,
                )
                assert cached == fresh
    # Performance work runs at its highest level unless efficient: the two points differ.
    performance = alike[1]
    assert operating_point(performance, "H100-80GB", MODEL, 5, replicas=1) != operating_point(
        performance, "H100-80GB", MODEL, 5, replicas=1, efficient=True
    )


# -- invariants ------------------------------------------------------------------------------------


def _independent_check(horizon: HorizonInput, result: HorizonPlan) -> bool:
    """Whether every deadline can be met, less its margin, within the caps, GPUs and allowances:
    a PuLP model of the same slots and operating points, with deadlines hard."""
    plan_input = horizon.plan_input
    setting = horizon.budgets["b"]
    slots = len(horizon.slot_seconds)
    problem = pulp.LpProblem("check", pulp.LpMinimize)
    idle = MODEL.idle_power_watts("H100-80GB")
    gpus_total = sum(n.gpu_count for n in plan_input.nodes)
    base_cap = gpus_total * H100.min_watts.value
    share = {}
    for key in result.schedules:
        for s in range(slots):
            share[key, s] = pulp.LpVariable(f"x_{key.replace('/', '_')}_{s}", 0, 1)
    for s in range(slots):
        problem += (
            pulp.lpSum(
                share[k, s] * r.point.gpus * (r.point.power_limit_watts - H100.min_watts.value)
                for k, r in result.schedules.items()
            )
            <= setting.cap_watts_by_slot[s] - base_cap
        )
        problem += pulp.lpSum(share[k, s] * r.point.gpus for k, r in result.schedules.items()) <= (
            gpus_total
        )
    kwh = {
        (k, s): r.point.gpus
        * (r.point.busy_watts_per_gpu - idle)
        / 1000
        * horizon.slot_seconds[s]
        / HOUR
        for k, r in result.schedules.items()
        for s in range(slots)
    }
    idle_kwh = gpus_total * idle / 1000 * sum(horizon.slot_seconds) / HOUR
    (period,) = setting.periods
    if period.energy_kwh_left is not None:
        problem += pulp.lpSum(share[k] * v for k, v in kwh.items()) <= (
            period.energy_kwh_left - idle_kwh
        )
    by_key = {w.key: w for w in plan_input.workloads}
    for key, schedule in result.schedules.items():
        workload = by_key[key]
        if workload.deadline_seconds is None:
            continue
        tokens = remaining_tokens(MODEL, workload)
        assert tokens is not None
        # The plan aims its margin before the deadline, unless it has less than that to spare.
        needed = tokens / schedule.point.tokens_per_second
        aim = workload.deadline_seconds
        if not is_urgent(aim, needed):
            aim -= float(margin_seconds(needed))
        for s in range(slots):
            start = sum(horizon.slot_seconds[:s])
            length = horizon.slot_seconds[s]
            open_share = min(1.0, max(0.0, aim - start) / length)
            problem += share[key, s] <= open_share
        problem += (
            pulp.lpSum(
                share[key, s] * schedule.point.tokens_per_second * horizon.slot_seconds[s]
                for s in range(slots)
            )
            >= tokens
        )
    problem += pulp.lpSum(share.values())
    problem.solve(pulp.HiGHS(msg=False))
    return bool(pulp.LpStatus[problem.status] == "Optimal")


@st.composite
def instances(draw: st.DrawFn) -> HorizonInput:
    hours = draw(st.integers(2, 8))
    # Hourly slots, or hourly up to a point and coarser after it, from a time inside an hour.
    slots = draw(
        st.one_of(
            st.just(hourly_slots(0, hours)),
            st.builds(
                lambda into, fine, coarse: hourly_slots(
                    into, hours, fine_hours=fine, coarse_slot_hours=coarse
                ),
                st.sampled_from([0.0, 900.0, 2700.0]),
                st.integers(1, hours),
                st.integers(2, 4),
            ),
        )
    )
    carbon = tuple(float(draw(st.integers(20, 800))) for _ in slots)
    count = draw(st.integers(1, 4))
    workloads = []
    for i in range(count):
        deadline = draw(st.one_of(st.none(), st.integers(1, hours + 4)))
        work = None if deadline is None else draw(st.floats(0.1, 6.0))
        # Work without a deadline at the lowest priority: deadlines outrank it, so "met when
        # feasible" is the rule (higher-priority work without one may take their room).
        priority = 0 if deadline is None else draw(st.sampled_from([0, 5]))
        workloads.append(job(f"t/j{i}", work, deadline, priority=priority))
    node_count = draw(st.integers(1, 3))
    floor = node_count * 8 * H100.min_watts.value
    span = node_count * 8 * (H100.max_watts.value - H100.min_watts.value)
    caps = tuple(floor + span * draw(st.floats(0.0, 1.0)) for _ in slots)
    idle_kwh = node_count * 8 * MODEL.idle_power_watts("H100-80GB") / 1000 * hours
    energy = draw(st.one_of(st.none(), st.floats(0.0, 60.0).map(lambda e: idle_kwh + e)))
    return horizon_input(
        tuple(workloads),
        node_count=node_count,
        carbon=carbon,
        caps=caps,
        cap_watts=max(caps),
        energy_kwh_left=energy,
        slots=slots,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_caps_allowances_and_deadlines_hold(horizon: HorizonInput) -> None:
    result = plan_horizon(horizon)
    assert result.status is HorizonStatus.OPTIMAL
    # The dual values bound the optimum from below and meet it (an LP optimum: gap 0).
    assert result.dual_bound <= result.objective + 1e-7 * max(1.0, abs(result.objective))
    assert result.gap <= 1e-6
    setting = horizon.budgets["b"]
    gpus_total = sum(n.gpu_count for n in horizon.plan_input.nodes)
    base_cap = gpus_total * H100.min_watts.value
    tolerance = 1e-6
    for s, cap in enumerate(setting.cap_watts_by_slot):
        limits = sum(
            r.share_by_slot[s] * r.point.gpus * (r.point.power_limit_watts - H100.min_watts.value)
            for r in result.schedules.values()
        )
        assert base_cap + limits <= cap * (1 + tolerance) + tolerance
        assert sum(r.share_by_slot[s] * r.point.gpus for r in result.schedules.values()) <= (
            gpus_total + tolerance
        )
    (period,) = setting.periods
    outlook = result.budgets["b"]
    if period.energy_kwh_left is not None and outlook.energy_over_kwh == 0:
        assert outlook.energy_kwh_by_period[0] <= period.energy_kwh_left * (1 + 1e-6) + 1e-6
    if _independent_check(horizon, result):
        for schedule in result.schedules.values():
            assert schedule.missed_tokens <= 1e-6 * max(schedule.required_tokens or 0, 1)

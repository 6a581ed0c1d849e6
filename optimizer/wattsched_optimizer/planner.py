"""The optimizer's entry point: `plan(PlanInput) -> Plan`, data -> model -> solve -> pack -> plan.

For: validating the input (errors name the object and field), running the pipeline (`options`
builds pools/classes/options, `formulation` solves the pool-level program, `packing` places
replicas on nodes and repairs), and assembling the `Plan`: placements, one power limit per GPU of
every node, budget allocations, unplaced workloads with reasons, status, objective, bound and gap.
Not for: reading Kubernetes objects (the operator does) or applying anything.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from wattsched_optimizer.formulation import (
    Formulation,
    SolveResult,
    SolveStatus,
    Weights,
    build,
    lexicographic_weights,
    solve,
)
from wattsched_optimizer.model import (
    CatalogueModel,
    PerformanceModel,
    UnknownProductError,
    product_spec,
    products_in_scope,
)
from wattsched_optimizer.options import (
    PlanData,
    WorkloadClass,
    budget_base_watts,
    build_plan_data,
    workload_label,
    workload_options,
)
from wattsched_optimizer.packing import WATTS_TOLERANCE, Assignment, ClusterState, Taken
from wattsched_optimizer.problem import (
    BudgetAllocation,
    GpuNode,
    MoveReason,
    Placement,
    Plan,
    PlanInput,
    PlanStatus,
    Shortfall,
    Unplaced,
    Workload,
    WorkloadType,
    WorkUnit,
)

# Programs with at most this many workload-option variables are solved to optimality (gap below
# SMALL_PROGRAM_GAP) when rounding the relaxation lost anything; larger ones to PlanOptions'.
SMALL_PROGRAM_VARIABLES = 500
SMALL_PROGRAM_GAP = 1e-7
# An Inference workload that cannot be served whole for one of these (a budget's cap, GPUs,
# packing, or maxReplicas too few for its demand) is served in part, at its priority's turn in
# the fill.
PARTIAL_CONSTRAINTS = frozenset({"budget", "gpus", "packing", "slo"})
# The class index of a service placed in part: not one of the program's classes (the objective
# does not count it).
PARTIAL_CLASS = -1


class PlanInputError(ValueError):
    """The input cannot be planned; the message names the object and the field."""


class PlanInvariantError(RuntimeError):
    """A plan broke a hard constraint: a bug in the optimizer, never returned to callers."""


def validate(plan_input: PlanInput) -> None:
    """Raise PlanInputError for input no plan can be made from."""
    seen_nodes: set[str] = set()
    for node in plan_input.nodes:
        if node.name in seen_nodes:
            raise PlanInputError(f"Node {node.name}: listed twice")
        seen_nodes.add(node.name)
        if node.gpu_count < 0:
            raise PlanInputError(f"Node {node.name}: gpu_count={node.gpu_count} is negative")
        if node.unmanaged_gpus < 0 or node.unmanaged_watts < 0:
            raise PlanInputError(
                f"Node {node.name}: unmanaged_gpus={node.unmanaged_gpus} and "
                f"unmanaged_watts={node.unmanaged_watts} must not be negative"
            )
        if not (
            0 <= node.leaving_gpus <= node.unmanaged_gpus
            and 0 <= node.leaving_watts <= node.unmanaged_watts
        ):
            raise PlanInputError(
                f"Node {node.name}: leaving_gpus={node.leaving_gpus} and "
                f"leaving_watts={node.leaving_watts} must be between 0 and the unmanaged ones"
            )
        try:
            product_spec(node.product)
        except UnknownProductError as error:
            raise PlanInputError(f"Node {node.name}: product: {error}") from error
    seen_workloads: set[str] = set()
    for workload in plan_input.workloads:
        label = workload_label(workload)
        if workload.key in seen_workloads:
            raise PlanInputError(f"{label}: listed twice")
        seen_workloads.add(workload.key)
        if workload.gpus_per_replica < 1:
            raise PlanInputError(f"{label}: spec.gpu.count={workload.gpus_per_replica}, need >= 1")
        if workload.nodes_per_replica < 1 or workload.gpus_per_replica % workload.nodes_per_replica:
            raise PlanInputError(
                f"{label}: spec.gpu.nodesPerReplica={workload.nodes_per_replica} must be >= 1 and "
                f"divide the replica's {workload.gpus_per_replica} GPUs"
            )
        if workload.model_parameters_billions <= 0:
            raise PlanInputError(f"{label}: spec.model.parametersBillions must be > 0")
        if not workload.variants:
            raise PlanInputError(f"{label}: spec.variants is empty")
        if workload.type is WorkloadType.INFERENCE:
            if not 0 <= workload.min_replicas <= workload.max_replicas or workload.max_replicas < 1:
                raise PlanInputError(
                    f"{label}: spec.minReplicas={workload.min_replicas} and "
                    f"spec.maxReplicas={workload.max_replicas}: need 0 <= min <= max, max >= 1"
                )
        elif workload.replicas < 1:
            raise PlanInputError(f"{label}: spec.replicas={workload.replicas}, need >= 1")
        work = workload.remaining_work
        if work is not None and work.unit is WorkUnit.STEPS and not work.tokens_per_step:
            raise PlanInputError(f"{label}: spec.slo.totalWork.steps needs tokensPerStep > 0")
        for variant in workload.variants:
            if variant.relative_throughput <= 0:
                raise PlanInputError(
                    f"{label}: spec.variants[{variant.name}].relativeThroughput must be > 0"
                )
    seen_budgets: set[str] = set()
    for budget in plan_input.budgets:
        if budget.name in seen_budgets:
            raise PlanInputError(f"EnergyBudget {budget.name}: listed twice")
        seen_budgets.add(budget.name)
        if budget.power_cap_watts <= 0:
            raise PlanInputError(f"EnergyBudget {budget.name}: spec.powerCapWatts must be > 0")
        if not 0 <= budget.uncontrolled_watts < math.inf:
            raise PlanInputError(
                f"EnergyBudget {budget.name}: uncontrolled_watts={budget.uncontrolled_watts:g} "
                "must be finite and >= 0"
            )
    for current in plan_input.current:
        if current.workload not in seen_workloads:
            raise PlanInputError(
                f"CurrentPlacement {current.workload}#{current.replica}: no such workload"
            )
    if plan_input.options.power_levels < 1:
        raise PlanInputError("PlanOptions.power_levels must be >= 1")
    if plan_input.options.churn_threshold < 0:
        raise PlanInputError(
            f"PlanOptions.churn_threshold={plan_input.options.churn_threshold:g}: must be >= 0"
        )
    if plan_input.options.startup_seconds < 0:
        raise PlanInputError(
            f"PlanOptions.startup_seconds={plan_input.options.startup_seconds:g}: must be >= 0"
        )
    if plan_input.options.solver not in ("highs", "cbc"):
        raise PlanInputError(
            f"PlanOptions.solver={plan_input.options.solver!r}: allowed are 'highs' and 'cbc'"
        )


def plan(plan_input: PlanInput, model: PerformanceModel | None = None) -> Plan:
    """Decide which workloads run, where, with which variant, at which per-GPU power limit.

    Products the catalogue lacks are known from `plan_input.products` while it plans.
    """
    with products_in_scope(plan_input.products):
        return _plan(plan_input, model)


def _plan(plan_input: PlanInput, model: PerformanceModel | None) -> Plan:
    started = time.perf_counter()
    validate(plan_input)
    performance: PerformanceModel = model if model is not None else CatalogueModel()
    held = held_budgets(plan_input)
    program_input = _without_held(plan_input, held)
    data = build_plan_data(program_input, performance)
    weights = lexicographic_weights(data)
    unplaced: dict[str, Unplaced] = {
        key: Unplaced(key, reason.reason, reason.constraint)
        for key, reason in data.no_option.items()
    }
    timings: dict[str, float] = {"data": time.perf_counter() - started}
    # The same for every pass: the workloads by key and each running workload's nodes.
    workload_by_key = {w.key: w for w in plan_input.workloads}
    prefer = _preferred_nodes(plan_input)
    pass_one = _solve_and_pack(
        plan_input,
        data,
        weights,
        unplaced,
        timings=timings,
        started=started,
        workload_by_key=workload_by_key,
        prefer=prefer,
        model=performance,
    )
    # Running work the pinned plan could not keep (a budget cut below every limit in place, or
    # higher-priority work that needs its GPUs) may move: plan again with it unpinned.
    pinned = {c.representative.key for c in data.classes if c.pinned_nodes}
    dropped = {key: pass_one[1][key] for key in pinned if key in pass_one[1]}
    dropped |= _displaced(program_input, pinned, pass_one[0])
    state, left_out, shortfalls, objective, bound, status, solver_used = pass_one
    if dropped:
        data = build_plan_data(program_input, performance, unpinned=frozenset(dropped))
        unplaced = {
            key: Unplaced(key, reason.reason, reason.constraint)
            for key, reason in data.no_option.items()
        }
        weights = lexicographic_weights(data)
        state, left_out, shortfalls, objective, bound, status, solver_used = _solve_and_pack(
            plan_input,
            data,
            weights,
            unplaced,
            timings=timings,
            started=started,
            workload_by_key=workload_by_key,
            prefer=prefer,
            model=performance,
            last_pass=True,
        )
    return _assemble(
        plan_input,
        data,
        state,
        performance,
        _explain_held(plan_input, held, left_out),
        held=held,
        shortfalls=shortfalls,
        move_reasons=_move_reasons(program_input, data, dropped),
        status=status,
        objective=objective,
        bound=bound,
        solver=solver_used,
        timings=timings | {"total": time.perf_counter() - started},
    )


def _solve_and_pack(
    plan_input: PlanInput,
    data: PlanData,
    weights: Weights,
    unplaced: Mapping[str, Unplaced],
    *,
    timings: dict[str, float],
    started: float,
    workload_by_key: Mapping[str, Workload],
    prefer: Mapping[str, list[str]],
    model: PerformanceModel,
    last_pass: bool = False,
) -> tuple[ClusterState, dict[str, Unplaced], tuple[Shortfall, ...], float, float, PlanStatus, str]:
    """Solve the program for `data`, pack and repair: the state, what is left out and why, the
    services served in part, the objective, its bound, the status and the solver that ran.
    `last_pass`: no pass follows, so a pinned service that is not served whole is served in part
    (`_fill_and_repair`)."""
    options = plan_input.options
    class_of = {m.key: c for c in data.classes for m in c.members}
    formulation = build(data)
    timings["build"] = formulation.build_seconds
    running_gpus = _running_gpus(plan_input, workload_by_key)

    def in_part(workload: Workload) -> WorkloadClass | None:
        return _partial_class(plan_input, data, workload, model)

    def realise(
        result: SolveResult,
    ) -> tuple[ClusterState, dict[str, Unplaced], tuple[Shortfall, ...], float]:
        pack_started = time.perf_counter()
        state = ClusterState(data, running_gpus)
        left_out = dict(unplaced)
        pending = _pack_solver_choice(data, state, result, formulation, prefer)
        waiting = set(pending)
        for workload_class in data.classes:
            for member in workload_class.members:
                if member.key not in state.placed and member.key not in waiting:
                    pending.append(member.key)
        # Services with no whole option at all (e.g. too few maxReplicas) are served in part.
        pending += sorted(
            key
            for key, why in unplaced.items()
            if _may_serve_in_part(workload_by_key.get(key), why.constraint)
        )
        shortfalls = _fill_and_repair(
            data,
            state=state,
            pending=pending,
            workload_by_key=workload_by_key,
            class_of=class_of,
            prefer=prefer,
            unplaced=left_out,
            in_part=in_part,
            pinned_in_part=last_pass,
        )
        timings["pack"] = timings.get("pack", 0.0) + time.perf_counter() - pack_started
        return state, left_out, shortfalls, _objective(data, weights, state.placed.values())

    # 1. The LP relaxation: its optimum bounds every plan; rounding it down, packing, filling
    #    and repairing usually lands within the gap.
    relaxation = solve(
        formulation,
        solver=options.solver,
        relaxed=True,
        time_limit_seconds=options.time_limit_seconds,
        gap=options.relative_gap,
    )
    timings["solve"] = relaxation.seconds
    trivial_bound = sum(
        len(c.members) * max(weights.coefficient(data, c.index, o) for o in range(len(c.options)))
        for c in data.classes
    )
    state, left_out, shortfalls, objective = realise(relaxation)
    bound = trivial_bound
    if relaxation.status is SolveStatus.OPTIMAL:
        bound = max(relaxation.bound, objective)
    solver_used = relaxation.solver
    timed_out = False
    # 2. Not close enough: the integer program, in the time left; the better plan wins. Small
    #    programs take milliseconds, so they are solved to optimality whenever rounding lost any.
    small = len(formulation.workloads) <= SMALL_PROGRAM_VARIABLES
    target_gap = SMALL_PROGRAM_GAP if small else options.relative_gap
    if relaxation.status is not SolveStatus.EMPTY and _gap(objective, bound) > target_gap:
        time_left = options.time_limit_seconds - (time.perf_counter() - started)
        exact = solve(
            formulation,
            solver=options.solver,
            relaxed=False,
            time_limit_seconds=max(time_left, 0.1),
            gap=target_gap,
        )
        timings["solve"] += exact.seconds
        solver_used = exact.solver
        if exact.status in (SolveStatus.OPTIMAL, SolveStatus.TIME_LIMIT):
            bound = min(bound, max(exact.bound, objective))
            timed_out = exact.status is SolveStatus.TIME_LIMIT
            candidate = realise(exact)
            if candidate[3] > objective:
                state, left_out, shortfalls, objective = candidate
    # The program keeps running non-preemptible work (keep_c); should packing fail to keep one,
    # the plan is one the program does not describe and may beat its bound.
    bound = max(bound, objective)
    gap = _gap(objective, bound)
    if gap <= options.relative_gap + 1e-9:
        status = PlanStatus.OPTIMAL
    elif timed_out:
        status = PlanStatus.TIME_LIMIT
    else:
        status = PlanStatus.FEASIBLE
    return state, left_out, shortfalls, objective, bound, status, solver_used


def _displaced(
    plan_input: PlanInput, pinned: Iterable[str], state: ClusterState
) -> dict[str, Unplaced]:
    """Pinned workloads that packing kept only by moving a running replica (a node of theirs lost
    a replica while another gained one): no placement in place fits, so they are unpinned like
    dropped ones. The constraint names a budget over their nodes (`budget:<name>`: no limit in
    place keeps it), else `gpus` (other work holds the GPUs)."""
    running: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for current in plan_input.current:
        running[current.workload][current.node] += 1
    displaced: dict[str, Unplaced] = {}
    for key in pinned:
        assignment = state.placed.get(key)
        if assignment is None:
            continue
        placed: dict[str, int] = defaultdict(int)
        for node in assignment.nodes:
            placed[node] += 1
        was = running[key]
        if any(placed[n] < c for n, c in was.items()) and any(
            c > was.get(n, 0) for n, c in placed.items()
        ):
            budgets = sorted(b.name for b in plan_input.budgets if b.node_names & set(was))
            constraint = f"budget:{budgets[0]}" if budgets else "gpus"
            displaced[key] = Unplaced(key, "no placement in place fits", constraint)
    return displaced


def _move_reasons(
    plan_input: PlanInput, data: PlanData, dropped: Mapping[str, Unplaced]
) -> dict[str, MoveReason]:
    """Why each running workload that the final data does not pin may move (see MoveReason)."""
    node_by_name = {node.name: node for node in plan_input.nodes}
    workload_by_key = {w.key: w for w in plan_input.workloads}
    pinned = {c.representative.key for c in data.classes if c.pinned_nodes}
    reasons: dict[str, MoveReason] = {}
    for current in plan_input.current:
        key = current.workload
        node = node_by_name.get(current.node)
        if node is None or not node.keeps_running:
            reasons[key] = MoveReason.NODE
        elif key in pinned or key in reasons:
            continue
        elif key in dropped:
            budget = dropped[key].constraint.startswith("budget:")
            reasons[key] = MoveReason.BUDGET if budget else MoveReason.PRIORITY
        elif workload_by_key[key].moves_to_save_energy:
            reasons[key] = MoveReason.SAVINGS
        else:
            reasons[key] = MoveReason.SPEC
    return reasons


def held_budgets(plan_input: PlanInput) -> dict[str, float]:
    """Budgets no plan can meet, by name: the watts their GPUs count for with nothing placed (their
    floor: idle GPUs at the minimum, GPUs of nodes whose agent is not ready at the maximum), where
    that floor exceeds the cap.

    Such a budget is held rather than failing the plan: its nodes take no work and are lowered to
    their minimum, its allocation is its floor, and everything outside its scope is planned as
    usual (a partial plan). Other budgets count its nodes as they are.
    """
    floors = budget_base_watts(plan_input)
    return {
        budget.name: floors[budget.name]
        for budget in plan_input.budgets
        if floors[budget.name] > budget.power_cap_watts + WATTS_TOLERANCE
    }


def _held_nodes(plan_input: PlanInput, held: Mapping[str, float]) -> frozenset[str]:
    return frozenset(n for b in plan_input.budgets if b.name in held for n in b.node_names)


def _without_held(plan_input: PlanInput, held: Mapping[str, float]) -> PlanInput:
    """The input the program sees: held budgets left out, their nodes unschedulable (no work
    goes there and running replicas there move), still counted in every other budget."""
    if not held:
        return plan_input
    nodes = _held_nodes(plan_input, held)
    return dataclasses.replace(
        plan_input,
        nodes=tuple(
            dataclasses.replace(node, schedulable=False, keeps_running=False)
            if node.name in nodes
            else node
            for node in plan_input.nodes
        ),
        budgets=tuple(b for b in plan_input.budgets if b.name not in held),
    )


def _could_use(workload: Workload, node: GpuNode) -> bool:
    """Whether a replica of `workload` would fit `node` by product, GPUs and memory."""
    if workload.allowed_products and node.product not in workload.allowed_products:
        return False
    if not node.schedulable:
        return False
    if node.gpu_count < workload.gpus_per_pod or (
        workload.spans_nodes and node.gpu_count != workload.gpus_per_pod
    ):
        return False
    memory = product_spec(node.product).memory_gib.value
    return any(
        (v.min_memory_gib if v.min_memory_gib > 0 else workload.min_memory_gib_per_gpu) <= memory
        for v in workload.variants
    )


def _explain_held(
    plan_input: PlanInput, held: Mapping[str, float], unplaced: Mapping[str, Unplaced]
) -> dict[str, Unplaced]:
    """Unplaced workloads that a held budget's nodes could have run say so (constraint
    `budget:<name>`), with what else kept them out."""
    result = dict(unplaced)
    if not held:
        return result
    by_name = {node.name: node for node in plan_input.nodes}
    workloads = {w.key: w for w in plan_input.workloads}
    for key, left_out in unplaced.items():
        workload = workloads[key]
        for budget in plan_input.budgets:
            if budget.name not in held:
                continue
            usable = sorted(
                n for n in budget.node_names if n in by_name and _could_use(workload, by_name[n])
            )
            if not usable:
                continue
            result[key] = Unplaced(
                key,
                f"{workload_label(workload)}: EnergyBudget {budget.name} holds its nodes "
                f"({', '.join(usable[:5])}{', ...' if len(usable) > 5 else ''}) at their minimum: "
                f"{held_budget_reason(budget.power_cap_watts, held[budget.name])}; elsewhere: "
                f"{left_out.reason}",
                f"budget:{budget.name}",
            )
            break
    return result


def held_budget_reason(cap_watts: float, floor_watts: float) -> str:
    """Why a budget is held, in words (for the plan's reasons and the budget's status)."""
    return (
        f"spec.powerCapWatts={cap_watts:g} is below the {floor_watts:g} W its GPUs count for "
        "with nothing placed (minimum limits; maximum where the node agent is not ready; GPUs "
        "held by pods wattsched did not create at their limits); raise the cap, narrow "
        "spec.nodeSelector or bring the agents back"
    )


def _may_serve_in_part(workload: Workload | None, constraint: str) -> bool:
    """Whether a workload left out for `constraint` may be served in part: Inference with a
    demand, left out for a budget, GPUs or too few maxReplicas (PARTIAL_CONSTRAINTS)."""
    return (
        workload is not None
        and workload.type is WorkloadType.INFERENCE
        and workload.tokens_per_second is not None
        and constraint.split(":", 1)[0] in PARTIAL_CONSTRAINTS
    )


def _partial_class(
    plan_input: PlanInput, data: PlanData, workload: Workload, model: PerformanceModel
) -> WorkloadClass | None:
    """The service's options that serve part of its demand (every replica count from
    minReplicas up), as a class of its own; None when it has none."""
    current = sorted(
        (c for c in plan_input.current if c.workload == workload.key),
        key=lambda c: (c.replica, c.rank),
    )
    options, option_pools = workload_options(
        workload,
        pools=data.pools,
        model=model,
        levels=plan_input.options.power_levels,
        current=current,
        node_by_name=data.node_by_name,
        churn_threshold=plan_input.options.churn_threshold,
        startup_seconds=plan_input.options.startup_seconds,
        partial=True,
        sm_clocks=plan_input.options.sm_clocks,
    )
    partial = [(o, p) for o, p in zip(options, option_pools, strict=True) if o.shortfall_steps]
    if not partial:
        return None
    return WorkloadClass(
        index=PARTIAL_CLASS,
        members=(workload,),
        options=tuple(o for o, _ in partial),
        option_pools=tuple(p for _, p in partial),
    )


def _shortfall(assignment: Assignment, why: Unplaced) -> Shortfall:
    demand = assignment.workload.tokens_per_second or 0.0
    served = len(assignment.nodes) * assignment.option.throughput_per_replica
    return Shortfall(
        workload=assignment.workload.key,
        demand_tokens_per_second=demand,
        served_tokens_per_second=served,
        reason=f"serves {served:.0f} of {demand:.0f} tokens/s "
        f"({served / demand:.1%}, modelled) with {len(assignment.nodes)} replica(s): " + why.reason,
        constraint=why.constraint,
    )


def _gap(objective: float, bound: float) -> float:
    if bound <= objective:
        return 0.0
    return (bound - objective) / max(abs(bound), 1e-9)


def _objective(data: PlanData, weights: Weights, placed: Iterable[Assignment]) -> float:
    return sum(
        weights.coefficient(data, a.workload_class, a.option_index)
        for a in placed
        if a.workload_class != PARTIAL_CLASS
    )


def _preferred_nodes(plan_input: PlanInput) -> dict[str, list[str]]:
    prefer: dict[str, list[str]] = defaultdict(list)
    for current in sorted(plan_input.current, key=lambda c: (c.workload, c.replica, c.rank)):
        prefer[current.workload].append(current.node)
    return prefer


def _running_gpus(
    plan_input: PlanInput, workload_by_key: Mapping[str, Workload]
) -> dict[tuple[str, str], int]:
    """(workload, node) -> GPUs its running replicas occupy there at planning time."""
    running: dict[tuple[str, str], int] = defaultdict(int)
    for current in plan_input.current:
        running[(current.workload, current.node)] += workload_by_key[current.workload].gpus_per_pod
    return dict(running)


def _pack_solver_choice(
    data: PlanData,
    state: ClusterState,
    result: SolveResult,
    formulation: Formulation,
    prefer: Mapping[str, list[str]],
) -> list[str]:
    """Place what the solver chose, whole workloads at a time; return the keys that did not fit.

    Each (class, option) runs floor(value) workloads (the value is an integer when the integer
    program ran). Each replica goes preferably to the pool where the solver put the most replicas
    of its type that are not yet taken, then to the type's other pools (packing repair).
    """
    remaining: dict[tuple[int, int], float] = dict(result.replicas)
    jobs: list[tuple[tuple[int, int, int, str], Workload, int, int, list[list[int]]]] = []
    assigned: dict[int, int] = defaultdict(int)
    for (c, o), value in sorted(result.workloads.items()):
        workload_class = data.classes[c]
        option = workload_class.options[o]
        t = formulation.option_type[(c, o)]
        pools = formulation.replica_types[t].pools
        for _ in range(math.floor(value + 1e-6)):
            if assigned[c] >= len(workload_class.members):
                break
            member = workload_class.members[assigned[c]]
            assigned[c] += 1
            replica_pools = []
            for _ in range(option.replicas):
                # Most replicas still to place first; ties to the lower pool index.
                best = max(pools, key=lambda p: (remaining.get((t, p), 0.0), -p))
                remaining[(t, best)] = remaining.get((t, best), 0.0) - 1.0
                replica_pools.append([best, *(p for p in pools if p != best)])
            order = (
                0 if workload_class.pinned_nodes or member.key in prefer else 1,
                -member.priority,
                -option.gpus_per_replica,
                member.key,
            )
            jobs.append((order, member, c, o, replica_pools))
    jobs.sort(key=lambda job: job[0])
    # Stability: the GPUs of running replicas are held for their workload until it is placed.
    held: dict[str, list[Taken]] = defaultdict(list)
    for _, member, c, o, _ in jobs:
        gpus = data.classes[c].options[o].gpus_per_pod
        for node in prefer.get(member.key, ()):
            taken = state.hold(member.key, node, gpus)
            if taken is not None:
                held[member.key].append(taken)
    failed: list[str] = []
    for _, member, c, o, replica_pools in jobs:
        for taken in held.pop(member.key, ()):
            state.release(taken)
        assignment = state.place(
            member, data.classes[c], o, replica_pools, prefer.get(member.key, ())
        )
        if assignment is None:
            failed.append(member.key)
    return failed


def _fill_and_repair(
    data: PlanData,
    *,
    state: ClusterState,
    pending: list[str],
    workload_by_key: Mapping[str, Workload],
    class_of: Mapping[str, WorkloadClass],
    prefer: Mapping[str, list[str]],
    unplaced: dict[str, Unplaced],
    in_part: Callable[[Workload], WorkloadClass | None],
    pinned_in_part: bool = False,
) -> tuple[Shortfall, ...]:
    """Place what is left in priority order, evicting strictly lower priority when that helps;
    return the services served in part.

    Running non-preemptible work (`PlanData.protected`) goes first while it stays where it runs,
    and is never evicted; it is left out only when the solver found no plan that keeps it (e.g.
    a budget cut below it). A placement that moves it or grows it onto other GPUs is undone: it
    then has its turns at its own priority, like any new placement (a service at 1 of its
    minReplicas 2, priority 0, took the only node a priority-1000 service could use; found by
    the round fuzzer); when none places it, it stays as it runs if it can, evicting what took
    its GPUs meanwhile (`ClusterState.place_where_it_runs`).
    A class that fails stays failed: later workloads have equal or lower priority, and the
    eviction test already counted every evictable lower-priority workload as removable.
    A service that cannot be served whole (PARTIAL_CONSTRAINTS) is served in part at its turn,
    after every workload of its priority had its whole turn and before lower priority: as many
    replicas (at least minReplicas) as fit once lower-priority preemptible work is out of the way
    (`ClusterState.place_in_part`), so that work keeps only what the service cannot use. A pinned
    service is not in the first pass (the second may still serve it whole elsewhere), and is in
    the second (`pinned_in_part`): there it stays pinned when the first pass served it whole, and
    the work that pass 2 unpinned may take what it needs to grow. Without that it was left out
    altogether, every replica it ran on stopped (seen in the 48-hour simulation: a service that
    asked for 13 replicas where 12 fit lost its 10 running ones).
    """
    # Protected work whose placement moved or grew it: it goes at its own priority.
    moving: set[str] = set()

    def first(key: str) -> bool:
        return key in data.protected and key not in moving

    def above(workload: Workload) -> float:
        """Evictable work below this priority may make room for `workload` served in part."""
        return math.inf if first(workload.key) else workload.priority

    def order(key: str, in_part: bool = False) -> tuple[bool, int, bool, str]:
        return (not first(key), -workload_by_key[key].priority, in_part, key)

    # Services with no whole option at all wait for their turn in part right away.
    heap = [order(key, key not in class_of) for key in pending]
    heapq.heapify(heap)
    failed_classes: dict[int, tuple[str, str]] = {}
    # Why each service served in part (or waiting for its turn in part) is not served whole.
    partly: dict[str, Unplaced] = {}
    queued = set(pending)

    def requeue(evicted: Iterable[Assignment]) -> None:
        for assignment in evicted:
            other = assignment.workload.key
            if other not in queued:
                queued.add(other)
                heapq.heappush(heap, order(other))

    def in_part_later(key: str, why: Unplaced) -> None:
        partly[key] = why
        queued.add(key)
        heapq.heappush(heap, order(key, in_part=True))

    def stands(key: str, placed: tuple[Assignment, list[Assignment]]) -> bool:
        """Whether a placement stands (its evictions requeued); False when it moved or grew
        protected work ahead of its priority: undone, and that work queued at its own."""
        assignment, evicted = placed
        if first(key) and not assignment.stays:
            state.undo(placed)
            moving.add(key)
            queued.add(key)
            heapq.heappush(heap, order(key))
            return False
        requeue(evicted)
        return True

    def stays_as_it_runs(key: str, workload_class: WorkloadClass | None, partial: bool) -> bool:
        if key not in moving or workload_class is None:
            return False
        placed = state.place_where_it_runs(
            workload_class, workload_by_key[key], prefer.get(key, ()), in_part=partial
        )
        if placed is None:
            return False
        requeue(placed[1])
        return True

    while heap:
        *_, in_part_turn, key = heapq.heappop(heap)
        queued.discard(key)
        if key in state.placed:
            continue
        workload = workload_by_key[key]
        wc = class_of.get(key)
        if not in_part_turn and wc is None:
            in_part_later(key, partly.get(key) or unplaced[key])
            continue
        if not in_part_turn and wc is not None:
            if wc.index not in failed_classes:
                fits = state.try_place(wc, workload, prefer.get(key, ()))
                if fits is not None:
                    if stands(key, (fits, [])):
                        unplaced.pop(key, None)
                    continue
                evicted = state.place_with_eviction(wc, workload, prefer.get(key, ()))
                if evicted is not None:
                    if stands(key, evicted):
                        unplaced.pop(key, None)
                    continue
                failed_classes[wc.index] = state.diagnose(wc, workload)
            constraint, reason = failed_classes[wc.index]
            why = Unplaced(
                key,
                reason.replace(wc.representative.key, key).replace(workload.key, key),
                constraint,
            )
            if _may_serve_in_part(workload, why.constraint) and (
                pinned_in_part or not wc.pinned_nodes
            ):
                # After every equal-priority workload's whole turn, before lower priority.
                in_part_later(key, why)
            elif stays_as_it_runs(key, wc, partial=False):
                unplaced.pop(key, None)
            else:
                unplaced[key] = why
            continue
        why = partly.get(key) or unplaced[key]
        placed = None
        partial = None
        # Per pod: a replica that spans nodes needs (at least) one node with that many free.
        if state.room_for_a_replica(workload.gpus_per_pod, above(workload)):
            partial = in_part(workload)
            if partial is not None:
                placed = state.place_in_part(
                    partial, workload, prefer.get(key, ()), above=above(workload)
                )
        if placed is not None:
            if stands(key, placed):
                unplaced.pop(key, None)
                partly[key] = why
            continue
        if key in moving and (
            stays_as_it_runs(key, wc, partial=False)
            or stays_as_it_runs(key, partial or in_part(workload), partial=True)
        ):
            unplaced.pop(key, None)
            if key in state.placed and state.placed[key].workload_class == PARTIAL_CLASS:
                partly[key] = why
            continue
        # Diagnosed only where a part was tried: with no room for one replica the reason stands.
        unplaced[key] = _not_even_in_part(why, state, partial, workload)
    # Whatever was placed in the end is not unplaced.
    for key in list(unplaced):
        if key in state.placed:
            del unplaced[key]
    return tuple(
        _shortfall(state.placed[key], why)
        for key, why in sorted(partly.items())
        if key in state.placed and state.placed[key].workload_class == PARTIAL_CLASS
    )


def _not_even_in_part(
    why: Unplaced, state: ClusterState, partial: WorkloadClass | None, workload: Workload
) -> Unplaced:
    """Why a service is left out when not even its partial options found room: why it is not
    served whole, then what keeps the least of it out, which is what binds it now (a running
    service stopped for a higher priority was told only that its maxReplicas were too few)."""
    if partial is None:
        return why
    constraint, reason = state.diagnose(partial, workload)
    least = reason.removeprefix(f"{workload_label(workload)}: ")
    return Unplaced(why.workload, f"{why.reason}; served in part: {least}", constraint)


def _number_replicas(
    nodes: Sequence[tuple[str, ...]], running: Mapping[int, tuple[str, ...]]
) -> list[tuple[int, tuple[str, ...]]]:
    """Replica indexes 0..n-1 for a workload's placed replicas (each the nodes of its pods,
    leader first): a running replica whose nodes are one of them keeps its index there (its pods
    stay); the other replicas take the free indexes."""
    left = list(nodes)
    numbered: list[tuple[int, tuple[str, ...]]] = []
    for replica, replica_nodes in sorted(running.items()):
        if replica < len(nodes) and replica_nodes in left:
            left.remove(replica_nodes)
            numbered.append((replica, replica_nodes))
    taken = {replica for replica, _ in numbered}
    free = (replica for replica in range(len(nodes)) if replica not in taken)
    numbered += [(next(free), replica_nodes) for replica_nodes in left]
    return sorted(numbered)


def _assemble(
    plan_input: PlanInput,
    data: PlanData,
    state: ClusterState,
    model: PerformanceModel,
    unplaced: Mapping[str, Unplaced],
    *,
    held: Mapping[str, float],
    status: PlanStatus,
    objective: float,
    bound: float,
    solver: str,
    timings: Mapping[str, float],
    shortfalls: tuple[Shortfall, ...] = (),
    move_reasons: Mapping[str, MoveReason] | None = None,
) -> Plan:
    # What to write (`limits`) and what budgets count (`counted`): idle GPUs at the minimum, those
    # of a node whose agent is not ready at the maximum (nothing confirms a lower limit there),
    # except on a held budget's nodes, which are lowered to the minimum but counted as they are.
    held_nodes = _held_nodes(plan_input, held)
    limits: dict[str, list[float]] = {}
    counted: dict[str, list[float]] = {}
    clocks: dict[str, list[int | None]] = {}
    expected: dict[str, list[float]] = {}
    idle_limits: dict[str, float] = {}
    for gpu_node in plan_input.nodes:
        spec = product_spec(gpu_node.product)
        idle_counted = spec.min_watts.value if gpu_node.agent_ready else spec.max_watts.value
        idle_limit = spec.min_watts.value if gpu_node.name in held_nodes else idle_counted
        idle_limits[gpu_node.name] = idle_limit
        limits[gpu_node.name] = [idle_limit] * gpu_node.gpu_count
        counted[gpu_node.name] = [idle_counted] * gpu_node.gpu_count
        clocks[gpu_node.name] = [None] * gpu_node.gpu_count
        expected[gpu_node.name] = [model.idle_power_watts(gpu_node.product)] * gpu_node.gpu_count
    next_gpu: dict[str, int] = defaultdict(int)
    placements: list[Placement] = []
    running_pods: dict[str, dict[int, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    for current in plan_input.current:
        running_pods[current.workload][current.replica][current.rank] = current.node
    for key in sorted(state.placed):
        assignment: Assignment = state.placed[key]
        option = assignment.option
        running = {
            replica: tuple(pods[rank] for rank in sorted(pods))
            for replica, pods in running_pods[key].items()
        }
        for replica, replica_nodes in _number_replicas(assignment.replica_nodes, running):
            for rank, node in enumerate(replica_nodes):
                first = next_gpu[node]
                next_gpu[node] += option.gpus_per_pod
                for gpu in range(first, first + option.gpus_per_pod):
                    limits[node][gpu] = option.power_limit_watts
                    counted[node][gpu] = option.power_limit_watts
                    clocks[node][gpu] = option.sm_clock_mhz
                    expected[node][gpu] = option.expected_watts_per_gpu
                placements.append(
                    Placement(
                        workload=key,
                        replica=replica,
                        node=node,
                        gpus=option.gpus_per_pod,
                        variant=option.variant.name,
                        power_limit_watts=option.power_limit_watts,
                        expected_watts_per_gpu=option.expected_watts_per_gpu,
                        expected_throughput=option.throughput_per_replica
                        / option.nodes_per_replica,
                        sm_clock_mhz=option.sm_clock_mhz,
                        rank=rank,
                        nodes_per_replica=option.nodes_per_replica,
                    )
                )
    unmanaged = {
        node.name: (node.unmanaged_gpus, node.unmanaged_watts)
        for node in plan_input.nodes
        if node.unmanaged_gpus > 0
    }
    allocations = []
    for budget in plan_input.budgets:
        scope = [n for n in sorted(budget.node_names) if n in limits]
        unmanaged_watts = sum(unmanaged[n][1] for n in scope if n in unmanaged)
        allocated = budget.uncontrolled_watts + sum(sum(counted[n]) for n in scope)
        allocated += unmanaged_watts
        if budget.name not in held and allocated > budget.power_cap_watts + 1e-3:
            raise PlanInvariantError(
                f"EnergyBudget {budget.name}: allocated {allocated} W > cap "
                f"{budget.power_cap_watts} W"
            )
        allocations.append(
            BudgetAllocation(
                name=budget.name,
                cap_watts=budget.power_cap_watts,
                allocated_cap_watts=allocated,
                expected_watts=sum(sum(expected[n]) for n in scope) + unmanaged_watts,
                unmanaged_watts=unmanaged_watts,
                held=budget.name in held,
            )
        )
    return Plan(
        status=status,
        objective=objective,
        bound=bound,
        gap=_gap(objective, bound),
        solve_seconds=timings.get("solve", 0.0),
        placements=tuple(placements),
        node_power_limits_watts={name: tuple(values) for name, values in limits.items()},
        budgets=tuple(allocations),
        unplaced=tuple(unplaced[key] for key in sorted(unplaced)),
        solver=solver,
        timings_seconds=dict(timings),
        shortfalls=shortfalls,
        move_reasons=dict(move_reasons or {}),
        node_idle_limits_watts=idle_limits,
        node_unmanaged=unmanaged,
        node_sm_clocks_mhz={name: tuple(values) for name, values in clocks.items()},
    )

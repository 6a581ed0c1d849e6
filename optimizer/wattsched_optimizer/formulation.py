"""The pool-level integer program: variables, named constraints, lexicographic objective, solve.

For: turning `PlanData` (pools, workload classes, options) into a PuLP problem, solving it with an
explicitly chosen solver (HiGHS through highspy; CBC as the fallback), and returning a typed
`SolveResult` with the solver's status, the objective, the relaxation bound and the replica counts
per (class, option, pool). Not for: per-workload filtering (`options`), node choice and repair
(`packing`), or the user-facing `Plan` (`planner`). docs/optimization.md writes the model down.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import pulp

from wattsched_optimizer.options import PlanData

# Largest ratio between the admission weights of the highest and lowest priority.
MAX_PRIORITY_RANGE = 1e6


class SolveStatus(StrEnum):
    OPTIMAL = "Optimal"  # proven within the relative gap
    TIME_LIMIT = "TimeLimit"  # stopped by the time limit with a solution
    NO_SOLUTION = "NoSolution"  # the solver returned no usable solution
    EMPTY = "Empty"  # nothing to decide


@dataclass(frozen=True)
class Weights:
    """Objective coefficient of one admitted workload of class c with option o.

    coefficient(c, o) = admission[c] - quality_step * quality_loss(c, o) - relative_cost(c, o).
    """

    admission_by_class: tuple[float, ...]
    quality_step: float

    def coefficient(self, data: PlanData, class_index: int, option_index: int) -> float:
        option = data.classes[class_index].options[option_index]
        return (
            self.admission_by_class[class_index]
            - self.quality_step * option.quality_loss
            - option.relative_cost
        )


def lexicographic_weights(data: PlanData) -> Weights:
    """Weights under which the weighted sum keeps the tiers in order (docs/optimization.md).

    Per workload: relative_cost (tier 3) is at most E; one quality step (tier 2) is worth
    floor(E) + 1, more than any energy difference; admitting it is worth at least
    U = (floor(E) + 1) Q + E + 1, more than its own quality and energy terms together, so a
    workload is never left out for a better variant or level of itself. Between priorities: a
    workload of priority rank k is worth U (D + 1)^k where D is the most GPUs one workload uses;
    admitting it displaces at most D lower-priority workloads (each holds at least one GPU), so
    it is worth more than all of them. Should (D + 1)^(ranks - 1) exceed MAX_PRIORITY_RANGE, the
    factor shrinks to keep the solver's numerics sound, and the priority repair in `packing`
    (always run) keeps the rule "never leave a higher-priority workload out to fit lower ones".
    """
    if not data.classes:
        return Weights((), 1.0)
    energy_max = max(o.relative_cost for c in data.classes for o in c.options)
    quality_max = max(o.quality_loss for c in data.classes for o in c.options)
    displaced_max = max(o.gpus for c in data.classes for o in c.options)
    quality_step = math.floor(energy_max) + 1.0
    unit = quality_step * quality_max + energy_max + 1.0
    priorities = sorted({c.representative.priority for c in data.classes})
    factor = float(displaced_max + 1)
    if len(priorities) > 1:
        factor = min(factor, MAX_PRIORITY_RANGE ** (1.0 / (len(priorities) - 1)))
    rank = {priority: index for index, priority in enumerate(priorities)}
    return Weights(
        admission_by_class=tuple(
            unit * factor ** rank[c.representative.priority] for c in data.classes
        ),
        quality_step=quality_step,
    )


@dataclass(frozen=True)
class ReplicaType:
    """Replicas that use resources alike: product, GPUs per replica, power limit, eligible pools.

    Which workload a replica belongs to does not matter to any constraint, so the program counts
    replicas per (type, pool) instead of per (class, option, pool).
    """

    product: str
    gpus_per_replica: int
    power_limit_watts: float
    pools: tuple[int, ...]
    # Whole nodes one replica takes when it spans nodes; 1 otherwise.
    nodes_per_replica: int = 1


@dataclass
class Formulation:
    problem: pulp.LpProblem
    # (class, option) -> variable: how many workloads of the class run with that option.
    workloads: dict[tuple[int, int], pulp.LpVariable]
    replica_types: list[ReplicaType]
    # (class, option) -> index into replica_types.
    option_type: dict[tuple[int, int], int]
    # (type, pool) -> expression: replicas of that type in that pool.
    replicas: dict[tuple[int, int], pulp.LpAffineExpression]
    # constraint name -> what it is, for people (e.g. "budget:rack-a").
    constraint_meaning: dict[str, str]
    weights: Weights
    build_seconds: float


def _constraint(
    problem: pulp.LpProblem,
    name: str,
    terms: Mapping[pulp.LpVariable, float] | list[tuple[pulp.LpVariable, float]],
    sense: int,
    rhs: float,
) -> None:
    expression = pulp.LpAffineExpression(terms)
    problem.addConstraint(pulp.LpConstraint(expression, sense, name, rhs), name)


def build(data: PlanData) -> Formulation:
    """The pool-level model. Every constraint is named; `constraint_meaning` decodes the names."""
    started = time.perf_counter()
    problem = pulp.LpProblem("wattsched_plan", pulp.LpMaximize)
    weights = lexicographic_weights(data)
    workloads: dict[tuple[int, int], pulp.LpVariable] = {}
    meaning: dict[str, str] = {}
    objective: dict[pulp.LpVariable, float] = {}
    type_index: dict[ReplicaType, int] = {}
    option_type: dict[tuple[int, int], int] = {}
    # type -> (y, replicas per workload) terms: how many replicas of the type the choices need.
    demand: list[list[tuple[pulp.LpVariable, float]]] = []
    for workload_class in data.classes:
        c = workload_class.index
        members = len(workload_class.members)
        admit_terms: list[tuple[pulp.LpVariable, float]] = []
        for o, option in enumerate(workload_class.options):
            y = problem.add_variable(f"y_{c}_{o}", 0, members, pulp.LpInteger)
            workloads[(c, o)] = y
            objective[y] = weights.coefficient(data, c, o)
            admit_terms.append((y, 1.0))
            replica_type = ReplicaType(
                option.product,
                option.gpus_per_replica,
                option.power_limit_watts,
                workload_class.option_pools[o],
                option.nodes_per_replica,
            )
            t = type_index.setdefault(replica_type, len(type_index))
            if t == len(demand):
                demand.append([])
            demand[t].append((y, float(option.replicas)))
            option_type[(c, o)] = t
        if len(workload_class.options) > 1:
            name = f"admit_{c}"
            _constraint(problem, name, admit_terms, pulp.LpConstraintLE, members)
            meaning[name] = f"at most the {members} workloads of class {c} run"
        if workload_class.representative.key in data.protected:
            # Running and not preemptible: it keeps running (a class of its own, so one member).
            name = f"keep_{c}"
            _constraint(problem, name, admit_terms, pulp.LpConstraintGE, members)
            meaning[name] = f"running non-preemptible {workload_class.representative.key} stays"
    replica_types = list(type_index)
    replicas: dict[tuple[int, int], pulp.LpAffineExpression] = {}
    gpus_by_pool: dict[int, dict[pulp.LpVariable, float]] = defaultdict(dict)
    whole_node_by_pool: dict[int, dict[pulp.LpVariable, float]] = defaultdict(dict)
    budget_terms: dict[str, dict[pulp.LpVariable, float]] = defaultdict(dict)

    def add(terms: dict[pulp.LpVariable, float], variable: pulp.LpVariable, value: float) -> None:
        terms[variable] = terms.get(variable, 0.0) + value

    for t, replica_type in enumerate(replica_types):
        per_pool: list[tuple[int, list[tuple[pulp.LpVariable, float]]]] = []
        if len(replica_type.pools) == 1:
            # One pool: the replica count is sum(r * y), no extra variable.
            per_pool.append((replica_type.pools[0], demand[t]))
        else:
            upper = sum(r * (v.upBound or 0) for v, r in demand[t])
            link = [(v, -r) for v, r in demand[t]]
            for p in replica_type.pools:
                z = problem.add_variable(f"z_{t}_{p}", 0, upper, pulp.LpInteger)
                link.append((z, 1.0))
                per_pool.append((p, [(z, 1.0)]))
            name = f"replicas_{t}"
            _constraint(problem, name, link, pulp.LpConstraintEQ, 0)
            meaning[name] = f"replicas of type {t} add up over its pools"
        for p, terms in per_pool:
            replicas[(t, p)] = pulp.LpAffineExpression(terms)
            pool = data.pools[p]
            extra = replica_type.gpus_per_replica * (
                replica_type.power_limit_watts - pool.min_watts
            )
            for variable, per_unit in terms:
                add(gpus_by_pool[p], variable, per_unit * replica_type.gpus_per_replica)
                if replica_type.nodes_per_replica > 1:
                    # Each replica takes that many whole nodes of the pool.
                    add(whole_node_by_pool[p], variable, per_unit * replica_type.nodes_per_replica)
                elif 2 * replica_type.gpus_per_replica > pool.gpus_per_node:
                    add(whole_node_by_pool[p], variable, per_unit)
                if pool.agent_ready and extra > 0:
                    for budget in pool.budgets:
                        add(budget_terms[budget], variable, per_unit * extra)
    for p, gpu_terms in sorted(gpus_by_pool.items()):
        name = f"gpus_pool_{p}"
        _constraint(problem, name, gpu_terms, pulp.LpConstraintLE, data.pools[p].total_gpus)
        meaning[name] = "gpus"
    for p, node_terms in sorted(whole_node_by_pool.items()):
        name = f"whole_node_pool_{p}"
        nodes = len(data.pools[p].node_names)
        _constraint(problem, name, node_terms, pulp.LpConstraintLE, nodes)
        meaning[name] = "gpus"
    for index, budget in enumerate(sorted(budget_terms)):
        name = f"budget_{index}"
        headroom = data.budget_cap_watts[budget] - data.budget_base_watts[budget]
        _constraint(problem, name, budget_terms[budget], pulp.LpConstraintLE, headroom)
        meaning[name] = f"budget:{budget}"
    problem.setObjective(pulp.LpAffineExpression(objective))
    return Formulation(
        problem=problem,
        workloads=workloads,
        replica_types=replica_types,
        option_type=option_type,
        replicas=replicas,
        constraint_meaning=meaning,
        weights=weights,
        build_seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class SolveResult:
    status: SolveStatus
    solver: str
    relaxed: bool  # the LP relaxation (values may be fractional) rather than the integer program
    objective: float
    bound: float  # a valid upper bound on the integer program's optimum
    seconds: float
    # (class, option) -> workloads with that option; (replica type, pool) -> replicas there.
    workloads: Mapping[tuple[int, int], float]
    replicas: Mapping[tuple[int, int], float]


@functools.cache
def _highs_available() -> bool:
    """Whether highspy imports; also swallows the banner HiGHS prints on its first construction.

    The banner goes to the process's stdout from C++, which would corrupt `wattsched plan -o json`.
    """
    if not pulp.HiGHS(msg=False).available():
        return False
    import highspy  # noqa: PLC0415 (only to construct once with stdout closed)

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()  # type: ignore[no-untyped-call]
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return True


def solve(
    formulation: Formulation,
    *,
    solver: str,
    relaxed: bool,
    time_limit_seconds: float,
    gap: float,
) -> SolveResult:
    """Solve the program (or its LP relaxation) with the named solver: "highs" or "cbc".

    "highs" falls back to CBC when highspy is missing. The status is always read from the solver
    and mapped to `SolveStatus`; values are only returned with a usable solution.
    """
    started = time.perf_counter()
    problem = formulation.problem
    if not formulation.workloads:
        return SolveResult(SolveStatus.EMPTY, solver, relaxed, 0.0, 0.0, 0.0, {}, {})
    if solver not in ("highs", "cbc"):
        raise ValueError(f"PlanOptions.solver: {solver!r} is not one of 'highs', 'cbc'")
    if solver == "highs" and _highs_available():
        used = "highs"
        problem.solve(
            pulp.HiGHS(
                mip=not relaxed,
                msg=False,
                timeLimit=time_limit_seconds,
                gapRel=gap,
                threads=1,
                random_seed=0,
            )
        )
        model = problem.solverModel
        info = model.getInfo()
        name = model.modelStatusToString(model.getModelStatus())
        has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
        # PuLP hands HiGHS the negated objective of a maximisation.
        objective = -info.objective_function_value
        bound = objective
        if not relaxed and math.isfinite(info.mip_dual_bound):
            bound = -info.mip_dual_bound
        if name == "Optimal" and has_solution:
            status = SolveStatus.OPTIMAL
        elif name == "Time limit reached" and has_solution:
            status = SolveStatus.TIME_LIMIT
        else:
            status = SolveStatus.NO_SOLUTION
    else:
        used = "cbc"
        if not relaxed:
            # CBC reports no bound through PuLP: the LP relaxation gives one.
            problem.solve(pulp.PULP_CBC_CMD(msg=False, mip=False, threads=1))
        bound = pulp.value(problem.objective) or 0.0
        problem.solve(
            pulp.PULP_CBC_CMD(
                msg=False, mip=not relaxed, timeLimit=time_limit_seconds, gapRel=gap, threads=1
            )
        )
        objective = pulp.value(problem.objective) or 0.0
        if relaxed:
            bound = objective
        if problem.status == pulp.LpStatusOptimal and problem.sol_status == pulp.LpSolutionOptimal:
            status = SolveStatus.OPTIMAL
        elif problem.sol_status == pulp.LpSolutionIntegerFeasible:
            status = SolveStatus.TIME_LIMIT
        else:
            status = SolveStatus.NO_SOLUTION
    workloads: dict[tuple[int, int], float] = {}
    replicas: dict[tuple[int, int], float] = {}
    if status in (SolveStatus.OPTIMAL, SolveStatus.TIME_LIMIT):
        for key, variable in formulation.workloads.items():
            value = variable.varValue or 0.0
            if value > 1e-9:
                workloads[key] = value
        for replica_key, expression in formulation.replicas.items():
            value = pulp.value(expression) or 0.0
            if value > 1e-9:
                replicas[replica_key] = value
    return SolveResult(
        status=status,
        solver=used,
        relaxed=relaxed,
        objective=objective,
        bound=max(bound, objective),
        seconds=time.perf_counter() - started,
        workloads=workloads,
        replicas=replicas,
    )

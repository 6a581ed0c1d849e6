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

# Bigger exact weight ranges than this are solved in two stages (see `solve`).
SINGLE_STAGE_WEIGHT_RANGE = 1e7


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
    """Weights under which the weighted sum orders plans exactly as the tiers do.

    Energy tier total is at most E = sum_c n_c max_o relative_cost; one quality step is worth
    E + 1; all of quality and energy together at most T = (E + 1) Q + E with
    Q = sum_c n_c max_o quality_loss. One admitted workload of the lowest priority is worth T + 1,
    and one of priority rank k is worth (T + 1) (1 + sum_{j<k} n_j W_j) / (T + 1) ... i.e.
    W_k = 1 + sum_{j<k} n_j W_j in units of T + 1: more than every lower-priority workload
    together.
    """
    energy_total = sum(
        len(c.members) * max(o.relative_cost for o in c.options) for c in data.classes
    )
    quality_total = sum(
        len(c.members) * max(o.quality_loss for o in c.options) for c in data.classes
    )
    quality_step = math.floor(energy_total) + 1.0
    unit = quality_step * quality_total + math.floor(energy_total) + 1.0
    count_by_priority: dict[int, int] = defaultdict(int)
    for workload_class in data.classes:
        count_by_priority[workload_class.representative.priority] += len(workload_class.members)
    weight_by_priority: dict[int, float] = {}
    lower_total = 0.0
    for priority in sorted(count_by_priority):
        weight = 1.0 + lower_total
        weight_by_priority[priority] = weight
        lower_total += count_by_priority[priority] * weight
    return Weights(
        admission_by_class=tuple(
            unit * weight_by_priority[c.representative.priority] for c in data.classes
        ),
        quality_step=quality_step,
    )


@dataclass
class Formulation:
    problem: pulp.LpProblem
    # (class, option) -> variable: how many workloads of the class run with that option.
    workloads: dict[tuple[int, int], pulp.LpVariable]
    # (class, option, pool) -> expression (a variable, or r * y when the option has one pool).
    replicas: dict[tuple[int, int, int], pulp.LpAffineExpression]
    # constraint name -> what it is, for people (e.g. "budget:rack-a").
    constraint_meaning: dict[str, str]
    weights: Weights
    build_seconds: float


def build(data: PlanData) -> Formulation:
    """The pool-level model. Every constraint is named; `constraint_meaning` decodes the names."""
    started = time.perf_counter()
    problem = pulp.LpProblem("wattsched_plan", pulp.LpMaximize)
    weights = lexicographic_weights(data)
    workloads: dict[tuple[int, int], pulp.LpVariable] = {}
    replicas: dict[tuple[int, int, int], pulp.LpAffineExpression] = {}
    meaning: dict[str, str] = {}
    objective: dict[pulp.LpVariable, float] = {}
    gpus_by_pool: dict[int, dict[pulp.LpVariable, float]] = defaultdict(dict)
    whole_node_by_pool: dict[int, dict[pulp.LpVariable, float]] = defaultdict(dict)
    budget_terms: dict[str, dict[pulp.LpVariable, float]] = defaultdict(dict)
    pools = data.pools

    def add(terms: dict[pulp.LpVariable, float], variable: pulp.LpVariable, value: float) -> None:
        terms[variable] = terms.get(variable, 0.0) + value

    for workload_class in data.classes:
        c = workload_class.index
        members = len(workload_class.members)
        admit_terms: list[tuple[pulp.LpVariable, float]] = []
        for o, option in enumerate(workload_class.options):
            y = problem.add_variable(f"y_{c}_{o}", 0, members, pulp.LpInteger)
            workloads[(c, o)] = y
            objective[y] = weights.coefficient(data, c, o)
            admit_terms.append((y, 1.0))
            option_pools = workload_class.option_pools[o]
            per_pool: list[tuple[int, pulp.LpVariable, float]] = []
            if len(option_pools) == 1:
                # One pool: the replica count is r * y, no extra variable.
                per_pool.append((option_pools[0], y, float(option.replicas)))
            else:
                link: list[tuple[pulp.LpVariable, float]] = [(y, -float(option.replicas))]
                for p in option_pools:
                    z = problem.add_variable(
                        f"z_{c}_{o}_{p}", 0, option.replicas * members, pulp.LpInteger
                    )
                    link.append((z, 1.0))
                    per_pool.append((p, z, 1.0))
                name = f"replicas_{c}_{o}"
                problem.addConstraint(
                    pulp.LpConstraint(pulp.LpAffineExpression(link), pulp.LpConstraintEQ, name, 0),
                    name,
                )
                meaning[name] = f"replicas of class {c} option {o} add up over pools"
            for p, variable, per_unit in per_pool:
                replicas[(c, o, p)] = pulp.LpAffineExpression([(variable, per_unit)])
                pool = pools[p]
                add(gpus_by_pool[p], variable, per_unit * option.gpus_per_replica)
                if 2 * option.gpus_per_replica > pool.gpus_per_node:
                    add(whole_node_by_pool[p], variable, per_unit)
                if pool.agent_ready and pool.budgets:
                    extra = option.power_limit_watts - pool.min_watts
                    if extra > 0:
                        for budget in pool.budgets:
                            add(
                                budget_terms[budget],
                                variable,
                                per_unit * option.gpus_per_replica * extra,
                            )
        if len(workload_class.options) > 1:
            name = f"admit_{c}"
            problem.addConstraint(
                pulp.LpConstraint(
                    pulp.LpAffineExpression(admit_terms), pulp.LpConstraintLE, name, members
                ),
                name,
            )
            meaning[name] = f"at most the {members} workloads of class {c} run"
    for p, terms in sorted(gpus_by_pool.items()):
        name = f"gpus_pool_{p}"
        problem.addConstraint(
            pulp.LpConstraint(
                pulp.LpAffineExpression(terms), pulp.LpConstraintLE, name, pools[p].total_gpus
            ),
            name,
        )
        meaning[name] = "gpus"
    for p, terms in sorted(whole_node_by_pool.items()):
        name = f"whole_node_pool_{p}"
        problem.addConstraint(
            pulp.LpConstraint(
                pulp.LpAffineExpression(terms),
                pulp.LpConstraintLE,
                name,
                len(pools[p].node_names),
            ),
            name,
        )
        meaning[name] = "gpus"
    for index, budget in enumerate(sorted(budget_terms)):
        name = f"budget_{index}"
        headroom = data.budget_cap_watts[budget] - data.budget_base_watts[budget]
        problem.addConstraint(
            pulp.LpConstraint(
                pulp.LpAffineExpression(budget_terms[budget]),
                pulp.LpConstraintLE,
                name,
                headroom,
            ),
            name,
        )
        meaning[name] = f"budget:{budget}"
    problem.setObjective(pulp.LpAffineExpression(objective))
    return Formulation(
        problem=problem,
        workloads=workloads,
        replicas=replicas,
        constraint_meaning=meaning,
        weights=weights,
        build_seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class SolveResult:
    status: SolveStatus
    solver: str
    objective: float
    bound: float
    seconds: float
    # (class, option, pool) -> replicas placed there.
    replicas: Mapping[tuple[int, int, int], int]


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
    formulation: Formulation, solver: str, time_limit_seconds: float, gap: float
) -> SolveResult:
    """Solve with the named solver ("highs", or "cbc"; "highs" falls back to CBC if unavailable)."""
    started = time.perf_counter()
    problem = formulation.problem
    if not formulation.workloads:
        return SolveResult(SolveStatus.EMPTY, solver, 0.0, 0.0, 0.0, {})
    if solver == "highs" and _highs_available():
        used = "highs"
        highs = pulp.HiGHS(
            msg=False,
            timeLimit=time_limit_seconds,
            gapRel=gap,
            threads=1,
            random_seed=0,
        )
        problem.solve(highs)
        model = problem.solverModel
        info = model.getInfo()
        highs_status = model.getModelStatus()
        name = model.modelStatusToString(highs_status)
        has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
        objective = -info.objective_function_value
        bound = -info.mip_dual_bound if math.isfinite(info.mip_dual_bound) else objective
        if name == "Optimal":
            status = SolveStatus.OPTIMAL
        elif name == "Time limit reached" and has_solution:
            status = SolveStatus.TIME_LIMIT
        else:
            status = SolveStatus.NO_SOLUTION
    elif solver in ("highs", "cbc"):
        used = "cbc"
        cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_seconds, gapRel=gap, threads=1)
        # The LP relaxation first, for the bound; then the integer program.
        problem.solve(pulp.PULP_CBC_CMD(msg=False, mip=False))
        bound = pulp.value(problem.objective) or 0.0
        problem.solve(cbc)
        objective = pulp.value(problem.objective) or 0.0
        if problem.status == pulp.LpStatusOptimal and problem.sol_status == pulp.LpSolutionOptimal:
            status = SolveStatus.OPTIMAL
        elif problem.sol_status == pulp.LpSolutionIntegerFeasible:
            status = SolveStatus.TIME_LIMIT
        else:
            status = SolveStatus.NO_SOLUTION
    else:
        raise ValueError(f"PlanOptions.solver: {solver!r} is not one of 'highs', 'cbc'")
    counts: dict[tuple[int, int, int], int] = {}
    if status in (SolveStatus.OPTIMAL, SolveStatus.TIME_LIMIT):
        for key, expression in formulation.replicas.items():
            value = pulp.value(expression)
            count = round(value) if value is not None else 0
            if count > 0:
                counts[key] = count
    return SolveResult(
        status=status,
        solver=used,
        objective=objective,
        bound=max(bound, objective),
        seconds=time.perf_counter() - started,
        replicas=counts,
    )

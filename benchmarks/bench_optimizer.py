"""Benchmark of the optimizer on generated clusters, against a straightforward formulation.

For: printing, per instance, build/solve/pack seconds, end-to-end median, objective, bound, gap,
peak memory, and the same instance built and solved by a straightforward model (a variable per
workload x pool x level x variant, built with lpSum, no classes, no pruning) as the baseline ratio.
Not a test: it asserts nothing and only prints figures (docs/benchmarks.md records them).

Run: `.venv/bin/python benchmarks/bench_optimizer.py [--sizes small,large,small-unique]
[--repeat 5] [--baseline-time-limit 60] [--skip-baseline]` (each instance in its own process).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict

import pulp

from wattsched_optimizer.formulation import lexicographic_weights
from wattsched_optimizer.model import CatalogueModel, product_spec
from wattsched_optimizer.options import PlanData, build_plan_data, workload_options
from wattsched_optimizer.planner import plan
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    Plan,
    PlanInput,
    PlanOptions,
    Precision,
    Variant,
    WorkAmount,
    Workload,
    WorkloadType,
    WorkUnit,
)

PRODUCT_SHARES = (("H100-80GB", 0.4), ("A100-80GB", 0.3), ("L40S", 0.2), ("L4", 0.1))
RACKS = 4
TEMPLATES = 60
PRIORITIES = (0, 10, 100, 1000)
# gpus per replica -> model size (billions of parameters), bf16 memory per GPU (GiB)
SIZES = {1: (8.0, 20.0), 2: (13.0, 20.0), 4: (34.0, 24.0), 8: (70.0, 24.0)}
# Share of 8-GPU templates turned into a 405B-class replica spanning 2 whole nodes (16 GPUs,
# spec.gpu.nodesPerReplica 2; bf16 about 810 GB of weights, 56 GiB per GPU with KV headroom).
SPANNING_SHARE = 0.25
SPANNING = (405.0, 56.0)


def generate(
    nodes_count: int, workloads_count: int, templates_count: int = TEMPLATES, seed: int = 7
) -> PlanInput:
    """A cluster of 8-GPU nodes (4 products, 4 racks, 1% agents not ready) and mixed workloads.

    Workloads are drawn from `templates_count` configurations x 4 priorities: clusters run many
    workloads that share a configuration, which is what class aggregation exploits. With as
    many templates as workloads almost every workload is its own class (the worst case). A share
    of the 8-GPU templates (`SPANNING_SHARE`) spans 2 nodes, drawn from a stream of its own so
    that every other draw is what it was before replicas could span nodes.
    """
    rng = random.Random(seed)
    spanning_rng = random.Random(seed + 1)
    nodes = []
    for i in range(nodes_count):
        roll, product = rng.random(), PRODUCT_SHARES[-1][0]
        for name, share in PRODUCT_SHARES:
            if roll < share:
                product = name
                break
            roll -= share
        nodes.append(GpuNode(f"node-{i:05d}", product, 8, agent_ready=rng.random() > 0.01))
    templates = []
    for t in range(templates_count):
        workload_type = rng.choices(list(WorkloadType), weights=[0.4, 0.2, 0.15, 0.25], k=1)[0]
        gpus = rng.choice([1, 1, 2, 4, 8])
        params, memory = SIZES[gpus]
        nodes_per_replica = 1
        if gpus == 8 and spanning_rng.random() < SPANNING_SHARE:
            (params, memory), nodes_per_replica = SPANNING, 2
        variants = [Variant("bf16", Precision.BF16, memory, 1.0, 1.0)]
        if rng.random() < 0.5:
            variants.append(Variant("fp8", Precision.FP8, memory / 2, 1.6, 0.97))
        base = Workload(
            key=f"template-{t}",
            type=workload_type,
            model_parameters_billions=params,
            gpus_per_replica=gpus * nodes_per_replica,
            nodes_per_replica=nodes_per_replica,
            variants=tuple(variants),
            policy=rng.choice(list(EnergyPolicy)),
            min_quality=rng.choice([0.0, 0.95, 0.99]),
        )
        if workload_type is WorkloadType.INFERENCE:
            base = dataclasses.replace(
                base,
                min_replicas=1,
                max_replicas=rng.choice([2, 4, 8]),
                tokens_per_second=rng.choice([0.5, 1.0, 2.0]) * 40000 / params,
            )
        else:
            replicas = rng.choice([1, 1, 2, 4])
            deadline = rng.choice([None, None, 4 * 3600.0])
            work = None
            if deadline is not None:
                rate = 65933 / params * gpus * nodes_per_replica * replicas * 0.6
                work = WorkAmount(WorkUnit.TOKENS, rate * deadline)
            base = dataclasses.replace(
                base, replicas=replicas, remaining_work=work, deadline_seconds=deadline
            )
        templates.append(base)
    workloads = tuple(
        dataclasses.replace(
            rng.choice(templates), key=f"team-{i % 50}/job-{i:05d}", priority=rng.choice(PRIORITIES)
        )
        for i in range(workloads_count)
    )
    spans = [
        (product_spec(n.product).min_watts.value, product_spec(n.product).max_watts.value)
        for n in nodes
    ]

    def idle_and_span(indexes: list[int]) -> tuple[float, float]:
        idle = sum(spans[i][0] * 8 if nodes[i].agent_ready else spans[i][1] * 8 for i in indexes)
        span = sum((spans[i][1] - spans[i][0]) * 8 for i in indexes if nodes[i].agent_ready)
        return idle, span

    budgets = []
    everything = list(range(nodes_count))
    idle, span = idle_and_span(everything)
    budgets.append(Budget("cluster", idle + 0.45 * span, frozenset(n.name for n in nodes)))
    for rack in range(RACKS):
        members = [i for i in everything if i % RACKS == rack]
        idle, span = idle_and_span(members)
        budgets.append(
            Budget(
                f"rack-{rack}",
                idle + (0.4 + 0.1 * rack) * span,
                frozenset(nodes[i].name for i in members),
            )
        )
    return PlanInput(tuple(nodes), workloads, tuple(budgets), options=PlanOptions())


def baseline(plan_input: PlanInput, time_limit_seconds: float) -> dict[str, float | str]:
    """The straightforward model: per workload x pool x level x variant, lpSum, no pruning."""
    started = time.perf_counter()
    model = CatalogueModel()
    data: PlanData = build_plan_data(plan_input, model)
    weights = lexicographic_weights(data)
    problem = pulp.LpProblem("baseline", pulp.LpMaximize)
    objective_terms = []
    gpus_by_pool: dict[int, list[pulp.LpAffineExpression]] = defaultdict(list)
    whole_by_pool: dict[int, list[pulp.LpAffineExpression]] = defaultdict(list)
    budget_terms: dict[str, list[pulp.LpAffineExpression]] = defaultdict(list)
    class_of = {m.key: c.index for c in data.classes for m in c.members}
    for workload in plan_input.workloads:
        options, option_pools = workload_options(
            workload,
            pools=data.pools,
            model=model,
            levels=plan_input.options.power_levels,
            current=(),
            node_by_name=data.node_by_name,
            churn_threshold=plan_input.options.churn_threshold,
            prune=False,
        )
        if not options:
            continue
        choose = []
        for o, option in enumerate(options):
            y = problem.add_variable(f"y_{workload.key}_{o}", 0, 1, pulp.LpInteger)
            choose.append(y)
            coefficient = (
                weights.admission_by_class[class_of[workload.key]]
                - weights.quality_step * option.quality_loss
                - option.relative_cost
            )
            objective_terms.append(coefficient * y)
            z = {
                p: problem.add_variable(
                    f"z_{workload.key}_{o}_{p}", 0, option.replicas, pulp.LpInteger
                )
                for p in option_pools[o]
            }
            problem += pulp.lpSum(z.values()) == option.replicas * y
            for p, variable in z.items():
                pool = data.pools[p]
                gpus_by_pool[p].append(option.gpus_per_replica * variable)
                if option.nodes_per_replica > 1:
                    whole_by_pool[p].append(option.nodes_per_replica * variable)
                elif 2 * option.gpus_per_replica > pool.gpus_per_node:
                    whole_by_pool[p].append(variable)
                if pool.agent_ready:
                    extra = option.gpus_per_replica * (option.power_limit_watts - pool.min_watts)
                    for budget in pool.budgets:
                        budget_terms[budget].append(extra * variable)
        problem += pulp.lpSum(choose) <= 1
    for p, terms in gpus_by_pool.items():
        problem += pulp.lpSum(terms) <= data.pools[p].total_gpus
    for p, terms in whole_by_pool.items():
        problem += pulp.lpSum(terms) <= len(data.pools[p].node_names)
    for budget, terms in budget_terms.items():
        headroom = data.budget_cap_watts[budget] - data.budget_base_watts[budget]
        problem += pulp.lpSum(terms) <= headroom
    problem += pulp.lpSum(objective_terms)
    build_seconds = time.perf_counter() - started
    relaxed_started = time.perf_counter()
    problem.solve(
        pulp.HiGHS(msg=False, mip=False, timeLimit=time_limit_seconds, threads=1, random_seed=0)
    )
    relaxed_seconds = time.perf_counter() - relaxed_started
    relaxed_status = problem.solverModel.modelStatusToString(problem.solverModel.getModelStatus())
    relaxed_objective = -problem.solverModel.getInfo().objective_function_value
    solve_started = time.perf_counter()
    problem.solve(
        pulp.HiGHS(msg=False, timeLimit=time_limit_seconds, gapRel=0.01, threads=1, random_seed=0)
    )
    solve_seconds = time.perf_counter() - solve_started
    info = problem.solverModel.getInfo()
    return {
        "lp_s": relaxed_seconds,
        "lp_status": relaxed_status,
        "lp_objective": relaxed_objective,
        "build_s": build_seconds,
        "solve_s": solve_seconds,
        "total_s": build_seconds + solve_seconds,
        "status": problem.solverModel.modelStatusToString(problem.solverModel.getModelStatus()),
        "objective": -info.objective_function_value,
        "bound": -info.mip_dual_bound,
        "variables": float(len(problem.variables())),
    }


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(
    name: str,
    nodes: int,
    workloads: int,
    templates: int,
    *,
    repeat: int,
    baseline_limit: float | None,
) -> None:
    plan_input = generate(nodes, workloads, templates)
    data = build_plan_data(plan_input, CatalogueModel())
    options = sum(len(c.options) for c in data.classes)
    print(
        f"\n## {name}: {nodes} nodes x 8 GPUs ({nodes * 8} GPUs), {workloads} workloads "
        f"from {templates} templates"
    )
    print(
        f"pools {len(data.pools)}, classes {len(data.classes)}, options after pruning {options}, "
        f"workloads with no option {len(data.no_option)}"
    )
    totals, cpu_totals, results = [], [], []
    for _ in range(repeat):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = plan(plan_input)
        totals.append(time.perf_counter() - started)
        cpu_totals.append(time.process_time() - cpu_started)
        results.append(result)
    rss_after_main = rss_mib()
    result = results[-1]
    t = result.timings_seconds
    placed = len({p.workload for p in result.placements})
    spanning = {w.key for w in plan_input.workloads if w.spans_nodes}
    placed_spanning = len({p.workload for p in result.placements if p.workload in spanning})
    print(
        f"end to end median {statistics.median(totals):.3f} s wall, "
        f"{statistics.median(cpu_totals):.3f} s CPU (wall min {min(totals):.3f}, "
        f"max {max(totals):.3f}, n={repeat}); last run: data {t['data']:.3f} s, "
        f"build {t['build']:.3f} s, solve {t['solve']:.3f} s, pack {t['pack']:.3f} s"
    )
    print(
        f"status {result.status}, objective {result.objective:.6g}, bound {result.bound:.6g}, "
        f"gap {result.gap:.4%}, placed {placed}, unplaced {len(result.unplaced)}; "
        f"spanning 2 nodes: {len(spanning)} workloads, {placed_spanning} placed"
    )
    replan(plan_input, result, repeat)
    tracemalloc.start()
    plan(plan_input)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"peak Python allocations (tracemalloc) {peak / 2**20:.1f} MiB; process max RSS "
        f"{rss_after_main:.0f} MiB (instance, plans and interpreter; before any baseline)"
    )
    if baseline_limit is None:
        return
    base = baseline(plan_input, baseline_limit)
    print(
        f"baseline: build {base['build_s']:.3f} s, solve {base['solve_s']:.3f} s "
        f"(HiGHS: {base['status']}, time limit {baseline_limit:g} s), "
        f"{base['variables']:.0f} variables, objective {base['objective']:.6g}, "
        f"bound {base['bound']:.6g}"
    )
    print(
        f"baseline LP relaxation alone: {base['lp_s']:.3f} s (HiGHS: {base['lp_status']}, "
        f"objective {base['lp_objective']:.6g})"
    )
    print(
        f"speed-up vs baseline: {float(base['total_s']) / statistics.median(totals):.1f}x "
        f"(baseline build + integer solve {float(base['total_s']):.3f} s)"
    )


def replan(plan_input: PlanInput, result: Plan, repeat: int) -> None:
    """The next round's plan: every placement of `result` running. Each running workload is a
    class of its own; the baseline, in the same run, builds their options one at a time, as
    the optimizer did before running workloads alike shared them."""
    current = tuple(
        CurrentPlacement(p.workload, p.replica, p.node, p.variant, p.power_limit_watts, p.rank)
        for p in result.placements
    )
    again = dataclasses.replace(plan_input, current=current)
    totals, inputs = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        replanned = plan(again)
        totals.append(time.perf_counter() - started)
        inputs.append(replanned.timings_seconds["data"])
    model = CatalogueModel()
    data = build_plan_data(again, model)
    by_key = {w.key: w for w in again.workloads}
    running: dict[str, list[CurrentPlacement]] = defaultdict(list)
    for placement in current:
        running[placement.workload].append(placement)
    node_by_name = {node.name: node for node in again.nodes}
    started = time.perf_counter()
    for key, placements in running.items():
        workload_options(
            by_key[key],
            pools=data.pools,
            model=model,
            levels=again.options.power_levels,
            current=sorted(placements, key=lambda c: (c.replica, c.rank)),
            node_by_name=node_by_name,
            churn_threshold=again.options.churn_threshold,
            startup_seconds=again.options.startup_seconds,
            sm_clocks=again.options.sm_clocks,
        )
    one_at_a_time = time.perf_counter() - started
    print(
        f"re-plan with the {len(current)} placed pods running ({len(running)} workloads): "
        f"median {statistics.median(totals):.3f} s, its input (data) median "
        f"{statistics.median(inputs):.3f} s (n={repeat}); baseline: the running workloads' "
        f"options built one at a time {one_at_a_time:.3f} s"
    )


INSTANCES = {
    "small": (1000, 2000, TEMPLATES),
    "large": (4000, 8000, TEMPLATES),
    "small-unique": (1000, 2000, 2000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="small,large,small-unique")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline-time-limit", type=float, default=60.0)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    names = args.sizes.split(",")
    if len(names) > 1:
        # One process per instance, so that the peak RSS of one does not carry into the next.
        print(f"load average before: {os.getloadavg()}, CPUs: {os.cpu_count()}", flush=True)
        for name in names:
            command = [sys.executable, __file__, "--sizes", name, "--repeat", str(args.repeat)]
            command += ["--baseline-time-limit", str(args.baseline_time_limit)]
            command += ["--skip-baseline"] if args.skip_baseline else []
            subprocess.run(command, check=True)
        print(f"\nload average after: {os.getloadavg()}")
        return
    nodes, workloads, templates = INSTANCES[names[0]]
    run(
        names[0],
        nodes,
        workloads,
        templates,
        repeat=args.repeat,
        baseline_limit=None if args.skip_baseline else args.baseline_time_limit,
    )
    print(f"load average now: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()

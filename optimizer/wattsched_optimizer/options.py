"""The data step of planning: pools of identical nodes, classes of identical workloads, options.

For: turning a `PlanInput` into the small, aggregated sets the formulation works on: `Pool`s
(nodes alike in product, GPU count, agent readiness, budget membership and whether they take new
replicas; a cordoned node's pool only keeps what runs there),
`WorkloadClass`es (workloads alike in everything but their name), and per class the `Option`s
(product, variant, power level, locked SM clock, replica count) that meet every per-workload hard
constraint (allow-list, memory, quality, maxPowerWattsPerGPU, policy, SLO, deadline), with dominated
options pruned. Workloads with no option get the reason here. Not for: building or solving the LP
(`formulation`) or choosing nodes (`packing`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wattsched_optimizer.model import (
    PerformanceModel,
    power_levels_watts,
    product_spec,
    sm_clock_effect,
    sm_clock_levels_mhz,
)
from wattsched_optimizer.problem import (
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    PlanInput,
    PlanOptions,
    Variant,
    Workload,
    WorkloadType,
    WorkUnit,
)

# Workloads with equal values of every field but `key` form one class.
_CLASS_KEY = operator.attrgetter(*(f.name for f in dataclasses.fields(Workload) if f.name != "key"))
# Quality is compared in steps of 0.01.
QUALITY_STEPS = 100
# Balanced locks only clocks that keep at least this share of the unlocked throughput (modelled):
# the latency a lower clock adds is part of what it balances; Efficiency takes any clock that pays.
BALANCED_MIN_CLOCK_THROUGHPUT = 0.98
# Added to the cost of moving a running replica, so that an equal-cost move keeps it in place.
STABILITY_TIE_BREAK = 1e-6


@dataclass(frozen=True)
class Pool:
    """GPU nodes that are interchangeable for the optimizer.

    A pool that is not `schedulable` (cordoned nodes) only keeps the replicas running there: it is
    offered to no other workload, and packing puts no new replica on it.
    """

    index: int
    product: str
    gpus_per_node: int
    agent_ready: bool
    budgets: frozenset[str]
    node_names: tuple[str, ...]
    min_watts: float
    max_watts: float
    # Memory per GPU: the nodes' label where they have one, else the product's.
    memory_gib: float
    schedulable: bool = True

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * len(self.node_names)


def pool_fits_replica(pool: Pool, workload: Workload) -> bool:
    """Whether a replica of `workload` fits nodes of `pool`: one node with enough GPUs, or, for a
    replica that spans nodes, `nodes_per_replica` whole nodes of the pool with exactly its GPUs
    per pod each (a replica never mixes products or pools)."""
    if workload.spans_nodes:
        return (
            pool.gpus_per_node == workload.gpus_per_pod
            and len(pool.node_names) >= workload.nodes_per_replica
        )
    return pool.gpus_per_node >= workload.gpus_per_replica


@dataclass(frozen=True)
class Option:
    """One way to run a workload: every replica on `product` with this variant and limit."""

    product: str
    variant: Variant
    power_limit_watts: float
    is_max_level: bool
    replicas: int
    gpus_per_replica: int
    throughput_per_replica: float  # tokens/s
    expected_watts_per_gpu: float
    # Tier 3: expected J per useful token relative to the class's cheapest option, minus 1 (>= 0).
    relative_cost: float
    # Tier 2: quality steps below the best variant the policy prefers (0 under Efficiency).
    quality_loss: int
    # Tier 4: the option keeps a running replica's product and variant.
    keeps_current: bool = False
    # Slowest replicas' worth of an Inference demand this option leaves unserved (0: all served;
    # only the partial options of `workload_options(partial=True)` leave any).
    shortfall_steps: int = 0
    # SM clock (MHz) to lock the replicas' GPUs at; None: left to the driver. Never a cap: the
    # budget counts `power_limit_watts` whatever the clock.
    sm_clock_mhz: int | None = None
    # A replica spans this many whole nodes (its workload's nodes_per_replica).
    nodes_per_replica: int = 1

    @property
    def gpus(self) -> int:
        return self.replicas * self.gpus_per_replica

    @property
    def gpus_per_pod(self) -> int:
        """GPUs of one pod: the whole replica's, or one node's share when it spans nodes."""
        return self.gpus_per_replica // self.nodes_per_replica


@dataclass(frozen=True)
class WorkloadClass:
    """Workloads that differ only in name (running workloads are always alone in theirs)."""

    index: int
    members: tuple[Workload, ...]
    options: tuple[Option, ...]
    # Pools each option may use, by position in `options`.
    option_pools: tuple[tuple[int, ...], ...]
    # Nodes running this (single) workload now, when the optimizer should keep it there.
    pinned_nodes: frozenset[str] = frozenset()

    @property
    def representative(self) -> Workload:
        return self.members[0]


@dataclass(frozen=True)
class NoOption:
    """Why a workload cannot run anywhere, whatever else happens."""

    constraint: str
    reason: str


@dataclass(frozen=True)
class PlanData:
    pools: tuple[Pool, ...]
    classes: tuple[WorkloadClass, ...]
    no_option: Mapping[str, NoOption]
    # Per budget: watts its GPUs count for whatever is placed (idle minimum, or maximum where the
    # agent is not ready), and the cap.
    budget_base_watts: Mapping[str, float]
    budget_cap_watts: Mapping[str, float]
    node_by_name: Mapping[str, GpuNode]
    # Running workloads the optimizer may not stop (`preemptible` false, every replica on a
    # schedulable node): the program keeps them admitted and the repair never evicts them.
    protected: frozenset[str] = frozenset()


def workload_label(workload: Workload) -> str:
    return key_label(workload.key)


def key_label(key: str) -> str:
    """How reasons name a workload: `LLMWorkload <namespace>/<name>`."""
    return f"LLMWorkload {key}"


def replica_count_field(workload: Workload) -> str:
    """The spec field that sets how many replicas a workload asks for: gangs (Training,
    FineTuning, BatchInference) have only spec.replicas; Inference scales within its minimum."""
    return "spec.replicas" if workload.type.is_gang else "spec.minReplicas"


def duration_text(seconds: float) -> str:
    """A duration rounded for people: `45 s`, `12 min`, `2.6 h`, `3.2 days`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def reference_tokens_per_gpu_hour(model: PerformanceModel, workload: Workload) -> float:
    """Tokens one reference GPU (H100-80GB at its maximum limit, bf16) processes in an hour."""
    spec = product_spec("H100-80GB")
    return 3600.0 * model.throughput_tokens_per_second(
        "H100-80GB",
        workload.type,
        workload.model_parameters_billions,
        1,
        1.0,
        spec.max_watts.value,
    )


def remaining_tokens(model: PerformanceModel, workload: Workload) -> float | None:
    work = workload.remaining_work
    if work is None:
        return None
    if work.unit is WorkUnit.TOKENS:
        return work.amount
    if work.unit is WorkUnit.STEPS:
        if work.tokens_per_step is None:
            raise ValueError(
                f"{workload_label(workload)}: spec.slo.totalWork.steps needs tokensPerStep"
            )
        return work.amount * work.tokens_per_step
    return work.amount * reference_tokens_per_gpu_hour(model, workload)


def build_pools(plan_input: PlanInput) -> tuple[Pool, ...]:
    budgets_of: dict[str, set[str]] = defaultdict(set)
    for budget in plan_input.budgets:
        for node_name in budget.node_names:
            budgets_of[node_name].add(budget.name)
    groups: dict[tuple[str, int, bool, frozenset[str], bool, float], list[str]] = defaultdict(list)
    for node in plan_input.nodes:
        if not (node.schedulable or node.keeps_running) or node.gpu_count < 1:
            continue
        memory = product_spec(node.product).memory_gib.value
        if node.memory_gib is not None:
            memory = node.memory_gib
        key = (
            node.product,
            node.gpu_count,
            node.agent_ready,
            frozenset(budgets_of[node.name]),
            node.schedulable,
            memory,
        )
        groups[key].append(node.name)
    pools = []
    order = sorted(groups, key=lambda k: (not k[4], k[0], k[1], k[2], sorted(k[3]), k[5]))
    for index, key in enumerate(order):
        product, gpus_per_node, agent_ready, budgets, schedulable, memory = key
        spec = product_spec(product)
        pools.append(
            Pool(
                index=index,
                product=product,
                gpus_per_node=gpus_per_node,
                agent_ready=agent_ready,
                budgets=budgets,
                node_names=tuple(sorted(groups[key])),
                min_watts=spec.min_watts.value,
                max_watts=spec.max_watts.value,
                schedulable=schedulable,
                memory_gib=memory,
            )
        )
    return tuple(pools)


def budget_base_watts(plan_input: PlanInput) -> dict[str, float]:
    """Per budget: the sum of its GPUs' limits with nothing placed.

    Idle GPUs count at their minimum; GPUs of nodes whose agent is not ready at their maximum;
    GPUs held by pods wattsched did not create at the limits they run at (`unmanaged_watts`);
    the watts the plan does not control (`Budget.uncontrolled_watts`) as they are.
    """
    by_name = {node.name: node for node in plan_input.nodes}
    base: dict[str, float] = {}
    for budget in plan_input.budgets:
        total = budget.uncontrolled_watts
        for node_name in budget.node_names:
            node = by_name.get(node_name)
            if node is None:
                continue
            spec = product_spec(node.product)
            per_gpu = spec.min_watts.value if node.agent_ready else spec.max_watts.value
            total += per_gpu * node.gpu_count + node.unmanaged_watts
        base[budget.name] = total
    return base


def _memory_need_gib(workload: Workload, variant: Variant) -> float:
    return variant.min_memory_gib if variant.min_memory_gib > 0 else workload.min_memory_gib_per_gpu


def _levels_for(
    workload: Workload, product: str, levels: int, current: float | None
) -> list[float]:
    spec = product_spec(product)
    cap = spec.max_watts.value
    if workload.max_power_watts_per_gpu is not None:
        cap = min(cap, workload.max_power_watts_per_gpu)
    if cap < spec.min_watts.value:
        return []
    if workload.policy is EnergyPolicy.PERFORMANCE:
        return [cap]
    chosen = {level for level in power_levels_watts(product, levels) if level <= cap}
    chosen.add(cap)
    if current is not None and spec.min_watts.value <= current <= cap:
        chosen.add(current)
    return sorted(chosen)


def _clocks_for(workload: Workload, product: str, sm_clocks: bool) -> list[int | None]:
    """Unlocked, plus the locked SM clocks the catalogue says pay for this work (decode-bound
    inference): any under Efficiency, those keeping `BALANCED_MIN_CLOCK_THROUGHPUT` under
    Balanced; Performance never locks clocks, nor does a plan with `PlanOptions.sm_clocks` off."""
    if workload.policy is EnergyPolicy.PERFORMANCE or not sm_clocks:
        return [None]
    levels = sm_clock_levels_mhz(product, workload.type)
    if workload.policy is EnergyPolicy.BALANCED:
        levels = tuple(
            clock
            for clock in levels
            if sm_clock_effect(product, workload.type, clock)[0] >= BALANCED_MIN_CLOCK_THROUGHPUT
        )
    return [None, *levels]


def replica_tokens_per_second(
    model: PerformanceModel,
    workload: Workload,
    product: str,
    *,
    relative_throughput: float,
    level: float,
    sm_clock_mhz: int | None = None,
) -> float:
    """Modelled tokens/s of one replica of the workload on `product` at this power limit, for a
    variant of this relative throughput (clock unlocked, or locked at `sm_clock_mhz` under the
    limit)."""
    return model.throughput_tokens_per_second(
        product,
        workload.type,
        workload.model_parameters_billions,
        workload.gpus_per_replica,
        relative_throughput,
        level,
        sm_clock_mhz=sm_clock_mhz,
    )


def _clocked(
    model: PerformanceModel,
    workload: Workload,
    product: str,
    *,
    relative_throughput: float,
    level: float,
    sm_clock_mhz: int,
) -> tuple[float, float] | None:
    """(tokens/s per replica, expected watts per GPU) at this limit with the clock locked, or None
    where the lock does not keep the draw under the limit (the cap, not the clock, then sets the
    clock: the lock adds nothing). Under the limit the cap never triggers, so throughput is the
    unlocked maximum's times the clock's fraction (Ma et al.: the cap is not on decode's path)."""
    spec = product_spec(product)
    _, draw_fraction = sm_clock_effect(product, workload.type, sm_clock_mhz)
    unlocked_watts = model.expected_power_watts(product, workload.type, spec.max_watts.value)
    watts = max(model.idle_power_watts(product), unlocked_watts * draw_fraction)
    if watts > level:
        return None
    throughput = replica_tokens_per_second(
        model,
        workload,
        product,
        relative_throughput=relative_throughput,
        level=level,
        sm_clock_mhz=sm_clock_mhz,
    )
    return throughput, watts


def prune_dominated(
    candidates: Sequence[tuple[Option, tuple[int, ...]]],
) -> list[tuple[Option, tuple[int, ...]]]:
    """Drop (option, pools) pairs that another pair dominates (of equal ones, the first stays).

    `a` dominates `b` (same product) when `a` may use every pool `b` may (an option below the
    maximum level cannot use nodes whose agent is not ready), is no worse in quality loss, energy
    cost and stability, and uses no more GPUs and no more budget watts (what the replicas add
    over their GPUs' idle minimum, as budgets count). Dominance is transitive, so each candidate,
    in an order where dominators come first, is only compared with the ones kept so far.
    """

    def signature(index: int) -> tuple[int, float, float, int, float, int, int, int]:
        option, pools = candidates[index]
        idle = product_spec(option.product).min_watts.value
        extra = option.gpus * (option.power_limit_watts - idle)
        return (
            option.shortfall_steps,
            option.quality_loss,
            option.relative_cost,
            option.gpus,
            extra,
            -int(option.keeps_current),
            -len(pools),
            index,
        )

    signatures = [signature(i) for i in range(len(candidates))]
    kept: list[int] = []
    for index in sorted(range(len(candidates)), key=signatures.__getitem__):
        option, pools = candidates[index]
        mine = signatures[index]
        dominated = False
        for other in kept:
            theirs = signatures[other]
            if (
                candidates[other][0].product == option.product
                and all(theirs[i] <= mine[i] for i in range(6))
                and set(candidates[other][1]) >= set(pools)
            ):
                dominated = True
                break
        if not dominated:
            kept.append(index)
    return [candidates[i] for i in sorted(kept)]


def _no_option_reason(
    workload: Workload, pools: Sequence[Pool], model: PerformanceModel
) -> NoOption:
    """The first per-workload filter that leaves nothing, as a sentence a person can act on.

    Filters apply in order, each to what the previous ones left: allow-list, GPUs per node,
    quality, memory, maxPowerWattsPerGPU, then the SLO or deadline (`deadline_passed` when no
    time is left at all, `deadline` when the time left is too short).
    """
    label = workload_label(workload)
    products = sorted({pool.product for pool in pools})
    allowed = [
        p for p in products if not workload.allowed_products or p in workload.allowed_products
    ]
    if not allowed:
        return NoOption(
            "products",
            f"{label}: spec.gpu.products allows {sorted(workload.allowed_products)}, but no "
            f"schedulable node has them (schedulable products: {', '.join(products) or 'none'}); "
            "widen the allow-list or add such nodes",
        )
    big_enough = sorted(
        {p.product for p in pools if p.product in allowed and pool_fits_replica(p, workload)}
    )
    if not big_enough and workload.spans_nodes:
        most = max(
            (len(p.node_names) for p in pools if p.gpus_per_node == workload.gpus_per_pod),
            default=0,
        )
        return NoOption(
            "gpus",
            f"{label}: spec.gpu.nodesPerReplica={workload.nodes_per_replica} needs that many "
            f"whole nodes with exactly spec.gpu.count={workload.gpus_per_pod} GPUs each, of one "
            f"product in one pool (nodes alike in product, GPUs, budgets and agent readiness), "
            f"but at most {most} such node(s) are alike; a replica never spans products, so add "
            "nodes or lower spec.gpu.nodesPerReplica",
        )
    if not big_enough:
        largest = max(pool.gpus_per_node for pool in pools if pool.product in allowed)
        return NoOption(
            "gpus",
            f"{label}: spec.gpu.count={workload.gpus_per_replica} exceeds the largest eligible "
            f"node ({largest} GPUs); lower spec.gpu.count, or span whole nodes with "
            "spec.gpu.nodesPerReplica",
        )
    variants = [v for v in workload.variants if v.quality >= workload.min_quality]
    if not variants:
        return NoOption(
            "quality",
            f"{label}: no variant has quality >= spec.minQuality={workload.min_quality:g}; "
            "lower spec.minQuality or add a variant",
        )
    memory_of = {
        product: max(
            pool.memory_gib
            for pool in pools
            if pool.product == product and pool_fits_replica(pool, workload)
        )
        for product in big_enough
    }
    fitting = [
        (product, variant)
        for product in big_enough
        for variant in variants
        if _memory_need_gib(workload, variant) <= memory_of[product]
    ]
    if not fitting:
        memory = max(memory_of.values())
        need = min(_memory_need_gib(workload, v) for v in variants)
        names = ", ".join(v.name for v in variants)
        return NoOption(
            "memory",
            f"{label}: the smallest allowed variant ({names}; spec.minQuality="
            f"{workload.min_quality:g}) needs {need:.1f} GiB per GPU but eligible GPUs have at "
            f"most {memory:g} GiB; add a smaller variant (e.g. fp8) in spec.variants, lower "
            "spec.minQuality, or allow larger GPUs in spec.gpu.products",
        )
    cap = workload.max_power_watts_per_gpu
    powered = [
        (product, variant)
        for product, variant in fitting
        if cap is None or cap >= product_spec(product).min_watts.value
    ]
    if not powered:
        lowest = min(product_spec(p).min_watts.value for p, _ in fitting)
        return NoOption(
            "power",
            f"{label}: spec.energy.maxPowerWattsPerGPU={cap:g} is below the lowest power limit "
            f"any eligible GPU accepts ({lowest:g} W); raise it",
        )
    best = 0.0
    for product, variant in powered:
        top = product_spec(product).max_watts.value
        top = top if cap is None else min(top, cap)
        best = max(
            best,
            replica_tokens_per_second(
                model, workload, product, relative_throughput=variant.relative_throughput, level=top
            ),
        )
    if workload.type is WorkloadType.INFERENCE:
        return NoOption(
            "slo",
            f"{label}: spec.maxReplicas={workload.max_replicas} replica(s) deliver at most "
            f"{best * workload.max_replicas:.0f} tokens/s (modelled) but "
            f"spec.slo.tokensPerSecond={workload.tokens_per_second or 0:g}; raise "
            "spec.maxReplicas, lower the SLO or allow faster GPUs",
        )
    if workload.deadline_seconds is not None and workload.deadline_seconds <= 0:
        return NoOption(
            "deadline_passed",
            f"{label}: spec.slo.deadline has passed and work is left; set a later "
            "spec.slo.deadline, or remove it to run the rest without one",
        )
    return NoOption(
        "deadline",
        f"{label}: even the fastest option ({best * workload.replicas:.0f} tokens/s, modelled) "
        f"does not finish the remaining work in the "
        f"{duration_text(workload.deadline_seconds or 0)} left before spec.slo.deadline; extend "
        f"the deadline, raise {replica_count_field(workload)} or allow faster GPUs",
    )


# One option before pools and pricing: (product, variant, level, replicas, throughput, watts, cost,
# quality loss, keeps current, tokens/s served when only part of the demand is: None when all is,
# SM clock in MHz: None when left to the driver).
RawOption = tuple[
    str, Variant, float, int, float, float, float, int, bool, float | None, int | None
]


def _where_it_runs(
    workload: Workload, current: Sequence[CurrentPlacement], node_by_name: Mapping[str, GpuNode]
) -> tuple[tuple[str | None, str | None, float | None], bool]:
    """What a workload's options keep of where it runs: the product, variant and power limit of
    its first replica on a node that keeps it (None each when none does), and whether it restarts
    wherever it goes (a gang with a replica on a node it cannot stay on; its replicas on healthy
    nodes still prefer to stay there, only the others move)."""
    staying = [c for c in current if c.node in node_by_name and node_by_name[c.node].keeps_running]
    restarts = workload.type.is_gang and len(staying) < len(current)
    if not staying:
        return (None, None, None), restarts
    first = staying[0]
    return (node_by_name[first.node].product, first.variant, first.power_limit_watts), restarts


def workload_options(
    workload: Workload,
    *,
    pools: Sequence[Pool],
    model: PerformanceModel,
    levels: int,
    current: Sequence[CurrentPlacement],
    node_by_name: Mapping[str, GpuNode],
    churn_threshold: float,
    startup_seconds: float = PlanOptions().startup_seconds,
    prune: bool = True,
    partial: bool = False,
    sm_clocks: bool = True,
) -> tuple[list[Option], list[tuple[int, ...]]]:
    """Every option that meets the workload's own constraints, dominated ones pruned.

    Stability (tier 4), for a running workload of any type: options that keep the product and
    variant of its replicas on schedulable nodes (power-limit changes are free) are kept as they
    cost; every other option pays `churn_threshold` times the cheapest keeping option's energy per
    useful work (in units of the class's cheapest), so it wins only by gaining more than that.
    A move restarts the replicas: for a running job, options that move it must meet the deadline
    with `startup_seconds` less. A gang with a replica on a node that cannot keep it (missing,
    NotReady, being deleted, NoExecute-tainted, agent lost) restarts wherever it goes (every
    option counts the startup), but options that keep its product and variant still keep its
    replicas on healthy nodes where they are. Pools that take no new replicas (cordoned nodes) are
    offered only where it runs now.

    `prune=False` keeps dominated options (for the benchmark's straightforward baseline).
    `partial=True` (Inference with a demand) adds options that serve part of it: every replica
    count from minReplicas up to one below what the demand needs (at most maxReplicas), each
    with the slowest replicas' worth of demand it leaves unserved (`shortfall_steps`).
    """
    running_on = {c.node for c in current}
    pools = [p for p in pools if p.schedulable or running_on & set(p.node_names)]
    products = sorted({pool.product for pool in pools})
    if workload.allowed_products:
        products = [p for p in products if p in workload.allowed_products]
    variants = [v for v in workload.variants if v.quality >= workload.min_quality]
    if not variants:
        return [], []
    best_quality = max(v.quality for v in variants)
    tokens_needed = remaining_tokens(model, workload)
    (current_product, current_variant, current_level), restarts = _where_it_runs(
        workload, current, node_by_name
    )
    # (product, variant, level, replicas, throughput, watts, cost, quality loss, keeps current,
    # tokens/s served when only part of the demand is: None when all is; SM clock)
    raw: list[RawOption] = []
    # (product, variant name) -> (pools whose agent is ready, all pools) with memory for it.
    pools_by_variant: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for product in products:
        eligible = [
            pool for pool in pools if pool.product == product and pool_fits_replica(pool, workload)
        ]
        for variant in variants:
            roomy = [p for p in eligible if _memory_need_gib(workload, variant) <= p.memory_gib]
            if not roomy:
                continue
            pools_by_variant[(product, variant.name)] = (
                tuple(pool.index for pool in roomy if pool.agent_ready),
                tuple(pool.index for pool in roomy),
            )
            level_current = current_level if product == current_product else None
            settings = [
                (level, clock)
                for level in _levels_for(workload, product, levels, level_current)
                for clock in _clocks_for(workload, product, sm_clocks)
            ]
            for level, clock in settings:
                if clock is None:
                    throughput = replica_tokens_per_second(
                        model,
                        workload,
                        product,
                        relative_throughput=variant.relative_throughput,
                        level=level,
                    )
                    watts = model.expected_power_watts(product, workload.type, level)
                else:
                    clocked = _clocked(
                        model,
                        workload,
                        product,
                        relative_throughput=variant.relative_throughput,
                        level=level,
                        sm_clock_mhz=clock,
                    )
                    if clocked is None:
                        continue
                    throughput, watts = clocked
                keeps = product == current_product and variant.name == current_variant
                quality_loss = 0
                if workload.policy is not EnergyPolicy.EFFICIENCY:
                    quality_loss = round((best_quality - variant.quality) * QUALITY_STEPS)
                if workload.type is WorkloadType.INFERENCE:
                    demand = workload.tokens_per_second
                    replicas = max(workload.min_replicas, 1)
                    if demand is not None:
                        needed = max(replicas, math.ceil(demand / throughput - 1e-9))
                        if partial:
                            for fewer in range(replicas, min(needed, workload.max_replicas + 1)):
                                served = fewer * throughput
                                raw.append(
                                    (
                                        product,
                                        variant,
                                        level,
                                        fewer,
                                        throughput,
                                        watts,
                                        fewer * workload.gpus_per_replica * watts / served,
                                        quality_loss,
                                        keeps,
                                        served,
                                        clock,
                                    )
                                )
                        replicas = needed
                    if replicas > workload.max_replicas:
                        continue
                    # No demand (none declared, or 0 tokens/s measured): the replicas' capacity.
                    useful = demand if demand else replicas * throughput
                else:
                    replicas = workload.replicas
                    useful = replicas * throughput
                    if workload.deadline_seconds is not None and tokens_needed is not None:
                        seconds = workload.deadline_seconds
                        if current and (restarts or not keeps):
                            seconds -= startup_seconds
                        if useful * seconds < tokens_needed:
                            continue
                # Tier 3: expected energy per unit of useful work (J per token).
                cost = replicas * workload.gpus_per_replica * watts / useful
                raw.append(
                    (
                        product,
                        variant,
                        level,
                        replicas,
                        throughput,
                        watts,
                        cost,
                        quality_loss,
                        keeps,
                        None,
                        clock,
                    )
                )
    if not raw:
        return [], []
    shortfalls = _shortfall_steps(workload, raw)
    cheapest = min(entry[6] for entry in raw)
    keep_costs = [entry[6] for entry in raw if entry[8]]
    # Stability: a move must gain more than the threshold (a tie keeps the replicas in place).
    move_penalty = 0.0
    if keep_costs:
        move_penalty = churn_threshold * min(keep_costs) / cheapest + STABILITY_TIE_BREAK
    candidates = []
    for entry, shortfall in zip(raw, shortfalls, strict=True):
        product, variant, level, replicas, throughput, watts, cost, quality_loss, keeps = entry[:9]
        clock = entry[10]
        relative = cost / cheapest - 1.0
        if not keeps:
            relative += move_penalty
        is_max = level >= product_spec(product).max_watts.value
        ready_pools, all_pools = pools_by_variant[(product, variant.name)]
        option_pools = all_pools if is_max else ready_pools
        if not option_pools:
            continue
        option = Option(
            product=product,
            variant=variant,
            power_limit_watts=level,
            is_max_level=is_max,
            replicas=replicas,
            gpus_per_replica=workload.gpus_per_replica,
            nodes_per_replica=workload.nodes_per_replica,
            throughput_per_replica=throughput,
            expected_watts_per_gpu=watts,
            relative_cost=round(relative, 9),
            quality_loss=quality_loss,
            keeps_current=keeps,
            shortfall_steps=shortfall,
            sm_clock_mhz=clock,
        )
        candidates.append((option, option_pools))
    if prune:
        candidates = prune_dominated(candidates)
    return [o for o, _ in candidates], [p for _, p in candidates]


def _shortfall_steps(
    workload: Workload,
    raw: Sequence[RawOption],
) -> list[int]:
    """Per option: 0 for options that serve all; for the others 1 plus how many of the
    workload's slowest replicas would make up what it serves below the most any option serves
    (its demand, or what maxReplicas deliver at best), so an option that serves that most still
    counts 1 and one that serves a replica's worth less counts more. Counting in replicas keeps
    the steps few and lets the packing prefer serving more, however far the demand is out of
    reach."""
    served = [entry[9] for entry in raw]
    if all(value is None for value in served):
        return [0] * len(raw)
    demand = workload.tokens_per_second or 0.0
    best = max((demand if value is None else value for value in served), default=demand)
    step = min(entry[4] for entry in raw)
    return [
        0 if value is None else 1 + max(0, math.ceil((best - value) / step - 1e-9))
        for value in served
    ]


class _RememberingModel:
    """A `PerformanceModel` that evaluates each distinct question once per plan."""

    def __init__(self, model: PerformanceModel) -> None:
        self._model = model
        self._throughput: dict[
            tuple[str, WorkloadType, float, int, float, float, int | None], float
        ] = {}
        self._power: dict[tuple[str, WorkloadType, float], float] = {}

    def throughput_tokens_per_second(  # noqa: PLR0917 (the interface's positional contract)
        self,
        product: str,
        workload_type: WorkloadType,
        params_billions: float,
        gpus: int,
        relative_throughput: float,
        power_limit_watts: float,
        *,
        sm_clock_mhz: int | None = None,
    ) -> float:
        key = (
            product,
            workload_type,
            params_billions,
            gpus,
            relative_throughput,
            power_limit_watts,
            sm_clock_mhz,
        )
        value = self._throughput.get(key)
        if value is None:
            value = self._model.throughput_tokens_per_second(*key[:6], sm_clock_mhz=sm_clock_mhz)
            self._throughput[key] = value
        return value

    def expected_power_watts(
        self, product: str, workload_type: WorkloadType, power_limit_watts: float
    ) -> float:
        key = (product, workload_type, power_limit_watts)
        value = self._power.get(key)
        if value is None:
            value = self._model.expected_power_watts(*key)
            self._power[key] = value
        return value

    def idle_power_watts(self, product: str) -> float:
        return self._model.idle_power_watts(product)


def build_plan_data(
    plan_input: PlanInput, model: PerformanceModel, unpinned: frozenset[str] = frozenset()
) -> PlanData:
    """Pools, classes with their options, and the workloads that have no option at all.

    A running workload is pinned (only options that keep its product and variant, on the pools of
    the nodes it runs on, so its replicas stay and only their limits change) unless a replica's
    node cannot keep it, its spec allows moves that save energy (`moves_to_save_energy`), its
    product or variant is no longer allowed, or it is in `unpinned` (the planner's second pass,
    for running work no pinned plan could keep).
    """
    model = _RememberingModel(model)
    pools = build_pools(plan_input)
    node_by_name = {node.name: node for node in plan_input.nodes}
    current_by_workload: dict[str, list[CurrentPlacement]] = defaultdict(list)
    for placement in plan_input.current:
        current_by_workload[placement.workload].append(placement)
    groups: dict[tuple[object, ...], list[Workload]] = defaultdict(list)
    singles: list[Workload] = []
    for workload in sorted(plan_input.workloads, key=lambda w: w.key):
        if workload.key in current_by_workload:
            singles.append(workload)
        else:
            groups[_CLASS_KEY(workload)].append(workload)
    ordered: list[list[Workload]] = [members for members in groups.values()]
    ordered += [[workload] for workload in singles]
    ordered.sort(key=lambda members: members[0].key)
    classes: list[WorkloadClass] = []
    no_option: dict[str, NoOption] = {}
    # Running workloads are classes of their own (each keeps its nodes), but alike ones that run
    # alike have the same options: those are built once. What `workload_options` reads of where a
    # workload runs: the pools of its nodes, `_where_it_runs`, and whether it runs at all.
    pool_of_node = {name: pool.index for pool in pools for name in pool.node_names}
    built: dict[tuple[object, ...], tuple[list[Option], list[tuple[int, ...]]]] = {}
    for members in ordered:
        workload = members[0]
        current = sorted(
            current_by_workload.get(workload.key, []), key=lambda c: (c.replica, c.rank)
        )
        alike = (
            _CLASS_KEY(workload),
            frozenset(pool_of_node.get(c.node) for c in current),
            _where_it_runs(workload, current, node_by_name),
            bool(current),
        )
        if alike not in built:
            built[alike] = workload_options(
                workload,
                pools=pools,
                model=model,
                levels=plan_input.options.power_levels,
                current=current,
                node_by_name=node_by_name,
                churn_threshold=plan_input.options.churn_threshold,
                startup_seconds=plan_input.options.startup_seconds,
                sm_clocks=plan_input.options.sm_clocks,
            )
        options, option_pools = built[alike]
        pinned: frozenset[str] = frozenset()
        if current and workload.key not in unpinned and not workload.moves_to_save_energy:
            nodes = {c.node for c in current}
            pinned_pools = {p.index for p in pools if nodes & set(p.node_names)}
            if all(n in node_by_name and node_by_name[n].keeps_running for n in nodes):
                # Running work is not moved: keep its product, variant and nodes' pools.
                keep = [
                    (o, tuple(p for p in ps if p in pinned_pools))
                    for o, ps in zip(options, option_pools, strict=True)
                    if o.keeps_current
                ]
                keep = [(o, ps) for o, ps in keep if ps]
                if keep:
                    options = [o for o, _ in keep]
                    option_pools = [ps for _, ps in keep]
                    pinned = frozenset(nodes)
        if not options:
            if not any(p.schedulable for p in pools):
                reason = NoOption(
                    "gpus",
                    f"{workload_label(workload)}: the cluster has no schedulable GPU node",
                )
            else:
                reason = _no_option_reason(workload, [p for p in pools if p.schedulable], model)
            for member in members:
                no_option[member.key] = dataclasses.replace(
                    reason, reason=reason.reason.replace(workload.key, member.key)
                )
            continue
        classes.append(
            WorkloadClass(
                index=len(classes),
                members=tuple(members),
                options=tuple(options),
                option_pools=tuple(option_pools),
                pinned_nodes=pinned,
            )
        )
    return PlanData(
        pools=pools,
        classes=tuple(classes),
        no_option=no_option,
        budget_base_watts=budget_base_watts(plan_input),
        budget_cap_watts={b.name: b.power_cap_watts for b in plan_input.budgets},
        node_by_name=node_by_name,
        protected=frozenset(
            w.key
            for w in plan_input.workloads
            if not w.preemptible
            and current_by_workload.get(w.key)
            and all(
                c.node in node_by_name and node_by_name[c.node].keeps_running
                for c in current_by_workload[w.key]
            )
        ),
    )

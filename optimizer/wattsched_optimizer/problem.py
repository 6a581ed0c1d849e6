"""The optimizer's input and output: plain, immutable data with no Kubernetes in it.

This module is the contract between the optimizer and its callers (the operator's snapshot reader,
`wattsched plan`, the simulator). Callers translate their world into a `PlanInput`; `plan()` returns
a `Plan`. Nothing here solves anything; see `model` (performance/power), `formulation` and `solve`.

Units are in the names: watts, seconds, GiB. Workloads are keyed by `"<namespace>/<name>"`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wattsched_optimizer.model import ProductSpec


class WorkloadType(StrEnum):
    INFERENCE = "Inference"
    TRAINING = "Training"
    FINE_TUNING = "FineTuning"
    BATCH_INFERENCE = "BatchInference"

    @property
    def is_gang(self) -> bool:
        """Training, fine-tuning and batch jobs run all their replicas or none."""
        return self is not WorkloadType.INFERENCE


class EnergyPolicy(StrEnum):
    PERFORMANCE = "Performance"
    BALANCED = "Balanced"
    EFFICIENCY = "Efficiency"


class Precision(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"


class WorkUnit(StrEnum):
    TOKENS = "tokens"
    STEPS = "steps"
    GPU_HOURS = "gpuHours"


@dataclass(frozen=True)
class Variant:
    """One model-compression choice of a workload (`spec.variants[]`).

    `min_memory_gib` is per GPU; 0 means the workload's `min_memory_gib_per_gpu` applies.
    """

    name: str
    precision: Precision
    min_memory_gib: float
    relative_throughput: float = 1.0
    quality: float = 1.0


@dataclass(frozen=True)
class WorkAmount:
    """Remaining work of a Training/FineTuning/BatchInference workload.

    `tokens_per_step` converts steps to tokens and is required when `unit` is STEPS.
    """

    unit: WorkUnit
    amount: float
    tokens_per_step: float | None = None


@dataclass(frozen=True)
class Workload:
    """A workload as the optimizer sees it (from an LLMWorkload's spec, defaults applied)."""

    key: str
    type: WorkloadType
    model_parameters_billions: float
    # GPUs of one whole replica: spec.gpu.count x spec.gpu.nodesPerReplica.
    gpus_per_replica: int
    variants: tuple[Variant, ...]
    # Gang size for Training/FineTuning/BatchInference; for Inference the range below applies.
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    min_memory_gib_per_gpu: float = 0.0
    # Normalised product names (see model.normalise_product); empty means any product.
    allowed_products: frozenset[str] = frozenset()
    min_quality: float = 0.0
    priority: int = 0
    preemptible: bool = False
    policy: EnergyPolicy = EnergyPolicy.BALANCED
    max_power_watts_per_gpu: float | None = None
    # Inference: aggregate tokens/s the admitted replicas must serve.
    tokens_per_second: float | None = None
    # Batch work: what is left and, optionally, how many seconds from now it must finish.
    remaining_work: WorkAmount | None = None
    deadline_seconds: float | None = None
    # spec.disruption.moveToSaveEnergy: running replicas may move when that saves more than
    # PlanOptions.churn_threshold; otherwise they move only for a `MoveReason` other than SAVINGS.
    moves_to_save_energy: bool = False
    # spec.gpu.nodesPerReplica: a replica of more than one node is a leader pod and workers, one
    # pod on each of that many whole nodes of one pool, each node with exactly `gpus_per_pod`
    # GPUs; its pods are placed all or none and all its GPUs get one power limit (and clock).
    nodes_per_replica: int = 1

    @property
    def gpus_per_pod(self) -> int:
        """GPUs of one pod of a replica (spec.gpu.count): all of them on one node."""
        return self.gpus_per_replica // self.nodes_per_replica

    @property
    def spans_nodes(self) -> bool:
        return self.nodes_per_replica > 1


@dataclass(frozen=True)
class GpuNode:
    """A node with GPUs. `product` is the normalised product name.

    `gpu_count` is the GPUs wattsched may place replicas on and set limits for; GPUs held by pods
    wattsched did not create are not among them: they count in every budget at `unmanaged_watts`
    (the sum of the limits they run at) and are never offered to a replica.
    """

    name: str
    product: str
    gpu_count: int
    # False for nodes that are NotReady, cordoned, or being deleted: no new replicas go there.
    schedulable: bool = True
    # False when running replicas must leave (NotReady, being deleted, a NoExecute taint, a lost
    # agent); a cordoned node is unschedulable but keeps what runs there.
    keeps_running: bool = True
    # A node whose agent is not ready (or did not confirm the last limits) counts at maximum power.
    agent_ready: bool = True
    unmanaged_gpus: int = 0
    unmanaged_watts: float = 0.0
    # Of the unmanaged GPUs and watts, those of old pods still serving while their replacements
    # start (make-before-break moves): they leave within minutes, so the plan over a horizon
    # counts them in its first slot only (`settled`).
    leaving_gpus: int = 0
    leaving_watts: float = 0.0
    # Memory per GPU the node reports (GFD `nvidia.com/gpu.memory`), in GiB; None: the product's.
    memory_gib: float | None = None

    def settled(self) -> GpuNode:
        """The node once the old pods of its make-before-break moves have left."""
        if not self.leaving_gpus and not self.leaving_watts:
            return self
        return dataclasses.replace(
            self,
            gpu_count=self.gpu_count + self.leaving_gpus,
            unmanaged_gpus=self.unmanaged_gpus - self.leaving_gpus,
            unmanaged_watts=self.unmanaged_watts - self.leaving_watts,
            leaving_gpus=0,
            leaving_watts=0.0,
        )


@dataclass(frozen=True)
class Budget:
    """An EnergyBudget resolved to the nodes in its scope. Budgets may overlap (nest)."""

    name: str
    power_cap_watts: float
    node_names: frozenset[str]
    # Watts in scope that the plan does not control: GPUs of nodes left out of planning (e.g. an
    # unknown product), counted at the most they can draw. Part of the budget's floor.
    uncontrolled_watts: float = 0.0


@dataclass(frozen=True)
class CurrentPlacement:
    """A replica that is running now: moving it costs stability (objective tier 4)."""

    workload: str
    replica: int
    node: str
    variant: str
    power_limit_watts: float
    # The pod's position in a replica that spans nodes (0: the leader); always 0 otherwise.
    rank: int = 0


@dataclass(frozen=True)
class PlanOptions:
    power_levels: int = 5
    time_limit_seconds: float = 10.0
    relative_gap: float = 0.01
    # Minimum relative gain in energy per useful work before a running replica (any workload
    # type) is moved to another product or variant; power-limit changes in place are free.
    churn_threshold: float = 0.05
    # Seconds a moved replica makes no progress (image pull + weight loading): a running job's
    # deadline check for an option that moves it subtracts them.
    startup_seconds: float = 60.0
    solver: str = "highs"  # "highs" or "cbc"
    # Lock SM clocks where the catalogue's clock curve says it pays (decode-bound inference under
    # Efficiency or Balanced); False never locks them (the evaluation's ablation).
    sm_clocks: bool = True


@dataclass(frozen=True)
class PlanInput:
    nodes: tuple[GpuNode, ...]
    workloads: tuple[Workload, ...]
    budgets: tuple[Budget, ...] = ()
    current: tuple[CurrentPlacement, ...] = ()
    options: PlanOptions = field(default_factory=PlanOptions)
    # Products the catalogue lacks, by key, as their nodes describe them (model.discovered_product).
    products: Mapping[str, ProductSpec] = field(default_factory=dict)


class MoveReason(StrEnum):
    """Why running replicas of a workload may leave their nodes (nothing else moves them)."""

    # Their node is gone, NotReady, being deleted, NoExecute-tainted or its agent is lost.
    NODE = "NodeLost"
    # No power limit in place keeps the workload inside a budget.
    BUDGET = "BudgetCut"
    # Higher-priority work needs the GPUs and the workload is preemptible.
    PRIORITY = "HigherPriority"
    # The move saves more than the churn threshold and spec.disruption.moveToSaveEnergy allows it.
    SAVINGS = "SavesEnergy"
    # The spec no longer allows the product or variant it runs with.
    SPEC = "SpecChanged"
    # The horizon plan runs the preemptible workload later (cleaner hours, an allowance running
    # short, a lower cap coming): a preemption, never a move.
    DEFERRED = "Deferred"


class PlanStatus(StrEnum):
    OPTIMAL = "Optimal"
    FEASIBLE = "Feasible"
    TIME_LIMIT = "TimeLimit"


@dataclass(frozen=True)
class Placement:
    workload: str
    replica: int
    node: str
    gpus: int
    variant: str
    power_limit_watts: float
    expected_watts_per_gpu: float
    # tokens/s of this pod: the replica's, shared evenly by its pods when it spans nodes.
    expected_throughput: float
    # SM clock (MHz) the replica's GPUs are locked at; None: left to the driver (never a cap).
    sm_clock_mhz: int | None = None
    # One placement per pod: a replica that spans nodes has one per node, rank 0 (the leader)
    # to nodes_per_replica - 1, all with the replica's variant, limit and clock.
    rank: int = 0
    nodes_per_replica: int = 1


@dataclass(frozen=True)
class BudgetAllocation:
    name: str
    cap_watts: float
    allocated_cap_watts: float  # sum of power limits of every GPU in scope, as counted
    expected_watts: float
    # The part of allocated_cap_watts that wattsched does not control: GPUs held by pods it did
    # not create, at the limits they run at.
    unmanaged_watts: float = 0.0
    # No plan meets the cap: the GPUs in scope count for more with nothing placed (see
    # `planner.held_budgets`). Its nodes take no work and are lowered to their minimum;
    # `allocated_cap_watts` is then that floor, above the cap. The rest is planned as usual.
    held: bool = False


@dataclass(frozen=True, slots=True)
class Unplaced:
    workload: str
    reason: str  # a sentence a person can act on
    constraint: str  # which constraint binds: "budget:<name>", "gpus", "memory", "products", ...

    @property
    def reason_name(self) -> str:
        """The binding constraint as the one CamelCase word every output uses for it (the
        Schedulable condition's reason, `wattsched plan -o json`): `budget:rack-a` -> `Budget`,
        `deadline_passed` -> `DeadlinePassed`."""
        head = self.constraint.split(":", 1)[0]
        words = [w for w in head.replace("-", "_").split("_") if w]
        return "".join(w[:1].upper() + w[1:] for w in words) or "Unplaced"

    @property
    def budget(self) -> str | None:
        """The EnergyBudget that binds, when a budget does."""
        head, _, name = self.constraint.partition(":")
        return name if head == "budget" and name else None


@dataclass(frozen=True)
class Shortfall:
    """An Inference workload placed with fewer replicas than its demand needs: no plan serves all
    of it (`constraint` binds, as in `Unplaced`), so it keeps as many replicas as fit."""

    workload: str
    demand_tokens_per_second: float
    served_tokens_per_second: float  # modelled: the placed replicas' expected throughput
    reason: str
    constraint: str

    @property
    def served_share(self) -> float:
        return min(1.0, self.served_tokens_per_second / self.demand_tokens_per_second)


@dataclass(frozen=True)
class Plan:
    status: PlanStatus
    objective: float
    bound: float
    gap: float
    solve_seconds: float
    placements: tuple[Placement, ...]
    # Every GPU node in the input, one limit per GPU to write (idle GPUs at their minimum; at their
    # maximum where the node agent is not ready, except in a held budget).
    node_power_limits_watts: Mapping[str, tuple[float, ...]]
    budgets: tuple[BudgetAllocation, ...]
    unplaced: tuple[Unplaced, ...]
    # Which solver ran ("highs" or "cbc"; empty when none was needed).
    solver: str = ""
    # Inference workloads served in part (placed, and not in `unplaced`).
    shortfalls: tuple[Shortfall, ...] = ()
    # Seconds per step: "data", "build", "solve", "pack", "total".
    timings_seconds: Mapping[str, float] = field(default_factory=dict)
    # Running workloads whose replicas the plan may move, and why; a running workload not listed
    # keeps every replica on its node (limits change in place).
    move_reasons: Mapping[str, MoveReason] = field(default_factory=dict)
    # Every GPU node in the input: the limit of its GPUs no replica holds (the product's minimum,
    # or its maximum while the node's agent is not ready).
    node_idle_limits_watts: Mapping[str, float] = field(default_factory=dict)
    # Nodes where pods wattsched did not create hold GPUs: (how many, the sum of their limits in
    # watts). Those GPUs are in no node_power_limits_watts tuple.
    node_unmanaged: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    # Every GPU node in the input, one entry per GPU: the SM clock (MHz) to lock it at, or None.
    node_sm_clocks_mhz: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)

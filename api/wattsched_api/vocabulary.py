"""The words of the wattsched API, in one place for the operator, agent, CLI and simulator: phases,
condition types and reasons, Event reasons, the labels, annotations and env names wattsched puts
on pods, and measured/modelled.

docs/api.md documents each of them (tests/api/test_vocabulary.py checks that it does). What is
not here: the binding-constraint reasons the optimizer names (`Unplaced.reason_name`: Budget,
Gpus, Deadline...), the agent's NVML fault reasons (`wattsched_agent.nvml_backend.FaultReason`)
and the move causes the optimizer decides (`wattsched_optimizer.problem.MoveReason`); times are
read and written by `wattsched_api.meta` (`parse_time`, `read_timestamp`, `format_time`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Source(StrEnum):
    """Where a figure came from, shown next to every W, J, tokens/J and gCO2 wattsched reports."""

    MEASURED = "measured"
    MODELLED = "modelled"


class EnergySource(StrEnum):
    """Where a running total came from: one Source, or both."""

    MEASURED = "measured"
    MODELLED = "modelled"
    MIXED = "mixed"  # a running total with measured and modelled parts


class Phase(StrEnum):
    """An LLMWorkload's `status.phase`."""

    PENDING = "Pending"
    PLACED = "Placed"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    PREEMPTED = "Preempted"


TERMINAL_PHASES: Final = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class PodPhase(StrEnum):
    """A Kubernetes Pod's `status.phase`, as the operator reads it."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


POD_FINISHED_PHASES: Final = frozenset({PodPhase.SUCCEEDED, PodPhase.FAILED})


class ConditionType(StrEnum):
    """The `type` of each condition on LLMWorkload, EnergyBudget and NodePowerProfile."""

    # LLMWorkload
    ADMITTED = "Admitted"
    SCHEDULABLE = "Schedulable"
    PLACED = "Placed"
    READY = "Ready"  # also EnergyBudget: the cap is enforced
    BUDGET_LIMITED = "BudgetLimited"
    SLO_MET = "SLOMet"
    TELEMETRY_FRESH = "TelemetryFresh"  # also EnergyBudget
    # EnergyBudget
    UNMANAGED_WITHIN_CAP = "UnmanagedWithinCap"
    NODES_PLANNED = "NodesPlanned"
    ALLOWANCE_EXHAUSTED = "AllowanceExhausted"
    # NodePowerProfile (written by the agent)
    APPLIED = "Applied"  # power limits in force (the budget guarantee rests on this one)
    CLOCKS_APPLIED = "ClocksApplied"  # locked SM clock ranges in force (a clock is no cap)


class Reason(StrEnum):
    """The `reason` of the conditions wattsched writes, beyond phases and the optimizer's
    binding-constraint names (see the module docstring)."""

    # Admitted
    ACCEPTED = "Accepted"
    INVALID_SPEC = "InvalidSpec"  # also EnergyBudget Ready
    POD_REJECTED = "PodRejected"
    # Schedulable, Placed, Ready
    PLANNED = "Planned"
    UNPLACED = "Unplaced"
    WAITING = "Waiting"
    MOVING = "Moving"
    PLAN_FAILED = "PlanFailed"  # also EnergyBudget Ready
    # BudgetLimited, SLOMet
    WITHIN_BUDGET = "WithinBudget"
    BUDGET_LIMITED = "BudgetLimited"
    BELOW_DEMAND = "BelowDemand"
    NOT_PLACED = "NotPlaced"
    ON_TRACK = "OnTrack"
    DEADLINE_PASSED = "DeadlinePassed"
    DEFERRED = "Deferred"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # TelemetryFresh
    MEASURED = "Measured"
    PROMETHEUS_UNAVAILABLE = "PrometheusUnavailable"
    NO_SAMPLES = "NoSamples"
    NOT_RUNNING = "NotRunning"
    # EnergyBudget Ready, UnmanagedWithinCap, NodesPlanned, AllowanceExhausted
    CAP_ENFORCED = "CapEnforced"
    OVER_CAP = "OverCap"
    CAP_BELOW_FLOOR = "CapBelowFloor"
    WITHIN_CAP = "WithinCap"
    UNMANAGED_OVER_CAP = "UnmanagedOverCap"
    ALL_PLANNED = "AllPlanned"
    NODE_EXCLUDED = "NodeExcluded"
    ENERGY_ALLOWANCE = "EnergyAllowance"
    CARBON_ALLOWANCE = "CarbonAllowance"
    WITHIN_ALLOWANCE = "WithinAllowance"
    # NodePowerProfile Applied, ClocksApplied (the agent; NVML faults name their own reason)
    LIMITS_APPLIED = "LimitsApplied"
    CLOCKS_APPLIED = "ClocksApplied"
    DEFAULTS_RESTORED = "DefaultsRestored"
    DEVICE_MAPPING_UNAVAILABLE = "DeviceMappingUnavailable"


class EventReason(StrEnum):
    """The `reason` of the Kubernetes Events the operator posts (a condition that turns False
    also posts its own reason as a Warning Event)."""

    ADMITTED = "Admitted"
    PLACED = "Placed"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNSCHEDULABLE = "Unschedulable"
    SLO_RISK = "SLORisk"
    DEFERRED = "Deferred"
    MOVED = "Moved"
    PREEMPTED = "Preempted"
    GANG_RESTART = "GangRestart"
    REPLACEMENT_NOT_READY = "ReplacementNotReady"
    REPLICA_FAILED = "ReplicaFailed"
    NODE_EXCLUDED = "NodeExcluded"
    ALLOWANCE_EXHAUSTED = "AllowanceExhausted"
    PLAN_FAILED = "PlanFailed"


# The Events that say a running replica went (shown by `wattsched explain`; `wattsched status`
# lists Moved and Preempted only).
DISRUPTION_EVENT_REASONS: Final = (
    EventReason.MOVED,
    EventReason.PREEMPTED,
    EventReason.GANG_RESTART,
)

# Labels on the pods wattsched creates: which LLMWorkload (pod's namespace) and which replica.
WORKLOAD_LABEL: Final = "wattsched.io/workload"
REPLICA_LABEL: Final = "wattsched.io/replica"
# A pod's rank in a replica that spans nodes (0: the leader); absent means 0.
RANK_LABEL: Final = "wattsched.io/rank"
# On the Services wattsched creates for an Inference workload: which role the Service plays.
SERVICE_ROLE_LABEL: Final = "wattsched.io/service"
# Annotations on those pods: the variant and per-GPU power limit the plan gave the replica, and
# the workload's spec.type (the simulated agent draws power for that kind of work).
VARIANT_ANNOTATION: Final = "wattsched.io/variant"
POWER_LIMIT_ANNOTATION: Final = "wattsched.io/power-limit-watts"
WORKLOAD_TYPE_ANNOTATION: Final = "wattsched.io/workload-type"
# The node the operator planned a pod on (read back where the pod is not bound yet).
NODE_ANNOTATION: Final = "wattsched.io/node"
# On a replica's replacement pod during a make-before-break move: the pod it replaces (same
# namespace), which stays until the replacement is Ready.
REPLACES_ANNOTATION: Final = "wattsched.io/replaces"
# On an LLMWorkload: its failed-replica count, the time before which it is not recreated, and
# the failed pod already counted (so a restart of the operator counts it once).
FAILURES_ANNOTATION: Final = "wattsched.io/failures"
RETRY_AFTER_ANNOTATION: Final = "wattsched.io/retry-after"
FAILURE_COUNTED_ANNOTATION: Final = "wattsched.io/failure-counted"
# On a pod in the simulated cluster: the utilisation the simulated agent draws power for.
SIMULATED_UTILISATION_ANNOTATION: Final = "wattsched.io/simulated-utilisation"
# The finalizer older operators (kopf) put on each LLMWorkload; the operator now removes it.
RELEASE_POWER_FINALIZER: Final = "wattsched.io/release-power"

# Env vars injected into every container of a replica.
VARIANT_ENV: Final = "WATTSCHED_VARIANT"
PRECISION_ENV: Final = "WATTSCHED_PRECISION"
POWER_LIMIT_ENV: Final = "WATTSCHED_POWER_LIMIT_WATTS"
# ... and of a replica that spans nodes: the leader's address, the pods in the replica and this
# pod's rank (docs/api.md). wattsched's own names for the rendezvous:
LEADER_ADDRESS_ENV: Final = "WATTSCHED_LEADER_ADDRESS"
GROUP_SIZE_ENV: Final = "WATTSCHED_GROUP_SIZE"
RANK_ENV: Final = "WATTSCHED_RANK"
# LeaderWorkerSet's (sigs.k8s.io/lws api/leaderworkerset/v1: LwsLeaderAddress, LwsGroupSize,
# LwsWorkerIndex).
LWS_LEADER_ADDRESS_ENV: Final = "LWS_LEADER_ADDRESS"
LWS_GROUP_SIZE_ENV: Final = "LWS_GROUP_SIZE"
LWS_WORKER_INDEX_ENV: Final = "LWS_WORKER_INDEX"
# PyTorch distributed (torchrun's --master-addr/--master-port/--nnodes/--node-rank).
MASTER_ADDR_ENV: Final = "MASTER_ADDR"
MASTER_PORT_ENV: Final = "MASTER_PORT"
WORLD_SIZE_ENV: Final = "WORLD_SIZE"
NODE_RANK_ENV: Final = "NODE_RANK"

# GPU Feature Discovery labels and the device plugin's resource.
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"
GPU_RESOURCE: Final = "nvidia.com/gpu"
# DCGM exporter's per-GPU energy counter (mJ since boot), as the agent exports it and the
# operator's telemetry reads it.
DCGM_ENERGY_METRIC: Final = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"

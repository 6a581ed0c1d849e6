"""Kubernetes objects -> the optimizer's `PlanInput`: one reading shared by the operator and
`wattsched plan`.

Input is plain JSON objects as the API server returns them (Nodes, LLMWorkloads, EnergyBudgets,
NodePowerProfiles, Pods); output is `wattsched_optimizer.problem.PlanInput`. Every function is pure
(the current time comes in as `now`) apart from a bounded cache of parsed LLMWorkloads keyed by
(uid, resourceVersion), which never changes a result. Bad objects raise `SnapshotError` naming
the object and field (or, with `strict=False`, bad objects are left out: LLMWorkloads are returned
as `rejected`, EnergyBudgets, NodePowerProfiles and Pods as `ignored`, so one bad object cannot
stop planning for the others). Not for listing or watching objects, or for solving.

Rules:
- GPU node: allocatable `nvidia.com/gpu` > 0; its product is the GFD label `nvidia.com/gpu.product`
  normalised by the performance model. Schedulable when Ready=True, not cordoned, not deleting.
  Its memory per GPU is the GFD label `nvidia.com/gpu.memory` (MiB) when present, else the
  catalogue's.
- Any NVIDIA GPU: a product the catalogue lacks is planned as its node describes it
  (`model.discovered_product`) once its agent has reported the GPUs' power range: memory from
  `nvidia.com/gpu.memory`, power range from its NodePowerProfile's `status.gpus[]`
  min/default/max watts (NVML), speed the catalogue's `unknown_product` default (modelled).
- A GPU node that cannot be planned for is excluded, never an error: product label missing, GPUs
  not countable, a malformed memory label, or a product the catalogue lacks whose agent has not
  reported its power range yet. It takes no work, and every budget whose selector matches it
  counts it at what it can draw (see `excluded_node`). `Snapshot.excluded_nodes` says which and
  why.
- A node whose allocatable GPUs read 0 while its NodePowerProfile's agent reports GPUs (a device
  plugin restarting) stays a GPU node with the agent's GPU count, unschedulable: it stays in its
  budgets (at maximum until its agent confirms lower limits) instead of dropping out of them.
- Unmanaged GPUs (held by pods wattsched did not create): where the node's agent reports a device
  mapping, the GPUs its profile's status marks `holder: other`, each at its applied limit (else its
  NVML maximum, else the product's maximum; while the agent has not applied the spec's generation,
  at least at the spec's `unmanagedPowerLimitWatts`);
  otherwise the GPUs requested by pods without the
  `wattsched.io/workload` label bound to the node, at the product's maximum. They are taken out of
  the node's GPUs for planning and counted in every budget (`GpuNode.unmanaged_*`).
- Agent readiness: a node's agent counts as ready when its NodePowerProfile says `agent.ready`, has
  applied the current spec generation (or, for a node in `raises_in_flight`, the generation just
  before the raise the operator wrote: `raise_on_its_way`), has a fresh heartbeat (when
  `heartbeat_timeout_seconds` is given) and the node is not in `unconfirmed_nodes`. An agent whose
  last heartbeat is older than the timeout is lost: its node also takes no work (the replicas
  there move; the rest stay), unless too many agents are lost at once (`lost_agents`: then
  their replicas stay).
  When the objects hold no NodePowerProfile at all and `agents_required` is False (offline
  planning from a snapshot), all agents count as ready.
- Budgets: the GPU nodes whose labels match the selector (no or empty selector: every GPU node).
- Remaining work of a job: `spec.slo.totalWork` in tokens less `status.progress.completedTokens`
  (see `progress`); the whole total, as written, while no progress is recorded.
- Current placements: pods labelled `wattsched.io/workload` (workload name, pod's namespace) and
  `wattsched.io/replica`, bound to a node (or annotated with one) and not finished.
- Make-before-break moves in progress (`handover`): the replacement is the replica's current
  placement; the old pod, still serving, is counted like an unmanaged pod (its GPUs taken out of
  planning, counted at its power-limit annotation in every budget).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from wattsched_api.energybudget import EnergyBudget, parse_energybudget
from wattsched_api.errors import ApiValidationError
from wattsched_api.llmworkload import (
    LLMWorkload,
    LLMWorkloadSpec,
    LLMWorkloadStatus,
    TotalWork,
    parse_llmworkload,
)
from wattsched_api.meta import API_VERSION, GROUP, parse_time
from wattsched_api.nodepowerprofile import (
    Holder,
    MappingSource,
    NodePowerProfile,
    parse_nodepowerprofile,
)
from wattsched_api.vocabulary import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    NODE_ANNOTATION,
    POD_FINISHED_PHASES,
    POWER_LIMIT_ANNOTATION,
    POWER_LIMIT_ENV,
    RANK_LABEL,
    REPLICA_LABEL,
    TERMINAL_PHASES,
    VARIANT_ANNOTATION,
    VARIANT_ENV,
    WORKLOAD_LABEL,
)
from wattsched_operator import handover, progress
from wattsched_operator.frozen import FrozenDict
from wattsched_optimizer.model import (
    CatalogueModel,
    ProductSpec,
    catalogue,
    discovered_product,
    known_products,
    product_key,
    product_spec,
    products_in_scope,
)
from wattsched_optimizer.options import reference_tokens_per_gpu_hour
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    PlanInput,
    PlanOptions,
    Precision,
    Variant,
    WorkAmount,
    Workload,
    WorkloadType,
    WorkUnit,
)

Body = Mapping[str, Any]

_WHOLE_NUMBER = re.compile(r"^[0-9]+$")
# GPU-hours of work convert to tokens with the uncalibrated catalogue (a fixed definition).
_CATALOGUE = CatalogueModel()


class SnapshotError(ValueError):
    """An object in the snapshot cannot be planned for; the message names object and field."""


@dataclass(frozen=True)
class ClusterObjects:
    """The objects a plan is made from, by kind, as JSON objects."""

    nodes: tuple[Body, ...] = ()
    workloads: tuple[Body, ...] = ()
    budgets: tuple[Body, ...] = ()
    profiles: tuple[Body, ...] = ()
    pods: tuple[Body, ...] = ()


@dataclass(frozen=True)
class ExcludedNode:
    """A GPU node left out of planning: it takes no work, and its budgets count `counted_watts`."""

    name: str
    reason: str
    counted_watts: float


@dataclass(frozen=True)
class IgnoredObject:
    """An object that cannot be read (with `strict=False`): left out of the plan, reported."""

    kind: str  # "EnergyBudget", "NodePowerProfile", "Pod", "Node"
    key: str  # name, or namespace/name
    message: str


@dataclass(frozen=True)
class Snapshot:
    """What the objects say: the optimizer's input and what was left out, and why."""

    plan_input: PlanInput
    rejected: tuple[ApiValidationError, ...] = ()
    # Workload key -> the parsed LLMWorkload, for callers that need more than the optimizer does:
    # its metadata and spec, and of its status only what planning reads (phase, progress).
    workloads: Mapping[str, LLMWorkload] = field(default_factory=dict)
    excluded_nodes: tuple[ExcludedNode, ...] = ()
    # Nodes whose agents fell silent together with too many others (`lost_agents`): their
    # replicas stay, they take no new work (a fault between the operator and the agents).
    silent_together: tuple[str, ...] = ()
    ignored: tuple[IgnoredObject, ...] = ()
    # Budget name -> the parsed EnergyBudget (its allowances, schedule and forecast: the horizon).
    budgets: Mapping[str, EnergyBudget] = field(default_factory=dict)


_KIND_FIELDS = {
    ("v1", "Node"): "nodes",
    ("wattsched.io/v1alpha1", "LLMWorkload"): "workloads",
    ("wattsched.io/v1alpha1", "EnergyBudget"): "budgets",
    ("wattsched.io/v1alpha1", "NodePowerProfile"): "profiles",
    ("v1", "Pod"): "pods",
}


def split_objects(documents: Iterable[object]) -> ClusterObjects:
    """Sort objects (and the items of `kind: List` / `*List` documents) by kind.

    Objects of other kinds (Namespaces, Services...) are ignored; a document that is not an object
    with apiVersion and kind is an error.
    """
    found: dict[str, list[Body]] = {name: [] for name in _KIND_FIELDS.values()}

    def visit(document: object, where: str) -> None:
        if document is None:
            return
        if not isinstance(document, Mapping):
            raise SnapshotError(
                f"{where}: expected a Kubernetes object, got {type(document).__name__}"
            )
        kind, api_version = document.get("kind"), document.get("apiVersion")
        if not isinstance(kind, str) or not isinstance(api_version, str):
            raise SnapshotError(f"{where}: a Kubernetes object needs apiVersion and kind")
        if kind == "List" or (kind.endswith("List") and "items" in document):
            items = document.get("items") or []
            if not isinstance(items, list):
                raise SnapshotError(f"{where} ({kind}): items must be a list")
            for index, item in enumerate(items):
                visit(item, f"{where} items[{index}]")
            return
        bucket = _KIND_FIELDS.get((api_version, kind))
        if bucket is not None:
            found[bucket].append(document)
        elif api_version.split("/", 1)[0] == GROUP:
            raise SnapshotError(
                f"{where} ({kind}): apiVersion {api_version!r} is not one this version reads; "
                f"wattsched reads {API_VERSION} LLMWorkload, EnergyBudget and NodePowerProfile"
            )

    for index, document in enumerate(documents):
        visit(document, f"document {index + 1}")
    return ClusterObjects(**{name: tuple(items) for name, items in found.items()})


def deadline_seconds(deadline: datetime, now: datetime) -> float:
    """Seconds from `now` until `deadline`; 0 when it has passed (the optimizer then reports it)."""
    return max(0.0, (deadline - now).total_seconds())


def build_snapshot(
    objects: ClusterObjects,
    *,
    now: datetime,
    options: PlanOptions | None = None,
    strict: bool = True,
    agents_required: bool = False,
    heartbeat_timeout_seconds: float | None = None,
    unconfirmed_nodes: frozenset[str] = frozenset(),
    raises_in_flight: Mapping[str, int] | None = None,
) -> Snapshot:
    """The optimizer's input for `objects` at time `now` (the rules: see the module docstring)."""
    ignored: list[IgnoredObject] = []

    def left_out(kind: str, key: str, error: Exception) -> None:
        if strict:
            raise SnapshotError(str(error)) from None
        ignored.append(IgnoredObject(kind, key, str(error)))

    profiles = _profiles_by_node(objects.profiles, left_out)
    unmanaged_pod_gpus = unmanaged_pod_gpus_by_node(objects.pods)
    leaving = handover.leaving_by_node(objects.pods)
    handing_over = frozenset(handover.pending_handovers(objects.pods))
    require_agents = agents_required or bool(profiles)
    nodes: list[GpuNode] = []
    excluded: list[ExcludedNode] = []
    discovered: dict[str, ProductSpec] = {}
    labels_by_node: dict[str, Mapping[str, str]] = {}
    node_names = _Unique("Node", "metadata.name")
    lost, together = (
        lost_agents(objects.nodes, profiles, now, heartbeat_timeout_seconds)
        if require_agents
        else (frozenset(), False)
    )
    for body in objects.nodes:
        try:
            name = _node_name(body)
            node_names.add(name)
        except SnapshotError as error:
            left_out("Node", str(_metadata_name(body)), error)
            continue
        node = _gpu_node(
            body,
            profiles=profiles,
            require_agents=require_agents,
            now=now,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            unconfirmed_nodes=unconfirmed_nodes,
            raised_generation=(raises_in_flight or {}).get(name),
            unmanaged_pod_gpus=unmanaged_pod_gpus.get(name, 0),
            discovered=discovered,
            lost=name in lost,
            lost_together=together,
        )
        if isinstance(node, GpuNode):
            nodes.append(_with_leaving(node, leaving.get(name)))
        elif node is not None:
            excluded.append(node)
        if node is not None:
            labels_by_node[name] = _labels_or_none(body)

    workloads: dict[str, LLMWorkload] = {}
    rejected: list[ApiValidationError] = []
    converted: list[Workload] = []
    workload_keys = _Unique("LLMWorkload", "metadata.namespace and metadata.name")
    for body in objects.workloads:
        try:
            workload, timeless = _read_workload(body)
            workload_keys.add(workload.key)
            if _is_finished(workload):
                continue
            converted.append(_with_deadline(timeless, workload, now))
        except ApiValidationError as error:
            if strict:
                raise SnapshotError(str(error)) from None
            rejected.append(error)
            continue
        except SnapshotError as error:  # the same workload twice (never from the API server)
            left_out("LLMWorkload", str(_metadata_name(body)), error)
            continue
        workloads[workload.key] = workload

    counted_watts = {node.name: node.counted_watts for node in excluded}
    budget_names = _Unique("EnergyBudget", "metadata.name")
    budgets = []
    parsed_budgets: dict[str, EnergyBudget] = {}
    for body in objects.budgets:
        try:
            budget = parse_budget(body)
            budget_names.add(budget.metadata.name)
        except SnapshotError as error:
            left_out("EnergyBudget", str(_metadata_name(body)), error)
            continue
        budgets.append(_budget(budget, labels_by_node, counted_watts))
        parsed_budgets[budget.name] = budget
    current = []
    for body in objects.pods:
        meta = body.get("metadata") if isinstance(body, Mapping) else None
        if isinstance(meta, Mapping) and (meta.get("namespace"), meta.get("name")) in handing_over:
            continue  # the old pod of a make-before-break move: its replacement stands for it
        try:
            placement = current_placement(body, workloads)
        except SnapshotError as error:
            meta = body.get("metadata") if isinstance(body, Mapping) else None
            meta = meta if isinstance(meta, Mapping) else {}
            left_out("Pod", f"{meta.get('namespace')}/{meta.get('name')}", error)
            continue
        if placement is not None:
            current.append(placement)
    plan_input = PlanInput(
        nodes=tuple(sorted(nodes, key=lambda n: n.name)),
        workloads=tuple(sorted(converted, key=lambda w: w.key)),
        budgets=tuple(sorted(budgets, key=lambda b: b.name)),
        current=tuple(sorted(current, key=lambda c: (c.workload, c.replica))),
        options=options or PlanOptions(),
        products=discovered,
    )
    return Snapshot(
        plan_input=plan_input,
        rejected=tuple(rejected),
        workloads=workloads,
        excluded_nodes=tuple(sorted(excluded, key=lambda n: n.name)),
        silent_together=tuple(sorted(lost & {node.name for node in nodes})) if together else (),
        ignored=tuple(ignored),
        budgets=parsed_budgets,
    )


def _metadata_name(body: object) -> object:
    meta = body.get("metadata") if isinstance(body, Mapping) else None
    return meta.get("name") if isinstance(meta, Mapping) else None


class _Unique:
    """Names of one kind seen so far; a second object with the same name is a SnapshotError."""

    def __init__(self, kind: str, field_name: str) -> None:
        self._kind = kind
        self._field_name = field_name
        self._seen: set[str] = set()

    def add(self, name: str) -> None:
        if name in self._seen:
            raise SnapshotError(
                f"{self._kind} {name}: {self._field_name}: the snapshot holds two objects with "
                "this name; keep one of them"
            )
        self._seen.add(name)


# -- nodes -----------------------------------------------------------------------------------------


def _node_name(body: Body) -> str:
    metadata = body.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        raise SnapshotError("Node: metadata.name is required")
    return name


def _labels_or_none(body: Body) -> Mapping[str, str]:
    """A node's labels; a malformed label map reads as no labels (the node then has no product
    and no budget selects it by label)."""
    try:
        return _labels(body)
    except SnapshotError:
        return {}


def _labels(body: Body) -> Mapping[str, str]:
    metadata = body.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise SnapshotError(f"{body.get('kind')} {_node_name(body)}: metadata.labels must be a map")
    return {str(key): str(value) for key, value in labels.items()}


def gpu_count(body: Body) -> int:
    """Allocatable `nvidia.com/gpu` of a Node (0 when absent)."""
    name = _node_name(body)
    status = body.get("status")
    allocatable = status.get("allocatable") if isinstance(status, Mapping) else None
    if allocatable is None:
        return 0
    if not isinstance(allocatable, Mapping):
        raise SnapshotError(f"Node {name}: status.allocatable must be a map of quantities")
    raw = allocatable.get(GPU_RESOURCE)
    if raw is None:
        return 0
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    if isinstance(raw, str) and _WHOLE_NUMBER.match(raw):
        return int(raw)
    raise SnapshotError(
        f'Node {name}: status.allocatable["{GPU_RESOURCE}"]: {raw!r} is not a whole number '
        'of GPUs (a quantity such as "8")'
    )


def is_schedulable(body: Body) -> bool:
    """Ready=True, not cordoned (spec.unschedulable) and not being deleted."""
    metadata = body.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return False
    if (body.get("spec") or {}).get("unschedulable") is True:
        return False
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )


def keeps_running(body: Body) -> bool:
    """Whether replicas running on the node may stay: Ready=True, not being deleted, no NoExecute
    taint. A cordon alone (spec.unschedulable) keeps them; `kubectl drain` evicts them itself."""
    metadata = body.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return False
    taints = (body.get("spec") or {}).get("taints") or []
    if any(isinstance(t, Mapping) and t.get("effect") == "NoExecute" for t in taints):
        return False
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )


def _profiles_by_node(
    bodies: Iterable[Body], left_out: Callable[[str, str, Exception], None]
) -> dict[str, NodePowerProfile]:
    """Profiles by node; an unreadable one is left out (its node's agent then counts as not
    ready) through `left_out`, which raises in strict mode."""
    profiles: dict[str, NodePowerProfile] = {}
    names = _Unique("NodePowerProfile", "metadata.name")
    for body in bodies:
        try:
            profile = parse_nodepowerprofile(body)
            names.add(profile.metadata.name)  # which is spec.nodeName: one profile per node
        except (ApiValidationError, SnapshotError) as error:
            left_out("NodePowerProfile", str(_metadata_name(body)), error)
            continue
        profiles[profile.spec.node_name] = profile
    return profiles


def raise_on_its_way(profile: NodePowerProfile, raised_generation: int | None) -> bool:
    """Whether the only change the agent has not applied is a raise the operator wrote and has not
    waited for: the spec is still that raise (at `raised_generation`, the generation the raising
    step's write made), and the ready agent applied the generation just before it.

    Its GPUs are then at or below the spec: the raising step is written only once every lowering
    of its round was confirmed, and it never lowers a GPU (`transition.power_steps`), so the
    generation before it is at or below it, and the agent moves from the one to the other. The node
    counts as ready at the spec's limits (the lowering step bounds it by the spec too, not by the
    older generation's reports: `transition.NodePowerState.from_profile`).
    """
    if raised_generation is None or profile.metadata.generation != raised_generation:
        return False
    # An agent that read the raise itself says whether it applied it (Applied): True only where
    # the raise is confirmed, as `limits_confirmed` says too.
    return profile.limits_applied(raised_generation - 1)


def agent_ready(
    profile: NodePowerProfile | None,
    *,
    now: datetime,
    heartbeat_timeout_seconds: float | None,
    raised_generation: int | None = None,
) -> bool:
    """Whether a node's agent confirmed its limits, or all but a raise on its way
    (`raise_on_its_way`: `raised_generation`), and, given a timeout, reported recently."""
    if profile is None:
        return False
    if not (profile.limits_confirmed or raise_on_its_way(profile, raised_generation)):
        return False
    if heartbeat_timeout_seconds is None:
        return True
    heartbeat = profile.status.agent.heartbeat if profile.status.agent else None
    return heartbeat is not None and (now - heartbeat).total_seconds() <= heartbeat_timeout_seconds


def unknown_gpu_max_watts() -> float:
    """What one GPU counts at while nothing says what it can draw (product label missing or not
    in the catalogue, and no NVML maximum from its agent): the catalogue's
    `unknown_product.max_watts_before_agent`, 2,000 W as shipped, the largest limit a
    NodePowerProfile can hold (above the B300's 1,400 W board power, the highest of a current
    NVIDIA data-centre GPU, https://glennklockwood.com/garden/processors/B300). An assumption, not
    measured; `--catalogue-file` can change it."""
    return catalogue().unknown.max_watts_before_agent.value


def excluded_node(
    name: str, reason: str, gpus: int | None, profile: NodePowerProfile | None
) -> ExcludedNode:
    """A GPU node the plan cannot use, and what its budgets count it at.

    Counted at the limits its agent confirmed (`status.gpus[].targetWatts`, else `appliedWatts`
    for a GPU with no target, such as another team's; they are not changed while the node is
    excluded), else at the most its GPUs can draw: each GPU's maximum limit as the agent reports
    it (NVML), else `unknown_gpu_max_watts()`. GPUs are counted from allocatable, else from the
    profile's status.
    """
    status = profile.status if profile is not None else None
    if profile is not None and status is not None and profile.limits_confirmed and status.gpus:
        limits = [
            g.target_watts if g.target_watts is not None else g.applied_watts for g in status.gpus
        ]
        if all(limit is not None for limit in limits):
            watts = sum(limit or 0.0 for limit in limits)
            return ExcludedNode(
                name, f"{reason}; counted at its confirmed limits ({watts:g} W)", watts
            )
    reported = {g.index: g.max_watts for g in status.gpus} if status is not None else {}
    count = gpus if gpus is not None else len(reported)
    unknown = unknown_gpu_max_watts()
    watts = sum(reported.get(i) or unknown for i in range(count))
    return ExcludedNode(
        name, f"{reason}; counted at the most its {count} GPU(s) can draw ({watts:g} W)", watts
    )


def agent_lost(
    profile: NodePowerProfile | None, *, now: datetime, heartbeat_timeout_seconds: float | None
) -> bool:
    """Whether a node's agent reported before and has been silent for longer than the timeout
    (a node that never had an agent is not lost: it waits for its first report)."""
    agent = profile.status.agent if profile is not None else None
    heartbeat = agent.heartbeat if agent is not None else None
    if heartbeat is None or heartbeat_timeout_seconds is None:
        return False
    return (now - heartbeat).total_seconds() > heartbeat_timeout_seconds


# When at least this share of the agents that have reported, and at least SILENT_TOGETHER_MIN of
# them, are lost at once, the fault is taken to lie between the operator and the agents (an API
# server too loaded to take their heartbeats in time, the operator's watch behind, the agents'
# DaemonSet rolled out broken), not in the nodes: their replicas stay. The values are
# kube-controller-manager's for a zone it stops evicting from (`--unhealthy-zone-threshold`
# 0.55, "no less than 3" nodes NotReady; NodeLifecycleControllerConfiguration,
# https://godocs.io/k8s.io/kubernetes/pkg/controller/nodelifecycle/config).
SILENT_TOGETHER_SHARE = 0.55
SILENT_TOGETHER_MIN = 3


def lost_agents(
    nodes: Iterable[Body],
    profiles: Mapping[str, NodePowerProfile],
    now: datetime,
    heartbeat_timeout_seconds: float | None,
) -> tuple[frozenset[str], bool]:
    """The nodes whose agents are lost (`agent_lost`), and whether so many of the agents that
    have reported are lost at once that their replicas stay (`SILENT_TOGETHER_SHARE`,
    `SILENT_TOGETHER_MIN`)."""
    names = {name for body in nodes if isinstance(name := _metadata_name(body), str)}
    reported = [
        name
        for name in names
        if (profile := profiles.get(name)) is not None
        and profile.status.agent is not None
        and profile.status.agent.heartbeat is not None
    ]
    lost = frozenset(
        name
        for name in reported
        if agent_lost(profiles[name], now=now, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    )
    together = len(lost) >= SILENT_TOGETHER_MIN and len(lost) >= SILENT_TOGETHER_SHARE * len(
        reported
    )
    return lost, together


def _gpu_node(
    body: Body,
    *,
    profiles: Mapping[str, NodePowerProfile],
    require_agents: bool,
    now: datetime,
    heartbeat_timeout_seconds: float | None,
    unconfirmed_nodes: frozenset[str],
    raised_generation: int | None = None,
    unmanaged_pod_gpus: int = 0,
    discovered: dict[str, ProductSpec] | None = None,
    lost: bool = False,
    lost_together: bool = False,
) -> GpuNode | ExcludedNode | None:
    """The node as the optimizer sees it, None when it has no GPUs, or an `ExcludedNode` when
    it has GPUs the plan cannot use. A product the catalogue lacks is added to `discovered`.
    `lost`: its agent is lost (it takes no work, its replicas move); `lost_together`: so many
    agents are lost at once that their replicas stay (`lost_agents`)."""
    name = _node_name(body)
    profile = profiles.get(name)
    try:
        count = gpu_count(body)
    except SnapshotError as error:
        return excluded_node(name, str(error), None, profile)
    # Allocatable 0 while the profile's agent still reports GPUs (a device plugin restarting):
    # the node stays in its budgets, takes no new work, and its limits are planned down.
    allocatable_gone = count == 0 and profile_gpu_count(profile) > 0
    if allocatable_gone:
        count = profile_gpu_count(profile)
    if count == 0:
        return None
    field_name = f'metadata.labels["{GPU_PRODUCT_LABEL}"]'
    labels = _labels_or_none(body)
    label = labels.get(GPU_PRODUCT_LABEL) if labels is not None else None
    if not label:
        return excluded_node(
            name,
            f"Node {name}: {field_name} is missing; wattsched needs the GPU Feature Discovery "
            "labels on every node with allocatable nvidia.com/gpu",
            count,
            profile,
        )
    try:
        memory_gib = _memory_gib(body)
    except SnapshotError as error:
        return excluded_node(name, str(error), count, profile)
    product = product_key(label)
    if product not in known_products():
        spec, reason = _discovered(name, product, memory_gib, profile)
        if spec is None:
            return excluded_node(name, reason or product, count, profile)
        if discovered is not None:
            discovered.setdefault(product, spec)
    ready = True
    if require_agents:
        ready = name not in unconfirmed_nodes and agent_ready(
            profile,
            now=now,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            raised_generation=raised_generation,
        )
    with products_in_scope(discovered or {}):
        unmanaged_gpus, unmanaged_watts = unmanaged_gpus_of(profile, product, unmanaged_pod_gpus)
    return GpuNode(
        name=name,
        product=product,
        gpu_count=max(count - unmanaged_gpus, 0),
        schedulable=is_schedulable(body) and not allocatable_gone and not lost,
        keeps_running=keeps_running(body) and (not lost or lost_together),
        agent_ready=ready,
        unmanaged_gpus=unmanaged_gpus,
        unmanaged_watts=unmanaged_watts,
        memory_gib=memory_gib,
    )


GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
MIB_PER_GIB = 1024


def _memory_gib(body: Body) -> float | None:
    """The node's `nvidia.com/gpu.memory` label (MiB, per GPU) in GiB; None when absent."""
    text = _labels(body).get(GPU_MEMORY_LABEL)
    if text is None:
        return None
    if not _WHOLE_NUMBER.match(text):
        raise SnapshotError(
            f'Node {_node_name(body)}: metadata.labels["{GPU_MEMORY_LABEL}"]: {text!r} is not a '
            "whole number of MiB (GPU Feature Discovery writes e.g. 81559)"
        )
    return round(int(text) / MIB_PER_GIB, 3)


def _discovered(
    name: str, product: str, memory_gib: float | None, profile: NodePowerProfile | None
) -> tuple[ProductSpec | None, str | None]:
    """A product the catalogue lacks, from the node's memory label and its agent's NVML reading;
    while the agent has not reported that reading, no product but why the node is excluded."""
    readings = [] if profile is None else [g for g in profile.status.gpus if g.max_watts]
    if not readings:
        return None, (
            f"Node {name}: GPU product {product!r} is not in the catalogue and its node agent has "
            "not reported the GPUs' power range (NodePowerProfile status.gpus[].maxWatts): it "
            "takes no work until it does"
        )
    first = readings[0]
    maximum = max(g.max_watts or 0.0 for g in readings)
    minimum = first.min_watts if first.min_watts else maximum
    default = first.default_watts if first.default_watts else maximum
    spec = discovered_product(
        product,
        memory_gib=0.0 if memory_gib is None else memory_gib,
        min_watts=min(minimum, maximum),
        default_watts=min(default, maximum),
        max_watts=maximum,
    )
    return spec, None


_MAPPED = frozenset({MappingSource.POD_RESOURCES, MappingSource.LAST_KNOWN})


def profile_gpu_count(profile: NodePowerProfile | None) -> int:
    """GPUs the node's agent last reported (`status.gpuCount`, else `status.gpus`); 0 if none."""
    if profile is None:
        return 0
    return profile.status.gpu_count or len(profile.status.gpus)


def _with_leaving(node: GpuNode, leaving: tuple[int, float] | None) -> GpuNode:
    """A node with the GPUs of old pods still serving during make-before-break moves (`handover`)
    taken out of planning and counted, at their limits, like GPUs wattsched does not place on
    (and marked as leaving: the plan over a horizon counts them in its first slot only)."""
    if leaving is None:
        return node
    gpus, watts = leaving
    gpus = min(gpus, node.gpu_count)
    return dataclasses.replace(
        node,
        gpu_count=node.gpu_count - gpus,
        unmanaged_gpus=node.unmanaged_gpus + gpus,
        unmanaged_watts=node.unmanaged_watts + watts,
        leaving_gpus=gpus,
        leaving_watts=watts,
    )


def unmanaged_gpus_of(
    profile: NodePowerProfile | None, product: str, pod_gpus: int
) -> tuple[int, float]:
    """GPUs of a node held by pods wattsched did not create, and the sum of their limits (W).

    The agent's device mapping is the truth where it has one (each GPU at its applied limit, else
    its NVML maximum, else the product's); otherwise the GPU requests of such pods bound to the
    node (`pod_gpus`), each at the product's maximum. While the agent has not applied the spec's
    generation (a raise on its way: `raise_on_its_way`), what it applied may be an older, lower
    cap: each GPU counts at least at the spec's `unmanagedPowerLimitWatts` (where the spec has
    none, the agent leaves the GPU as it is).
    """
    product_max = product_spec(product).max_watts.value
    mapping = None if profile is None else profile.status.device_mapping
    if profile is not None and mapping is not None and mapping.source in _MAPPED:
        status = profile.status
        others = [gpu for gpu in status.gpus if gpu.holder is Holder.OTHER]
        generation = profile.metadata.generation
        behind = generation is not None and (status.observed_generation or 0) < generation
        floor = (profile.spec.unmanaged_power_limit_watts or 0.0) if behind else 0.0
        watts = sum(
            max(
                floor,
                next(w for w in (gpu.applied_watts, gpu.max_watts, product_max) if w is not None),
            )
            for gpu in others
        )
        return len(others), watts
    return pod_gpus, pod_gpus * product_max


# -- workloads -------------------------------------------------------------------------------------


def _is_finished(workload: LLMWorkload) -> bool:
    return (
        workload.metadata.deletion_timestamp is not None or workload.status.phase in TERMINAL_PHASES
    )


def _work_amount(total_work: TotalWork) -> WorkAmount:
    if total_work.tokens is not None:
        return WorkAmount(unit=WorkUnit.TOKENS, amount=total_work.tokens)
    if total_work.steps is not None:
        return WorkAmount(
            unit=WorkUnit.STEPS,
            amount=float(total_work.steps),
            tokens_per_step=total_work.tokens_per_step,
        )
    if total_work.gpu_hours is None:  # parse_llmworkload guarantees one unit; keep mypy honest
        raise ValueError("totalWork has no unit")
    return WorkAmount(unit=WorkUnit.GPU_HOURS, amount=total_work.gpu_hours)


def _with_deadline(timeless: Workload, workload: LLMWorkload, now: datetime) -> Workload:
    deadline = workload.spec.slo.deadline_time
    if deadline is None:
        return timeless
    return dataclasses.replace(timeless, deadline_seconds=deadline_seconds(deadline, now))


# Parsed LLMWorkloads by uid, each with the resourceVersion it was parsed from: the API server
# never reuses a (uid, resourceVersion) pair for different content, and re-planning mostly sees
# unchanged objects, so the operator parses each version once. One entry per object: a new version
# replaces the one before (keyed by the pair, every status write left an entry behind: 10,000
# workloads held up to 50,000 parsed versions). Bounded (the oldest entry goes first); objects
# without both keys (hand-written snapshots) are parsed every time.
_READ_CACHE_SIZE = 50_000
_read_cache: dict[str, tuple[str, LLMWorkload, Workload]] = {}


def _read_workload(body: Body) -> tuple[LLMWorkload, Workload]:
    """The parsed LLMWorkload and its optimizer form without the deadline (which needs `now`)."""
    metadata = body.get("metadata")
    uid = version = None
    if isinstance(metadata, Mapping):
        uid, version = metadata.get("uid"), metadata.get("resourceVersion")
        if isinstance(uid, str) and uid and isinstance(version, str) and version:
            cached = _read_cache.get(uid)
            if cached is not None and cached[0] == version:
                return cached[1], cached[2]
        else:
            uid = None
    workload = _as_planned(parse_llmworkload(body))
    spec_read = _spec_reads.read(body.get("spec"), workload) if uid is not None else None
    if spec_read is None:
        timeless = _timeless_workload(workload)
    else:
        workload = dataclasses.replace(workload, spec=spec_read[0])
        timeless = _timeless_workload(workload, dataclasses.replace(spec_read[1], key=workload.key))
    if uid is not None:
        if _read_cache.pop(uid, None) is None and len(_read_cache) >= _READ_CACHE_SIZE:
            del _read_cache[next(iter(_read_cache))]
        _read_cache[uid] = (str(version), workload, timeless)
    return workload, timeless


# Parsed specs by the read-only spec they were read from (`frozen.FrozenDict`, by identity, kept
# with it so its id is not reused): the operator's cache keeps one spec object for all the
# workloads whose spec is the same (`cache.SharedValues`), so workloads made from one template
# share one parsed spec and the optimizer form of it (`Workload` objects share its variants,
# products and work amount; each has its own key and progress). The specs no cached body holds
# any more leave whenever the table has doubled since the last sweep (as `cache.SharedValues`).
_SPEC_SWEEP_MIN_ENTRIES = 1024
# sys.getrefcount of a spec only this table, `cache.SharedValues`' table and the call hold.
_SPEC_UNUSED_REFERENCES = 3


class _SpecReads:
    """Parsed specs and their optimizer form, by the identity of the read-only spec."""

    def __init__(self) -> None:
        self.table: dict[int, tuple[FrozenDict, LLMWorkloadSpec, Workload]] = {}
        self._sweep_above = _SPEC_SWEEP_MIN_ENTRIES

    def read(self, spec: object, workload: LLMWorkload) -> tuple[LLMWorkloadSpec, Workload] | None:
        """The parsed spec and the optimizer form of it (with the key of the workload it was
        first read for) shared by every workload holding `spec`; None for a spec that may change
        (not a `FrozenDict`)."""
        if type(spec) is not FrozenDict:
            return None
        cached = self.table.get(id(spec))
        if cached is not None and cached[0] is spec:
            return cached[1], cached[2]
        if len(self.table) >= self._sweep_above:
            self._sweep()
        read = (spec, workload.spec, _spec_workload(workload))
        self.table[id(spec)] = read
        return read[1], read[2]

    def _sweep(self) -> None:
        """Drop the specs no cached body holds any more."""
        unused = [
            key
            for key, entry in self.table.items()
            if sys.getrefcount(entry[0]) <= _SPEC_UNUSED_REFERENCES
        ]
        for key in unused:
            del self.table[key]
        self._sweep_above = max(_SPEC_SWEEP_MIN_ENTRIES, 2 * len(self.table))


_spec_reads = _SpecReads()


def _as_planned(workload: LLMWorkload) -> LLMWorkload:
    """The workload with only the part of its status planning reads: its phase and progress.
    The rest (conditions, placements, figures, messages) is the operator's own output, read from
    the object's body where needed, not kept parsed for every workload (the parse cache holds one
    per LLMWorkload: docs/benchmarks.md has what that costs at 10,000)."""
    status = workload.status
    if status == LLMWorkloadStatus(phase=status.phase, progress=status.progress):
        return workload
    return dataclasses.replace(
        workload, status=LLMWorkloadStatus(phase=status.phase, progress=status.progress)
    )


def _timeless_workload(workload: LLMWorkload, from_spec: Workload | None = None) -> Workload:
    """The optimizer's form of `workload` without the deadline; `from_spec`: the form of its spec
    (`_spec_workload`) where already built."""
    converted = _spec_workload(workload) if from_spec is None else from_spec
    done = workload.status.progress
    if converted.remaining_work is None or done is None:
        return converted
    return dataclasses.replace(
        converted,
        remaining_work=progress.remaining_work(
            converted.remaining_work,
            done.completed_tokens,
            reference_tokens_per_gpu_hour(_CATALOGUE, converted),
        ),
    )


def _spec_workload(workload: LLMWorkload) -> Workload:
    """The optimizer's form of the workload's spec (with its key; no progress, no deadline)."""
    spec = workload.spec
    # A label the catalogue lacks names a discovered product (any NVIDIA GPU), so it is kept.
    allowed = {product_key(label) for label in spec.gpu.products}
    return Workload(
        key=workload.key,
        type=WorkloadType(spec.type.value),
        model_parameters_billions=spec.model.parameters_billions,
        gpus_per_replica=spec.gpu.gpus_per_replica,
        nodes_per_replica=spec.gpu.nodes_per_replica,
        variants=tuple(
            Variant(
                name=variant.name,
                precision=Precision(variant.precision.value),
                min_memory_gib=spec.variant_min_memory_gib(variant),
                relative_throughput=variant.relative_throughput,
                quality=variant.quality,
            )
            for variant in spec.variants
        ),
        replicas=spec.replicas or spec.effective_min_replicas,
        min_replicas=spec.effective_min_replicas,
        max_replicas=spec.effective_max_replicas,
        min_memory_gib_per_gpu=spec.gpu.min_memory_gib or 0.0,
        allowed_products=frozenset(allowed),
        min_quality=spec.min_quality,
        priority=spec.priority,
        preemptible=spec.effective_preemptible,
        policy=EnergyPolicy(spec.energy.policy.value),
        max_power_watts_per_gpu=spec.energy.max_power_watts_per_gpu,
        tokens_per_second=spec.slo.tokens_per_second,
        remaining_work=None if spec.slo.total_work is None else _work_amount(spec.slo.total_work),
        moves_to_save_energy=spec.move_to_save_energy,
    )


def job_terms(workload: LLMWorkload) -> progress.JobTerms | None:
    """A Training/FineTuning/BatchInference workload's total in tokens and progress query (None
    for Inference)."""
    if not workload.spec.is_gang:
        return None
    timeless = _timeless_workload(workload)
    total = None
    if workload.spec.slo.total_work is not None:
        total = progress.total_tokens(
            _work_amount(workload.spec.slo.total_work),
            reference_tokens_per_gpu_hour(_CATALOGUE, timeless),
        )
    return progress.JobTerms(total_tokens=total, prometheus_query=workload.spec.progress_query)


# -- budgets ---------------------------------------------------------------------------------------


def parse_budget(body: Body) -> EnergyBudget:
    try:
        return parse_energybudget(body)
    except ApiValidationError as error:
        raise SnapshotError(str(error)) from None


def _budget(
    budget: EnergyBudget,
    labels_by_node: Mapping[str, Mapping[str, str]],
    excluded_watts: Mapping[str, float],
) -> Budget:
    """The budget over the GPU nodes its selector matches; the excluded ones among them count
    as `uncontrolled_watts`."""
    selected = {name for name, labels in labels_by_node.items() if budget.spec.selects(labels)}
    return Budget(
        name=budget.name,
        power_cap_watts=budget.spec.power_cap_watts,
        node_names=frozenset(name for name in selected if name not in excluded_watts),
        uncontrolled_watts=sum(excluded_watts[name] for name in selected if name in excluded_watts),
    )


# -- pods ------------------------------------------------------------------------------------------


def _requested_gpus(pod: Body) -> int:
    """`nvidia.com/gpu` a pod's containers request (limits first, as for extended resources)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        amount = (resources.get("limits") or {}).get(GPU_RESOURCE) or (
            resources.get("requests") or {}
        ).get(GPU_RESOURCE)
        if isinstance(amount, int) or (isinstance(amount, str) and _WHOLE_NUMBER.match(amount)):
            total += int(amount)
    return total


def unmanaged_pod_gpus_by_node(pods: Iterable[Body]) -> dict[str, int]:
    """Node -> GPUs requested by pods without the `wattsched.io/workload` label bound to it
    (neither finished nor being deleted)."""
    by_node: dict[str, int] = {}
    for pod in pods:
        metadata = pod.get("metadata") or {}
        if (metadata.get("labels") or {}).get(WORKLOAD_LABEL) or metadata.get("deletionTimestamp"):
            continue
        if (pod.get("status") or {}).get("phase") in POD_FINISHED_PHASES:
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        gpus = _requested_gpus(pod)
        if node and gpus:
            by_node[str(node)] = by_node.get(str(node), 0) + gpus
    return by_node


def _container_env(pod: Body, name: str) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for env in container.get("env") or []:
            if isinstance(env, Mapping) and env.get("name") == name and "value" in env:
                return str(env["value"])
    return None


def current_placement(pod: Body, workloads: Mapping[str, LLMWorkload]) -> CurrentPlacement | None:
    """The running replica a wattsched pod stands for, or None when it is not one.

    Pods of workloads not in `workloads`, finished or deleting pods and pods without a node are
    not current placements. The variant and power limit come from the pod's annotations, else from
    its containers' env. A wattsched pod with a malformed replica label or no readable power limit
    is an error.
    """
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    workload_name = labels.get(WORKLOAD_LABEL)
    if not workload_name:
        return None
    namespace = metadata.get("namespace") or "default"
    where = f"Pod {namespace}/{metadata.get('name')}"
    key = f"{namespace}/{workload_name}"
    workload = workloads.get(key)
    if workload is None or metadata.get("deletionTimestamp"):
        return None
    if (pod.get("status") or {}).get("phase") in POD_FINISHED_PHASES:
        return None
    annotations = metadata.get("annotations") or {}
    node = (pod.get("spec") or {}).get("nodeName") or annotations.get(NODE_ANNOTATION)
    if not node:
        return None
    replica_text = labels.get(REPLICA_LABEL)
    if not isinstance(replica_text, str) or not _WHOLE_NUMBER.match(replica_text):
        raise SnapshotError(
            f'{where}: metadata.labels["{REPLICA_LABEL}"]: {replica_text!r} is not a replica index '
            '(a whole number such as "0")'
        )
    rank_text = labels.get(RANK_LABEL, "0")
    if not isinstance(rank_text, str) or not _WHOLE_NUMBER.match(rank_text):
        raise SnapshotError(
            f'{where}: metadata.labels["{RANK_LABEL}"]: {rank_text!r} is not a rank in its replica '
            '(a whole number such as "0")'
        )
    variant = annotations.get(VARIANT_ANNOTATION) or _container_env(pod, VARIANT_ENV)
    if not variant:
        variant = workload.spec.variants[0].name
    limit_text = annotations.get(POWER_LIMIT_ANNOTATION) or _container_env(pod, POWER_LIMIT_ENV)
    field_name = f'metadata.annotations["{POWER_LIMIT_ANNOTATION}"]'
    if limit_text is None:
        raise SnapshotError(
            f"{where}: {field_name} is missing (and no container has {POWER_LIMIT_ENV}); "
            "wattsched sets both on the pods it creates"
        )
    try:
        limit = float(limit_text)
    except ValueError:
        raise SnapshotError(
            f"{where}: {field_name}: {limit_text!r} is not a number of watts"
        ) from None
    return CurrentPlacement(
        workload=key,
        replica=int(replica_text),
        node=str(node),
        variant=str(variant),
        power_limit_watts=limit,
        rank=int(rank_text),
    )


def parse_now(text: str) -> datetime:
    """`--now` for `wattsched plan`: an RFC 3339 time (SnapshotError otherwise)."""
    try:
        return parse_time(text)
    except ValueError as error:
        raise SnapshotError(f"--now: {error}") from None

"""Pure functions from a plan to the Kubernetes objects the operator wants: pods and power profiles.

Given the optimizer's `Plan` and the LLMWorkload objects it was computed for, this module says what
each replica's pod looks like (one of two deterministic names, see `handover`; GPU request, node,
variant and power-limit env), what each NodePowerProfile's spec should be, and which pods must go.
It talks to no API server and keeps no state; `core` decides with it and `apply` writes what
the core decides, in a budget-safe order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wattsched_api.meta import GROUP, VERSION
from wattsched_api.vocabulary import GPU_RESOURCE, POD_FINISHED_PHASES
from wattsched_api.vocabulary import NODE_ANNOTATION as ANNOTATION_NODE
from wattsched_api.vocabulary import POWER_LIMIT_ANNOTATION as ANNOTATION_POWER_LIMIT
from wattsched_api.vocabulary import POWER_LIMIT_ENV as ENV_POWER_LIMIT
from wattsched_api.vocabulary import PRECISION_ENV as ENV_PRECISION
from wattsched_api.vocabulary import RANK_LABEL as LABEL_RANK
from wattsched_api.vocabulary import REPLICA_LABEL as LABEL_REPLICA
from wattsched_api.vocabulary import VARIANT_ANNOTATION as ANNOTATION_VARIANT
from wattsched_api.vocabulary import VARIANT_ENV as ENV_VARIANT
from wattsched_api.vocabulary import WORKLOAD_LABEL as LABEL_WORKLOAD
from wattsched_api.vocabulary import WORKLOAD_TYPE_ANNOTATION as ANNOTATION_WORKLOAD_TYPE
from wattsched_operator import replica_groups
from wattsched_operator.handover import REPLACES_ANNOTATION, ReplicaKey, is_ready
from wattsched_operator.transition import NodeLimits, PodKey
from wattsched_optimizer.problem import Placement, Plan, WorkloadType

__all__ = [
    "ANNOTATION_NODE",
    "ANNOTATION_POWER_LIMIT",
    "ANNOTATION_VARIANT",
    "ANNOTATION_WORKLOAD_TYPE",
    "ENV_POWER_LIMIT",
    "ENV_PRECISION",
    "ENV_VARIANT",
    "GPU_RESOURCE",
    "GROUP",
    "LABEL_REPLICA",
    "LABEL_WORKLOAD",
    "VERSION",
    "pod_name",
]

HOSTNAME_LABEL = "kubernetes.io/hostname"


@dataclass(frozen=True)
class WorkloadObject:
    """What pod building needs from one LLMWorkload (read from its metadata and spec)."""

    namespace: str
    name: str
    uid: str
    type: WorkloadType
    template: Mapping[str, Any]
    # variant name -> precision (`spec.variants[].precision`; default one `bf16` variant).
    precisions: Mapping[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_name(workload_name: str, replica: int, rank: int = 0) -> str:
    """A replica's first pod name (a make-before-break replacement takes its other one, see
    `handover`); a worker of a replica that spans nodes (`rank` > 0) is named after its leader
    (`replica_groups.member_name`) and never handed over."""
    return replica_groups.member_name(workload_name, replica, rank)


def format_watts(power_limit_watts: float) -> str:
    """Watts as written into env and annotations: whole watts when integral, else one decimal."""
    rounded = round(power_limit_watts, 1)
    return str(int(rounded)) if rounded == int(rounded) else str(rounded)


def build_pod(
    workload: WorkloadObject,
    placement: Placement,
    *,
    name: str | None = None,
    replaces: str | None = None,
) -> dict[str, Any]:
    """The pod for one planned replica, from `spec.template` plus what the operator adds.

    `name`: the replica's pod name (default `pod_name`; a replacement in a make-before-break move
    takes the replica's other name, see `handover`), `replaces`: the pod such a replacement
    replaces, written to its `wattsched.io/replaces` annotation.

    Added: `nvidia.com/gpu` requests and limits on the first container, a nodeSelector on
    `kubernetes.io/hostname` (kube-scheduler still binds, so its resource and taint checks hold),
    the workload/replica labels, the variant/precision/power-limit env on every container, and an
    ownerReference to the LLMWorkload so Kubernetes collects the pod with it.

    The WATTSCHED_* env vars come first in each container's env, replacing same-named ones from
    the template: Kubernetes expands `$(VAR)` only for variables defined earlier in the list, so
    this is what lets the template's own env values reference them.

    A pod of a replica that spans nodes also gets its rank label, its hostname (its name) and
    subdomain (the replica's headless Service), and the rendezvous env (`replica_groups`).
    """
    template = copy.deepcopy(dict(workload.template))
    template_meta: dict[str, Any] = dict(template.get("metadata") or {})
    spec: dict[str, Any] = dict(template.get("spec") or {})
    containers = [dict(c) for c in spec.get("containers") or []]
    if not containers:
        raise ValueError(
            f"LLMWorkload {workload.key}: spec.template.spec.containers is empty; "
            "a replica needs at least one container"
        )
    precision = workload.precisions.get(placement.variant, "bf16")
    added_env = [
        {"name": ENV_VARIANT, "value": placement.variant},
        {"name": ENV_PRECISION, "value": precision},
        {"name": ENV_POWER_LIMIT, "value": format_watts(placement.power_limit_watts)},
    ]
    ours = {ENV_VARIANT, ENV_PRECISION, ENV_POWER_LIMIT}
    spans = placement.nodes_per_replica > 1
    if spans:
        added_env += replica_groups.rendezvous_env(
            workload.name,
            workload.namespace,
            placement.replica,
            rank=placement.rank,
            nodes_per_replica=placement.nodes_per_replica,
            master_port=replica_groups.template_master_port(containers),
        )
        ours |= set(replica_groups.RENDEZVOUS_ENV)
    for container in containers:
        template_env = [e for e in container.get("env") or [] if e.get("name") not in ours]
        container["env"] = added_env + template_env
    first = containers[0]
    resources = {k: dict(v) for k, v in (first.get("resources") or {}).items()}
    for section in ("requests", "limits"):
        resources.setdefault(section, {})[GPU_RESOURCE] = str(placement.gpus)
    first["resources"] = resources
    spec["containers"] = containers
    # The plan's node only: templates may not choose nodes (nodeName, nodeSelector and node
    # affinity are refused by the CRD and the models).
    spec["nodeSelector"] = {HOSTNAME_LABEL: placement.node}
    if "restartPolicy" not in spec:
        is_batch = workload.type is not WorkloadType.INFERENCE
        spec["restartPolicy"] = "Never" if is_batch else "Always"
    labels = {
        **(template_meta.get("labels") or {}),
        LABEL_WORKLOAD: workload.name,
        LABEL_REPLICA: str(placement.replica),
    }
    if name is None or spans:
        name = pod_name(workload.name, placement.replica, placement.rank)
    if spans:
        labels[LABEL_RANK] = str(placement.rank)
        spec["hostname"] = name
        spec["subdomain"] = replica_groups.leader_name(workload.name, placement.replica)
    annotations = {
        **(template_meta.get("annotations") or {}),
        ANNOTATION_NODE: placement.node,
        ANNOTATION_VARIANT: placement.variant,
        ANNOTATION_POWER_LIMIT: format_watts(placement.power_limit_watts),
        ANNOTATION_WORKLOAD_TYPE: workload.type.value,
    }
    if replaces is not None:
        annotations[REPLACES_ANNOTATION] = replaces
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": workload.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [replica_groups.owner_reference(workload.name, workload.uid)],
        },
        "spec": spec,
    }


def desired_pods(
    workloads: Mapping[str, WorkloadObject],
    placements: Iterable[Placement],
    *,
    names: Mapping[ReplicaKey, str] | None = None,
    replaces: Mapping[ReplicaKey, str] | None = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Every planned replica's pod, keyed by (namespace, pod name); `names` and `replaces` by
    (workload key, replica) as `handover.decide` gives them (absent: `pod_name`, none)."""
    pods: dict[tuple[str, str], dict[str, Any]] = {}
    for placement in placements:
        workload = workloads.get(placement.workload)
        if workload is None:
            continue  # planned from a snapshot that has since lost the workload
        replica = (placement.workload, placement.replica)
        pod = build_pod(
            workload,
            placement,
            name=_planned_name(placement, workload.name, names),
            replaces=(replaces or {}).get(replica) if placement.nodes_per_replica == 1 else None,
        )
        pods[(workload.namespace, pod["metadata"]["name"])] = pod
    return pods


def _planned_name(
    placement: Placement, workload_name: str, names: Mapping[ReplicaKey, str] | None
) -> str:
    """A planned pod's name: the one `names` gives its replica (`handover.decide`), else
    `pod_name`; the pods of a replica that spans nodes always keep theirs (never handed over)."""
    given = (names or {}).get((placement.workload, placement.replica))
    if given is None or placement.nodes_per_replica > 1:
        return pod_name(workload_name, placement.replica, placement.rank)
    return given


@dataclass(frozen=True)
class PodChanges:
    """What to do with pods: delete these (namespace, name), create those, re-annotate the rest."""

    delete: tuple[tuple[str, str], ...]
    create: tuple[dict[str, Any], ...]
    # (namespace, name) -> new power-limit annotation for pods that stay where they are.
    relabel_power: Mapping[tuple[str, str], str]


def _pod_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod["metadata"]
    return (meta["namespace"], meta["name"])


def _is_finished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in POD_FINISHED_PHASES


def pod_changes(
    current: Iterable[Mapping[str, Any]],
    desired: Mapping[tuple[str, str], Mapping[str, Any]],
    keep: frozenset[tuple[str, str]] = frozenset(),
) -> PodChanges:
    """Compare the operator's pods with the planned ones.

    A pod is deleted when no replica is planned under its name, when its node or variant changed
    (pods are immutable, so a move is delete + create under the same name), or when it belongs to
    an earlier workload of the same name (another owner uid: deleted and created again before the
    garbage collector took its pods). A finished pod is
    left to the lifecycle rules (completion, retry with backoff), and so is any pod in `keep` (the
    old pod of a make-before-break move: its replacement has the replica's other name, see
    `handover`). A pod being deleted blocks the creation of a replacement of the same name until
    it is gone.
    """
    current_by_key = {_pod_key(p): p for p in current}
    delete: list[tuple[str, str]] = []
    create: list[dict[str, Any]] = []
    relabel: dict[tuple[str, str], str] = {}
    for key, pod in sorted(current_by_key.items()):
        if key in keep or _is_finished(pod) or pod["metadata"].get("deletionTimestamp"):
            continue
        want = desired.get(key)
        annotations = pod["metadata"].get("annotations") or {}
        if want is None:
            delete.append(key)
            continue
        uid = replica_groups.owner_uid(pod)
        if uid is not None and uid != replica_groups.owner_uid(want):
            delete.append(key)  # an earlier workload's; its replacement waits for the name
            continue
        want_annotations = want["metadata"]["annotations"]
        moved = any(
            annotations.get(a) != want_annotations[a] for a in (ANNOTATION_NODE, ANNOTATION_VARIANT)
        )
        if moved:
            delete.append(key)
        elif annotations.get(ANNOTATION_POWER_LIMIT) != want_annotations[ANNOTATION_POWER_LIMIT]:
            relabel[key] = want_annotations[ANNOTATION_POWER_LIMIT]
    for key, want in sorted(desired.items()):
        if key not in current_by_key:
            create.append(dict(want))
    return PodChanges(delete=tuple(delete), create=tuple(create), relabel_power=relabel)


def planned_limits(
    plan: Plan,
    *,
    names: Mapping[ReplicaKey, str] | None = None,
    kept: Mapping[str, Mapping[PodKey, float]] | None = None,
) -> dict[str, NodeLimits]:
    """Each planned node's limits: one per replica's pod (named as in `desired_pods`), one per
    old pod a make-before-break move keeps (`kept`: node -> pod -> its limit, see `handover`), and
    the idle limit for every other GPU of the node; a replica the plan locks clocks for gets its
    range."""
    pods: dict[str, dict[PodKey, float]] = {node: {} for node in plan.node_power_limits_watts}
    for node, by_pod in (kept or {}).items():
        pods.setdefault(node, {}).update(by_pod)
    clocks: dict[str, dict[PodKey, tuple[int, int]]] = {}
    for placement in plan.placements:
        namespace, _, name = placement.workload.partition("/")
        key = (namespace, _planned_name(placement, name, names))
        pods.setdefault(placement.node, {})[key] = placement.power_limit_watts
        if placement.sm_clock_mhz is not None:
            clock = placement.sm_clock_mhz
            clocks.setdefault(placement.node, {})[key] = (clock, clock)
    return {
        node: NodeLimits(
            idle_watts=plan.node_idle_limits_watts.get(node),
            pods=by_pod,
            clocks=clocks.get(node, {}),
        )
        for node, by_pod in pods.items()
    }


def moved_replicas(
    current: Mapping[tuple[str, str], Mapping[str, Any]],
    desired: Mapping[tuple[str, str], Mapping[str, Any]],
    delete: Iterable[tuple[str, str]],
    notes: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, list[str]]:
    """Per workload key (`namespace/name`), the replicas a deletion moves: a pod deleted while a pod
    of the same name is still wanted elsewhere or with another variant, as `<pod>: <from> -> <to>`,
    followed by ` (<note>)` for a pod in `notes` (why it went before its replacement was ready).

    `current`: the operator's pods by (namespace, name); `desired` as `desired_pods` returns it;
    `delete` as `pod_changes` returns it. Deletions with no wanted replacement (preemptions,
    scale-down, retries) are not moves.
    """
    moves: dict[str, list[str]] = {}
    for key in delete:
        pod, want = current.get(key), desired.get(key)
        if pod is None or want is None:
            continue
        before = pod["metadata"].get("annotations") or {}
        after = want["metadata"]["annotations"]
        old_node = (pod.get("spec") or {}).get("nodeName") or before.get(ANNOTATION_NODE)
        text = f"{key[1]}: {old_node} -> {after[ANNOTATION_NODE]}"
        if before.get(ANNOTATION_VARIANT) != after[ANNOTATION_VARIANT]:
            text += f" (variant {before.get(ANNOTATION_VARIANT)} -> {after[ANNOTATION_VARIANT]})"
        if key in (notes or {}):
            text += f" ({(notes or {})[key]})"
        workload = f"{key[0]}/{pod['metadata'].get('labels', {}).get(LABEL_WORKLOAD)}"
        moves.setdefault(workload, []).append(text)
    return moves


@dataclass(frozen=True)
class PacedDeletions:
    """A round's pod deletions split into those made now and those left for a later round."""

    now: tuple[tuple[str, str], ...]
    later: tuple[tuple[str, str], ...]


def pace_deletions(
    delete: Iterable[tuple[str, str]],
    current: Mapping[tuple[str, str], Mapping[str, Any]],
    desired: Mapping[tuple[str, str], Mapping[str, Any]],
    *,
    services: frozenset[str],
    forced: frozenset[str],
    lost_nodes: frozenset[str],
) -> PacedDeletions:
    """Which of the planned deletions happen this round, so that a service loses at most one
    replica at a time.

    For an Inference workload (`services`, keys `namespace/name`) that is not in `forced` (a
    budget that no limit in place can keep forces its moves at once), a replica that moves (a
    deletion with a replacement wanted under the same name) goes only while every other replica
    the plan wants is Ready, and one per round; the others wait for a later round. A pod that
    serves nothing (not Ready, or on a node in `lost_nodes`: gone, NotReady, NoExecute) always
    goes; so does a pod that is not moving (scale-down, preemption: the plan wants it nowhere) and
    every gang member. The pods of a replica that spans nodes go together (one replica's move).
    """
    now: list[tuple[str, str]] = []
    later: list[tuple[str, str]] = []
    down: dict[str, int] = {}
    for key in desired:
        pod = current.get(key)
        if pod is None or not is_ready(pod):
            workload = f"{key[0]}/{desired[key]['metadata']['labels'][LABEL_WORKLOAD]}"
            down[workload] = down.get(workload, 0) + 1
    for key in sorted(delete):
        pod = current.get(key)
        if pod is None:
            now.append(key)
            continue
        workload = f"{key[0]}/{(pod['metadata'].get('labels') or {}).get(LABEL_WORKLOAD)}"
        node = (pod.get("spec") or {}).get("nodeName") or (
            pod["metadata"].get("annotations") or {}
        ).get(ANNOTATION_NODE)
        moving = key in desired
        serving = is_ready(pod) and node not in lost_nodes
        if workload not in services or workload in forced or not moving or not serving:
            now.append(key)
        elif down.get(workload, 0) == 0:
            now.append(key)
            down[workload] = 1
        else:
            later.append(key)
    # The pods of a replica that spans nodes go together: one going now takes the others along.
    going = {group for key in now if (group := _group_of(current.get(key), key)) is not None}
    along = [key for key in later if _group_of(current.get(key), key) in going]
    return PacedDeletions(
        now=tuple(now + along), later=tuple(key for key in later if key not in along)
    )


def _group_of(pod: Mapping[str, Any] | None, key: tuple[str, str]) -> tuple[str, str, str] | None:
    """(namespace, workload, replica) of a pod of a replica that spans nodes; None otherwise."""
    labels = ((pod or {}).get("metadata") or {}).get("labels") or {}
    if LABEL_RANK not in labels:
        return None
    return (key[0], str(labels.get(LABEL_WORKLOAD)), str(labels.get(LABEL_REPLICA)))


def node_power_profile(node_name: str, limits: NodeLimits) -> dict[str, Any]:
    """A NodePowerProfile manifest (cluster-scoped, named after its node): a limit per wattsched
    pod, applied by the agent to the GPUs that pod holds, and one for idle GPUs."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NodePowerProfile",
        "metadata": {"name": node_name},
        "spec": {
            "nodeName": node_name,
            **{k: v for k, v in limits.spec_fields().items() if v is not None},
        },
    }

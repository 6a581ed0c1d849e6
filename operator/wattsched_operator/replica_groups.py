"""Pure functions for replicas that span nodes: names, rendezvous env, the headless Service per
replica, and which pods go so that a replica restarts as a whole.

A replica of an LLMWorkload with `spec.gpu.nodesPerReplica` > 1 is LeaderWorkerSet's shape: a
leader pod (rank 0, named like any replica's pod) and workers (`<leader>-w<rank>`), one on each
whole node the plan gives it. Each pod's hostname is its name and its subdomain the replica's
headless Service (named like the leader), so every pod resolves as
`<pod>.<service>.<namespace>` (Kubernetes' pod DNS for hostname + subdomain). Every container gets
the rendezvous env under wattsched's names and the names frameworks read: LeaderWorkerSet's
`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE`, `LWS_WORKER_INDEX` (values as LWS sets them: the leader's
`<hostname>.<subdomain>.<namespace>`, the pods in the group, 0 for the leader) and what
`torchrun --nnodes $WORLD_SIZE --node-rank $NODE_RANK --master-addr $MASTER_ADDR --master-port
$MASTER_PORT` reads (WORLD_SIZE counts nodes here, as PyTorchJob-style launchers inject it for
torchrun, which then sets the per-process WORLD_SIZE itself).

Not for: API calls (the loop applies what these return) or single-node replicas (their pods get
none of this).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wattsched_api.meta import GROUP, VERSION
from wattsched_api.vocabulary import (
    GROUP_SIZE_ENV,
    LEADER_ADDRESS_ENV,
    LWS_GROUP_SIZE_ENV,
    LWS_LEADER_ADDRESS_ENV,
    LWS_WORKER_INDEX_ENV,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NODE_RANK_ENV,
    POD_FINISHED_PHASES,
    RANK_ENV,
    RANK_LABEL,
    REPLICA_LABEL,
    WORKLOAD_LABEL,
    WORLD_SIZE_ENV,
    PodPhase,
)

# torchrun's default rendezvous port; a template that sets MASTER_PORT keeps its own.
DEFAULT_MASTER_PORT = 29500

RENDEZVOUS_ENV = (
    LEADER_ADDRESS_ENV,
    GROUP_SIZE_ENV,
    RANK_ENV,
    LWS_LEADER_ADDRESS_ENV,
    LWS_GROUP_SIZE_ENV,
    LWS_WORKER_INDEX_ENV,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    WORLD_SIZE_ENV,
    NODE_RANK_ENV,
)


def leader_name(workload_name: str, replica: int) -> str:
    """The leader pod's name, also the replica's headless Service: `<workload>-<replica>`."""
    return f"{workload_name}-{replica}"


def member_name(workload_name: str, replica: int, rank: int) -> str:
    """A pod of a replica: the leader's name for rank 0, `<leader>-w<rank>` for a worker (the
    `w` keeps it apart from any replica pod name, which ends in `-<digits>`)."""
    leader = leader_name(workload_name, replica)
    return leader if rank == 0 else f"{leader}-w{rank}"


def leader_address(workload_name: str, replica: int, namespace: str) -> str:
    """The leader's DNS name through the replica's headless Service, as LWS writes it."""
    leader = leader_name(workload_name, replica)
    return f"{leader}.{leader}.{namespace}"


def rendezvous_env(
    workload_name: str,
    namespace: str,
    replica: int,
    *,
    rank: int,
    nodes_per_replica: int,
    master_port: str | None,
) -> list[dict[str, str]]:
    """The env every container of a replica's pod gets (wattsched's, LWS's and PyTorch's
    names); `master_port` is the template's MASTER_PORT where it sets one."""
    address = leader_address(workload_name, replica, namespace)
    size = str(nodes_per_replica)
    values = {
        LEADER_ADDRESS_ENV: address,
        GROUP_SIZE_ENV: size,
        RANK_ENV: str(rank),
        LWS_LEADER_ADDRESS_ENV: address,
        LWS_GROUP_SIZE_ENV: size,
        LWS_WORKER_INDEX_ENV: str(rank),
        MASTER_ADDR_ENV: address,
        MASTER_PORT_ENV: master_port or str(DEFAULT_MASTER_PORT),
        WORLD_SIZE_ENV: size,
        NODE_RANK_ENV: str(rank),
    }
    return [{"name": name, "value": values[name]} for name in RENDEZVOUS_ENV]


def template_master_port(containers: Iterable[Mapping[str, Any]]) -> str | None:
    """The first plain MASTER_PORT value the template's containers set, if any."""
    for container in containers:
        for env in container.get("env") or []:
            if env.get("name") == MASTER_PORT_ENV and isinstance(env.get("value"), str):
                return str(env["value"])
    return None


def owner_reference(workload_name: str, uid: str) -> dict[str, Any]:
    """The LLMWorkload as controller owner, so Kubernetes collects the object with it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMWorkload",
        "name": workload_name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the LLMWorkload that owns `obj` as its controller (None: no such owner)."""
    for owner in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("kind") == "LLMWorkload" and owner.get("controller"):
            return str(owner.get("uid"))
    return None


def headless_service(workload_name: str, namespace: str, uid: str, replica: int) -> dict[str, Any]:
    """The replica's headless Service: selects the replica's pods (leader and workers) and
    publishes them before they are Ready, so workers can resolve the leader during rendezvous
    (LeaderWorkerSet's headless Service does the same)."""
    name = leader_name(workload_name, replica)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {WORKLOAD_LABEL: workload_name, REPLICA_LABEL: str(replica)},
            "ownerReferences": [owner_reference(workload_name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {WORKLOAD_LABEL: workload_name, REPLICA_LABEL: str(replica)},
        },
    }


@dataclass(frozen=True)
class GroupRestart:
    """Pods to delete so replicas restart whole, and pods not to create until they can start
    together (by (namespace, name))."""

    delete: frozenset[tuple[str, str]]
    hold: frozenset[tuple[str, str]]


def _restarted(pod: Mapping[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any(int(s.get("restartCount") or 0) > 0 for s in statuses if isinstance(s, Mapping))


def group_restarts(
    pods: Iterable[Mapping[str, Any]],
    desired: Mapping[tuple[str, str], Mapping[str, Any]],
) -> GroupRestart:
    """If one pod of a replica that spans nodes failed (phase Failed) or restarted a container,
    the replica restarts as a whole: every other live pod of it goes now (as does a pod that
    restarted a container), and none of its wanted pods is created while a failed one is still
    there (the lifecycle deletes that one when its retry is due), so all start again together.

    `pods`: the operator's pods; `desired`: the planned pods by (namespace, name), as
    `desired.desired_pods` returns them. Only pods with a rank label (those of replicas that span
    nodes) are considered.
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if RANK_LABEL not in labels or WORKLOAD_LABEL not in labels:
            continue
        group = (
            str(pod["metadata"]["namespace"]),
            str(labels[WORKLOAD_LABEL]),
            str(labels.get(REPLICA_LABEL)),
        )
        groups.setdefault(group, []).append(pod)
    delete: set[tuple[str, str]] = set()
    stopped: set[tuple[str, str, str]] = set()
    for group, members in groups.items():
        failed = [p for p in members if (p.get("status") or {}).get("phase") == PodPhase.FAILED]
        restarted = [p for p in members if _restarted(p) and p not in failed]
        if not failed and not restarted:
            continue
        if failed:
            stopped.add(group)
        for pod in members:
            if pod in failed or pod["metadata"].get("deletionTimestamp"):
                continue
            if (pod.get("status") or {}).get("phase") == PodPhase.SUCCEEDED:
                continue
            delete.add((pod["metadata"]["namespace"], pod["metadata"]["name"]))
    hold = {
        key
        for key, pod in desired.items()
        if (
            key[0],
            str((pod["metadata"].get("labels") or {}).get(WORKLOAD_LABEL)),
            str((pod["metadata"].get("labels") or {}).get(REPLICA_LABEL)),
        )
        in stopped
    }
    return GroupRestart(delete=frozenset(delete), hold=frozenset(hold))


def whole_replica_deletions(
    delete: Iterable[tuple[str, str]], pods: Iterable[Mapping[str, Any]]
) -> tuple[tuple[str, str], ...]:
    """`delete` (pods to delete, by (namespace, name)) with every other live pod of each replica
    that spans nodes one of whose pods is in it: a replica's pods move, and restart, together
    (a worker moved alone would join a rendezvous that already ran)."""
    chosen = set(delete)
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for pod in pods:
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        if RANK_LABEL not in labels or meta.get("deletionTimestamp"):
            continue
        if (pod.get("status") or {}).get("phase") in POD_FINISHED_PHASES:
            continue
        group = (
            str(meta["namespace"]),
            str(labels.get(WORKLOAD_LABEL)),
            str(labels.get(REPLICA_LABEL)),
        )
        groups.setdefault(group, []).append((meta["namespace"], meta["name"]))
    extra = [key for members in groups.values() if chosen & set(members) for key in members]
    return tuple(sorted(chosen | set(extra)))

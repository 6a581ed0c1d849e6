"""Pure functions for the Services the operator owns: one per Inference LLMWorkload (its clients'
address) and the headless Service of each replica that spans nodes (`replica_groups`), and the
difference between those and the Services that exist.

An Inference workload's Service is named after the workload and selects its pods
(`wattsched.io/workload=<name>`), only the leaders (`wattsched.io/rank=0`) when its replicas span
nodes; Kubernetes routes only to Ready pods, so a replica serves once its pod (its leader) is
Ready and a move keeps the others serving (moves are paced one replica at a time,
`desired.pace_deletions`). It is created once a pod it selects is Ready, and kept from then on
while the workload lives: before that it would route nowhere. Its three writes (the Service,
kube-controller-manager's Endpoints and EndpointSlice) then come after the round that places the
pods, not among its writes (issue 18), and the endpoints are written with the ready pod in them,
not first without it and again when a model that loads for minutes turns the pod Ready. Its
ports are the template's container ports (of the leader when replicas span nodes); a template
without ports gets a headless Service (DNS names the ready pods). A workload whose name is not a
DNS-1035 label gets no Service (a Service name must be one).

Not for: API calls (the loop lists, creates, patches and deletes what `service_changes` says).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from wattsched_api.vocabulary import RANK_LABEL, SERVICE_ROLE_LABEL, WORKLOAD_LABEL
from wattsched_operator import replica_groups
from wattsched_operator.handover import is_ready

# A Service name: DNS-1035 label.
_SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
# The operator's own Services carry the workload label, and SERVICE_ROLE_LABEL says which:
INFERENCE_ROLE = "inference"
RENDEZVOUS_ROLE = "rendezvous"


@dataclass(frozen=True, slots=True)
class InferenceWorkload:
    """What an Inference workload's Service needs from the LLMWorkload."""

    namespace: str
    name: str
    uid: str
    spans_nodes: bool
    template: Mapping[str, Any]


def service_name(workload_name: str) -> str | None:
    """The Inference workload's Service name (its own), or None when that is not a valid one."""
    return workload_name if _SERVICE_NAME.fullmatch(workload_name) else None


def template_ports(template: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Service ports for every container port of the template: same number and protocol, the
    container port's name as target (or its number); names `port-<n>` where the template has
    none and there is more than one port (a Service needs names then)."""
    ports: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    for container in (template.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            number = port.get("containerPort")
            protocol = port.get("protocol") or "TCP"
            if not isinstance(number, int) or (number, protocol) in seen:
                continue
            seen.add((number, protocol))
            name = port.get("name")
            ports.append(
                {
                    **({"name": name} if name else {}),
                    "port": number,
                    "targetPort": name or number,
                    "protocol": protocol,
                }
            )
    if len(ports) > 1:
        for index, port in enumerate(ports):
            port.setdefault("name", f"port-{index}")
    return ports


def inference_service(workload: InferenceWorkload) -> dict[str, Any] | None:
    """The workload's Service, or None when its name cannot name one."""
    name = service_name(workload.name)
    return None if name is None else _inference_service(workload, name)


def _inference_service(workload: InferenceWorkload, name: str) -> dict[str, Any]:
    selector = {WORKLOAD_LABEL: workload.name}
    if workload.spans_nodes:
        selector[RANK_LABEL] = "0"
    ports = template_ports(workload.template)
    spec: dict[str, Any] = {"selector": selector}
    if ports:
        spec["ports"] = ports
    else:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": workload.namespace,
            "labels": {WORKLOAD_LABEL: workload.name, SERVICE_ROLE_LABEL: INFERENCE_ROLE},
            "ownerReferences": [replica_groups.owner_reference(workload.name, workload.uid)],
        },
        "spec": spec,
    }


def serves(pod: Mapping[str, Any]) -> bool:
    """The pod is one an Inference workload's Service sends traffic to: Ready, and its replica's
    leader (or its only pod)."""
    return ((pod["metadata"].get("labels") or {}).get(RANK_LABEL) in (None, "0")) and is_ready(pod)


def serving_workloads(pods: Iterable[Mapping[str, Any]]) -> frozenset[tuple[str, str]]:
    """(namespace, workload name) of each workload with a pod that `serves`."""
    return frozenset(
        (pod["metadata"]["namespace"], pod["metadata"]["labels"][WORKLOAD_LABEL])
        for pod in pods
        if WORKLOAD_LABEL in (pod["metadata"].get("labels") or {}) and serves(pod)
    )


class WantedServices(Mapping[tuple[str, str], dict[str, Any]]):
    """The Services the operator wants, by (namespace, name). An Inference workload's Service is
    built each time it is read (`inference_service`), not held: a round keeps what it wants from
    its decision until it applies, and 10,000 services built were 12 MB of dicts (measured, one
    round decided offline under tracemalloc). The headless ones, one per replica that spans
    nodes, are few and held. Each is kept where it exists; `may_create` says which are created
    where they do not (an Inference workload's once it serves)."""

    def __init__(
        self,
        inference: Mapping[tuple[str, str], InferenceWorkload],
        headless: Mapping[tuple[str, str], dict[str, Any]],
        serving: frozenset[tuple[str, str]],
    ) -> None:
        self._inference = inference
        self._headless = headless
        self._serving = serving

    def may_create(self, key: tuple[str, str]) -> bool:
        """Whether the Service is created where it does not exist: a headless one at once (its
        pods find each other through it as they start), an Inference workload's once a pod it
        selects is Ready."""
        if key in self._headless:
            return True
        workload = self._inference[key]
        return (workload.namespace, workload.name) in self._serving

    def __getitem__(self, key: tuple[str, str]) -> dict[str, Any]:
        if key in self._headless:
            return self._headless[key]
        return _inference_service(self._inference[key], key[1])

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from self._headless
        yield from (key for key in self._inference if key not in self._headless)

    def __len__(self) -> int:
        return len(self._headless) + sum(1 for key in self._inference if key not in self._headless)


def desired_services(
    inference: Iterable[InferenceWorkload],
    spanning_replicas: Mapping[tuple[str, str, str], Iterable[int]],
    serving: frozenset[tuple[str, str]],
) -> WantedServices:
    """Every Service the operator wants, by (namespace, name): each Inference workload's, and a
    headless one for each planned replica that spans nodes (`spanning_replicas`: (namespace,
    name, uid) -> replica indexes). A name two of them would share goes to the headless one.
    `serving`: the workloads with a pod that serves (`serving_workloads`), whose Service may be
    created."""
    services: dict[tuple[str, str], InferenceWorkload] = {}
    for workload in inference:
        name = service_name(workload.name)
        if name is not None:
            services[(workload.namespace, name)] = workload
    headless: dict[tuple[str, str], dict[str, Any]] = {}
    for (namespace, name, uid), replicas in spanning_replicas.items():
        for replica in replicas:
            service = replica_groups.headless_service(name, namespace, uid, replica)
            service["metadata"]["labels"][SERVICE_ROLE_LABEL] = RENDEZVOUS_ROLE
            headless[(namespace, service["metadata"]["name"])] = service
    return WantedServices(services, headless, serving)


@dataclass(frozen=True)
class ServiceChanges:
    """Services to create, patch (the fields the operator sets) and delete, by (namespace, name)."""

    create: tuple[dict[str, Any], ...]
    patch: Mapping[tuple[str, str], dict[str, Any]]
    delete: tuple[tuple[str, str], ...]


def _differs(current: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    spec, want_spec = current.get("spec") or {}, want["spec"]
    if spec.get("selector") != want_spec["selector"]:
        return True
    if (spec.get("clusterIP") == "None") != (want_spec.get("clusterIP") == "None"):
        return True
    have_ports = [
        (p.get("name"), p.get("port"), p.get("targetPort"), p.get("protocol") or "TCP")
        for p in spec.get("ports") or []
    ]
    want_ports = [
        (p.get("name"), p["port"], p["targetPort"], p["protocol"])
        for p in want_spec.get("ports") or []
    ]
    return have_ports != want_ports


def inference_workloads(bodies: Iterable[Mapping[str, Any]]) -> list[InferenceWorkload]:
    """The Inference LLMWorkloads among `bodies` (objects as the API returns them)."""
    found = []
    for body in bodies:
        spec = body.get("spec") or {}
        if spec.get("type", "Inference") != "Inference":
            continue
        meta = body["metadata"]
        found.append(
            InferenceWorkload(
                namespace=meta["namespace"],
                name=meta["name"],
                uid=meta.get("uid", ""),
                spans_nodes=int((spec.get("gpu") or {}).get("nodesPerReplica") or 1) > 1,
                template=spec.get("template") or {},
            )
        )
    return found


def status_service(body: Mapping[str, Any]) -> str | None:
    """`status.service` of an LLMWorkload: its Service's name (Inference with a valid name)."""
    if (body.get("spec") or {}).get("type", "Inference") != "Inference":
        return None
    return service_name(body["metadata"]["name"])


def desired_from_plan(
    bodies: Mapping[str, Mapping[str, Any]],
    placements: Iterable[Any],
    pods: Iterable[Mapping[str, Any]],
) -> WantedServices:
    """`desired_services` for the active workloads (`bodies` by key), the plan's placements
    (`Placement`s: the replicas with more than one node get a headless Service) and the
    operator's pods (those that serve let their workload's Service be created)."""
    spanning: dict[tuple[str, str, str], set[int]] = {}
    for placement in placements:
        body = bodies.get(placement.workload)
        if body is None or placement.nodes_per_replica <= 1:
            continue
        meta = body["metadata"]
        group = (meta["namespace"], meta["name"], meta.get("uid", ""))
        spanning.setdefault(group, set()).add(placement.replica)
    return desired_services(
        inference_workloads(bodies.values()),
        {group: sorted(replicas) for group, replicas in spanning.items()},
        serving_workloads(pods),
    )


def compared(service: Mapping[str, Any]) -> dict[str, Any]:
    """What `service_changes` reads of a listed Service: its name and namespace, whether it is
    being deleted, its LLMWorkload controller, its selector, clusterIP and ports. The operator
    keeps only this of each Service it lists, page by page (10,000 Services as the API returns
    them are 54 MB of Python objects, measured; the operator lists them every round)."""
    meta = service.get("metadata") or {}
    spec = service.get("spec") or {}
    kept_meta: dict[str, Any] = {"namespace": meta.get("namespace"), "name": meta.get("name")}
    if meta.get("deletionTimestamp"):
        kept_meta["deletionTimestamp"] = meta["deletionTimestamp"]
    owners = [
        {"kind": o.get("kind"), "controller": o.get("controller"), "uid": o.get("uid")}
        for o in meta.get("ownerReferences") or []
        if o.get("kind") == "LLMWorkload" and o.get("controller")
    ]
    if owners:
        kept_meta["ownerReferences"] = owners
    kept_spec = {key: spec[key] for key in ("selector", "clusterIP") if key in spec}
    if "ports" in spec:
        kept_spec["ports"] = [
            {key: port[key] for key in ("name", "port", "targetPort", "protocol") if key in port}
            for port in spec["ports"] or []
        ]
    return {"metadata": kept_meta, "spec": kept_spec}


def service_changes(
    current: Iterable[Mapping[str, Any]], desired: WantedServices
) -> ServiceChanges:
    """Compare the operator's Services (`current`: listed with the workload label) with the
    wanted ones; a missing one is created where `desired.may_create` it. Services without an
    LLMWorkload controller are not the operator's and are left alone (creating a wanted name
    they hold fails with a conflict, which the loop logs). One whose clusterIP kind (headless or
    not) must change is deleted and created again next round (the field is immutable); other
    differences are patched in place."""
    by_key = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in current}
    create: list[dict[str, Any]] = []
    patch: dict[tuple[str, str], dict[str, Any]] = {}
    delete: list[tuple[str, str]] = []
    for key, service in sorted(by_key.items()):
        if (
            service["metadata"].get("deletionTimestamp")
            or replica_groups.owner_uid(service) is None
        ):
            continue
        want = desired.get(key)
        if want is None or replica_groups.owner_uid(service) != replica_groups.owner_uid(want):
            delete.append(key)
            continue
        headless = (service.get("spec") or {}).get("clusterIP") == "None"
        if headless != (want["spec"].get("clusterIP") == "None"):
            delete.append(key)
        elif _differs(service, want):
            patch[key] = {
                "spec": {"selector": want["spec"]["selector"], "ports": want["spec"].get("ports")}
            }
    for key in sorted(desired):
        if key not in by_key and desired.may_create(key):
            create.append(dict(desired[key]))
    return ServiceChanges(create=tuple(create), patch=patch, delete=tuple(delete))

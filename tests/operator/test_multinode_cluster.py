"""Replicas that span nodes and the Inference Service, end to end on the sandbox (real
kube-apiserver, kube-scheduler, kube-controller-manager filling EndpointSlices, KWOK nodes and
pods): all-or-none placement, rendezvous env, headless Services resolving every pod, the whole
replica restarting when a worker fails, and the workload's Service selecting its ready leaders.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.operator.conftest import REPO_ROOT, StartOperator, get_json, wait_until

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

H100 = "NVIDIA-H100-80GB-HBM3"  # the sandbox has 8 nodes of 8 H100s


def spanning_workload(
    name: str, *, nodes: int, type_: str = "Inference", replicas: int = 1
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": type_,
        "model": {"name": "meta-llama/Llama-3.1-405B", "parametersBillions": 405},
        "gpu": {"count": 8, "nodesPerReplica": nodes, "products": [H100]},
        "variants": [{"name": "fp8", "precision": "fp8"}],
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "vllm",
                        "ports": [{"name": "http", "containerPort": 8000}],
                    }
                ]
            }
        },
    }
    if type_ == "Inference":
        spec |= {"minReplicas": replicas, "maxReplicas": replicas, "slo": {"tokensPerSecond": 1}}
    else:
        spec |= {"replicas": replicas, "slo": {"totalWork": {"tokens": 1_000_000_000}}}
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply(sandbox: Sandbox, namespace: str, *objects: dict[str, Any]) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))


def pods_by_name(sandbox: Sandbox, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    items = get_json(sandbox, "pods", "-n", namespace, "-l", f"wattsched.io/workload={name}")
    return {p["metadata"]["name"]: p for p in items["items"]}


def running_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def all_running(sandbox: Sandbox, namespace: str, name: str, count: int) -> bool:
    pods = pods_by_name(sandbox, namespace, name)
    live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
    return len(live) == count and all(running_ready(p) for p in live)


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def endpoint_pods(sandbox: Sandbox, namespace: str, service: str) -> dict[str, dict[str, Any]]:
    """Pod name -> endpoint, over the Service's EndpointSlices (as kube-controller-manager
    writes them)."""
    slices = get_json(
        sandbox,
        "endpointslices.discovery.k8s.io",
        "-n",
        namespace,
        "-l",
        f"kubernetes.io/service-name={service}",
    )["items"]
    return {
        endpoint["targetRef"]["name"]: endpoint
        for item in slices
        for endpoint in item.get("endpoints") or []
        if (endpoint.get("targetRef") or {}).get("kind") == "Pod"
    }


def service_of(sandbox: Sandbox, namespace: str, name: str) -> dict[str, Any] | None:
    """The Service, once it exists (an Inference workload's comes with its first ready pod)."""
    found = sandbox.kubectl(
        "get", "service", name, "-n", namespace, "--ignore-not-found", "-o", "json"
    )
    return json.loads(found.stdout) if found.stdout.strip() else None


def status_of(sandbox: Sandbox, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = (
        get_json(sandbox, "llmworkload", name, "-n", namespace).get("status") or {}
    )
    return status


def set_failed(sandbox: Sandbox, namespace: str, pod: str) -> None:
    """Stand in for the kubelet: the pod's container exited 1 (KWOK only completes Job pods)."""
    status = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "main",
                    "image": "vllm",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 1, "reason": "Error"}},
                }
            ],
        }
    }
    sandbox.kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def test_a_two_node_replica_runs_with_rendezvous_env_and_a_resolvable_headless_service(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator
) -> None:
    start_operator()
    apply(sandbox, namespace, spanning_workload("big", nodes=2))
    wait_until("leader and worker Running", lambda: all_running(sandbox, namespace, "big", 2), 90)
    pods = pods_by_name(sandbox, namespace, "big")
    assert set(pods) == {"big-0", "big-0-w1"}
    leader, worker = pods["big-0"], pods["big-0-w1"]
    assert leader["spec"]["nodeName"] != worker["spec"]["nodeName"]
    address = f"big-0.big-0.{namespace}"
    for rank, pod in enumerate((leader, worker)):
        env = env_of(pod)
        assert env["LWS_LEADER_ADDRESS"] == env["MASTER_ADDR"] == address
        assert env["WATTSCHED_LEADER_ADDRESS"] == address
        assert env["LWS_GROUP_SIZE"] == env["WORLD_SIZE"] == env["WATTSCHED_GROUP_SIZE"] == "2"
        assert env["LWS_WORKER_INDEX"] == env["NODE_RANK"] == env["WATTSCHED_RANK"] == str(rank)
        assert env["MASTER_PORT"] == "29500"
        assert pod["spec"]["subdomain"] == "big-0"
        assert pod["spec"]["hostname"] == pod["metadata"]["name"]
        assert pod["metadata"]["labels"]["wattsched.io/rank"] == str(rank)
    service = get_json(sandbox, "service", "big-0", "-n", namespace)
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["name"] == "big"
    # kube-controller-manager lists both pods, by hostname, under the headless Service: what
    # cluster DNS serves as big-0.big-0.<ns> and big-0-w1.big-0.<ns>.
    endpoints = wait_until(
        "the headless Service's EndpointSlices list leader and worker",
        lambda: (e := endpoint_pods(sandbox, namespace, "big-0")) and set(e) == set(pods) and e,
        60,
    )
    assert {name: e.get("hostname") for name, e in endpoints.items()} == {
        "big-0": "big-0",
        "big-0-w1": "big-0-w1",
    }
    for name, endpoint in endpoints.items():
        assert endpoint["addresses"] == [pods[name]["status"]["podIP"]]
    # Both pods' GPUs carry the same planned limit.
    status = wait_until(
        "big's status names its Service",
        lambda: (s := status_of(sandbox, namespace, "big")).get("service") and s,
    )
    placements = status["placements"]
    assert [(p["replica"], p["rank"]) for p in placements] == [(0, 0), (0, 1)]
    assert len({p["powerLimitWatts"] for p in placements}) == 1
    assert status["replicas"]["placed"] == 1
    assert status["service"] == "big"


def test_a_replica_that_cannot_have_all_its_nodes_gets_no_pod_at_all(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator
) -> None:
    """9 nodes of H100s asked for, 8 exist: nothing is placed, not even part of the replica."""
    start_operator()
    apply(sandbox, namespace, spanning_workload("huge", nodes=9))

    def refused() -> bool:
        status = get_json(sandbox, "llmworkload", "huge", "-n", namespace).get("status") or {}
        schedulable: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c["type"] == "Schedulable"), {}
        )
        return schedulable.get("status") == "False" and schedulable.get("reason") == "Gpus"

    wait_until("huge refused for GPUs", refused, 60)
    assert pods_by_name(sandbox, namespace, "huge") == {}
    message = get_json(sandbox, "llmworkload", "huge", "-n", namespace)["status"]["message"]
    assert "spec.gpu.nodesPerReplica=9" in message


def test_a_failed_worker_restarts_its_whole_replica(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator
) -> None:
    start_operator("--backoff-seconds", "2")
    apply(sandbox, namespace, spanning_workload("train", nodes=2, type_="Training"))
    wait_until("train Running", lambda: all_running(sandbox, namespace, "train", 2), 90)
    before = {n: p["metadata"]["uid"] for n, p in pods_by_name(sandbox, namespace, "train").items()}
    set_failed(sandbox, namespace, "train-0-w1")

    def leader_gone() -> bool:
        leader = pods_by_name(sandbox, namespace, "train").get("train-0")
        return leader is None or leader["metadata"]["uid"] != before["train-0"]

    wait_until("the leader of the failed worker's replica deleted", leader_gone, 60)

    def both_new() -> bool:
        pods = pods_by_name(sandbox, namespace, "train")
        return (
            set(pods) == set(before)
            and all(p["metadata"]["uid"] != before[n] for n, p in pods.items())
            and all(running_ready(p) for p in pods.values())
        )

    wait_until("leader and worker both replaced and Running", both_new, 90)
    events = sandbox.kubectl("get", "events", "-n", namespace).stdout
    assert "ReplicaFailed" in events


def test_the_inference_service_selects_exactly_the_ready_leaders(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator
) -> None:
    start_operator()
    apply(sandbox, namespace, spanning_workload("chat", nodes=2, replicas=2))
    wait_until(
        "2 replicas x 2 pods Running", lambda: all_running(sandbox, namespace, "chat", 4), 90
    )
    service = wait_until(
        "the Service, with the first ready leader", lambda: service_of(sandbox, namespace, "chat")
    )
    assert service["spec"]["selector"] == {
        "wattsched.io/workload": "chat",
        "wattsched.io/rank": "0",
    }
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 8000, "http")
    ]
    assert service["metadata"]["ownerReferences"][0]["kind"] == "LLMWorkload"
    endpoints = wait_until(
        "the Service's EndpointSlices list both leaders",
        lambda: (e := endpoint_pods(sandbox, namespace, "chat")) and len(e) == 2 and e,
        60,
    )
    assert set(endpoints) == {"chat-0", "chat-1"}
    assert all(e["conditions"]["ready"] for e in endpoints.values())
    wait_until(
        "status.service names it",
        lambda: status_of(sandbox, namespace, "chat").get("service") == "chat",
    )
    # The Services go with the workload (owner references; the garbage collector deletes them).
    sandbox.kubectl("delete", "llmworkload", "chat", "-n", namespace, "--timeout=60s")

    def services_gone() -> bool:
        items = get_json(sandbox, "services", "-n", namespace)["items"]
        return not [s for s in items if s["metadata"]["name"].startswith("chat")]

    wait_until("the workload's Services deleted with it", services_gone, 60)


def test_the_large_model_examples_run_on_whole_h100_nodes(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator
) -> None:
    """examples/large-models/: the 405B service on 2 x 8 H100s and the 70B run on 4 nodes."""
    start_operator()
    sandbox.kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "examples" / "large-models"))
    wait_until(
        "llama-405b's 2 pods Running", lambda: all_running(sandbox, namespace, "llama-405b", 2), 90
    )
    wait_until(
        "llama-70b-pretrain's 4 pods Running",
        lambda: all_running(sandbox, namespace, "llama-70b-pretrain", 4),
        90,
    )
    nodes = {}
    for name, count in (("llama-405b", 2), ("llama-70b-pretrain", 4)):
        pods = pods_by_name(sandbox, namespace, name)
        nodes[name] = {p["spec"]["nodeName"] for p in pods.values()}
        assert len(nodes[name]) == count
        assert {env_of(p)["WORLD_SIZE"] for p in pods.values()} == {str(count)}

        def running_status(name: str = name) -> dict[str, Any] | None:
            status = status_of(sandbox, namespace, name)
            return status if status.get("phase") == "Running" else None

        status = wait_until(f"{name} Running", running_status)
        assert len({p["powerLimitWatts"] for p in status["placements"]}) == 1
    assert nodes["llama-405b"].isdisjoint(nodes["llama-70b-pretrain"])
    assert all(n.startswith("gpu-h100-") for names in nodes.values() for n in names)
    service = wait_until(
        "llama-405b's Service", lambda: service_of(sandbox, namespace, "llama-405b")
    )
    assert service["spec"]["ports"][0]["port"] == 8000

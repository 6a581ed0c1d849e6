"""Disruption only with a reason, on the sandbox (issue 11): with the examples running, lowering
rack-a, cordoning a busy node and draining a node under a PodDisruptionBudget.

Pods are compared by UID before and after: a recreated pod (same name, new UID) is a move.
KWOK plays the kubelets and marks pods Ready; the simulated agents apply the limits.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.operator.conftest import (
    REPO_ROOT,
    TEST_LABEL,
    OperatorProcess,
    StartOperator,
    get_json,
    wait_until,
)
from tests.operator.test_operator_cluster import (
    apply,
    ensure_volume_claims,
    with_deadlines_from_now,
)

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

EXAMPLES = REPO_ROOT / "examples"
KINDS_TO_APPLY = {"LLMWorkload", "EnergyBudget"}


def example_manifests() -> list[Any]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        kinds = {doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if doc}
        if kinds and kinds <= KINDS_TO_APPLY:
            found.append(path)
    return found


def workload_names() -> list[str]:
    return [
        doc["metadata"]["name"]
        for path in example_manifests()
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "LLMWorkload"
    ]


def pods(sandbox: Sandbox, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(
        sandbox, "pods", "-n", namespace, "-l", "wattsched.io/workload"
    )["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def uids(sandbox: Sandbox, namespace: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(sandbox, namespace)}


def every_replica_ready(sandbox: Sandbox, namespace: str, names: list[str]) -> bool:
    """Every workload Running with as many Ready pods as its placements, none terminating."""
    found = pods(sandbox, namespace)
    for name in names:
        status = get_json(sandbox, "llmw", name, "-n", namespace).get("status") or {}
        if status.get("phase") != "Running":
            return False
        mine = [p for p in found if p["metadata"]["labels"]["wattsched.io/workload"] == name]
        if len(mine) != len(status.get("placements") or []) or not all(map(ready, mine)):
            return False
    return True


def disruption_events(sandbox: Sandbox, namespace: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = get_json(sandbox, "events", "-n", namespace)["items"]
    return [e for e in events if e["reason"] in {"Moved", "Preempted"}]


class Examples:
    def __init__(self, namespace: str, operator: OperatorProcess, names: list[str]) -> None:
        self.namespace = namespace
        self.operator = operator
        self.names = names


@pytest.fixture
def examples(sandbox: Sandbox, namespace: str, start_operator: StartOperator) -> Examples:
    # The default horizon: the examples' allowances leave room at any hour of the week, so nothing
    # is deferred (test_horizon_cluster.py covers deferral).
    operator = start_operator("--replan-interval-seconds", "5")
    paths = example_manifests()
    ensure_volume_claims(sandbox, namespace, paths)
    documents = [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]
    with_deadlines_from_now(documents, timedelta(days=30))
    apply(sandbox, namespace, *[d for d in documents if d["kind"] == "LLMWorkload"])
    apply(sandbox, None, *[d for d in documents if d["kind"] == "EnergyBudget"])
    sandbox.kubectl("label", "energybudgets", "cluster", "rack-a", f"{TEST_LABEL}=disruption")
    names = workload_names()
    wait_until(
        "every example workload Running with its replicas Ready",
        lambda: every_replica_ready(sandbox, namespace, names),
        timeout_seconds=180,
    )
    return Examples(namespace, operator, names)


def rounds_after(operator: OperatorProcess, count: int) -> None:
    """Wait until the operator has planned `count` more rounds."""
    start = operator.plans()
    wait_until(f"{count} more plans", lambda: operator.plans() >= start + count, 90)


def test_lowering_rack_a_lowers_limits_in_place_and_recreates_no_pod(
    sandbox: Sandbox, examples: Examples
) -> None:
    ns = examples.namespace
    before = uids(sandbox, ns)
    events_before = {e["metadata"]["uid"] for e in disruption_events(sandbox, ns)}
    # The example's evening window (15,000 W) may only lower the cap: it goes with the cut.
    cut = {"spec": {"powerCapWatts": 7000, "schedule": None}}
    sandbox.kubectl("patch", "eb", "rack-a", "--type=merge", "-p", json.dumps(cut))
    wait_until(
        "rack-a allocated within 7000 W",
        lambda: (
            get_json(sandbox, "eb", "rack-a").get("status", {}).get("allocatedCapWatts", 1e9)
            <= 7000
        ),
        90,
    )
    rounds_after(examples.operator, 3)
    wait_until("every replica Ready", lambda: every_replica_ready(sandbox, ns, examples.names), 90)
    after = uids(sandbox, ns)
    recreated = sorted(name for name, uid in before.items() if after.get(name) != uid)
    new = [e for e in disruption_events(sandbox, ns) if e["metadata"]["uid"] not in events_before]
    # A workload whose work keeps its SLO or deadline at a lower limit in place keeps its pods.
    # Where the first plan put the chat service on rack-a, no limit in place keeps its SLO inside
    # 7000 W: it may move, and only with a Moved Event whose cause is the budget.
    moved = {e["involvedObject"]["name"] for e in new}
    assert all(e["reason"] == "Moved" and "cause BudgetCut" in e["message"] for e in new), [
        e["message"] for e in new
    ]
    assert moved <= {"llama-70b-chat"}
    owners = {name.rsplit("-", 1)[0] for name in recreated}
    assert owners <= moved, (recreated, [e["message"] for e in new])
    training = get_json(sandbox, "llmw", "llama-8b-pretrain", "-n", ns)["status"]
    rack_a = {
        n["metadata"]["name"]
        for n in get_json(sandbox, "nodes", "-l", "wattsched.io/rack=rack-a")["items"]
    }
    if {p["node"] for p in training["placements"]} & rack_a:
        # Where the first plan put the training on rack-a (it may put it elsewhere), its limits
        # went down in place.
        assert {p["powerLimitWatts"] for p in training["placements"]} != {325.0}
    assert not any(name.startswith("llama-8b-pretrain-") for name in recreated)


def test_cordoning_a_busy_node_recreates_no_pod_and_places_nothing_new_there(
    sandbox: Sandbox, examples: Examples
) -> None:
    ns = examples.namespace
    chat = get_json(sandbox, "llmw", "llama-70b-chat", "-n", ns)["status"]
    node = chat["placements"][0]["node"]
    before = uids(sandbox, ns)
    sandbox.kubectl("cordon", node)
    try:
        rounds_after(examples.operator, 3)
        after = uids(sandbox, ns)
        assert after == before
        assert disruption_events(sandbox, ns) == []
        # A new workload's replicas do not go to the cordoned node.
        extra = {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": "LLMWorkload",
            "metadata": {"name": "small", "namespace": ns},
            "spec": {
                "type": "Inference",
                "model": {"name": "m", "parametersBillions": 8},
                "gpu": {"count": 1},
                "minReplicas": 4,
                "maxReplicas": 4,
                "slo": {"tokensPerSecond": 100},
                "template": {"spec": {"containers": [{"name": "s", "image": "vllm"}]}},
            },
        }
        sandbox.kubectl("apply", "-f", "-", input=json.dumps(extra))
        wait_until(
            "small placed",
            lambda: (get_json(sandbox, "llmw", "small", "-n", ns).get("status") or {}).get(
                "placements"
            ),
            60,
        )
        small = get_json(sandbox, "llmw", "small", "-n", ns)["status"]["placements"]
        assert node not in {p["node"] for p in small}
        rounds_after(examples.operator, 2)
        after_extra = uids(sandbox, ns)
        assert {k: v for k, v in after_extra.items() if k in before} == before
    finally:
        sandbox.kubectl("uncordon", node)


def test_draining_a_node_under_a_pdb_keeps_min_available_replicas_ready(
    sandbox: Sandbox, examples: Examples
) -> None:
    ns = examples.namespace
    chat = get_json(sandbox, "llmw", "llama-70b-chat", "-n", ns)["status"]
    replicas = len(chat["placements"])
    assert replicas >= 2
    min_available = replicas - 1
    node = chat["placements"][0]["node"]
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "chat", "namespace": ns},
        "spec": {
            "minAvailable": min_available,
            "selector": {"matchLabels": {"wattsched.io/workload": "llama-70b-chat"}},
        },
    }
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(pdb))
    wait_until(
        "the PDB allows one disruption",
        lambda: (
            (get_json(sandbox, "pdb", "chat", "-n", ns).get("status") or {}).get(
                "disruptionsAllowed"
            )
            == 1
        ),
        30,
    )
    lowest = [replicas]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            chat_pods = [
                p
                for p in pods(sandbox, ns)
                if p["metadata"]["labels"]["wattsched.io/workload"] == "llama-70b-chat"
            ]
            lowest[0] = min(lowest[0], sum(map(ready, chat_pods)))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        sandbox.kubectl(
            "drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=240s"
        )
        wait_until(
            "every replica Ready again, none on the drained node",
            lambda: (
                every_replica_ready(sandbox, ns, examples.names)
                and all(p["spec"].get("nodeName") != node for p in pods(sandbox, ns))
            ),
            120,
        )
    finally:
        stop.set()
        watcher.join()
        sandbox.kubectl("uncordon", node)
    assert lowest[0] >= min_available


def chat_pods(sandbox: Sandbox, namespace: str) -> list[dict[str, Any]]:
    return [
        p
        for p in pods(sandbox, namespace)
        if p["metadata"]["labels"]["wattsched.io/workload"] == "llama-70b-chat"
    ]


def test_a_moved_service_replica_is_replaced_before_its_old_pod_goes(
    sandbox: Sandbox, examples: Examples
) -> None:
    """Make-before-break: allowing the chat service no more of the product it runs on moves it
    (cause SpecChanged); each replacement is Ready before the pod it replaces is evicted, and the
    service's Ready pods never drop."""
    ns = examples.namespace
    placements = get_json(sandbox, "llmw", "llama-70b-chat", "-n", ns)["status"]["placements"]
    replicas_before = len(placements)
    node = placements[0]["node"]
    product = get_json(sandbox, "node", node)["metadata"]["labels"]["nvidia.com/gpu.product"]
    allowed = [
        p for p in ("NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L40S") if p != product
    ]
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in chat_pods(sandbox, ns)}
    events_before = {e["metadata"]["uid"] for e in disruption_events(sandbox, ns)}
    lowest = [replicas_before]
    highest = [replicas_before]
    broken: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            found = chat_pods(sandbox, ns)
            by_name = {p["metadata"]["name"]: p for p in found}
            lowest[0] = min(lowest[0], sum(map(ready, found)))
            highest[0] = max(highest[0], len(found))
            for new in found:
                old_name = (new["metadata"].get("annotations") or {}).get("wattsched.io/replaces")
                old = by_name.get(old_name or "")
                if old_name in before and not ready(new) and (old is None or not ready(old)):
                    broken.append(f"{old_name} gone before {new['metadata']['name']} was Ready")
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        sandbox.kubectl(
            "patch",
            "llmw",
            "llama-70b-chat",
            "-n",
            ns,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"gpu": {"products": allowed}}}),
        )

        def moved_off() -> bool:
            found = chat_pods(sandbox, ns)
            return (
                bool(found)
                and not any(p["metadata"]["name"] in before for p in found)
                and every_replica_ready(sandbox, ns, ["llama-70b-chat"])
            )

        wait_until("every chat replica moved and Ready", moved_off, 180)
    finally:
        stop.set()
        watcher.join()
    replicas_after = len(chat_pods(sandbox, ns))
    new = [e for e in disruption_events(sandbox, ns) if e["metadata"]["uid"] not in events_before]
    messages = [e["message"] for e in new if e["involvedObject"]["name"] == "llama-70b-chat"]
    assert messages, "a Moved Event names the move"
    assert all("cause SpecChanged" in m for m in messages), messages
    assert any("make-before-break" in m for m in messages), messages
    assert broken == []
    # Only a move the GPUs or budget do not allow to overlap (and that says so) may cost a replica.
    if not any("moved before its replacement was ready" in m for m in messages):
        assert lowest[0] >= min(replicas_before, replicas_after)
        assert highest[0] > replicas_before, "old and new pods ran side by side"

"""What the chart's service accounts may do on a real API server, and what they may not.

- `kubectl auth can-i --as=system:serviceaccount:...`: every verb each component needs is allowed,
  a list of others (secrets, pods/exec, RBAC objects, node writes, the other side's half of a
  NodePowerProfile) is denied.
- The own-node rule: with a token bound to the agent pod on node A (what the kubelet mounts), the
  agent may write A's NodePowerProfile status and not B's; a token without a node cannot write any.
- The operator's job under its own identity (impersonation): pods in a user namespace, workload
  status, profiles, events; and the confused deputy: a pod template that breaks the namespace's
  Pod Security level is rejected by the API server even though the operator may create pods.

Not for: what the chart renders (test_chart_static.py) or installs (test_chart_cluster.py).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.chart.conftest import (
    CHART_DIR,
    REPO_ROOT,
    Chart,
    KubectlAs,
    Release,
    profile_manifest,
    token_kubectl,
)

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

USER_NAMESPACE = "<user>"  # replaced by the test's fresh namespace
# (verb, resource, namespace or None for cluster-scoped / all namespaces)
Permission = tuple[str, str, str | None]

OPERATOR_ALLOWED: list[Permission] = [
    *[(verb, "llmworkloads.wattsched.io", USER_NAMESPACE) for verb in ("get", "list", "watch")],
    ("patch", "llmworkloads.wattsched.io", USER_NAMESPACE),
    ("patch", "llmworkloads.wattsched.io/status", USER_NAMESPACE),
    ("update", "llmworkloads.wattsched.io/status", USER_NAMESPACE),
    ("update", "llmworkloads.wattsched.io/finalizers", USER_NAMESPACE),
    ("list", "llmworkloads.wattsched.io", None),
    ("watch", "llmworkloads.wattsched.io", None),
    *[(verb, "energybudgets.wattsched.io", None) for verb in ("get", "list", "watch", "patch")],
    ("patch", "energybudgets.wattsched.io/status", None),
    *[
        (verb, "nodepowerprofiles.wattsched.io", None)
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete")
    ],
    *[(verb, "nodes", None) for verb in ("get", "list", "watch")],
    *[
        (verb, "pods", USER_NAMESPACE)
        for verb in ("get", "list", "watch", "create", "delete", "patch")
    ],
    ("list", "pods", None),
    ("watch", "pods", None),
    # Moves and preemptions evict (policy/v1 Eviction) so PodDisruptionBudgets hold.
    ("create", "pods/eviction", USER_NAMESPACE),
    # Headless Services of replicas that span nodes, and each Inference workload's Service.
    *[(verb, "services", USER_NAMESPACE) for verb in ("get", "list", "create", "delete", "patch")],
    ("create", "events", USER_NAMESPACE),
    ("create", "events.events.k8s.io", USER_NAMESPACE),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("list", "clusterkopfpeerings.kopf.dev", None),
    ("watch", "clusterkopfpeerings.kopf.dev", None),
]
OPERATOR_DENIED: list[Permission] = [
    ("get", "secrets", USER_NAMESPACE),
    ("list", "secrets", None),
    ("get", "secrets", "kube-system"),
    ("get", "configmaps", USER_NAMESPACE),
    ("create", "pods/exec", USER_NAMESPACE),
    ("create", "pods/attach", USER_NAMESPACE),
    ("create", "serviceaccounts/token", USER_NAMESPACE),
    ("create", "deployments.apps", USER_NAMESPACE),
    ("create", "clusterroles.rbac.authorization.k8s.io", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("create", "rolebindings.rbac.authorization.k8s.io", USER_NAMESPACE),
    ("impersonate", "users", None),
    ("patch", "nodes", None),
    ("delete", "nodes", None),
    ("create", "namespaces", None),
    ("patch", "nodepowerprofiles.wattsched.io/status", None),
    ("create", "llmworkloads.wattsched.io", USER_NAMESPACE),
    ("delete", "llmworkloads.wattsched.io", USER_NAMESPACE),
    ("create", "energybudgets.wattsched.io", None),
    ("delete", "energybudgets.wattsched.io", None),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("create", "validatingadmissionpolicies.admissionregistration.k8s.io", None),
]
AGENT_ALLOWED: list[Permission] = [
    *[(verb, "nodepowerprofiles.wattsched.io", None) for verb in ("get", "list", "watch")],
    ("patch", "nodepowerprofiles.wattsched.io/status", None),
    ("update", "nodepowerprofiles.wattsched.io/status", None),
    ("get", "nodes", None),
    *[(verb, "pods", None) for verb in ("get", "list", "watch")],
]
AGENT_DENIED: list[Permission] = [
    *[
        (verb, "nodepowerprofiles.wattsched.io", None)
        for verb in ("create", "update", "patch", "delete")
    ],
    ("get", "secrets", USER_NAMESPACE),
    ("list", "secrets", None),
    ("create", "events", USER_NAMESPACE),
    ("create", "pods", USER_NAMESPACE),
    ("delete", "pods", USER_NAMESPACE),
    ("create", "pods/exec", USER_NAMESPACE),
    ("list", "nodes", None),
    ("patch", "nodes", None),
    ("patch", "nodes/status", None),
    ("get", "llmworkloads.wattsched.io", USER_NAMESPACE),
    ("patch", "llmworkloads.wattsched.io/status", USER_NAMESPACE),
    ("get", "energybudgets.wattsched.io", None),
    ("create", "clusterroles.rbac.authorization.k8s.io", None),
    ("patch", "clusterkopfpeerings.kopf.dev", None),
]


def can_i(sandbox: Sandbox, user: str, permission: Permission, user_namespace: str) -> bool:
    """`kubectl auth can-i` for a permission; resources may carry a /subresource."""
    verb, resource, namespace = permission
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as={user}"]
    if subresource:
        args.append(f"--subresource={subresource}")
    if namespace is None:
        args.append("--all-namespaces")
    else:
        args += ["-n", user_namespace if namespace == USER_NAMESPACE else namespace]
    answer = sandbox.kubectl(*args, check=False).stdout.strip()
    assert answer in {"yes", "no"}, f"kubectl auth can-i {args}: {answer!r}"
    return answer == "yes"


def _describe(permission: Permission) -> str:
    verb, resource, namespace = permission
    return f"{verb} {resource}" + (f" in {namespace}" if namespace else " (cluster)")


@pytest.mark.parametrize("permission", OPERATOR_ALLOWED, ids=_describe)
def test_operator_may(sandbox: Sandbox, release: Release, permission: Permission) -> None:
    assert can_i(sandbox, release.operator_user, permission, "rbac-probe")


@pytest.mark.parametrize("permission", OPERATOR_DENIED, ids=_describe)
def test_operator_may_not(sandbox: Sandbox, release: Release, permission: Permission) -> None:
    assert not can_i(sandbox, release.operator_user, permission, "rbac-probe")


@pytest.mark.parametrize("permission", AGENT_ALLOWED, ids=_describe)
def test_agent_may(sandbox: Sandbox, release: Release, permission: Permission) -> None:
    assert can_i(sandbox, release.agent_user, permission, "rbac-probe")


@pytest.mark.parametrize("permission", AGENT_DENIED, ids=_describe)
def test_agent_may_not(sandbox: Sandbox, release: Release, permission: Permission) -> None:
    assert not can_i(sandbox, release.agent_user, permission, "rbac-probe")


def test_operator_may_patch_only_its_own_peering_object(sandbox: Sandbox, release: Release) -> None:
    def may_patch(name: str) -> bool:
        return (
            sandbox.kubectl(
                "auth", "can-i", "patch", f"clusterkopfpeerings.kopf.dev/{name}",
                f"--as={release.operator_user}", check=False,
            ).stdout.strip()
            == "yes"
        )  # fmt: skip

    assert may_patch(release.name)
    assert not may_patch("someone-else")


# --- The own-node rule (ValidatingAdmissionPolicy on the node bound into the agent's token) -------

HEARTBEAT = {
    "status": {
        "agent": {"ready": True, "backend": "simulated", "heartbeatTime": "2026-01-01T00:00:00Z"}
    }
}


def _heartbeat(kubectl: KubectlAs, node_name: str, heartbeat_time: str) -> tuple[int, str]:
    patch = json.loads(json.dumps(HEARTBEAT))
    patch["status"]["agent"]["heartbeatTime"] = heartbeat_time
    result = kubectl(
        "patch", "nodepowerprofile", node_name, "--subresource=status", "--type=merge",
        "-p", json.dumps(patch),
    )  # fmt: skip
    return result.returncode, result.stderr


def test_agent_token_bound_to_its_node_may_report_that_nodes_profile(
    sandbox: Sandbox,
    two_agent_profiles: tuple[str, str],
    as_agent_on_node: Callable[[str], KubectlAs],
) -> None:
    own, _ = two_agent_profiles
    returncode, stderr = _heartbeat(as_agent_on_node(own), own, "2026-01-01T00:00:00Z")
    assert returncode == 0, stderr
    profile = json.loads(sandbox.kubectl("get", "nodepowerprofile", own, "-o", "json").stdout)
    assert profile["status"]["agent"]["heartbeatTime"] == "2026-01-01T00:00:00Z"


def test_agent_token_bound_to_one_node_may_not_report_another_nodes_profile(
    sandbox: Sandbox,
    two_agent_profiles: tuple[str, str],
    as_agent_on_node: Callable[[str], KubectlAs],
) -> None:
    own, other = two_agent_profiles
    returncode, stderr = _heartbeat(as_agent_on_node(own), other, "2026-01-01T00:00:00Z")
    assert returncode != 0
    assert "ValidatingAdmissionPolicy" in stderr
    assert f"the agent on node {own} may only write the NodePowerProfile named {own}" in stderr
    profile = json.loads(sandbox.kubectl("get", "nodepowerprofile", other, "-o", "json").stdout)
    assert profile.get("status", {}).get("agent", {}).get("heartbeatTime") != (
        "2026-01-01T00:00:00Z"
    )


def test_agent_token_without_a_node_may_not_report_any_profile(
    sandbox: Sandbox, release: Release, two_agent_profiles: tuple[str, str], tmp_path: Path
) -> None:
    own, _ = two_agent_profiles
    unbound = sandbox.kubectl(
        "create", "token", release.agent_service_account, "-n", release.namespace,
        "--duration", "10m",
    ).stdout.strip()  # fmt: skip
    returncode, stderr = _heartbeat(
        token_kubectl(sandbox, unbound, tmp_path), own, "2026-01-01T00:00:00Z"
    )
    assert returncode != 0
    assert "carries no node binding" in stderr


def test_impersonating_the_agent_cannot_bypass_the_own_node_rule(
    sandbox: Sandbox, release: Release, two_agent_profiles: tuple[str, str]
) -> None:
    own, _ = two_agent_profiles
    result = sandbox.kubectl(
        "patch", "nodepowerprofile", own, "--subresource=status", "--type=merge",
        f"--as={release.agent_user}", "-p", json.dumps(HEARTBEAT), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "carries no node binding" in result.stderr


def test_own_node_rule_does_not_apply_to_the_operator(
    sandbox: Sandbox, release: Release, two_agent_profiles: tuple[str, str]
) -> None:
    _, other = two_agent_profiles
    patch = {"spec": {"idlePowerLimitWatts": 450}}
    sandbox.kubectl(
        "patch", "nodepowerprofile", other, "--type=merge", "-p", json.dumps(patch),
        f"--as={release.operator_user}",
    )  # fmt: skip


# --- The operator's job under its own identity ---------------------------------------------------


def _example_workload(namespace: str) -> dict[str, object]:
    workload: dict[str, object] = yaml.safe_load(
        (REPO_ROOT / "examples" / "inference-vllm.yaml").read_text()
    )
    metadata = workload["metadata"]
    assert isinstance(metadata, dict)
    metadata["namespace"] = namespace
    return workload


def _replica_pod(namespace: str, owner: dict[str, str], security: dict[str, object]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"replica-{secrets.token_hex(3)}",
                "namespace": namespace,
                "labels": {"wattsched.io/workload": owner["name"], "wattsched.io/replica": "0"},
                "ownerReferences": [{**owner, "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {
                "containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.3", **security}]
            },
        }
    )


RESTRICTED_CONTAINER: dict[str, object] = {
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
}
PRIVILEGED_CONTAINER: dict[str, object] = {
    "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}, "runAsUser": 0}
}


@pytest.fixture
def user_workload(sandbox: Sandbox, namespace: str) -> dict[str, str]:
    """An LLMWorkload (the vLLM example) in the test's namespace; returns its owner reference."""
    created = json.loads(
        sandbox.kubectl(
            "create", "-f", "-", "-o", "json", input=yaml.safe_dump(_example_workload(namespace))
        ).stdout
    )
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "name": created["metadata"]["name"],
        "uid": created["metadata"]["uid"],
    }


def test_operator_identity_can_run_a_workload_in_a_user_namespace(
    sandbox: Sandbox, release: Release, namespace: str, user_workload: dict[str, str]
) -> None:
    as_operator = f"--as={release.operator_user}"
    name = user_workload["name"]
    sandbox.kubectl("get", "llmworkload", name, "-n", namespace, as_operator)
    sandbox.kubectl(
        "patch", "llmworkload", name, "-n", namespace, "--type=merge", as_operator,
        "-p", json.dumps({"metadata": {"finalizers": ["wattsched.io/release-power"]}}),
    )  # fmt: skip
    pod = sandbox.kubectl(
        "create", "-f", "-", "-o", "name", as_operator,
        input=_replica_pod(namespace, user_workload, RESTRICTED_CONTAINER),
    ).stdout.strip()  # fmt: skip
    status = {"status": {"phase": "Placed", "message": "placed by the chart's RBAC test"}}
    sandbox.kubectl(
        "patch", "llmworkload", name, "-n", namespace, "--subresource=status", "--type=merge",
        as_operator, "-p", json.dumps(status),
    )  # fmt: skip
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}-", "namespace": namespace},
        "involvedObject": {**user_workload, "namespace": namespace},
        "reason": "Placed",
        "message": "replica 0 placed",
        "type": "Normal",
    }
    sandbox.kubectl("create", "-f", "-", as_operator, input=yaml.safe_dump(event))
    sandbox.kubectl("delete", pod, "-n", namespace, as_operator, "--wait=false")
    sandbox.kubectl(
        "patch", "llmworkload", name, "-n", namespace, "--type=merge", as_operator,
        "-p", json.dumps({"metadata": {"finalizers": None}}),
    )  # fmt: skip
    got = json.loads(
        sandbox.kubectl("get", "llmworkload", name, "-n", namespace, "-o", "json").stdout
    )
    assert got["status"]["phase"] == "Placed"


def test_operator_identity_can_manage_node_power_profiles(
    sandbox: Sandbox, release: Release
) -> None:
    node = sandbox.kubectl(
        "get", "nodes", "-l", "nvidia.com/gpu.present=true",
        "-o", "jsonpath={.items[-1].metadata.name}",
    ).stdout.strip()  # fmt: skip
    as_operator = f"--as={release.operator_user}"
    sandbox.kubectl("delete", "nodepowerprofile", node, "--ignore-not-found")
    sandbox.kubectl("create", "-f", "-", as_operator, input=profile_manifest(node))
    sandbox.kubectl(
        "patch", "nodepowerprofile", node, "--type=merge", as_operator,
        "-p", json.dumps({"spec": {"idlePowerLimitWatts": 300}}),
    )  # fmt: skip
    denied = sandbox.kubectl(
        "patch", "nodepowerprofile", node, "--subresource=status", "--type=merge", as_operator,
        "-p", json.dumps(HEARTBEAT), check=False,
    )  # fmt: skip
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr
    sandbox.kubectl("delete", "nodepowerprofile", node, as_operator)


def test_pod_writes_are_limited_to_listed_workload_namespaces(
    chart: Chart, sandbox: Sandbox, namespace: str
) -> None:
    name = f"ns-{secrets.token_hex(3)}"
    other = f"{namespace}-other"[:63]
    sandbox.kubectl("create", "namespace", other)
    rbac = [
        doc
        for doc in chart.render(
            values_files=(CHART_DIR / "ci" / "workload-namespaces-values.yaml",),
            set_values=(f"operator.rbac.workloadNamespaces={{{namespace}}}",),
            release_name=name,
        )
        if doc["kind"] in {"ClusterRole", "ClusterRoleBinding", "RoleBinding"}
        and "-operator" in doc["metadata"]["name"]
    ]
    try:
        sandbox.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
        user = f"system:serviceaccount:wattsched-system:{name}-wattsched-operator"
        assert can_i(sandbox, user, ("create", "pods", namespace), namespace)
        assert can_i(sandbox, user, ("delete", "pods", namespace), namespace)
        assert not can_i(sandbox, user, ("create", "pods", other), other)
        assert can_i(sandbox, user, ("create", "services", namespace), namespace)
        assert not can_i(sandbox, user, ("create", "services", other), other)
        assert can_i(sandbox, user, ("list", "pods", None), other)
    finally:
        for doc in rbac:
            sandbox.kubectl(
                "delete", doc["kind"], doc["metadata"]["name"], "--ignore-not-found",
                *(["-n", doc["metadata"]["namespace"]] if "namespace" in doc["metadata"] else []),
            )  # fmt: skip
        sandbox.kubectl("delete", "namespace", other, "--wait=false")


# --- Confused deputy: the operator creates pods, but the user's namespace decides what runs -------


def test_restricted_namespace_rejects_a_privileged_replica_from_the_operator(
    sandbox: Sandbox, release: Release, namespace: str, user_workload: dict[str, str]
) -> None:
    sandbox.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    as_operator = f"--as={release.operator_user}"
    privileged = _replica_pod(namespace, user_workload, PRIVILEGED_CONTAINER)
    rejected = sandbox.kubectl("create", "-f", "-", as_operator, input=privileged, check=False)
    assert rejected.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in rejected.stderr
    assert '"SYS_ADMIN"' in rejected.stderr
    compliant = _replica_pod(namespace, user_workload, RESTRICTED_CONTAINER)
    sandbox.kubectl("create", "-f", "-", as_operator, input=compliant)
    pods = json.loads(
        sandbox.kubectl(
            "get", "pods", "--all-namespaces", "-o", "json",
            "-l", f"wattsched.io/workload={user_workload['name']}",
        ).stdout
    )["items"]  # fmt: skip
    assert [pod["metadata"]["namespace"] for pod in pods] == [namespace]

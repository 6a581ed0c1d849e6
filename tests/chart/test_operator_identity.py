"""The real operator, run with nothing but the chart's operator ServiceAccount, does its job.

`wattsched operator` runs as a subprocess whose only credential is a token of the installed
release's operator ServiceAccount (TokenRequest API), so every API call it makes is authorised by
the chart's RBAC. It runs with peering on the release's own ClusterKopfPeering object (as the
chart's Deployment does, `--peering=<peering.name>`), so the peering grants are exercised too: it
acts only once its keep-alive entry is in that object. Simulated agents (admin credentials: they
stand in for the DaemonSet, whose own identity is tested in test_rbac.py) confirm power limits.

- A workload in an ordinary namespace gets its replica pods, NodePowerProfiles and its status
  (phase and conditions, written through the status subresource); the operator's entry is in the
  peering object, and the operator's log holds no RBAC denial.
- The confused deputy: a privileged template in a namespace that enforces Pod Security `restricted`
  gets no pod anywhere; the API server's PodSecurity rejection is what stopped it.

Not for: the operator's planning behaviour (tests/operator/).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.chart.conftest import REPO_ROOT, Release, token_kubeconfig

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

PLACEMENT_TIMEOUT_SECONDS = 60
OPERATOR_IDENTITY = "identity-test/operator"  # its key in the peering object's status
RBAC_DENIAL = "is forbidden: User"  # how the API server words an RBAC refusal


@dataclass
class RunningOperator:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def operator_as_chart_identity(
    sandbox: Sandbox, release: Release, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningOperator]:
    workdir = tmp_path_factory.mktemp("operator-identity")
    token = sandbox.kubectl(
        "create", "token", release.operator_service_account, "-n", release.namespace,
        "--duration", "1h",
    ).stdout.strip()  # fmt: skip
    kubeconfig = token_kubeconfig(sandbox, token, workdir)
    cli = [sys.executable, "-m", "wattsched_cli.main"]
    with (workdir / "agents.log").open("wb") as agents_log:
        agents = subprocess.Popen(
            [
                *cli, "agent", "--backend", "simulated", "--all-nodes", "--metrics-port", "0",
                "--interval-seconds", "1", "--kubeconfig", str(sandbox.kubeconfig),
            ],
            stdout=agents_log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )  # fmt: skip
    log_path = workdir / "operator.log"
    with log_path.open("wb") as operator_log:
        process = subprocess.Popen(
            [
                *cli, "operator", "--kubeconfig", str(kubeconfig), f"--peering={release.name}",
                "--metrics-port", "0", "--health-port", "0", "--debounce-seconds", "0.3",
                "--confirm-timeout-seconds", "10",
            ],
            stdout=operator_log,
            stderr=subprocess.STDOUT,
            env={
                "PATH": "/usr/bin:/bin", "KUBECONFIG": str(kubeconfig), "HOME": str(workdir),
                "WATTSCHED_POD_NAME": OPERATOR_IDENTITY,
            },
            cwd=REPO_ROOT,
        )  # fmt: skip
    running = RunningOperator(process=process, log_path=log_path)
    try:
        yield running
    finally:
        _stop(process)
        _stop(agents)


def _wait_for(
    what: str, check: Callable[[], Any], operator: RunningOperator, timeout: float
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert operator.process.poll() is None, f"operator exited:\n{operator.log()[-3000:]}"
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{operator.log()[-3000:]}")


def _apply_workload(
    sandbox: Sandbox, namespace: str, name: str, security: dict[str, Any] | None = None
) -> None:
    workload = yaml.safe_load((REPO_ROOT / "examples" / "inference-vllm.yaml").read_text())
    workload["metadata"].update({"name": name, "namespace": namespace})
    if security is not None:
        workload["spec"]["template"]["spec"]["containers"][0]["securityContext"] = security
    sandbox.kubectl("apply", "-f", "-", input=yaml.safe_dump(workload))


def _pods_of(sandbox: Sandbox, name: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = json.loads(
        sandbox.kubectl(
            "get", "pods", "--all-namespaces", "-o", "json", "-l", f"wattsched.io/workload={name}"
        ).stdout
    )["items"]
    return pods


@pytest.fixture
def workload_cleanup(sandbox: Sandbox, namespace: str) -> Iterator[None]:
    """Delete the test's LLMWorkloads while the operator still runs (it lowers their GPUs)."""
    yield
    sandbox.kubectl("delete", "llmworkloads", "--all", "-n", namespace, "--timeout=60s")


@pytest.mark.usefixtures("workload_cleanup")
def test_operator_with_the_chart_identity_places_a_workload(
    sandbox: Sandbox,
    namespace: str,
    release: Release,
    operator_as_chart_identity: RunningOperator,
) -> None:
    operator = operator_as_chart_identity
    _apply_workload(sandbox, namespace, "chat")
    pods = _wait_for(
        "the replica pod to be bound",
        lambda: [pod for pod in _pods_of(sandbox, "chat") if pod["spec"].get("nodeName")],
        operator,
        PLACEMENT_TIMEOUT_SECONDS,
    )
    assert {pod["metadata"]["namespace"] for pod in pods} == {namespace}
    node = pods[0]["spec"]["nodeName"]
    # The operator, with the chart's identity, wrote the node's limits (the replica's own limit may
    # be elsewhere by now: the first plan counts nodes at maximum until their agents confirm, and
    # the next one may move the replica).
    profile = json.loads(sandbox.kubectl("get", "nodepowerprofile", node, "-o", "json").stdout)
    assert profile["spec"]["idlePowerLimitWatts"] > 0, f"NodePowerProfile {node} has no limits"
    workload = _wait_for(
        "the workload's status to say Running, with its pods on the placed nodes",
        lambda: _running_workload(sandbox, namespace, "chat"),
        operator,
        PLACEMENT_TIMEOUT_SECONDS,
    )
    status = workload["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    for kind in ("Admitted", "Schedulable", "Placed", "Ready"):
        assert conditions[kind]["status"] == "True", conditions[kind]
    status_writes = [
        entry["fieldsV1"]["f:status"]
        for entry in workload["metadata"]["managedFields"]
        if entry.get("subresource") == "status"
    ]
    assert any({"f:phase", "f:conditions"} <= set(fields) for fields in status_writes)
    peering = json.loads(
        sandbox.kubectl("get", "clusterkopfpeering", release.name, "-o", "json").stdout
    )
    assert OPERATOR_IDENTITY in peering["status"], "the operator's keep-alive is not in its peering"
    assert RBAC_DENIAL not in operator.log()


def _running_workload(sandbox: Sandbox, namespace: str, name: str) -> dict[str, Any] | None:
    workload: dict[str, Any] = json.loads(
        sandbox.kubectl(
            "get", "llmworkload", name, "-n", namespace, "-o", "json", "--show-managed-fields"
        ).stdout
    )  # fmt: skip
    status = workload.get("status") or {}
    live_pods = [
        pod
        for pod in _pods_of(sandbox, name)
        if pod["metadata"]["namespace"] == namespace and "deletionTimestamp" not in pod["metadata"]
    ]
    pod_nodes = {pod["spec"].get("nodeName") for pod in live_pods}
    placed_nodes = {p["node"] for p in status.get("placements") or []}
    settled = status.get("phase") == "Running" and pod_nodes == placed_nodes
    return workload if settled else None


@pytest.mark.usefixtures("workload_cleanup")
def test_privileged_template_in_a_restricted_namespace_gets_no_pod_anywhere(
    sandbox: Sandbox, namespace: str, operator_as_chart_identity: RunningOperator
) -> None:
    operator = operator_as_chart_identity
    sandbox.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    privileged = {"capabilities": {"add": ["SYS_ADMIN"]}, "runAsUser": 0}
    _apply_workload(sandbox, namespace, "escalate", privileged)
    rejection = 'pods "escalate-0" is forbidden: violates PodSecurity'
    _wait_for(
        "the API server to refuse the replica pod",
        lambda: rejection in operator.log().replace('\\"', '"'),
        operator,
        PLACEMENT_TIMEOUT_SECONDS,
    )
    assert _pods_of(sandbox, "escalate") == []
    assert RBAC_DENIAL not in operator.log()
    phase = sandbox.kubectl(
        "get", "llmworkload", "escalate", "-n", namespace, "-o", "jsonpath={.status.phase}"
    ).stdout
    assert phase != "Running"


def _reports_pod_security(sandbox: Sandbox, namespace: str, name: str) -> bool:
    status = json.loads(
        sandbox.kubectl("get", "llmworkload", name, "-n", namespace, "-o", "json").stdout
    ).get("status", {})
    texts = [status.get("message") or ""] + [
        f"{condition.get('reason')} {condition.get('message')}"
        for condition in status.get("conditions") or []
        if condition.get("status") == "False"
    ]
    return status.get("phase") in {"Failed", "Pending"} and any(
        "PodSecurity" in text for text in texts
    )


@pytest.mark.usefixtures("workload_cleanup")
def test_privileged_template_in_a_restricted_namespace_is_reported_on_the_workload(
    sandbox: Sandbox, namespace: str, operator_as_chart_identity: RunningOperator
) -> None:
    sandbox.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    _apply_workload(sandbox, namespace, "escalate", {"capabilities": {"add": ["SYS_ADMIN"]}})
    _wait_for(
        "a status condition or message naming PodSecurity",
        lambda: _reports_pod_security(sandbox, namespace, "escalate"),
        operator_as_chart_identity,
        30,
    )

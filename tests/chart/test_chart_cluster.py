"""The chart on the sandbox: every ci scenario passes server-side dry-run, an install brings up the
CRDs, RBAC, admission policy and workloads, and the documented CRD upgrade procedure works.

KWOK plays the kubelets, so the operator and agent pods are scheduled and reported Running without
a container actually starting (the image is not pulled).
Not for: what the RBAC allows (test_rbac.py).
"""

from __future__ import annotations

import json
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.chart.conftest import CHART_DIR, Chart, Release, ci_values_files

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

# Kinds whose CRDs the sandbox lacks (prometheus-operator's); test_chart_static.py checks them.
KINDS_WITHOUT_CRD = {"ServiceMonitor", "PrometheusRule"}
TEAM_NAMESPACES = ("team-a", "team-b")  # named in ci/workload-namespaces-values.yaml


@pytest.fixture(scope="module")
def chart_crds(sandbox: Sandbox) -> None:
    """The chart's CRDs applied server-side (what `helm install` or the upgrade procedure does)."""
    sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART_DIR / "crds"))
    sandbox.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "!no-such-label"
    )


@pytest.fixture(scope="module")
def team_namespaces(sandbox: Sandbox) -> Iterator[None]:
    created = []
    for name in TEAM_NAMESPACES:
        if sandbox.kubectl("get", "namespace", name, check=False).returncode:
            sandbox.kubectl("create", "namespace", name)
            created.append(name)
    yield
    for name in created:
        sandbox.kubectl("delete", "namespace", name, "--wait=false")


@pytest.mark.usefixtures("chart_crds", "team_namespaces")
@pytest.mark.parametrize("values_file", ci_values_files(), ids=lambda p: p.name)
def test_ci_scenario_passes_server_side_dry_run(
    chart: Chart, sandbox: Sandbox, namespace: str, values_file: Path
) -> None:
    args = chart.template_args((values_file,))
    args[args.index("wattsched-system")] = namespace
    documents = [doc for doc in yaml.safe_load_all(chart.helm(*args).stdout) if doc]
    checked = [doc for doc in documents if doc["kind"] not in KINDS_WITHOUT_CRD]
    stream = yaml.safe_dump_all(checked)
    result = sandbox.kubectl(
        "apply", "--dry-run=server", "--server-side", "-f", "-", "-o", "name", input=stream
    )
    assert len(result.stdout.split()) == len(checked)


def test_install_creates_the_crds(sandbox: Sandbox, release: Release) -> None:
    for crd in (
        "llmworkloads.wattsched.io",
        "energybudgets.wattsched.io",
        "nodepowerprofiles.wattsched.io",
        "clusterkopfpeerings.kopf.dev",
    ):
        sandbox.kubectl("wait", "--for=condition=Established", "--timeout=10s", f"crd/{crd}")


def test_install_creates_service_accounts_roles_and_the_own_node_policy(
    sandbox: Sandbox, release: Release
) -> None:
    for service_account in (release.operator_service_account, release.agent_service_account):
        sandbox.kubectl("get", "serviceaccount", service_account, "-n", release.namespace)
        sandbox.kubectl("get", "clusterrole", service_account)
        binding = json.loads(
            sandbox.kubectl("get", "clusterrolebinding", service_account, "-o", "json").stdout
        )
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": service_account, "namespace": release.namespace}
        ]
    policy = f"{release.name}-wattsched-agent-own-node"
    sandbox.kubectl("get", "validatingadmissionpolicy", policy)
    binding = json.loads(
        sandbox.kubectl("get", "validatingadmissionpolicybinding", policy, "-o", "json").stdout
    )
    assert binding["spec"]["policyName"] == policy


def test_install_creates_the_peering_object_and_the_budget(
    sandbox: Sandbox, release: Release
) -> None:
    sandbox.kubectl("get", "clusterkopfpeering.kopf.dev", release.name)
    budget = json.loads(sandbox.kubectl("get", "energybudget", release.name, "-o", "json").stdout)
    assert budget["spec"]["powerCapWatts"] == 40000


def test_operator_deployment_is_available(sandbox: Sandbox, release: Release) -> None:
    deployment = json.loads(
        sandbox.kubectl(
            "get", "deployment", f"{release.name}-wattsched-operator", "-n", release.namespace,
            "-o", "json",
        ).stdout
    )  # fmt: skip
    assert deployment["status"].get("availableReplicas") == 1
    pod_spec = deployment["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == release.operator_service_account


def test_agent_daemonset_runs_one_pod_on_every_gpu_node(sandbox: Sandbox, release: Release) -> None:
    gpu_nodes = set(
        sandbox.kubectl(
            "get", "nodes", "-l", "nvidia.com/gpu.present=true",
            "-o", "jsonpath={.items[*].metadata.name}",
        ).stdout.split()
    )  # fmt: skip
    assert len(gpu_nodes) >= 2
    pods = json.loads(
        sandbox.kubectl(
            "get", "pods", "-n", release.namespace, "-o", "json",
            "-l", f"app.kubernetes.io/component=agent,app.kubernetes.io/instance={release.name}",
        ).stdout
    )["items"]  # fmt: skip
    assert sorted(pod["spec"]["nodeName"] for pod in pods) == sorted(gpu_nodes)
    assert {pod["status"]["phase"] for pod in pods} == {"Running"}


def test_crd_upgrade_procedure_then_helm_upgrade_to_two_peered_operators(
    chart: Chart, sandbox: Sandbox, namespace: str, tmp_path: Path
) -> None:
    name = f"up-{secrets.token_hex(3)}"
    minimal = CHART_DIR / "ci" / "minimal-values.yaml"
    chart.helm(
        "install", name, str(chart.directory), "-n", namespace, "-f", str(minimal),
        kubeconfig=sandbox.kubeconfig,
    )  # fmt: skip
    try:
        chart.helm("package", str(chart.directory), "--destination", str(tmp_path))
        (package,) = tmp_path.glob("wattsched-*.tgz")
        with tarfile.open(package) as archive:
            archive.extractall(tmp_path / "untarred", filter="data")
        applied = sandbox.kubectl(
            "apply", "--server-side", "--force-conflicts", "-o", "name",
            "-f", str(tmp_path / "untarred" / "wattsched" / "crds"),
        )  # fmt: skip
        assert len(applied.stdout.split()) == 4
        chart.helm(
            "upgrade", name, str(chart.directory), "-n", namespace, "-f", str(minimal),
            "--set", "peering.enabled=true", "--set", f"peering.name={name}",
            "--set", "operator.replicas=2", "--wait", "--timeout", "120s",
            kubeconfig=sandbox.kubeconfig,
        )  # fmt: skip
        deployment = json.loads(
            sandbox.kubectl(
                "get", "deployment", f"{name}-wattsched-operator", "-n", namespace, "-o", "json"
            ).stdout
        )
        assert deployment["status"]["availableReplicas"] == 2
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--peering={name}" in args
        sandbox.kubectl("get", "clusterkopfpeering.kopf.dev", name)
    finally:
        chart.helm("uninstall", name, "-n", namespace, kubeconfig=sandbox.kubeconfig)
    assert sandbox.kubectl("get", "clusterkopfpeering.kopf.dev", name, check=False).returncode
    assert sandbox.kubectl(
        "get", "clusterrole", f"{name}-wattsched-operator", check=False
    ).returncode

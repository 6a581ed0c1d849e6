"""Fixtures for the Helm chart tests: the helm binary, rendering, and a release on the sandbox.

- `chart` (session, no cluster): runs our helm (the sandbox build's, never one on PATH) against
  charts/wattsched: `render()` returns the parsed documents of `helm template`, `lint()` the result.
- `release` (session, cluster): the chart installed with ci/sandbox-values.yaml into a fresh
  namespace under a unique release name, uninstalled afterwards. Its EnergyBudget selects no node
  (so other tests' planning is unaffected) and its peering object is named after the release.
- `agent_token_on_node` (cluster): a token of the agent's ServiceAccount bound to the agent pod on
  a given node, i.e. the token the kubelet would mount there; `as_agent_on_node`: kubectl with it.
- `two_agent_profiles` (cluster): NodePowerProfiles for two nodes that run agents (own, other).

Not for: the sandbox itself (tests/conftest.py) or assertions (the test modules).
"""

from __future__ import annotations

import base64
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from tests.conftest import Sandbox

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "wattsched"
KUBE_VERSION = "1.36.3"
HELM_TIMEOUT_SECONDS = 180

Manifest = dict[str, Any]


class HelmError(AssertionError):
    """A helm call that was expected to succeed failed; carries its arguments and stderr."""


@dataclass(frozen=True)
class Chart:
    """Our helm binary pointed at charts/wattsched."""

    helm_path: Path
    directory: Path = CHART_DIR

    def helm(
        self, *args: str, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run helm; with check=True a non-zero exit raises HelmError with its stderr."""
        command = [str(self.helm_path), *args]
        if kubeconfig is not None:
            command += ["--kubeconfig", str(kubeconfig)]
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=HELM_TIMEOUT_SECONDS
        )
        if check and result.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def template_args(
        self,
        values_files: tuple[Path, ...] = (),
        set_values: tuple[str, ...] = (),
        release_name: str = "wattsched",
    ) -> list[str]:
        """Arguments of `helm template` for a release in namespace wattsched-system."""
        args = ["template", release_name, str(self.directory), "--namespace", "wattsched-system"]
        args += ["--kube-version", KUBE_VERSION]
        for values_file in values_files:
            args += ["--values", str(values_file)]
        for assignment in set_values:
            args += ["--set", assignment]
        return args

    def render_text(
        self, values_files: tuple[Path, ...] = (), set_values: tuple[str, ...] = ()
    ) -> str:
        """The YAML stream `helm template` prints."""
        return self.helm(*self.template_args(values_files, set_values)).stdout

    def render(
        self,
        values_files: tuple[Path, ...] = (),
        set_values: tuple[str, ...] = (),
        release_name: str = "wattsched",
    ) -> list[Manifest]:
        """The parsed documents `helm template` renders (empty documents dropped)."""
        text = self.helm(*self.template_args(values_files, set_values, release_name)).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]


def ci_values_files() -> list[Path]:
    """Every ci/*-values.yaml scenario of the chart."""
    return sorted((CHART_DIR / "ci").glob("*-values.yaml"))


def find(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    """The one manifest of this kind whose name ends with name_suffix."""
    matches = [
        m
        for m in manifests
        if m["kind"] == kind and str(m["metadata"]["name"]).endswith(name_suffix)
    ]
    assert len(matches) == 1, f"expected one {kind} named *{name_suffix}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="session")
def chart() -> Chart:
    """The chart and the helm binary from the sandbox build (fails with how to build it)."""
    build = subprocess.run(
        [str(REPO_ROOT / "sandbox" / "build.sh"), "--dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    helm_path = Path(build.stdout.strip()) / "helm"
    if not helm_path.is_file():
        pytest.fail(
            f"helm is missing in {helm_path.parent}: build it with `make binaries` "
            "(sandbox/build.sh). Chart tests are never skipped.",
            pytrace=False,
        )
    return Chart(helm_path=helm_path)


@dataclass(frozen=True)
class Release:
    """The chart installed on the sandbox."""

    name: str
    namespace: str
    operator_service_account: str
    agent_service_account: str

    @property
    def operator_user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.operator_service_account}"

    @property
    def agent_user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.agent_service_account}"


@pytest.fixture(scope="session")
def release(chart: Chart, sandbox: Sandbox) -> Iterator[Release]:
    """ci/sandbox-values.yaml installed under a unique name in a fresh namespace."""
    name = f"ws-{secrets.token_hex(3)}"
    namespace = f"{name}-system"
    sandbox.kubectl("create", "namespace", namespace)
    chart.helm(
        "install",
        name,
        str(chart.directory),
        "--namespace",
        namespace,
        "--values",
        str(CHART_DIR / "ci" / "sandbox-values.yaml"),
        "--set",
        f"peering.name={name}",
        "--set",
        f"defaultEnergyBudget.name={name}",
        "--set-json",
        'defaultEnergyBudget.spec.nodeSelector={"matchLabels":{"wattsched.io/chart-test":"none"}}',
        "--wait",
        "--timeout",
        "120s",
        kubeconfig=sandbox.kubeconfig,
    )
    yield Release(
        name=name,
        namespace=namespace,
        operator_service_account=f"{name}-wattsched-operator",
        agent_service_account=f"{name}-wattsched-agent",
    )
    chart.helm("uninstall", name, "--namespace", namespace, kubeconfig=sandbox.kubeconfig)
    sandbox.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")


KubectlAs = Callable[..., subprocess.CompletedProcess[str]]


def token_kubeconfig(sandbox: Sandbox, token: str, workdir: Path) -> Path:
    """A kubeconfig for the sandbox whose only credential is a bearer token."""
    config = yaml.safe_load(sandbox.kubeconfig.read_text())
    ca_path = workdir / "ca.crt"
    ca_path.write_bytes(
        base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"])
    )
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "sandbox",
                "cluster": {"server": sandbox.api_url, "certificate-authority": str(ca_path)},
            }
        ],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "token"}}],
        "current-context": "sandbox",
    }
    kubeconfig_path = workdir / f"kubeconfig-{secrets.token_hex(4)}"
    kubeconfig_path.write_text(yaml.safe_dump(kubeconfig))
    return kubeconfig_path


def token_kubectl(sandbox: Sandbox, token: str, workdir: Path) -> KubectlAs:
    """kubectl that authenticates with a bearer token only (no admin certificate)."""
    kubeconfig_path = token_kubeconfig(sandbox, token, workdir)

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(sandbox.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig_path), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    return run


@pytest.fixture
def agent_token_on_node(sandbox: Sandbox, release: Release) -> Callable[[str], str]:
    """A TokenRequest bound to the agent pod on a node: the token the kubelet mounts there."""

    def for_node(node_name: str) -> str:
        pods = sandbox.kubectl(
            "get", "pods", "-n", release.namespace,
            "-l", "app.kubernetes.io/component=agent,app.kubernetes.io/instance=" + release.name,
            "--field-selector", f"spec.nodeName={node_name}",
            "-o", "jsonpath={.items[*].metadata.name}",
        ).stdout.split()  # fmt: skip
        assert len(pods) == 1, f"expected one agent pod on {node_name}, found {pods}"
        return sandbox.kubectl(
            "create", "token", release.agent_service_account, "-n", release.namespace,
            "--bound-object-kind", "Pod", "--bound-object-name", pods[0], "--duration", "10m",
        ).stdout.strip()  # fmt: skip

    return for_node


@pytest.fixture
def as_agent_on_node(
    sandbox: Sandbox, agent_token_on_node: Callable[[str], str], tmp_path: Path
) -> Callable[[str], KubectlAs]:
    """kubectl as the agent pod on a node (authenticating with agent_token_on_node's token)."""

    def for_node(node_name: str) -> KubectlAs:
        return token_kubectl(sandbox, agent_token_on_node(node_name), tmp_path)

    return for_node


def profile_manifest(node_name: str) -> str:
    """A NodePowerProfile for a node (one GPU at 500 W), as YAML."""
    return yaml.safe_dump(
        {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": "NodePowerProfile",
            "metadata": {"name": node_name},
            "spec": {"nodeName": node_name, "idlePowerLimitWatts": 500},
        }
    )


@pytest.fixture
def two_agent_profiles(sandbox: Sandbox, release: Release) -> Iterator[tuple[str, str]]:
    """NodePowerProfiles for two GPU nodes that run agents (deleted afterwards)."""
    nodes = sandbox.kubectl(
        "get", "pods", "-n", release.namespace, "-o", "jsonpath={.items[*].spec.nodeName}",
        "-l", f"app.kubernetes.io/component=agent,app.kubernetes.io/instance={release.name}",
    ).stdout.split()  # fmt: skip
    own, other = sorted(nodes)[:2]
    existed = {
        node
        for node in (own, other)
        if sandbox.kubectl("get", "nodepowerprofile", node, check=False).returncode == 0
    }
    for node in {own, other} - existed:
        sandbox.kubectl("create", "-f", "-", input=profile_manifest(node))
    yield own, other
    for node in {own, other} - existed:
        sandbox.kubectl("delete", "nodepowerprofile", node, "--ignore-not-found")

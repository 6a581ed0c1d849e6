"""The `wattsched` command line against the sandbox: missing objects are one line with exit code 4,
`explain` finds a workload by `-n NAMESPACE NAME`, by the kubeconfig context's namespace or by
`NAMESPACE/NAME`, and prints the same facts as text, JSON or YAML.

Unreachable servers and bad kubeconfigs need no cluster: test_cli_errors.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from wattsched_api.commandline import EXIT_NOT_FOUND, CommandError
from wattsched_operator.kube import Kube
from wattsched_operator.run import ensure_peering

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]


def wattsched(*args: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "WATTSCHED_DEBUG"}
    environment["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run(
        [sys.executable, "-m", "wattsched_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=environment,
    )


def one_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"wattsched {command}: ")
    return line


def workload_manifest(name: str) -> str:
    (manifest,) = yaml.safe_load_all((REPO_ROOT / "examples" / "finetune.yaml").read_text())
    manifest["metadata"] = {"name": name}
    return yaml.safe_dump(manifest)


def test_explain_of_a_missing_workload_says_so_in_one_line_with_exit_4(
    sandbox: Sandbox, crds: list[str], namespace: str
) -> None:
    result = wattsched("explain", "-n", namespace, "nothing-here", kubeconfig=sandbox.kubeconfig)
    assert result.returncode == EXIT_NOT_FOUND
    line = one_line(result, "explain")
    assert f"LLMWorkload {namespace}/nothing-here not found" in line
    assert f"kubectl get llmw -n {namespace}" in line


def test_explain_finds_a_workload_by_flag_by_context_namespace_and_by_slash(
    sandbox: Sandbox, crds: list[str], namespace: str, tmp_path: Path
) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=workload_manifest("tune"))
    by_flag = wattsched("explain", "-n", namespace, "tune", kubeconfig=sandbox.kubeconfig)
    assert by_flag.returncode == 0, by_flag.stderr
    assert by_flag.stdout.startswith(f"LLMWorkload {namespace}/tune: FineTuning")
    by_slash = wattsched("explain", f"{namespace}/tune", kubeconfig=sandbox.kubeconfig)
    assert by_slash.stdout == by_flag.stdout
    # A kubeconfig whose context names the namespace, as `kubectl config set-context` writes it.
    context_config = tmp_path / "kubeconfig"
    context_config.write_text(sandbox.kubeconfig.read_text())
    sandbox.kubectl(
        "config", "set-context", "--current", f"--namespace={namespace}",
        "--kubeconfig", str(context_config),
    )  # fmt: skip
    by_context = wattsched("explain", "tune", kubeconfig=context_config)
    assert by_context.returncode == 0, by_context.stderr
    assert by_context.stdout == by_flag.stdout
    in_default = wattsched("explain", "tune", kubeconfig=sandbox.kubeconfig)
    assert in_default.returncode == EXIT_NOT_FOUND
    assert "LLMWorkload default/tune not found" in one_line(in_default, "explain")


def test_explain_prints_the_same_facts_as_json_and_yaml(
    sandbox: Sandbox, crds: list[str], namespace: str
) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=workload_manifest("tune"))
    as_json = wattsched(
        "explain", "-n", namespace, "tune", "-o", "json", kubeconfig=sandbox.kubeconfig
    )
    as_yaml = wattsched(
        "explain", "-n", namespace, "tune", "-o", "yaml", kubeconfig=sandbox.kubeconfig
    )
    assert as_json.returncode == as_yaml.returncode == 0, as_json.stderr + as_yaml.stderr
    document = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == document
    assert document["workload"] == f"{namespace}/tune"
    assert document["type"] == "FineTuning"
    assert document["gpusPerReplica"] == 8
    assert document["placements"] == []  # no operator runs in this test: not yet planned
    assert document["phase"] is None


def test_agent_for_a_node_that_does_not_exist_says_so_in_one_line_with_exit_4(
    sandbox: Sandbox,
) -> None:
    for backend in ("nvml", "simulated"):
        result = wattsched(
            "agent", "--backend", backend, "--node-name", "no-such-node", "--metrics-port", "0",
            kubeconfig=sandbox.kubeconfig,
        )  # fmt: skip
        assert result.returncode == EXIT_NOT_FOUND, result.stderr
        line = one_line(result, "agent")
        assert "node no-such-node not found" in line
        assert "--node-name" in line


def test_a_missing_peering_crd_names_what_to_install(sandbox: Sandbox, crds: list[str]) -> None:
    """The real API server's answer for a kind it does not serve (a version of kopf's group that
    no CRD defines), as the operator meets it where kopf's peering CRD was never installed."""
    kube = Kube(str(sandbox.kubeconfig))
    with pytest.raises(CommandError) as raised:
        ensure_peering(kube, "wattsched", path="/apis/kopf.dev/v0missing/clusterkopfpeerings")
    assert raised.value.exit_code == EXIT_NOT_FOUND
    message = str(raised.value)
    assert "kopf's peering CRD (clusterkopfpeerings.kopf.dev) is not installed" in message
    assert "charts/wattsched/crds/kopf.dev_clusterkopfpeerings.yaml" in message
    assert "--standalone" in message

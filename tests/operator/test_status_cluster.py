"""`wattsched status`, `kubectl wattsched status` and `wattsched plan --from-cluster` on the
sandbox, with the examples' budgets and workloads applied and the operator and simulated agents
running.

One scenario, set up for each test: the examples placed, one workload nobody can place
(an H200-only one), one the operator rejects as invalid, and a service whose spec stops allowing
the product it runs on, so the operator moves its replicas (a Moved Event, cause SpecChanged; a
cordon alone moves nothing). The screen and the what-if are then read as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
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
from wattsched_api.llmworkload import MAX_TEMPLATE_DEPTH

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

EXAMPLES = REPO_ROOT / "examples"
KINDS_TO_APPLY = {"LLMWorkload", "EnergyBudget"}


def example_manifests() -> list[Path]:
    """The example files that hold only LLMWorkloads and EnergyBudgets (not node definitions or
    offline snapshots)."""
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        kinds = {doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if doc}
        if kinds and kinds <= KINDS_TO_APPLY:
            found.append(path)
    return found


def unplaceable(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "h200-only", "namespace": namespace},
        "spec": {
            "type": "Inference",
            "model": {"name": "meta-llama/Llama-3.1-8B", "parametersBillions": 8},
            "gpu": {"count": 1, "products": ["NVIDIA-H200"]},
            "variants": [{"name": "bf16", "precision": "bf16"}],
            "slo": {"tokensPerSecond": 100},
            "template": {"spec": {"containers": [{"name": "server", "image": "vllm"}]}},
        },
    }


def invalid(namespace: str) -> dict[str, Any]:
    """Accepted by the API server, rejected by the operator: a template nested deeper than the
    models read (a product the catalogue lacks is no longer invalid: issue 13)."""
    workload = unplaceable(namespace)
    workload["metadata"]["name"] = "too-deep"
    deep: dict[str, Any] = {"a": 1}
    for _ in range(MAX_TEMPLATE_DEPTH):
        deep = {"a": deep}
    workload["spec"]["template"]["spec"]["x"] = deep
    return workload


def wattsched(sandbox: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wattsched_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)},
    )


def placed(body: dict[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") in {"Placed", "Running"}


class Scenario:
    def __init__(self, namespace: str, operator: OperatorProcess, moved_node: str) -> None:
        self.namespace = namespace
        self.operator = operator
        self.moved_node = moved_node


@pytest.fixture
def scenario(sandbox: Sandbox, namespace: str, start_operator: StartOperator) -> Scenario:
    # Rounds every 5 s, each accounting energy: the counters move within the test. The default
    # horizon: the examples' allowances leave room at any hour of the week, Monday's first (the
    # tightest share of rack-a's weekly allowance) included; test_horizon_cluster.py covers
    # deferral.
    operator = start_operator("--accounting-seconds", "2", "--replan-interval-seconds", "5")
    for path in example_manifests():
        sandbox.kubectl("apply", "-n", namespace, "-f", str(path))
    sandbox.kubectl("label", "energybudgets", "cluster", "rack-a", f"{TEST_LABEL}=status")
    names = [
        doc["metadata"]["name"]
        for path in example_manifests()
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "LLMWorkload"
    ]
    wait_until(
        "every example workload placed",
        lambda: all(placed(get_json(sandbox, "llmw", n, "-n", namespace)) for n in names),
        timeout_seconds=120,
    )
    for extra in (unplaceable(namespace), invalid(namespace)):
        sandbox.kubectl("apply", "-f", "-", input=json.dumps(extra))
    triton = get_json(sandbox, "llmw", "llama-8b-triton", "-n", namespace)
    node = triton["status"]["placements"][0]["node"]
    product = get_json(sandbox, "node", node)["metadata"]["labels"]["nvidia.com/gpu.product"]
    allowed = [p for p in triton["spec"]["gpu"]["products"] if p != product]
    patch = {"spec": {"gpu": {"products": allowed}}}
    sandbox.kubectl(
        "patch", "llmw", "llama-8b-triton", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )
    wait_until(
        "a Moved Event for llama-8b-triton",
        lambda: [
            e
            for e in get_json(sandbox, "events", "-n", namespace)["items"]
            if e["reason"] == "Moved" and e["involvedObject"]["name"] == "llama-8b-triton"
        ],
        timeout_seconds=90,
    )
    wait_until(
        "h200-only unplaced with a reason",
        lambda: (
            get_json(sandbox, "llmw", "h200-only", "-n", namespace).get("status", {}).get("phase")
        ),
    )
    return Scenario(namespace, operator, node)


def test_status_shows_budgets_unplaced_workloads_moves_nodes_and_rounds(
    sandbox: Sandbox, scenario: Scenario
) -> None:
    metrics_url = f"http://127.0.0.1:{scenario.operator.metrics_port}"
    confirmed = "NODES WHOSE AGENT HAS NOT CONFIRMED ITS LIMITS: 0 of"

    def status_once_confirmed() -> subprocess.CompletedProcess[str] | None:
        # A plan just after the move may still be on its way to the agents (a screen is one
        # instant): the agents confirm every profile within their next pass.
        shown = wattsched(sandbox, "status", "--operator-metrics-url", metrics_url)
        return shown if shown.returncode != 0 or confirmed in shown.stdout else None

    result = wait_until(
        "every agent's limits confirmed on the status screen", status_once_confirmed
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    screen = result.stdout
    for name in ("cluster", "rack-a"):
        budget = get_json(sandbox, "energybudget", name)
        row = next(line.split() for line in screen.splitlines() if line.startswith(f"{name} "))
        assert row[1] == f"{budget['spec']['powerCapWatts']:,.0f}"
        assert row[2] == f"{budget['status']['allocatedCapWatts']:,.0f}"
        assert row[4] == f"{budget['status']['headroomWatts']:,.0f}"
    ns = scenario.namespace
    assert f"{ns}/h200-only" in screen
    assert "NVIDIA-H200" in screen or "H200" in screen
    assert f"{ns}/too-deep" in screen  # rejected: Admitted=False with the operator's reason
    moved = [line for line in screen.splitlines() if f"{ns}/llama-8b-triton" in line]
    assert any("Moved" in line and scenario.moved_node in line for line in moved)
    assert "last plan " in screen
    assert "operator metrics: 0 failed rounds since it started" in screen


def test_operator_counters_follow_the_energy_and_carbon_in_statuses(
    sandbox: Sandbox, scenario: Scenario
) -> None:
    def counted() -> dict[str, Any]:
        found = scenario.operator.scrape()
        energy = found.get("wattsched_workload_energy_joules_total", {})
        return found if energy and all(v > 0 for v in energy.values()) else {}

    samples = wait_until("workload energy counters above 0", counted, timeout_seconds=60)
    (build,) = samples["wattsched_build_info"]
    assert dict(build)["version"]
    ns = scenario.namespace
    energy = samples["wattsched_workload_energy_joules_total"]
    chat = [v for labels, v in energy.items() if dict(labels)["workload"] == "llama-70b-chat"]
    assert chat
    assert sum(chat) > 0
    assert {dict(labels)["namespace"] for labels in energy} == {ns}
    # The counters advance with the increments the statuses add up: the counter read after the
    # status holds at least what the status says and at most a few more increments (the modelled
    # power of the budget's scope for 10 s).
    budget = get_json(sandbox, "energybudget", "cluster")
    # energyUsedKilowattHours is rounded to the watt-hour for people; energyUsedJoules is exact.
    used_kwh = budget["status"]["energyUsedJoules"] / 3.6e6
    joules = sum(
        value
        for labels, value in scenario.operator.scrape()[
            "wattsched_budget_energy_joules_total"
        ].items()
        if dict(labels)["budget"] == "cluster"
    )
    slack_kwh = budget["status"]["expectedWatts"] * budget["spec"]["pue"] * 10 / 3.6e6
    assert used_kwh - 1e-6 <= joules / 3.6e6 <= used_kwh + slack_kwh
    ratio = samples["wattsched_budget_energy_allowance_used_ratio"]
    assert ratio[(("budget", "cluster"),)] == pytest.approx(
        used_kwh / budget["spec"]["energy"]["kilowattHours"],
        abs=slack_kwh / budget["spec"]["energy"]["kilowattHours"],
    )
    carbon = samples["wattsched_budget_carbon_grams_total"]
    assert carbon[(("budget", "rack-a"),)] > 0  # rack-a has a carbon intensity
    slo = samples["wattsched_workload_slo_met"]
    assert (("namespace", ns), ("workload", "llama-70b-chat")) in slo


def test_kubectl_wattsched_runs_the_same_screen(
    sandbox: Sandbox, scenario: Scenario, tmp_path: Path
) -> None:
    result = wattsched(sandbox, "install-kubectl-plugin", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    environment = {
        **os.environ,
        "KUBECONFIG": str(sandbox.kubeconfig),
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
    }
    plugin = subprocess.run(
        [str(sandbox.bin_dir / "kubectl"), "wattsched", "status"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=environment,
    )
    assert plugin.returncode == 0, plugin.stderr
    assert plugin.stdout.startswith("wattsched status at ")
    assert f"{scenario.namespace}/h200-only" in plugin.stdout
    listed = subprocess.run(
        [str(sandbox.bin_dir / "kubectl"), "plugin", "list"],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
    )
    assert str(tmp_path / "kubectl-wattsched") in listed.stdout


def test_plan_from_cluster_skips_invalid_workloads_and_diffs_a_lower_cap(
    sandbox: Sandbox, scenario: Scenario
) -> None:
    rack = get_json(sandbox, "energybudget", "rack-a")
    # rack-a's 32 H100 GPUs at their 200 W minimum are 6,400 W: 7,000 W is feasible and below
    # what the examples allocate there.
    lower = 7000
    assert rack["status"]["allocatedCapWatts"] > lower
    result = wattsched(
        sandbox,
        "plan",
        "--from-cluster",
        # The example's evening window (15,000 W) may only lower the cap: it goes first.
        "--set",
        "energybudget/rack-a.spec.schedule=null",
        "--set",
        f"energybudget/rack-a.spec.powerCapWatts={lower}",
        "--diff",
        "-o",
        "json",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    ns = scenario.namespace
    assert [e for e in plan["skipped"] if f"LLMWorkload {ns}/too-deep" in e]
    budget = next(b for b in plan["budgets"] if b["name"] == "rack-a")
    assert budget["capWatts"] == lower
    assert budget["allocatedCapWatts"] <= lower
    diff = plan["diff"]
    # The running replicas were read from the pods: what runs now is not "started" again.
    running_now = {
        (f"{ns}/{p['metadata']['labels']['wattsched.io/workload']}",
         int(p["metadata"]["labels"]["wattsched.io/replica"]))
        for p in get_json(sandbox, "pods", "-n", ns, "-l", "wattsched.io/workload")["items"]
        if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
    }  # fmt: skip
    assert running_now
    assert not {(s["workload"], s["replica"]) for s in diff["started"]} & running_now
    # Less room on rack-a: replicas there run at lower limits, stop or move.
    on_rack = {
        n["metadata"]["name"]
        for n in get_json(sandbox, "nodes", "-l", "wattsched.io/rack=rack-a")["items"]
    }
    changes = (
        [c for c in diff["limitChanged"] if c["node"] in on_rack and c["toWatts"] < c["fromWatts"]]
        + [s for s in diff["stopped"] if s["node"] in on_rack]
        + [m for m in diff["moved"] if m["fromNode"] in on_rack]
    )
    assert changes
    # Nothing was written: the budget's cap is unchanged.
    assert (
        get_json(sandbox, "energybudget", "rack-a")["spec"]["powerCapWatts"]
        == (rack["spec"]["powerCapWatts"])
    )


def test_status_and_plan_say_in_one_line_when_the_cluster_cannot_be_read(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    broken = tmp_path / "kubeconfig"
    config = yaml.safe_load(sandbox.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    broken.write_text(yaml.safe_dump(config))
    for command in (("status",), ("plan", "--from-cluster")):
        result = wattsched(sandbox, *command, "--kubeconfig", str(broken))
        assert result.returncode == 3  # the cluster cannot be used (README, "Command line")
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1
        assert "cannot reach the API server https://127.0.0.1:1" in result.stderr

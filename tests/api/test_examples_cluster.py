"""`kubectl apply -f examples/` on a live cluster: the folder is safe to apply as a whole.

It applies without an error and creates exactly the objects its files name; every object that was
there before (nodes, budgets, profiles, workloads, pods elsewhere) keeps its labels, annotations and
spec (status is left out: controllers, KWOK and agents write it meanwhile).
Offline inputs (snapshots, the sandbox's nodes, simulation budgets) live outside examples/.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples"
# What the old examples/ overwrote, and what a workload could disturb.
WATCHED = "nodes,energybudgets,nodepowerprofiles,llmworkloads,pods"
Key = tuple[str, str, str]  # kind, namespace ("" when cluster-scoped), name


def live_objects(sandbox: Sandbox) -> dict[Key, str]:
    """Every watched object -> what an apply could change in it (labels, annotations, spec)."""
    listing = json.loads(sandbox.kubectl("get", WATCHED, "-A", "-o", "json").stdout)
    return {
        (
            item["kind"],
            item["metadata"].get("namespace", ""),
            item["metadata"]["name"],
        ): json.dumps(
            [
                item["metadata"].get("labels"),
                item["metadata"].get("annotations"),
                item.get("spec"),
            ],
            sort_keys=True,
        )
        for item in listing["items"]
    }


def example_objects(namespace: str) -> set[Key]:
    """The objects examples/*.yaml (not subfolders: kubectl's default) create, namespaced ones in
    `namespace` when they name none."""
    found = set()
    for path in EXAMPLES_DIR.glob("*.yaml"):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for doc in [item for d in documents for item in d.get("items", [d])]:
            scoped = doc["kind"] not in {"EnergyBudget", "NodePowerProfile", "Namespace"}
            home = doc["metadata"].get("namespace", namespace) if scoped else ""
            found.add((doc["kind"], home, doc["metadata"]["name"]))
    return found


def test_applying_the_examples_folder_creates_its_objects_and_changes_nothing_else(
    sandbox: Sandbox, crds: list[str], namespace: str
) -> None:
    expected = example_objects(namespace)
    budgets = [name for kind, _, name in expected if kind == "EnergyBudget"]
    # A leftover example budget (a demo run) would be updated rather than created.
    sandbox.kubectl("delete", "energybudget", *budgets, "--ignore-not-found", "--wait=true")
    # Something for a careless folder to overwrite: a budget and a node's power profile.
    canary = f"canary-{secrets.token_hex(3)}"
    node = json.loads(sandbox.kubectl("get", "nodes", "-o", "json").stdout)["items"][0]
    node_name = node["metadata"]["name"]
    created_profile = (
        sandbox.kubectl("get", "nodepowerprofile", node_name, check=False).returncode != 0
    )
    sandbox.kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump_all(
            [
                {
                    "apiVersion": "wattsched.io/v1alpha1",
                    "kind": "EnergyBudget",
                    "metadata": {"name": canary},
                    "spec": {"nodeSelector": {}, "powerCapWatts": 123456},
                },
                {
                    "apiVersion": "wattsched.io/v1alpha1",
                    "kind": "NodePowerProfile",
                    "metadata": {"name": node_name},
                    "spec": {"nodeName": node_name},
                },
            ]
        ),
    )
    before = live_objects(sandbox)
    try:
        applied = sandbox.kubectl("apply", "-f", str(EXAMPLES_DIR), "-n", namespace, check=False)
        assert applied.returncode == 0, applied.stderr
        assert applied.stderr == ""
        after = live_objects(sandbox)
        changed = {key for key, seen in before.items() if after.get(key, seen) != seen}
        assert changed == set()
        assert set(after) - set(before) == expected
        # Applied again, nothing changes (kubectl may say `configured`: a list with schema
        # defaults, spec.variants, is sent whole, and the API server finds nothing to change).
        again = sandbox.kubectl("apply", "-f", str(EXAMPLES_DIR), "-n", namespace)
        assert "created" not in again.stdout
        # Objects another test left going (a namespace being deleted) may vanish meanwhile: only
        # what is new or changed counts.
        final = live_objects(sandbox)
        assert set(final) - set(after) == set()
        assert {key for key, seen in after.items() if final.get(key, seen) != seen} == set()
    finally:
        sandbox.kubectl("delete", "energybudget", *budgets, canary, "--ignore-not-found")
        if created_profile:
            sandbox.kubectl("delete", "nodepowerprofile", node_name, "--ignore-not-found")

"""Fault containment on the sandbox: an object a tenant gets past the API server affects only
itself. The operator stays up, marks that object, and keeps placing everyone else's work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.operator.conftest import StartOperator, wait_until
from tests.operator.test_operator_cluster import (
    apply,
    events_of,
    pods_of,
    running_on_planned_nodes,
    workload,
)
from wattsched_api.llmworkload import MAX_TEMPLATE_DEPTH

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

# The API server refuses JSON nested deeper than this (Go encoding/json's maxNestingDepth, kept by
# sigs.k8s.io/json, which kube-apiserver decodes request bodies with).
API_SERVER_MAX_JSON_DEPTH = 10_000


def deep_workload_json(name: str, namespace: str, levels: int) -> str:
    """An LLMWorkload whose spec.template.spec carries `levels` nested objects, as JSON text
    (built as text: json.dumps would recurse once per level)."""
    body = workload(name)
    body["metadata"]["namespace"] = namespace
    body["spec"]["template"]["spec"]["x"] = "DEEP"
    return json.dumps(body).replace('"DEEP"', '{"a":' * levels + "1" + "}" * levels)


def create_raw(sandbox: Sandbox, namespace: str, text: str, path: Path) -> Any:
    """POST a body as it is (kubectl create --raw sends the file's bytes unparsed)."""
    path.write_text(text)
    return sandbox.kubectl(
        "create",
        "--raw",
        f"/apis/wattsched.io/v1alpha1/namespaces/{namespace}/llmworkloads",
        "-f",
        str(path),
        check=False,
    )


def status_of(sandbox: Sandbox, namespace: str, name: str) -> dict[str, Any]:
    """Only the status (the whole object may be too deep for Python's json at its default limit)."""
    text = sandbox.kubectl(
        "get", "llmworkload", name, "-n", namespace, "-o", "jsonpath={.status}"
    ).stdout
    result: dict[str, Any] = json.loads(text) if text.strip() else {}
    return result


def result_of_plan(sandbox: Sandbox) -> str:
    """`wattsched plan --from-cluster -o json` against the sandbox (its stdout)."""
    return subprocess.run(
        [sys.executable, "-m", "wattsched_cli.main", "plan", "--from-cluster", "-o", "json"],
        env={**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def test_templates_nested_thousands_deep_stop_neither_the_operator_nor_other_workloads(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator, tmp_path: Path
) -> None:
    # 990 levels killed the operator's watch before; 9,990 is near the most the API server takes.
    # One exists before the operator starts (its first listing), one arrives on the watch.
    created = create_raw(
        sandbox, namespace, deep_workload_json("deep-listed", namespace, 9_990), tmp_path / "a"
    )
    assert created.returncode == 0, created.stderr
    operator = start_operator()
    created = create_raw(
        sandbox, namespace, deep_workload_json("deep-watched", namespace, 990), tmp_path / "b"
    )
    assert created.returncode == 0, created.stderr
    apply(sandbox, namespace, workload("neighbour"))
    wait_until(
        "neighbour Running on its planned node",
        lambda: running_on_planned_nodes(sandbox, namespace, "neighbour"),
        90,
    )
    for name in ("deep-listed", "deep-watched"):

        def refused(name: str = name) -> dict[str, Any] | None:
            found = condition(status_of(sandbox, namespace, name), "Admitted")
            return found if found and found["status"] == "False" else None

        admitted = wait_until(f"{name} Admitted=False", refused)
        assert admitted["reason"] == "InvalidSpec"
        assert "spec.template" in admitted["message"]
        assert f"more than {MAX_TEMPLATE_DEPTH} levels" in admitted["message"]
        assert status_of(sandbox, namespace, name)["phase"] == "Pending"
        assert pods_of(sandbox, namespace, name) == []
        assert "InvalidSpec" in {e["reason"] for e in events_of(sandbox, namespace, name)}
    assert operator.process.poll() is None, operator.log_path.read_text()[-3000:]
    assert "RecursionError" not in operator.log_path.read_text()
    # The commands that read the cluster are not stopped by them either.
    status = subprocess.run(
        [sys.executable, "-m", "wattsched_cli.main", "status"],
        env={**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    skipped = json.loads(result_of_plan(sandbox))["skipped"]
    assert any(f"{namespace}/deep-listed: spec.template: nests" in line for line in skipped)
    # Deeper than the API server's JSON limit is refused at the door.
    too_deep = create_raw(
        sandbox,
        namespace,
        deep_workload_json("deeper", namespace, API_SERVER_MAX_JSON_DEPTH),
        tmp_path / "c",
    )
    assert too_deep.returncode != 0
    assert "max depth" in too_deep.stderr


def test_a_template_that_pins_a_node_is_refused_and_placed_pods_keep_their_uids(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator
) -> None:
    start_operator()
    pinned = workload("pinned")
    pinned["spec"]["template"]["spec"]["nodeName"] = "gpu-l4-00"
    refused = sandbox.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(pinned), check=False
    )
    assert refused.returncode != 0
    assert "spec.template.spec.nodeName must not be set" in refused.stderr
    apply(sandbox, namespace, workload("steady", replicas=2))
    wait_until("steady Running", lambda: running_on_planned_nodes(sandbox, namespace, "steady"))
    uids = {p["metadata"]["uid"] for p in pods_of(sandbox, namespace, "steady")}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert {p["metadata"]["uid"] for p in pods_of(sandbox, namespace, "steady")} == uids
        time.sleep(1)


def test_a_pod_the_api_server_refuses_with_400_is_reported_and_retried_with_backoff(
    sandbox: Sandbox, namespace: str, start_operator: StartOperator
) -> None:
    operator = start_operator("--backoff-seconds", "10")
    bad = workload("bad-image")
    bad["spec"]["template"]["spec"]["containers"][0]["image"] = 123  # a 400, not a 422
    apply(sandbox, namespace, bad, workload("good"))
    wait_until("good Running", lambda: running_on_planned_nodes(sandbox, namespace, "good"))

    def rejected() -> dict[str, Any] | None:
        found = condition(status_of(sandbox, namespace, "bad-image"), "Admitted")
        return found if found and found["reason"] == "PodRejected" else None

    admitted = wait_until("bad-image PodRejected", rejected)
    assert admitted["status"] == "False"
    assert "cannot unmarshal number" in admitted["message"]
    started = time.monotonic()
    attempts_before = create_attempts(operator.log_path)
    seen_phases = set()
    while time.monotonic() - started < 20:
        status = status_of(sandbox, namespace, "bad-image")
        seen_phases.add(status.get("phase"))
        assert (condition(status, "Admitted") or {}).get("status") == "False"
        time.sleep(0.5)
    attempts = create_attempts(operator.log_path) - attempts_before
    # Backoff 10 s doubling: at most 2 tries in 20 s (before: ~37 at 111 a minute).
    assert attempts <= 2, f"{attempts} create attempts in 20 s"
    assert seen_phases == {"Pending"}
    assert pods_of(sandbox, namespace, "bad-image") == []
    assert "PodRejected" in {e["reason"] for e in events_of(sandbox, namespace, "bad-image")}


def create_attempts(log_path: Path) -> int:
    """Refused creations of bad-image's pod the operator logged (as a refusal, or before this
    fix, as a failed apply step)."""
    text = log_path.read_text()
    return len(re.findall(r"bad-image: replica pod refused|apply step failed.*bad-image", text))

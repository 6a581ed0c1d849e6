"""The sandbox is a real control plane: kube-scheduler binds, KWOK runs pods, the controllers work.

Not for: the operator or agents (their own tests use the same fixtures).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA-H100-80GB-HBM3"


def gpu_pod(name: str, gpus: int, product: str | None = None) -> dict[str, Any]:
    """A pod asking for `gpus` NVIDIA GPUs, optionally pinned to a GPU product by nodeSelector."""
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "main",
                "image": "registry.k8s.io/pause:3.10",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ]
    }
    if product is not None:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": product}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def create(sandbox: Sandbox, namespace: str, manifest: dict[str, Any]) -> None:
    sandbox.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def get_json(sandbox: Sandbox, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(sandbox.kubectl("get", *args, "-o", "json").stdout)
    return result


def wait_until(what: str, condition: Callable[[], bool], timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds} s waiting for {what}")
        time.sleep(0.2)


def is_gone(sandbox: Sandbox, namespace: str, kind_and_name: str) -> bool:
    result = sandbox.kubectl("get", "-n", namespace, kind_and_name, check=False)
    return result.returncode != 0 and "NotFound" in result.stderr


def test_api_server_reports_the_pinned_kubernetes_version(sandbox: Sandbox) -> None:
    pinned = dict(
        line.split("=", 1)
        for line in (REPO_ROOT / "sandbox" / "versions.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )["KUBERNETES_VERSION"]
    versions = json.loads(sandbox.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == pinned
    assert versions["clientVersion"]["gitVersion"] == pinned


def test_every_control_plane_endpoint_listed_in_endpoints_yaml_answers(sandbox: Sandbox) -> None:
    endpoints = sandbox.endpoints()
    assert endpoints["apiserver"] == sandbox.api_url
    health_paths = {
        "apiserver": "/readyz",
        "etcd": "/health",
        "kube-controller-manager": "/healthz",
        "kube-scheduler": "/healthz",
        "kwok": "/healthz",
    }
    pki = sandbox.directory / "pki"
    for name, path in health_paths.items():
        # The admin certificate for the API server; the others allow anonymous health checks.
        answer = subprocess.run(
            ["curl", "-fsS", "--max-time", "5", "--cacert", str(pki / "ca.crt"),
             "--cert", str(pki / "admin.crt"), "--key", str(pki / "admin.key"),
             *([] if name == "apiserver" else ["--insecure"]), endpoints[name] + path],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        assert answer.returncode == 0, f"{name} {endpoints[name]}{path}: {answer.stderr}"


def test_every_example_node_is_ready_untainted_with_its_gpus_allocatable(sandbox: Sandbox) -> None:
    expected = {
        node["metadata"]["name"]: node
        for node in yaml.safe_load_all((REPO_ROOT / "sandbox" / "nodes.yaml").read_text())
        if node
    }
    live = {node["metadata"]["name"]: node for node in get_json(sandbox, "nodes")["items"]}
    for name, node in expected.items():
        assert name in live, f"node {name} from sandbox/nodes.yaml is missing"
        status = live[name]["status"]
        ready = [c["status"] for c in status["conditions"] if c["type"] == "Ready"]
        assert ready == ["True"], f"node {name}: Ready={ready}"
        # Schedulable too: up.sh waits for the node lifecycle controller to lift this taint.
        taints = [t["key"] for t in live[name]["spec"].get("taints") or []]
        assert "node.kubernetes.io/not-ready" not in taints, f"node {name}: taints {taints}"
        gpus = status["allocatable"]["nvidia.com/gpu"]
        assert gpus == node["status"]["allocatable"]["nvidia.com/gpu"]
        assert gpus == live[name]["metadata"]["labels"]["nvidia.com/gpu.count"]


def test_pod_asking_for_four_gpus_on_an_h100_is_bound_by_the_scheduler_and_runs(
    sandbox: Sandbox, namespace: str
) -> None:
    create(sandbox, namespace, gpu_pod("four-gpus", 4, H100))
    sandbox.kubectl(
        "wait",
        "-n",
        namespace,
        "pod/four-gpus",
        "--for=jsonpath={.status.phase}=Running",
        "--timeout=30s",
    )
    pod = get_json(sandbox, "-n", namespace, "pod/four-gpus")
    node = get_json(sandbox, "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == H100
    scheduled = get_json(
        sandbox,
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.name=four-gpus,reason=Scheduled",
    )["items"]
    assert [
        event["source"].get("component") or event.get("reportingComponent") for event in scheduled
    ] == ["default-scheduler"]


def test_pod_asking_for_nine_gpus_stays_pending_with_a_failed_scheduling_event(
    sandbox: Sandbox, namespace: str
) -> None:
    create(sandbox, namespace, gpu_pod("nine-gpus", 9))

    def failed_scheduling_events() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = get_json(
            sandbox,
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=nine-gpus,reason=FailedScheduling",
        )["items"]
        return events

    wait_until("a FailedScheduling event", lambda: bool(failed_scheduling_events()))
    assert "Insufficient nvidia.com/gpu" in failed_scheduling_events()[0]["message"]
    pod = get_json(sandbox, "-n", namespace, "pod/nine-gpus")
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]


def test_deleting_a_running_pod_removes_it(sandbox: Sandbox, namespace: str) -> None:
    create(sandbox, namespace, gpu_pod("short-lived", 1))
    sandbox.kubectl(
        "wait",
        "-n",
        namespace,
        "pod/short-lived",
        "--for=jsonpath={.status.phase}=Running",
        "--timeout=30s",
    )
    sandbox.kubectl("delete", "-n", namespace, "pod/short-lived", "--timeout=30s")
    assert is_gone(sandbox, namespace, "pod/short-lived")


def test_garbage_collector_deletes_a_pod_whose_owner_was_deleted(
    sandbox: Sandbox, namespace: str
) -> None:
    create(
        sandbox,
        namespace,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}},
    )
    owner_uid = get_json(sandbox, "-n", namespace, "configmap/owner")["metadata"]["uid"]
    pod = gpu_pod("owned", 1)
    pod["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    ]
    create(sandbox, namespace, pod)
    sandbox.kubectl("delete", "-n", namespace, "configmap/owner")
    wait_until(
        "the garbage collector to delete pod/owned",
        lambda: is_gone(sandbox, namespace, "pod/owned"),
    )


def test_service_account_tokens_are_issued_and_authenticate(
    sandbox: Sandbox, namespace: str
) -> None:
    token = sandbox.kubectl("create", "token", "default", "-n", namespace).stdout.strip()
    # Only the token: with the admin kubeconfig, its client certificate would authenticate first.
    whoami = subprocess.run(
        [
            str(sandbox.bin_dir / "kubectl"),
            "--kubeconfig",
            os.devnull,
            "--server",
            sandbox.api_url,
            "--certificate-authority",
            str(sandbox.directory / "pki" / "ca.crt"),
            "--token",
            token,
            "auth",
            "whoami",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    username = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
    assert username == f"system:serviceaccount:{namespace}:default"


def test_deleting_a_namespace_removes_it_with_its_pods(sandbox: Sandbox) -> None:
    name = f"doomed-{time.monotonic_ns() % 10**6}"
    sandbox.kubectl("create", "namespace", name)
    wait_until(
        "the default service account",
        lambda: (
            sandbox.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode
            == 0
        ),
    )
    pod = gpu_pod("tenant", 1)
    # The namespace controller waits out the pods' grace period before it checks again.
    pod["spec"]["terminationGracePeriodSeconds"] = 0
    create(sandbox, name, pod)
    sandbox.kubectl(
        "wait", "-n", name, "pod/tenant", "--for=jsonpath={.status.phase}=Running", "--timeout=30s"
    )
    sandbox.kubectl("delete", "namespace", name, "--timeout=60s")
    assert is_gone(sandbox, "default", f"namespace/{name}")


def test_starting_a_running_sandbox_again_reuses_it(sandbox: Sandbox) -> None:
    again = subprocess.run(
        [str(REPO_ROOT / "sandbox" / "up.sh")],
        env={**os.environ, "SANDBOX_DIR": str(sandbox.directory)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "already running" in again.stderr
    assert again.stdout.strip() == str(sandbox.kubeconfig)
    assert sandbox.endpoints()["apiserver"] == sandbox.api_url


def test_a_job_runs_to_completion(sandbox: Sandbox, namespace: str) -> None:
    # kube-controller-manager's Job controller creates the pod; KWOK's pod-complete stage ends it.
    template = gpu_pod("unused", 1)
    template["spec"]["restartPolicy"] = "Never"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "one-shot"},
        "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]}},
    }
    create(sandbox, namespace, job)
    sandbox.kubectl(
        "wait", "-n", namespace, "job/one-shot", "--for=condition=Complete", "--timeout=60s"
    )
    pods = get_json(sandbox, "pods", "-n", namespace, "-l", "job-name=one-shot")["items"]
    assert [pod["status"]["phase"] for pod in pods] == ["Succeeded"]

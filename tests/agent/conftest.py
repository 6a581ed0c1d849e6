"""Helpers for tests that run `wattsched agent` against the sandbox (agent and telemetry tests).

Import them with `from tests.agent.conftest import start_agent, ...`. Not for fixtures of the
sandbox itself (tests/conftest.py). `truth_draw_watts` is the simulator's ground-truth draw of one
GPU (the formula of `wattsched_simulator.engine`, from `GroundTruth`), what a simulated agent's GPU
must draw.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator.truth import GroundTruth, truth_product

if TYPE_CHECKING:
    from tests.conftest import Sandbox


def truth_draw_watts(
    product_label: str,
    utilisation: float,
    power_limit_watts: float,
    node_factor: float,
    workload_type: WorkloadType = WorkloadType.INFERENCE,
) -> float:
    """One GPU's draw in the simulator (engine.py): a service's load is its utilisation times the
    throughput kept at the limit, a job's its utilisation; then node deviation and the limit."""
    truth = GroundTruth()
    product = truth_product(product_label)
    spec = truth.product(product)
    full = truth.full_load_watts(product, workload_type)
    load = utilisation
    if workload_type is WorkloadType.INFERENCE:
        load *= truth.throughput_fraction(workload_type, power_limit_watts / spec.max_watts)
    share = math.pow(min(load, 1.0), truth.load_power_exponent)
    return min(
        (spec.idle_watts + (full - spec.idle_watts) * share) * node_factor, power_limit_watts
    )


def start_agent(sandbox: Sandbox, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`wattsched agent --backend simulated` against the sandbox, reconciling every second."""
    command = [sys.executable, "-m", "wattsched_cli.main", "agent", "--backend", "simulated"]
    command += ["--kubeconfig", str(sandbox.kubeconfig), "--interval-seconds", "1", *args]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop_agent(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def wait_until(what: str, check: Callable[[], Any], timeout_seconds: float = 30) -> Any:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_seconds}s waiting for {what}")


def apply_profile(
    sandbox: Sandbox,
    node: str,
    idle_watts: float | None,
    pods: dict[tuple[str, str], float] | None = None,
) -> None:
    """A NodePowerProfile as the operator writes it: a limit per pod and one for idle GPUs (None:
    idle GPUs keep their limit)."""
    spec: dict[str, Any] = {
        "nodeName": node,
        "pods": [
            {"namespace": namespace, "name": name, "powerLimitWatts": watts}
            for (namespace, name), watts in (pods or {}).items()
        ],
    }
    if idle_watts is not None:
        spec["idlePowerLimitWatts"] = idle_watts
    profile = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": node},
        "spec": spec,
    }
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(profile))


def gpu_pod(
    name: str, namespace: str, node: str, gpus: int, *, wattsched: bool = True
) -> dict[str, Any]:
    """A pod bound to a (KWOK) node holding `gpus` GPUs; labelled as wattsched's or not."""
    labels = {"wattsched.io/workload": name.rsplit("-", 1)[0]} if wattsched else {"team": "other"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "server",
                    "image": "vllm/vllm-openai",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def profile_object(sandbox: Sandbox, node: str) -> dict[str, Any]:
    result = sandbox.kubectl("get", "nodepowerprofile", node, "-o", "json")
    profile: dict[str, Any] = json.loads(result.stdout)
    return profile


def applied_status(sandbox: Sandbox, node: str, condition_status: str) -> dict[str, Any] | None:
    """The profile's status once the agent has handled its current generation."""
    profile = profile_object(sandbox, node)
    status: dict[str, Any] = profile.get("status") or {}
    if status.get("observedGeneration") != profile["metadata"]["generation"]:
        return None
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    applied = conditions.get("Applied")
    if applied is None or applied["status"] != condition_status:
        return None
    return status


def scrape(address: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}

"""The real agent, run with the token the kubelet would mount in its DaemonSet pod, does its job
on its own node and is stopped by the own-node policy on any other.

`wattsched agent --backend simulated` runs as a subprocess whose only credential is a token of the
release's agent ServiceAccount bound to the agent pod on node A (TokenRequest API), so every call is
authorised by the chart's RBAC and admitted by its ValidatingAdmissionPolicy.
Not for: the agent's NVML behaviour (tests/agent/).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.chart.conftest import REPO_ROOT, token_kubeconfig

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

INTERVAL_SECONDS = 0.5
# The agent's log line for a failed reconcile of one node's profile.
RECONCILE_FAILED = re.compile(r"reconcile of \S+ failed")


STARTUP_TIMEOUT_SECONDS = 60


def _wait_for_log(log_path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while text not in log_path.read_text(errors="replace"):
        assert process.poll() is None, f"agent exited:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, (
            f"no {text!r} in the agent's log:\n{log_path.read_text()}"
        )
        time.sleep(0.2)


@pytest.fixture
def run_agent(
    sandbox: Sandbox, agent_token_on_node: Callable[[str], str], tmp_path: Path
) -> Iterator[Callable[[str, str, str], str]]:
    """Run the agent for `node_name` with the token bound to `token_node` until its log shows
    `until` and a few more reconcile intervals have passed; stop it (SIGTERM) and return its log."""
    processes: list[subprocess.Popen[bytes]] = []

    def run(node_name: str, token_node: str, until: str) -> str:
        kubeconfig = token_kubeconfig(sandbox, agent_token_on_node(token_node), tmp_path)
        log_path = tmp_path / f"agent-{node_name}-{len(processes)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "wattsched_cli.main", "agent",
                    "--backend", "simulated", "--node-name", node_name,
                    "--kubeconfig", str(kubeconfig), "--metrics-port", "0",
                    "--interval-seconds", str(INTERVAL_SECONDS),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                cwd=REPO_ROOT,
            )  # fmt: skip
        processes.append(process)
        _wait_for_log(log_path, until, process)
        time.sleep(4 * INTERVAL_SECONDS)
        assert process.poll() is None, f"agent exited:\n{log_path.read_text()[-3000:]}"
        process.terminate()
        process.wait(timeout=20)
        return log_path.read_text(errors="replace")

    yield run
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_agent_with_its_pods_token_reports_its_own_node(
    sandbox: Sandbox,
    run_agent: Callable[[str, str, str], str],
    two_agent_profiles: tuple[str, str],
) -> None:
    own, _ = two_agent_profiles
    log = run_agent(own, own, f"node {own}: simulated backend")
    assert RECONCILE_FAILED.search(log) is None
    assert "could not mark" not in log  # the shutdown patch (agent.ready=false) was admitted too
    assert "Forbidden" not in log
    profile = json.loads(sandbox.kubectl("get", "nodepowerprofile", own, "-o", "json").stdout)
    assert profile["status"]["observedGeneration"] == profile["metadata"]["generation"]
    assert profile["status"]["agent"]["backend"] == "simulated"
    assert profile["status"]["gpus"][0]["product"]


def test_agent_with_one_nodes_token_is_refused_another_nodes_profile(
    run_agent: Callable[[str, str, str], str], two_agent_profiles: tuple[str, str]
) -> None:
    own, other = two_agent_profiles
    refusal = f"the agent on node {own} may only write the NodePowerProfile named {own}"
    log = run_agent(other, own, refusal)
    assert f"reconcile of {other} failed" in log

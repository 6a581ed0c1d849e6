"""Fixtures for the operator's sandbox tests: operator and agent processes, and cluster helpers.

- `agents` (session): one `wattsched agent --backend simulated --all-nodes` process serving every
  KWOK GPU node (the real agent, writing NodePowerProfile status).
- `start_operator`: a factory that starts `wattsched operator` as a subprocess against the sandbox;
  every process it started is stopped after the test, after the test's LLMWorkloads (while an
  operator still runs, which lowers their GPUs) and EnergyBudgets are deleted.
- helpers to read objects as JSON and wait for conditions.
Not for: the pure-function unit tests, which need none of this.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from tests.conftest import Sandbox

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_LABEL = "wattsched.io/test-owner"
# A node a test serves with an agent of its own (to stop it, or to give it another product table):
# the session's `--all-nodes` agent leaves it alone, or two agents would confirm its limits.
OWN_AGENT_LABEL = "wattsched.io/test-own-agent"
Labels = tuple[tuple[str, str], ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def scrape(self) -> dict[str, dict[Labels, float]]:
        """Every sample on this operator's /metrics: sample name -> its labels -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            text = response.read().decode()
        samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[labels] = sample.value
        return samples

    def plans(self) -> float:
        """Plans this operator solved, from its /metrics (0 when it never planned)."""
        return sum(self.scrape().get("wattsched_plans_total", {}).values())

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """One metric's samples keyed by one label's value (e.g. budget -> watts)."""
        return {dict(labels)[label]: value for labels, value in self.scrape().get(name, {}).items()}


def get_json(sandbox: Sandbox, *args: str) -> Any:
    return json.loads(sandbox.kubectl("get", *args, "-o", "json").stdout)


def wait_until(
    what: str, check: Callable[[], Any], timeout_seconds: float = 60, interval: float = 0.25
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_seconds
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout_seconds:.0f} s waiting for {what} (last: {last!r})")


def phase_of(sandbox: Sandbox, namespace: str, name: str) -> str | None:
    body = get_json(sandbox, "llmworkload", name, "-n", namespace)
    phase: str | None = (body.get("status") or {}).get("phase")
    return phase


@pytest.fixture(scope="session")
def agents(
    sandbox: Sandbox, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The agents' process; yields its Prometheus `file_sd` targets file (one /metrics a node)."""
    workdir = tmp_path_factory.mktemp("agents")
    log_path = workdir / "agents.log"
    targets_file = workdir / "targets.json"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wattsched_cli.main",
                "agent",
                "--backend",
                "simulated",
                "--all-nodes",
                "--node-selector",
                f"nvidia.com/gpu.present=true,!{OWN_AGENT_LABEL}",
                "--metrics-port",
                "0",
                "--interval-seconds",
                "1",
                "--targets-file",
                str(targets_file),
                "--pod-resources-dir",
                str(workdir / "pod-resources"),
                "--kubeconfig",
                str(sandbox.kubeconfig),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield targets_file
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


StartOperator = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(
    sandbox: Sandbox, crds: list[str], agents: Path, namespace: str, tmp_path: Path
) -> Iterator[StartOperator]:
    started: list[OperatorProcess] = []

    def start(*extra: str, standalone: bool = True) -> OperatorProcess:
        metrics_port = free_port()
        log_path = tmp_path / f"operator-{len(started)}.log"
        args = [
            sys.executable,
            "-m",
            "wattsched_cli.main",
            "operator",
            "--kubeconfig",
            str(sandbox.kubeconfig),
            "--debounce-seconds",
            "0.3",
            "--confirm-timeout-seconds",
            "10",
            "--metrics-port",
            str(metrics_port),
            "--health-port",
            "0",
            *(["--standalone"] if standalone else []),
            *extra,
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ}
            )
        handle = OperatorProcess(process=process, log_path=log_path, metrics_port=metrics_port)
        started.append(handle)
        return handle

    yield start

    live = [p for p in started if p.process.poll() is None]
    if live:
        # Let a live operator lower the GPUs of the test's workloads before it stops.
        sandbox.kubectl(
            "delete", "llmworkloads", "--all", "-n", namespace, "--timeout=60s", check=False
        )
    sandbox.kubectl("delete", "energybudgets", "-l", TEST_LABEL, "--timeout=60s", check=False)
    for handle in started:
        handle.kill(signal.SIGTERM)

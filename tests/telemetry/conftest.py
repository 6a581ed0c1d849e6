"""A real Prometheus (Debian's `prometheus` binary) on loopback, scraping file_sd targets.

`start_prometheus(workdir, targets_file)` writes a config that scrapes every endpoint listed in a
Prometheus file_sd JSON file (the format `wattsched agent --targets-file` writes) once a second,
keeps its TSDB in `workdir`, listens on a free loopback port and waits until it is ready. The
`prometheus` fixture gives a factory that stops every Prometheus it started at teardown.

Other areas can use it too: `from tests.telemetry.conftest import start_prometheus`.
The binary comes from `apt-get install prometheus` (the Makefile installs it in CI); if it is
missing the test fails with that command: Prometheus tests are never skipped.
Not for: the sandbox control plane (tests/conftest.py) or the agents themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

SCRAPE_INTERVAL_SECONDS = 1
READY_TIMEOUT_SECONDS = 30


def prometheus_binary() -> str:
    binary = os.environ.get("PROMETHEUS_BINARY") or shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "Debian's prometheus binary is missing: apt-get update && apt-get install -y "
            "prometheus (or set PROMETHEUS_BINARY). Prometheus tests are never skipped.",
            pytrace=False,
        )
    return binary


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_targets(targets_file: Path, endpoints: dict[str, str]) -> None:
    """A file_sd list: one target per `name -> host:port`, labelled wattsched_node=name."""
    targets = [
        {"targets": [address], "labels": {"wattsched_node": name}}
        for name, address in sorted(endpoints.items())
    ]
    temporary = targets_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(targets))
    temporary.replace(targets_file)


@dataclass
class RunningPrometheus:
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
            return json.loads(response.read())

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("/api/v1/targets")["data"]["activeTargets"]
        return targets

    def wait_for_targets_up(self, count: int, timeout_seconds: float = 30) -> None:
        deadline = time.monotonic() + timeout_seconds
        healthy: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            healthy = [t for t in self.active_targets() if t.get("health") == "up"]
            if len(healthy) >= count:
                return
            time.sleep(0.5)
        raise AssertionError(
            f"Prometheus at {self.url}: {len(healthy)} of {count} targets up after "
            f"{timeout_seconds}s: {self.active_targets()}; log: {self.log_path}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_prometheus(workdir: Path, targets_file: Path) -> RunningPrometheus:
    """Start Prometheus scraping `targets_file` every second; returns once it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_SECONDS}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_SECONDS}s",
        },
        "scrape_configs": [
            {
                "job_name": "wattsched-agent",
                # Keep the exporters' own pod/namespace labels, as for dcgm-exporter in clusters.
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
            }
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_loopback_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=2h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = RunningPrometheus(f"http://127.0.0.1:{port}", process, workdir, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{running.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return running
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    running.stop()
    raise AssertionError(f"prometheus not ready after {READY_TIMEOUT_SECONDS}s: {log_path}")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[Path], RunningPrometheus]]:
    """Factory: `prometheus(targets_file)` starts one; all are stopped after the test."""
    started: list[RunningPrometheus] = []

    def start(targets_file: Path) -> RunningPrometheus:
        running = start_prometheus(tmp_path / f"prometheus-{len(started)}", targets_file)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()

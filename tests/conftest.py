"""Shared pytest fixtures: the sandbox control plane, a fresh namespace per test, and the CRDs.

- `sandbox` (session): starts the sandbox with sandbox/up.sh, or reuses the one running in
  $SANDBOX_DIR (default <repo>/.sandbox). A sandbox this session started is stopped at the end
  (set SANDBOX_KEEP=1 to keep it); one it found running is left alone. While it is up, KUBECONFIG
  points at it and PATH starts with the sandbox binaries (our kubectl/helm, never /usr/bin's).
  Missing binaries fail the test with the command to build them: cluster tests are never skipped.
- `namespace` (function): a fresh namespace with its `default` service account, deleted afterwards.
- `crds` (session): applies every crds/*.yaml and waits until each CRD is Established.
Any pytest run puts the sandbox binaries first on PATH (like the Makefile), so tests that call
`kubectl` or `helm` get ours, never /usr/bin's.

Every test that uses `sandbox` must carry the `cluster` marker (checked at collection), so
`pytest -m "not cluster"` never starts a control plane. For typing, annotate with
`if TYPE_CHECKING: from tests.conftest import Sandbox`.

Not for: fixtures of one area (put those in tests/<area>/conftest.py).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SANDBOX_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
KUBECTL_TIMEOUT_SECONDS = 120


class KubectlError(AssertionError):
    """A kubectl call that was expected to succeed failed; carries its arguments and stderr."""


@dataclass(frozen=True)
class Sandbox:
    """A running sandbox control plane and the tools to talk to it."""

    directory: Path
    kubeconfig: Path
    bin_dir: Path
    api_url: str
    logs_dir: Path

    def kubectl(
        self,
        *args: str,
        input: str | None = None,  # noqa: A002  (the name subprocess.run uses)
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run our kubectl against the sandbox; with check=True a failure raises KubectlError."""
        command = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(
            command,
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=KUBECTL_TIMEOUT_SECONDS,
        )
        if check and result.returncode != 0:
            raise KubectlError(
                f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def endpoints(self) -> dict[str, str]:
        """Every URL listed in $SANDBOX_DIR/endpoints.yaml, by name."""
        document = yaml.safe_load((self.directory / "endpoints.yaml").read_text())
        return {str(name): str(url) for name, url in document["endpoints"].items()}

    def add_endpoint(self, name: str, url: str) -> None:
        """Record an endpoint (e.g. a Prometheus or agent URL) in endpoints.yaml."""
        _run_script(
            [sys.executable, str(REPO_ROOT / "sandbox" / "endpoints.py"), "add", name, url],
            self.directory,
        )


def _sandbox_dir() -> Path:
    return Path(os.environ.get("SANDBOX_DIR") or REPO_ROOT / ".sandbox").resolve()


def _run_script(command: list[str], sandbox_dir: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SANDBOX_DIR": str(sandbox_dir)}
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment, timeout=300
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}\n"
            f"component logs: {sandbox_dir / 'logs'}",
            pytrace=False,
        )
    return result


def _binaries_path() -> Path:
    """Where sandbox/build.sh puts (or would put) the binaries of the pinned versions."""
    result = subprocess.run(
        [str(REPO_ROOT / "sandbox" / "build.sh"), "--dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(result.stdout.strip())


def _binaries_dir() -> Path:
    bin_dir = _binaries_path()
    missing = [name for name in (*SANDBOX_BINARIES, "kubectl") if not (bin_dir / name).is_file()]
    if missing:
        pytest.fail(
            f"sandbox binaries missing in {bin_dir}: {', '.join(missing)}. "
            "Build them with `make binaries` (sandbox/build.sh; about 8 minutes cold). "
            "Cluster tests are never skipped.",
            pytrace=False,
        )
    return bin_dir


def pytest_configure(config: pytest.Config) -> None:
    """Put the sandbox binaries first on PATH, as the Makefile does: always our kubectl/helm."""
    bin_dir = _binaries_path()
    if bin_dir.is_dir() and os.environ.get("PATH", "").split(os.pathsep)[0] != str(bin_dir):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """The sandbox control plane: started once per session, or reused if already running."""
    bin_dir = _binaries_dir()
    sandbox_dir = _sandbox_dir()
    started = _run_script([str(REPO_ROOT / "sandbox" / "up.sh")], sandbox_dir)
    reused = "already running" in started.stderr
    endpoints = yaml.safe_load((sandbox_dir / "endpoints.yaml").read_text())["endpoints"]
    running = Sandbox(
        directory=sandbox_dir,
        kubeconfig=sandbox_dir / "kubeconfig",
        bin_dir=bin_dir,
        api_url=str(endpoints["apiserver"]),
        logs_dir=sandbox_dir / "logs",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBECONFIG", str(running.kubeconfig))
        patch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        patch.setenv("SANDBOX_DIR", str(sandbox_dir))
        yield running
    if not reused and os.environ.get("SANDBOX_KEEP") != "1":
        _run_script([str(REPO_ROOT / "sandbox" / "down.sh")], sandbox_dir)


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:48].rstrip("-")
    return f"{stem or 't'}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, ready for pods (its service account exists)."""
    name = _namespace_name(request.node.name)
    sandbox.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while sandbox.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        if time.monotonic() > deadline:
            pytest.fail(f"namespace {name}: service account `default` not created within 30 s")
        time.sleep(0.1)
    yield name
    sandbox.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="session")
def crds(sandbox: Sandbox) -> list[str]:
    """Apply every crds/*.yaml (server-side) and wait until Established; returns the CRD names."""
    files = sorted((REPO_ROOT / "crds").glob("*.yaml"))
    if not files:
        pytest.fail(f"no CRD files in {REPO_ROOT / 'crds'}", pytrace=False)
    file_args = [arg for path in files for arg in ("-f", str(path))]
    applied = sandbox.kubectl(
        "apply", "--server-side", "--force-conflicts", *file_args, "-o", "name"
    )
    names = applied.stdout.split()
    sandbox.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    return [name.split("/", 1)[1] for name in names]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse tests that need the sandbox without the `cluster` marker."""
    unmarked = [
        item.nodeid
        for item in items
        if "sandbox" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("cluster")
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests using the sandbox must carry the `cluster` marker "
            f"(pytestmark = pytest.mark.cluster): {', '.join(unmarked)}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skipped `cluster` test is a failure: cluster tests are never skipped."""
    report = yield
    if report.skipped and item.get_closest_marker("cluster") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"cluster test {item.nodeid} was skipped ({report.longrepr}); cluster tests must run"
        )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After failures, say where the sandbox component logs are."""
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        logs = _sandbox_dir() / "logs"
        if logs.is_dir():
            terminalreporter.write_line(f"sandbox component logs: {logs}")

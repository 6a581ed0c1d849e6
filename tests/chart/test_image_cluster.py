"""The image the chart deploys, built from the Dockerfile here (sandbox/image.sh: buildah, no Docker
engine), runs the operator and the simulated agents against the sandbox and they place an example.

Each process runs from the image as the kubelet would run the chart's container, as far as
buildah's chroot isolation allows: the image's entry point with the args of the rendered chart
(`helm template`, so they cannot drift; only the ports are set to free ones, since every process
shares the host's network), the chart's user and group, its capabilities (drop ALL), a read-only
root filesystem (every top-level directory of the image bind-mounted read-only over itself; `/`
itself, `/run` and `/dev` stay as buildah makes them: root-owned, so the chart's user cannot write
them), a tmpfs for each emptyDir the chart mounts (`/tmp`), the environment the chart sets (downward
API fields filled in), and in-cluster credentials where the kubelet puts them: a pod-bound token of
the release's service account, the CA and the namespace under
/var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT pointing at the
sandbox's API server. So the chart's RBAC and the agent's own-node admission policy apply.

What chroot isolation cannot check, so these tests do not: cgroup resource limits (the chart's
`resources`), separate network and PID namespaces (the ports the chart binds on every address of
the pod are on every address of the host while a test runs), `allowPrivilegeEscalation: false`
(buildah leaves no_new_privs unset), the container runtime's own RuntimeDefault seccomp profile
(buildah applies its default filter), the kubelet's probes (the tests request the probe paths
themselves), pulling the image from a registry, and the nvml backend (no GPU, no NVIDIA runtime).
Not for: the chart on KWOK without the image (test_chart_cluster.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.agent.conftest import applied_status, scrape
from tests.chart.conftest import CHART_DIR, Chart, Manifest, Release, find
from tests.operator.conftest import free_port, get_json, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = REPO_ROOT / "sandbox" / "image.sh"
EXAMPLE = REPO_ROOT / "examples" / "inference-vllm.yaml"
# Where the kubelet mounts the service account, /var/run/secrets/kubernetes.io/serviceaccount, is
# this path in the image (/var/run links to /run). buildah would resolve that link on the host, and
# create the directories there, so the mount names the link's target.
SERVICE_ACCOUNT_DIR = "/run/secrets/kubernetes.io/serviceaccount"
# Set up by buildah (devices, proc, sys, its /run/.containerenv): left as buildah makes them.
RUNTIME_DIRECTORIES = {"dev", "proc", "sys", "run"}
IMAGE_BUILD_TIMEOUT_SECONDS = 1800
BUILDAH_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 30
BUILDAH_EXIT = re.compile(r"(subprocess exited (with status \d+|on \w+)|Error: exit status \d+)$")


@dataclass(frozen=True)
class Image:
    """The image sandbox/image.sh built (or reused), with its OCI config."""

    ref: str
    entrypoint: list[str]
    user: str


def buildah(*args: str) -> str:
    result = subprocess.run(
        ["buildah", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILDAH_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, f"buildah {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


@pytest.fixture(scope="module")
def image() -> Image:
    """`sandbox/image.sh build`: the image of the current sources (reused when unchanged)."""
    if os.geteuid() != 0:
        pytest.fail(
            "the image tests need root (debootstrap, buildah --isolation chroot): run them as root",
            pytrace=False,
        )
    built = subprocess.run(
        [str(IMAGE_SCRIPT), "build"],
        capture_output=True,
        text=True,
        check=False,
        timeout=IMAGE_BUILD_TIMEOUT_SECONDS,
    )
    if built.returncode != 0:
        pytest.fail(f"sandbox/image.sh build failed:\n{built.stderr[-4000:]}", pytrace=False)
    ref = built.stdout.split()[-1]
    config = json.loads(buildah("inspect", "--type", "image", ref))["OCIv1"]["config"]
    return Image(ref=ref, entrypoint=list(config["Entrypoint"]), user=str(config["User"]))


def service_account_files(sandbox: Sandbox, token: str, namespace: str, directory: Path) -> Path:
    """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount (mode 0644)."""
    config = yaml.safe_load(sandbox.kubeconfig.read_text())
    ca = base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"])
    directory.mkdir(parents=True)
    for name, content in (
        ("token", token.encode()),
        ("ca.crt", ca),
        ("namespace", namespace.encode()),
    ):
        (directory / name).write_bytes(content)
        (directory / name).chmod(0o644)
    directory.chmod(0o755)
    return directory


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of a container's args from its environment."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


@dataclass
class InImage:
    """One container of a rendered pod spec, run from the image with buildah's chroot isolation."""

    image: Image
    pod_spec: Manifest
    fields: dict[str, str]  # downward API: fieldPath -> value
    credentials: Path  # service_account_files()
    api_url: str
    log_path: Path
    command: list[str] | None = None  # instead of the entry point and the chart's args
    name: str = field(default_factory=lambda: f"wattsched-test-{secrets.token_hex(4)}")
    process: subprocess.Popen[bytes] | None = None

    @property
    def container(self) -> Manifest:
        (container,) = self.pod_spec["containers"]
        container_spec: Manifest = container
        return container_spec

    def security(self) -> Manifest:
        """The container's security context over the pod's (the container's fields win)."""
        return {**self.pod_spec.get("securityContext", {}), **self.container["securityContext"]}

    def environment(self) -> dict[str, str]:
        env = {}
        for variable in self.container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = str(variable["value"])
            else:
                env[variable["name"]] = self.fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        host, _, port = self.api_url.removeprefix("https://").partition(":")
        return env | {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}

    def buildah_run_args(self, rootfs: Path) -> list[str]:
        security = self.security()
        args = ["--isolation", "chroot", "--network", "host"]
        args += ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
        args += [f"--cap-drop={cap}" for cap in security["capabilities"].get("drop", [])]
        args += [f"--cap-add={cap}" for cap in security["capabilities"].get("add", [])]
        volumes = {volume["name"]: volume for volume in self.pod_spec.get("volumes", [])}
        mount_paths = set()
        for mount in self.container.get("volumeMounts", []):
            assert "emptyDir" in volumes[mount["name"]], f"only emptyDir volumes run here: {mount}"
            args += ["--mount", f"type=tmpfs,destination={mount['mountPath']}"]
            mount_paths.add(mount["mountPath"].strip("/"))
        if security.get("readOnlyRootFilesystem"):
            args.append("--no-hosts")  # /etc is read-only: keep the image's /etc/hosts
            for entry in sorted(rootfs.iterdir()):
                own = entry.is_dir() and not entry.is_symlink()
                if own and entry.name not in RUNTIME_DIRECTORIES | mount_paths:
                    args += ["--volume", f"{entry}:/{entry.name}:ro"]
        args += ["--volume", f"{self.credentials}:{SERVICE_ACCOUNT_DIR}:ro"]
        for name, value in self.environment().items():
            args += ["--env", f"{name}={value}"]
        return args

    def argv(self) -> list[str]:
        if self.command is not None:
            return self.command
        env = self.environment()
        command = self.container.get("command") or self.image.entrypoint
        return [*command, *(expand(arg, env) for arg in self.container.get("args", []))]

    def start(self) -> InImage:
        buildah("from", "--pull=never", "--name", self.name, self.image.ref)
        rootfs = Path(buildah("mount", self.name).strip())
        args = ["buildah", "run", *self.buildah_run_args(rootfs), self.name, "--", *self.argv()]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait(self, timeout_seconds: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_seconds)

    def log(self) -> str:
        """What the container printed, without the lines buildah adds when it exits non-zero."""
        text = self.log_path.read_text(errors="replace")
        return "".join(line for line in text.splitlines(True) if not BUILDAH_EXIT.match(line))

    def inner_pids(self) -> list[int]:
        """The container's own processes: buildah's session, less buildah's helpers."""
        assert self.process is not None
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            session = int(text[text.rindex(")") + 2 :].split()[3])
            if session == self.process.pid and "buildah" not in comm:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        """SIGTERM to the container's processes (as the kubelet does), then remove the container."""
        if self.process is not None and self.process.poll() is None:
            for pid in self.inner_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        subprocess.run(["buildah", "umount", self.name], capture_output=True, check=False)
        subprocess.run(["buildah", "rm", self.name], capture_output=True, check=False)


def process_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


@dataclass(frozen=True)
class Rendered:
    """The operator's and the agent's pod specs from `helm template` of the release's values."""

    operator: Manifest
    agent: Manifest
    health_port: int
    metrics_port: int
    agent_metrics_port: int


def render(chart: Chart, release: Release) -> Rendered:
    """The release's values (ci/sandbox-values.yaml, its peering name), with free ports."""
    health_port, metrics_port, agent_metrics_port = free_port(), free_port(), free_port()
    manifests = chart.render(
        (CHART_DIR / "ci" / "sandbox-values.yaml",),
        (
            f"peering.name={release.name}",
            f"operator.health.port={health_port}",
            f"operator.metrics.port={metrics_port}",
            f"agent.metrics.port={agent_metrics_port}",
        ),
        release_name=release.name,
    )
    return Rendered(
        operator=find(manifests, "Deployment", "-operator")["spec"]["template"]["spec"],
        agent=find(manifests, "DaemonSet", "-agent")["spec"]["template"]["spec"],
        health_port=health_port,
        metrics_port=metrics_port,
        agent_metrics_port=agent_metrics_port,
    )


def release_pods(sandbox: Sandbox, release: Release, component: str) -> list[Manifest]:
    """The release's (KWOK-run) pods of one component: the identities the in-image processes use."""
    selector = f"app.kubernetes.io/component={component},app.kubernetes.io/instance={release.name}"
    pods: list[Manifest] = get_json(sandbox, "pods", "-n", release.namespace, "-l", selector)[
        "items"
    ]
    return pods


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except OSError:
        return 0


def probe_url(container: Manifest, port: int) -> str:
    """The readiness probe's URL of a rendered container, on the host (shared network)."""
    return f"http://127.0.0.1:{port}{container['readinessProbe']['httpGet']['path']}"


@dataclass
class Launcher:
    """Starts InImage processes for the release's pods with their service accounts' tokens."""

    image: Image
    chart: Chart
    release: Release
    sandbox: Sandbox
    workdir: Path
    started: list[InImage] = field(default_factory=list)

    def render(self) -> Rendered:
        return render(self.chart, self.release)

    def start(
        self,
        pod_spec: Manifest,
        fields: dict[str, str],
        token: str,
        command: list[str] | None = None,
    ) -> InImage:
        number = len(self.started)
        runner = InImage(
            image=self.image,
            pod_spec=pod_spec,
            fields=fields,
            credentials=service_account_files(
                self.sandbox, token, self.release.namespace, self.workdir / f"sa-{number}"
            ),
            api_url=self.sandbox.api_url,
            log_path=self.workdir / f"in-image-{number}.log",
            command=command,
        )
        self.started.append(runner)
        return runner.start()


@pytest.fixture
def launcher(
    image: Image, chart: Chart, release: Release, sandbox: Sandbox, tmp_path: Path
) -> Iterator[Launcher]:
    """A Launcher; afterwards its processes are stopped (last first), their containers removed."""
    launcher = Launcher(image, chart, release, sandbox, tmp_path)
    yield launcher
    for runner in reversed(launcher.started):
        runner.stop()


def test_the_image_runs_as_the_charts_user_with_the_charts_entry_point(
    image: Image, chart: Chart, release: Release
) -> None:
    rendered = render(chart, release)
    for pod_spec in (rendered.operator, rendered.agent):
        security = {**pod_spec["securityContext"], **pod_spec["containers"][0]["securityContext"]}
        assert image.user == f"{security['runAsUser']}:{security['runAsGroup']}"
        assert security["runAsNonRoot"] is True
        assert "command" not in pod_spec["containers"][0]  # the image's entry point runs
    assert image.entrypoint == ["wattsched"]


def test_the_root_filesystem_is_read_only_and_tmp_writable_for_the_charts_user(
    launcher: Launcher,
) -> None:
    script = (
        "id -u; id -g; grep CapEff /proc/self/status; "
        "for path in /opt/wattsched/x /usr/x /etc/x /x /run/x /tmp/x; do "
        'if touch "$path" 2>/dev/null; then echo "$path writable"; else echo "$path refused"; fi; '
        "done; "
        "touch /opt/wattsched/x 2>&1 | grep -c 'Read-only file system'"
    )
    operator = launcher.render().operator
    runner = launcher.start(operator, {"metadata.name": "probe"}, "unused", ["sh", "-c", script])
    assert runner.wait() == 0, runner.log()
    lines = runner.log().splitlines()
    assert lines[:3] == ["65532", "65532", "CapEff:\t0000000000000000"], runner.log()
    assert lines[3:] == [
        "/opt/wattsched/x refused",
        "/usr/x refused",
        "/etc/x refused",
        "/x refused",
        "/run/x refused",
        "/tmp/x writable",
        "1",  # refused by the read-only mount, not only by file permissions
    ], runner.log()


def test_the_simulator_is_not_in_the_image_and_says_so_in_one_line(launcher: Launcher) -> None:
    command = [*launcher.image.entrypoint, "simulate", "--cluster", "n.yaml", "--out", "/tmp/out"]
    operator = launcher.render().operator
    runner = launcher.start(operator, {"metadata.name": "probe"}, "unused", command)
    assert runner.wait() == 2
    assert runner.log().strip() == (
        "wattsched simulate: needs the 'simulator' extra (matplotlib, tqdm), which this "
        "installation lacks; install it with: pip install 'wattsched[simulator]'"
    )


def assert_runs_as_the_charts_user_without_capabilities(runner: InImage) -> None:
    statuses = [process_status(pid) for pid in runner.inner_pids()]
    assert statuses, "no process of the container found"
    for status in statuses:
        assert (status["Name"], status["Uid"].split()[0], status["Gid"].split()[0]) == (
            status["Name"], "65532", "65532",
        )  # fmt: skip
        assert (status["Name"], status["CapEff"]) == (status["Name"], "0000000000000000")


def test_in_image_operator_and_agents_place_an_example_and_apply_its_power_profile(
    launcher: Launcher,
    crds: list[str],
    namespace: str,
    agent_token_on_node: Callable[[str], str],
) -> None:
    sandbox, release = launcher.sandbox, launcher.release
    rendered = launcher.render()
    (operator_pod,) = release_pods(sandbox, release, "operator")
    operator_name = operator_pod["metadata"]["name"]
    operator_token = sandbox.kubectl(
        "create", "token", release.operator_service_account, "-n", release.namespace,
        "--bound-object-kind", "Pod", "--bound-object-name", operator_name, "--duration", "20m",
    ).stdout.strip()  # fmt: skip
    operator = launcher.start(rendered.operator, {"metadata.name": operator_name}, operator_token)
    operator_ready = probe_url(rendered.operator["containers"][0], rendered.health_port)

    def operator_is_ready() -> bool:
        assert operator.process is not None
        assert operator.process.poll() is None, f"the operator exited:\n{operator.log()[-3000:]}"
        return http_status(operator_ready) == 200

    wait_until(f"the in-image operator's readiness probe {operator_ready}", operator_is_ready, 120)
    assert_runs_as_the_charts_user_without_capabilities(operator)

    # The example, unchanged, in the test's namespace.
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    sandbox.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    try:

        def placed() -> list[Manifest]:
            status = get_json(sandbox, "llmworkload", name, "-n", namespace).get("status") or {}
            placements: list[Manifest] = status.get("placements") or []
            return placements if status.get("phase") == "Running" else []

        placements = wait_until(f"{name} placed by the in-image operator", placed, 180)
        pods = get_json(sandbox, "pods", "-n", namespace, "-l", f"wattsched.io/workload={name}")
        bound = {int(p["metadata"]["labels"]["wattsched.io/replica"]): p for p in pods["items"]}
        for placement in placements:
            assert bound[placement["replica"]]["spec"]["nodeName"] == placement["node"]

        # One in-image agent per node the example runs on, as the DaemonSet's pod there, each
        # with a free metrics port (the host's network is shared).
        agents: dict[str, tuple[InImage, int]] = {}
        for node in sorted({placement["node"] for placement in placements}):
            node_rendered = launcher.render()
            agent = launcher.start(
                node_rendered.agent, {"spec.nodeName": node}, agent_token_on_node(node)
            )
            metrics_port = node_rendered.agent_metrics_port
            agents[node] = (agent, metrics_port)
            agent_ready = probe_url(node_rendered.agent["containers"][0], metrics_port)

            def agent_is_ready(agent: InImage = agent, url: str = agent_ready) -> bool:
                assert agent.process is not None
                assert agent.process.poll() is None, f"an agent exited:\n{agent.log()[-3000:]}"
                return http_status(url) == 200

            wait_until(f"the in-image agent on {node}: {agent_ready}", agent_is_ready, 120)
            assert_runs_as_the_charts_user_without_capabilities(agent)

        for node, (agent, metrics_port) in agents.items():

            def planned_and_applied(node: str = node, port: int = metrics_port) -> bool:
                """The profile has the workload's planned limit for each of its pods on this node,
                and this node's in-image agent applied it to exactly the GPUs each pod holds
                (status for this generation, and its own /metrics). The plan is the workload's
                current one: a later round may change the limits in place (calibration from the
                agents' readings), and the pods stay where they were placed."""
                workload_status = get_json(sandbox, "llmworkload", name, "-n", namespace)
                current: list[Manifest] = (workload_status.get("status") or {}).get(
                    "placements"
                ) or []
                if [(p["replica"], p["node"]) for p in current] != [
                    (p["replica"], p["node"]) for p in placements
                ]:
                    return False
                status = applied_status(sandbox, node, "True")
                if status is None:
                    return False
                profile = get_json(sandbox, "nodepowerprofile", node)
                planned = {
                    f"{pod['namespace']}/{pod['name']}": pod["powerLimitWatts"]
                    for pod in profile["spec"].get("pods") or []
                }
                samples = scrape(f"127.0.0.1:{port}")["DCGM_FI_DEV_POWER_MGMT_LIMIT"]
                limits = {int(sample.labels["gpu"]): sample.value for sample in samples}
                for placement in current:
                    if placement["node"] != node:
                        continue
                    pod = bound[placement["replica"]]["metadata"]
                    key = f"{pod['namespace']}/{pod['name']}"
                    held = [gpu for gpu in status["gpus"] if gpu.get("pod") == key]
                    if (
                        planned.get(key) != placement["powerLimitWatts"]
                        or len(held) != placement["gpus"]
                        or any(
                            gpu.get("targetWatts") != placement["powerLimitWatts"]
                            or gpu.get("appliedWatts") != gpu["targetWatts"]
                            or limits.get(gpu["index"]) != gpu["appliedWatts"]
                            for gpu in held
                        )
                    ):
                        return False
                return True

            wait_until(
                f"NodePowerProfile {node}: the planned limits, applied by the in-image agent "
                f"(log: {agent.log_path})",
                planned_and_applied,
                120,
            )
    finally:
        # Deleted while the operator still runs (it lowers the GPUs) before the processes stop.
        sandbox.kubectl(
            "delete", "llmworkload", name, "-n", namespace, "--timeout=60s", check=False
        )

"""Operator benchmark on the sandbox: apply-to-bound latency, burst throughput, RSS at scale.

Starts (or reuses) a sandbox with `--nodes` KWOK GPU nodes in its own directory, the simulated
agents for every node and one standalone operator, then measures:
1. latency from `kubectl apply` of one LLMWorkload to its pod being bound (spec.nodeName set by
   kube-scheduler), p50/p99 over `--singles` applies one after another;
2. a burst of `--burst` LLMWorkloads created at once: placed (pod bound) per second; the baseline,
   measured in the same run, is the same number of plain pods created directly (kube-scheduler
   alone), so the ratio shows what planning costs on top of scheduling;
3. the operator's RSS with `--rss-workloads` LLMWorkloads in the cluster, against its RSS idle:
   first the operator that saw them arrive (and planned them round by round), then a fresh
   operator started against them (kopf's initial listing, the first plan of all of them).
Goals (issue 5): p50 <= 2 s, p99 <= 5 s, burst >= 50 workloads/s, RSS <= 300 MB.

Usage: .venv/bin/python benchmarks/bench_operator.py [--nodes 200] [--singles 100] [--burst 1000]
       [--rss-workloads 10000] [--rss-seconds 240] [--keep-rss-workloads].
Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

from wattsched_operator.kube import Kube, KubeError, pods_path, workloads_path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def sh(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, check: bool = True
) -> str:
    try:
        result = subprocess.run(
            args, capture_output=True, text=True, check=check, env=env, input=stdin, timeout=900
        )
    except subprocess.TimeoutExpired:
        if check:
            raise
        print(f"(timed out after 900 s: {' '.join(args)})", file=sys.stderr)
        return ""
    return result.stdout


def delete_workloads(namespace: str, *, timeout_seconds: int, env: dict[str, str]) -> None:
    """Delete every LLMWorkload in `namespace` (the operator's finalizer removes their pods)."""
    sh(
        "kubectl",
        "delete",
        "llmworkloads",
        "--all",
        "-n",
        namespace,
        f"--timeout={timeout_seconds}s",
        env=env,
        check=False,
    )


def api_requests(env: dict[str, str]) -> Counter[tuple[str, str]]:
    """kube-apiserver's request counters (apiserver_request_total), by (verb, resource[/sub])."""
    text = sh("kubectl", "get", "--raw", "/metrics", env=env)
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = sample.labels
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            counts[(labels.get("verb", ""), resource)] += int(sample.value)
    return counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            found[name] = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return found


def cpu_used(before: dict[str, float], after: dict[str, float]) -> str:
    """CPU seconds each process used between two readings, largest first."""
    used = sorted(((after[k] - before[k], k) for k in after if k in before), reverse=True)
    return ", ".join(f"{name} {seconds:.1f}" for seconds, name in used)


def writes_per_object(
    before: Counter[tuple[str, str]], after: Counter[tuple[str, str]], objects: int
) -> str:
    """The API writes made between two counter readings, per object, largest first."""
    writes = {
        key: after[key] - before.get(key, 0)
        for key in after
        if key[0] in {"POST", "PATCH", "PUT", "DELETE", "APPLY"} and key[1] != "leases"
    }
    rows = sorted(((n, key) for key, n in writes.items() if n > 0), reverse=True)
    total = sum(n for n, _ in rows)
    parts = ", ".join(f"{verb} {resource} {n / objects:.2f}" for n, (verb, resource) in rows)
    return f"{total / objects:.2f} ({parts})"


def report(figures: list[tuple[str, str, str]], name: str, value: str, goal: str) -> None:
    """Keep a figure for the final table and print it at once (a later step may fail)."""
    figures.append((name, value, goal))
    print(f"{name}: {value}" + (f" (goal {goal})" if goal else ""), flush=True)


def rss_megabytes(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def workload(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": name},
        "spec": {
            "type": "Inference",
            "model": {"name": "meta-llama/Llama-3.1-8B", "parametersBillions": 8},
            "gpu": {"count": 1},
            "minReplicas": 1,
            "maxReplicas": 1,
            "slo": {"tokensPerSecond": 10},
            "template": {"spec": {"containers": [{"name": "main", "image": "busybox"}]}},
        },
    }


def plain_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "baseline"}},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {
                        "requests": {"nvidia.com/gpu": "1"},
                        "limits": {"nvidia.com/gpu": "1"},
                    },
                }
            ]
        },
    }


class BindWatcher(threading.Thread):
    """Records, per pod name in one namespace, when it was first seen bound to a node."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        super().__init__(daemon=True)
        self.namespace = namespace
        self.bound: dict[str, float] = {}
        self.changed = threading.Condition()
        self.api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))  # type: ignore[no-untyped-call]
        self.started = threading.Event()

    def run(self) -> None:
        while True:
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            self.started.set()
            try:
                for event in stream.stream(  # type: ignore[no-untyped-call]
                    self.api.list_namespaced_pod, self.namespace, timeout_seconds=300
                ):
                    pod = event["object"]
                    if pod.spec.node_name and pod.metadata.name not in self.bound:
                        with self.changed:
                            self.bound[pod.metadata.name] = time.monotonic()
                            self.changed.notify_all()
            except client.ApiException:
                time.sleep(0.5)  # e.g. 504 "too large resource version": list and watch again

    def wait_for(self, names: set[str], timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        with self.changed:
            while not names <= self.bound.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True


@contextmanager
def background(
    args: list[str], log: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        stop(process, log.stem)


def stop(process: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM, and print how long the process took to exit (SIGKILL after 30 s)."""
    if process.poll() is not None:
        return
    stopping = time.monotonic()
    process.terminate()
    try:
        process.wait(timeout=30)
        print(f"{name}: stopped {time.monotonic() - stopping:.1f} s after SIGTERM")
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        print(f"{name}: still running 30 s after SIGTERM, killed")


def sample_rss(process: subprocess.Popen[bytes], seconds: int) -> str:
    """The peak and the last of the process's RSS, sampled every 5 s for `seconds`, and whether
    it exited in the meantime."""
    started = time.monotonic()
    last = peak = rss_megabytes(process.pid)
    for _ in range(max(1, seconds // 5)):
        time.sleep(5)
        if process.poll() is not None:
            return (
                f"peak {peak:.0f} MB, then EXITED (status {process.returncode}) after "
                f"{time.monotonic() - started:.0f} s"
            )
        last = rss_megabytes(process.pid)
        peak = max(peak, last)
    return f"peak {peak:.0f} MB, last {last:.0f} MB"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def create_all(kube: Kube, path: str, bodies: list[dict[str, Any]], workers: int = 16) -> None:
    def create(body: dict[str, Any]) -> None:
        try:
            kube.create(path, body)
        except KubeError as error:
            if error.status != 409:
                raise

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, bodies))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rss-workloads", type=int, default=10000)
    parser.add_argument(
        "--rss-seconds", type=int, default=240, help="how long to sample RSS after creating them"
    )
    parser.add_argument(
        "--keep-rss-workloads",
        action="store_true",
        help="leave the RSS step's LLMWorkloads in the cluster (deleting 10,000 takes long)",
    )
    parser.add_argument(
        "--operator-log-level", default="WARNING", help="INFO logs every plan and apply step"
    )
    parser.add_argument(
        "--sandbox-dir", default=str(Path(tempfile.gettempdir()) / "wattsched-sandbox-bench")
    )
    args = parser.parse_args()

    env = {**os.environ, "SANDBOX_DIR": args.sandbox_dir, "SANDBOX_NODES": str(args.nodes)}
    bin_dir = sh(str(REPO / "sandbox/build.sh"), "--dir").strip()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    sh(str(REPO / "sandbox/up.sh"), env=env)
    kubeconfig = Path(args.sandbox_dir) / "kubeconfig"
    env["KUBECONFIG"] = str(kubeconfig)
    crds = [str(p) for p in sorted((REPO / "crds").glob("*.yaml"))]
    sh(
        "kubectl",
        "apply",
        "--server-side",
        "--force-conflicts",
        *(f"-f={c}" for c in crds),
        env=env,
    )
    sh("kubectl", "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all", env=env)
    kube = Kube(str(kubeconfig))
    logs = Path(args.sandbox_dir) / "logs"
    run_id = str(int(time.time()))
    figures: list[tuple[str, str, str]] = []

    agent_args = [PYTHON, "-m", "wattsched_cli.main", "agent", "--backend", "simulated"]
    agent_args += ["--all-nodes", "--metrics-port", "0", "--interval-seconds", "10"]
    agent_args += ["--kubeconfig", str(kubeconfig)]
    operator_args = [PYTHON, "-m", "wattsched_cli.main", "operator", "--standalone"]
    operator_args += ["--kubeconfig", str(kubeconfig), "--metrics-port", "0", "--health-port", "0"]
    operator_args += ["--debounce-seconds", "0.2", "--log-level", args.operator_log_level]

    with (
        background(agent_args, logs / "bench-agents.log", env) as agent,
        background(operator_args, logs / "bench-operator.log", env) as operator,
    ):
        run_dir = Path(args.sandbox_dir) / "run"
        pids = {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}
        pids |= {"operator": operator.pid, "agent": agent.pid, "bench clients": os.getpid()}
        time.sleep(10)  # first plan: every node's profile written and confirmed
        idle_rss = rss_megabytes(operator.pid)

        # 1. Single applies, one after another.
        namespace = f"bench-single-{run_id}"
        kube.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
        watcher = BindWatcher(kubeconfig, namespace)
        watcher.start()
        watcher.started.wait()
        latencies: list[float] = []
        for i in range(args.singles):
            name = f"single-{i:04d}"
            started = time.monotonic()
            sh(
                "kubectl",
                "apply",
                "-n",
                namespace,
                "-f",
                "-",
                env=env,
                stdin=json.dumps(workload(name)),
            )
            if not watcher.wait_for({f"{name}-0"}, 60):
                print(f"single apply {name}: not bound within 60 s", file=sys.stderr)
                continue
            latencies.append(watcher.bound[f"{name}-0"] - started)
        if latencies:
            p50 = f"{percentile(latencies, 0.5):.2f} s"
            report(figures, "apply -> bound, p50", p50, "<= 2 s")
            report(figures, "apply -> bound, p99", f"{percentile(latencies, 0.99):.2f} s", "<= 5 s")
            report(figures, "apply -> bound, mean", f"{statistics.mean(latencies):.2f} s", "")
        delete_workloads(namespace, timeout_seconds=300, env=env)

        # 2. Burst, and the plain-pod baseline.
        base_ns = f"bench-baseline-{run_id}"
        kube.create("/api/v1/namespaces", {"metadata": {"name": base_ns}})
        base_watch = BindWatcher(kubeconfig, base_ns)
        base_watch.start()
        base_watch.started.wait()
        names = {f"pod-{i:05d}" for i in range(args.burst)}
        requests_before = api_requests(env)
        cpu_before = cpu_by_process(pids)
        started = time.monotonic()
        create_all(kube, pods_path(base_ns), [plain_pod(n) for n in sorted(names)])
        base_ok = base_watch.wait_for(names, 600)
        base_writes = writes_per_object(requests_before, api_requests(env), args.burst)
        base_cpu = cpu_used(cpu_before, cpu_by_process(pids))
        base_seconds = max(base_watch.bound.values()) - started if base_ok else float("nan")
        sh(
            "kubectl",
            "delete",
            "namespace",
            base_ns,
            "--wait=true",
            "--timeout=300s",
            env=env,
            check=False,
        )

        burst_ns = f"bench-burst-{run_id}"
        kube.create("/api/v1/namespaces", {"metadata": {"name": burst_ns}})
        burst_watch = BindWatcher(kubeconfig, burst_ns)
        burst_watch.start()
        burst_watch.started.wait()
        names = {f"burst-{i:05d}" for i in range(args.burst)}
        requests_before = api_requests(env)
        cpu_before = cpu_by_process(pids)
        started = time.monotonic()
        create_all(kube, workloads_path(burst_ns), [workload(n) for n in sorted(names)])
        created_seconds = time.monotonic() - started
        pods = {f"{n}-0" for n in names}
        burst_ok = burst_watch.wait_for(pods, 900)
        burst_writes = writes_per_object(requests_before, api_requests(env), args.burst)
        burst_cpu = cpu_used(cpu_before, cpu_by_process(pids))
        bound = [burst_watch.bound[p] for p in pods if p in burst_watch.bound]
        burst_seconds = (max(bound) - started) if bound else float("nan")
        rate = len(bound) / burst_seconds if bound else 0.0
        base_rate = args.burst / base_seconds if base_ok else float("nan")
        report(
            figures,
            f"burst of {args.burst}: placed/s",
            f"{rate:.1f}/s ({len(bound)} bound in {burst_seconds:.1f} s"
            f"{'' if burst_ok else ', INCOMPLETE'}; created in {created_seconds:.1f} s)",
            ">= 50/s",
        )
        if bound:
            since = [t - started for t in bound]
            report(
                figures,
                "burst: time to 50% / 90% / 100% bound",
                " / ".join(f"{percentile(since, q):.1f} s" for q in (0.5, 0.9, 1.0)),
                "",
            )
        report(
            figures,
            f"baseline: {args.burst} plain pods, bound/s",
            f"{base_rate:.1f}/s (ratio wattsched/baseline {rate / base_rate:.2f})",
            "",
        )
        # Every API write (not leases) from the first create to the last binding, per object.
        report(figures, "API writes per workload, burst", burst_writes, "")
        report(figures, "API writes per plain pod, baseline", base_writes, "")
        report(figures, "CPU seconds during the burst", burst_cpu, "")
        report(figures, "CPU seconds during the baseline", base_cpu, "")
        delete_workloads(burst_ns, timeout_seconds=600, env=env)

        # 3. RSS with many workloads in the cluster (most cannot be placed: GPUs run out), first
        # for the operator that sees them arrive, then for a fresh one started against them.
        if args.rss_workloads == 0:
            print_table(args, figures)
            return 0
        rss_ns = f"bench-rss-{run_id}"
        kube.create("/api/v1/namespaces", {"metadata": {"name": rss_ns}})
        create_all(
            kube,
            workloads_path(rss_ns),
            [workload(f"many-{i:05d}") for i in range(args.rss_workloads)],
        )
        # The peak comes while the operator writes every workload's status, after the plan.
        report(
            figures,
            f"operator RSS with {args.rss_workloads} workloads, saw them arrive",
            f"{sample_rss(operator, args.rss_seconds)} (idle {idle_rss:.0f} MB)",
            "<= 300 MB",
        )
        stop(operator, "bench-operator")
        with background(operator_args, logs / "bench-operator-restarted.log", env) as restarted:
            report(
                figures,
                f"operator RSS with {args.rss_workloads} workloads, started against them",
                sample_rss(restarted, args.rss_seconds),
                "<= 300 MB",
            )
            if args.keep_rss_workloads:
                print(f"kept the {args.rss_workloads} LLMWorkloads in namespace {rss_ns}")
            else:
                delete_workloads(rss_ns, timeout_seconds=900, env=env)

    print_table(args, figures)
    return 0


def print_table(args: argparse.Namespace, figures: list[tuple[str, str, str]]) -> None:
    width = max(len(f[0]) for f in figures)
    print(f"\nOperator benchmark: {args.nodes} KWOK GPU nodes, sandbox {args.sandbox_dir}")
    print(f"{'figure':<{width}}  {'measured':<70} goal")
    for name, value, goal in figures:
        print(f"{name:<{width}}  {value:<70} {goal}")


if __name__ == "__main__":
    raise SystemExit(main())

"""Operator benchmark on the sandbox: apply-to-bound latency, burst throughput, RSS at scale.

Starts (or reuses) a sandbox with `--nodes` KWOK GPU nodes in its own directory, the simulated
agents for every node and one standalone operator, then measures:
1. latency from `kubectl apply` of one LLMWorkload to its pod being bound (spec.nodeName set by
   kube-scheduler), p50/p99 over `--singles` applies one after another;
2. a burst of `--burst` LLMWorkloads created at once: placed (pod bound) per second; the baseline,
   measured in the same run, is the same number of plain pods created directly (kube-scheduler
   alone), so the ratio shows what planning costs on top of scheduling;
3. with `--delete N`: the time `kubectl delete llmworkloads --all` of N bound workloads takes until
   the last of their pods is gone, against the baseline measured first in the same run: N
   ConfigMaps each owning one bound plain pod, deleted at once, their pods deleted by
   kube-controller-manager's garbage collector; and the plans the operator solved meanwhile;
4. the operator's RSS with `--rss-workloads` LLMWorkloads in the cluster, against its RSS idle:
   first the operator that saw them arrive (and planned them round by round), then a fresh
   operator started against them (kopf's initial listing, the first plan of all of them); each
   for `--rss-seconds`, or with `--rss-until-written` until every workload's status is written
   and `--rss-seconds` more (the RSS every 5 s in a series file), the second after every status
   was removed with `--rss-clear-statuses` (so it writes all of them too). `--rss-namespace`
   measures only the second, against the workloads an earlier `--keep-rss-workloads` left.
At the end, with `--operator-log-level INFO`, the longest planning round (decide: plan input and
solve; apply) from the operator's log. `--scale` is the large run of issue 18 (2,000 nodes, 10,000
workloads). Goals (issues 5, 18): p99 <= 2 s, burst >= 0.9 x kube-scheduler alone, RSS <= 300 MB,
deletion within 2 x the garbage collector's time.

Usage: .venv/bin/python benchmarks/bench_operator.py [--nodes 200] [--singles 100] [--burst 1000]
       [--delete 1000] [--rss-workloads 10000] [--rss-seconds 240] [--rss-until-written]
       [--rss-write-out-seconds 3600] [--rss-clear-statuses] [--rss-namespace NS]
       [--keep-rss-workloads] [--scale].
Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

from wattsched_api.nodepowerprofile import Holder
from wattsched_operator.desired import LABEL_WORKLOAD
from wattsched_operator.kube import Kube, KubeError, pods_path, profiles_path, workloads_path
from wattsched_operator.transition import is_confirmed

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# One simulated agent process serves every node, so its heartbeats grow with the node count: at
# 2,286 nodes and 10 s it could not keep up (each node reported about every 98 s, measured,
# against the operator's 30-s timeout; docs/benchmarks.md). The bench keeps the heartbeat write
# rate the 200-node runs had with the agent's 10-s default, 20 status patches/s, whatever the
# node count: interval = nodes / 20 per s, at least 10 s. The operator's heartbeat timeout is 3
# intervals, at least its 30-s default: the agent writes each node at least every 1.5 intervals
# (AgentRunner), so a node is lost after two missed reports, as with the defaults (10 s, 30 s).
AGENT_HEARTBEATS_PER_SECOND = 20.0
AGENT_INTERVAL_MIN_SECONDS = 10.0
HEARTBEAT_TIMEOUT_INTERVALS = 3.0
HEARTBEAT_TIMEOUT_MIN_SECONDS = 30.0
# Waits that list every NodePowerProfile poll every 0.5 s up to this many nodes, then slower in
# proportion (a list of 2,286 profiles with their GPU statuses is megabytes).
PROFILE_POLL_NODES = 400


def agent_interval_seconds(nodes: int) -> float:
    return max(AGENT_INTERVAL_MIN_SECONDS, nodes / AGENT_HEARTBEATS_PER_SECOND)


def heartbeat_timeout_seconds(interval_seconds: float) -> float:
    return max(HEARTBEAT_TIMEOUT_MIN_SECONDS, HEARTBEAT_TIMEOUT_INTERVALS * interval_seconds)


def profile_poll_seconds(nodes: int) -> float:
    return max(0.5, nodes / PROFILE_POLL_NODES)


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


def delete_workloads(
    kube: Kube, namespace: str, *, timeout_seconds: int, env: dict[str, str]
) -> None:
    """Delete every LLMWorkload in `namespace` (the garbage collector removes their pods) and
    poll until they are gone, as `timed_delete` does (kubectl's own wait is slow for many)."""
    sh(
        "kubectl",
        "delete",
        "llmworkloads",
        "--all",
        "-n",
        namespace,
        "--wait=false",
        env=env,
        check=False,
    )
    wait_empty(kube, workloads_path(namespace), None, timeout_seconds)


class ApiRequests(NamedTuple):
    """kube-apiserver's request counters by (verb, resource[/sub]): how many
    (apiserver_request_total) and the seconds they took (apiserver_request_duration_seconds)."""

    counts: dict[tuple[str, str], float]
    seconds: dict[tuple[str, str], float]


def api_requests(env: dict[str, str]) -> ApiRequests:
    """One reading of kube-apiserver's request counters."""
    text = sh("kubectl", "get", "--raw", "/metrics", env=env)
    counts: defaultdict[tuple[str, str], float] = defaultdict(float)
    seconds: defaultdict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name == "apiserver_request":
            suffix, into = "_total", counts
        elif family.name == "apiserver_request_duration_seconds":
            suffix, into = "_sum", seconds
        else:
            continue
        for sample in family.samples:
            if not sample.name.endswith(suffix):
                continue
            labels = sample.labels
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            into[(labels.get("verb", ""), resource)] += sample.value
    return ApiRequests(counts, seconds)


def request_seconds(before: ApiRequests, after: ApiRequests, top: int = 8) -> str:
    """The seconds kube-apiserver spent serving requests between two readings (summed over
    requests served at once, so more than the wall time), the largest `top` by verb and
    resource; watches left out (they last as long as they are open)."""
    spent = {
        key: after.seconds[key] - before.seconds.get(key, 0.0)
        for key in after.seconds
        if key[0] != "WATCH"
    }
    rows = sorted(((v, key) for key, v in spent.items() if v > 0), reverse=True)
    total = sum(v for v, _ in rows)
    parts = ", ".join(f"{verb} {resource} {v:.1f}" for v, (verb, resource) in rows[:top])
    return f"{total:.1f} s ({parts})"


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


def writes_per_object(before: ApiRequests, after: ApiRequests, objects: int) -> str:
    """The API writes made between two counter readings, per object, largest first."""
    writes = {
        key: after.counts[key] - before.counts.get(key, 0)
        for key in after.counts
        if key[0] in {"POST", "PATCH", "PUT", "DELETE", "APPLY"} and key[1] != "leases"
    }
    rows = sorted(((n, key) for key, n in writes.items() if n > 0), reverse=True)
    total = sum(n for n, _ in rows)
    parts = ", ".join(f"{verb} {resource} {n / objects:.2f}" for n, (verb, resource) in rows)
    return f"{total / objects:.2f} ({parts})"


def load_average() -> str:
    """The machine's 1-minute load average and its cores (the benchmark shares the machine)."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def wait_settled(kube: Kube, path: str, count: int, timeout_seconds: float) -> bool:
    """Wait until `count` objects at `path` report status.phase Running (the writes that follow
    the binding, statuses and Events included, have landed); False on timeout."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        phases = [(body.get("status") or {}).get("phase") for body in kube.list(path)]
        if phases.count("Running") >= count:
            return True
        time.sleep(1)
    return False


def report(figures: list[tuple[str, str, str]], name: str, value: str, goal: str) -> None:
    """Keep a figure for the final table and print it at once (a later step may fail)."""
    figures.append((name, value, goal))
    print(f"{name}: {value}" + (f" (goal {goal})" if goal else ""), flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
                    self.api.list_namespaced_pod,
                    self.namespace,
                    timeout_seconds=300,
                ):
                    pod = event["object"]
                    if pod.spec.node_name and pod.metadata.name not in self.bound:
                        with self.changed:
                            self.bound[pod.metadata.name] = time.monotonic()
                            self.changed.notify_all()
            except Exception:  # e.g. 504 "too large resource version", a broken stream
                time.sleep(0.5)  # list and watch again

    def wait_for(self, names: set[str], timeout_seconds: float) -> bool:
        """Whether every pod in `names` was bound within the timeout."""
        deadline = time.monotonic() + timeout_seconds
        with self.changed:
            while not names <= self.bound.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True


def watched_namespace(kube: Kube, kubeconfig: Path, namespace: str) -> BindWatcher:
    """Create `namespace` and start recording when its pods are bound."""
    kube.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
    watcher = BindWatcher(kubeconfig, namespace)
    watcher.start()
    watcher.started.wait()
    return watcher


def delete_namespace(namespace: str, env: dict[str, str]) -> None:
    """Start deleting `namespace` without waiting (its thousands of Events may take minutes)."""
    sh("kubectl", "delete", "namespace", namespace, "--wait=false", env=env, check=False)


def wait_earlier_runs_gone(env: dict[str, str], timeout_seconds: float) -> float:
    """Delete the namespaces an earlier run on the same sandbox left (`bench-*`: they are deleted
    without waiting) and wait until they are gone, so that their deletion does not load the API
    server while this run measures. Returns the seconds waited."""

    def left() -> list[str]:
        names = sh("kubectl", "get", "namespaces", "-o", "name", env=env).split()
        return [n.partition("/")[2] for n in names if n.startswith("namespace/bench-")]

    started = time.monotonic()
    for namespace in left():
        delete_namespace(namespace, env)
    while left() and time.monotonic() - started < timeout_seconds:
        time.sleep(5)
    return time.monotonic() - started


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


def exited(process: subprocess.Popen[bytes], peak: float, started: float) -> str:
    """The RSS figure of a process that exited while it was sampled."""
    return (
        f"peak {peak:.0f} MB, then EXITED (status {process.returncode}) after "
        f"{time.monotonic() - started:.0f} s"
    )


def sample_rss(process: subprocess.Popen[bytes], seconds: int) -> str:
    """The peak and the last of the process's RSS, sampled every 5 s for `seconds`, and whether
    it exited in the meantime."""
    started = time.monotonic()
    last = peak = rss_megabytes(process.pid)
    for _ in range(max(1, seconds // 5)):
        time.sleep(5)
        if process.poll() is not None:
            return exited(process, peak, started)
        last = rss_megabytes(process.pid)
        peak = max(peak, last)
    return f"peak {peak:.0f} MB, last {last:.0f} MB"


def statuses_written(kube: Kube, path: str) -> int | None:
    """How many LLMWorkloads at `path` have a status written (a phase); None when the list
    failed (a loaded API server may not send a page within the client's 30 s). Pages of 100: a
    page of 500 workloads with their statuses is megabytes."""
    try:
        bodies = kube.list(
            path, keep=lambda b: {"phase": (b.get("status") or {}).get("phase")}, page_size=100
        )
    except Exception as error:  # any failure: counted again a minute later
        print(f"  (statuses not counted: {error!r:.200})", flush=True)
        return None
    return sum(1 for body in bodies if body["phase"])


def clear_statuses(kube: Kube, path: str) -> int:
    """Remove every LLMWorkload's status at `path` (a merge patch `status: null` on the status
    subresource, 16 at a time), so an operator started against them writes every first status;
    how many were removed."""
    names = [b["name"] for b in kube.list(path, keep=lambda b: {"name": b["metadata"]["name"]})]
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda n: kube.merge_patch(f"{path}/{n}/status", {"status": None}, parse=False),
                names,
            )
        )
    return len(names)


def sample_rss_until_written(
    process: subprocess.Popen[bytes],
    kube: Kube,
    path: str,
    count: int,
    *,
    after_seconds: int,
    timeout_seconds: int,
    series: Path,
) -> str:
    """Sample the process's RSS every 5 s until all `count` LLMWorkloads at `path` have a status
    (counted in a thread, a minute after the last count ended, so a slow list leaves no gap in
    the samples; a progress line at each count), then `after_seconds` more (later rounds). Each
    sample goes to `series` (UTC time, seconds since the start, RSS in MB, statuses written at
    the last count, 1-minute load average). Returns the peak until every status was written and
    after, the last RSS and when every status was written (or that it was not)."""
    started = time.monotonic()
    peak = last = rss_megabytes(process.pid)
    written = 0
    written_at: float | None = None
    peak_after = 0.0
    counted = started - 60
    with series.open("w") as out, ThreadPoolExecutor(1) as counter:
        counting = None
        out.write("utc\tseconds\trss_mb\tstatuses_written\tload_1min\n")
        while True:
            time.sleep(5)
            now = time.monotonic()
            if process.poll() is not None:
                return (
                    f"{exited(process, peak, started)} with {written} of {count} statuses written"
                )
            last = rss_megabytes(process.pid)
            if written_at is None:
                peak = max(peak, last)
            else:
                peak_after = max(peak_after, last)
            if counting is None and now - counted >= 60:
                counting = counter.submit(statuses_written, kube, path)
            elif counting is not None and counting.done():
                written = counting.result() or written
                counting, counted = None, now
                print(
                    f"  +{now - started:.0f} s: RSS {last:.0f} MB (peak {peak:.0f} MB), "
                    f"{written} of {count} statuses written, {load_average()}",
                    flush=True,
                )
                if written_at is None and written >= count:
                    written_at = now
            out.write(
                f"{time.strftime('%H:%M:%S', time.gmtime())}\t{now - started:.0f}\t{last:.0f}\t"
                f"{written}\t{os.getloadavg()[0]:.1f}\n"
            )
            out.flush()
            if written_at is not None and now - written_at >= after_seconds:
                return (
                    f"peak {peak:.0f} MB until all {count} statuses were written "
                    f"({written_at - started:.0f} s), peak {peak_after:.0f} MB in the "
                    f"{after_seconds} s after, last {last:.0f} MB; series in {series}"
                )
            if written_at is None and now - started >= timeout_seconds:
                return (
                    f"peak {peak:.0f} MB, last {last:.0f} MB; NOT every status written after "
                    f"{now - started:.0f} s ({written} of {count}); series in {series}"
                )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def distribution(values: list[float]) -> str:
    """Percentiles of `values` (seconds) in one line, and how many exceed 1 and 2 s."""
    fractions = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
    shown = ", ".join(f"p{round(f * 100)} {percentile(values, f):.2f}" for f in fractions)
    over = {limit: sum(v > limit for v in values) for limit in (1, 2)}
    return (
        f"distribution (s, n={len(values)}): min {min(values):.2f}, {shown}, max {max(values):.2f};"
        f" over 1 s: {over[1]}, over 2 s: {over[2]}"
    )


def utc_now() -> str:
    """The wall-clock time, to the millisecond (to find an apply in the operator's log)."""
    now = time.time()
    return time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}"


def create_all(
    kube: Kube, path: str, bodies: list[dict[str, Any]], workers: int = 16
) -> list[dict[str, Any]]:
    """Create every body, 16 at a time; the created objects ({} for one that already existed)."""

    def create(body: dict[str, Any]) -> dict[str, Any]:
        try:
            return kube.create(path, body)
        except KubeError as error:
            if error.status != 409:
                raise
            return {}

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(create, bodies))


def owner(name: str) -> dict[str, Any]:
    """A ConfigMap that owns one plain pod in the deletion baseline."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"bench": "owner"}},
        "data": {},
    }


def owned_pod(name: str, owner_body: dict[str, Any]) -> dict[str, Any]:
    """A plain GPU pod owned by `owner_body`: kube-controller-manager's garbage collector
    deletes it once its owner is gone."""
    pod = plain_pod(name)
    pod["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": owner_body["metadata"]["name"],
            "uid": owner_body["metadata"]["uid"],
        }
    ]
    return pod


def operator_plans(port: int) -> float:
    """Plans the operator solved so far (wattsched_plans_total on its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "wattsched_plans"
        for sample in family.samples
        if sample.name == "wattsched_plans_total"
    )


@dataclass
class Deletion:
    """One timed `kubectl delete`: when kubectl had sent every DELETE, when the last pod and the
    last owner were gone (seconds from the start of kubectl)."""

    returned_seconds: float
    pods_gone_seconds: float
    owners_gone_seconds: float
    complete: bool
    writes: str
    cpu: str

    @property
    def seconds(self) -> float:
        """Until the owners and every pod they owned are gone."""
        return max(self.pods_gone_seconds, self.owners_gone_seconds)


def wait_empty(kube: Kube, path: str, selector: str | None, timeout_seconds: float) -> bool:
    """Poll (one object per page, twice a second) until nothing is left at `path`."""
    query = {"limit": "1"} | ({"labelSelector": selector} if selector else {})
    deadline = time.monotonic() + timeout_seconds
    while kube.request("GET", path, query=query).get("items"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def wait_no_other_holders(kube: Kube, timeout_seconds: float, poll_seconds: float) -> bool:
    """Poll until no NodePowerProfile's status reports a GPU held by another team's pod (the
    agents report freed GPUs at their next heartbeat: until then the operator cannot offer
    them); False on timeout."""
    deadline = time.monotonic() + timeout_seconds
    while any(
        gpu.get("holder") == Holder.OTHER
        for profile in kube.list(profiles_path())
        for gpu in (profile.get("status") or {}).get("gpus") or []
    ):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_seconds)
    return True


def wait_profiles_confirmed(kube: Kube, nodes: int, timeout_seconds: float) -> float | None:
    """Poll until each of `nodes` NodePowerProfiles is confirmed by its agent, as the operator
    judges it (`transition.is_confirmed` at the spec's generation): the operator's first rounds
    and the agents' first reports are done. Returns the seconds waited; None on timeout."""
    started = time.monotonic()
    while True:
        profiles = kube.list(profiles_path())
        confirmed = sum(
            1 for p in profiles if is_confirmed(p, int(p["metadata"].get("generation") or 0))
        )
        if confirmed >= nodes:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_seconds:
            return None
        time.sleep(profile_poll_seconds(nodes))


def timed_delete(
    what: list[str],
    namespace: str,
    *,
    owners_path: str,
    owners_selector: str | None,
    pods_selector: str,
    count: int,
    kube: Kube,
    env: dict[str, str],
    pids: dict[str, int],
    timeout_seconds: int,
) -> Deletion:
    """`kubectl delete <what> --wait=false` in `namespace`, then poll until the pods (by
    `pods_selector`) and the owners are gone. kubectl's own wait is left out: it checks the objects
    one by one under its client-side rate limit, minutes for 1,000 whatever the controllers do.
    Polled, not watched: a pod watch on a saturated API server broke and never resumed."""
    requests_before = api_requests(env)
    cpu_before = cpu_by_process(pids)
    started = time.monotonic()
    sh("kubectl", "delete", *what, "-n", namespace, "--wait=false", env=env, check=False)
    returned = time.monotonic() - started
    complete = wait_empty(kube, pods_path(namespace), pods_selector, timeout_seconds)
    pods_gone = time.monotonic() - started
    complete = wait_empty(kube, owners_path, owners_selector, timeout_seconds) and complete
    owners_gone = time.monotonic() - started
    return Deletion(
        returned_seconds=returned,
        pods_gone_seconds=pods_gone,
        owners_gone_seconds=owners_gone,
        complete=complete,
        writes=writes_per_object(requests_before, api_requests(env), count),
        cpu=cpu_used(cpu_before, cpu_by_process(pids)),
    )


def measure_deletion(
    count: int,
    *,
    kube: Kube,
    kubeconfig: Path,
    env: dict[str, str],
    pids: dict[str, int],
    metrics_port: int,
    run_id: str,
    figures: list[tuple[str, str, str]],
) -> None:
    """Delete `count` bound LLMWorkloads with `kubectl delete llmworkloads --all`, against the
    baseline measured first in the same run: `count` ConfigMaps each owning one bound plain pod,
    deleted with `kubectl delete configmaps -l bench=owner` (kube-controller-manager's garbage
    collector deletes the pods)."""
    timeout = 1800
    base_ns = f"bench-delete-baseline-{run_id}"
    base_watch = watched_namespace(kube, kubeconfig, base_ns)
    owners = create_all(
        kube,
        f"/api/v1/namespaces/{base_ns}/configmaps",
        [owner(f"owner-{i:05d}") for i in range(count)],
    )
    pods = {f"pod-{i:05d}" for i in range(count)}
    create_all(
        kube, pods_path(base_ns), [owned_pod(f"pod-{i:05d}", o) for i, o in enumerate(owners)]
    )
    if not base_watch.wait_for(pods, 900):
        print("deletion baseline: not every plain pod bound within 900 s", file=sys.stderr)
    time.sleep(10)  # KWOK marks them Running, the scheduler's Events land
    # Not --all: it would take the namespace's kube-root-ca.crt too, which its controller puts
    # back at once.
    base = timed_delete(
        ["configmaps", "-l", "bench=owner"],
        base_ns,
        owners_path=f"/api/v1/namespaces/{base_ns}/configmaps",
        owners_selector="bench=owner",
        pods_selector="bench=baseline",
        count=count,
        kube=kube,
        env=env,
        pids=pids,
        timeout_seconds=timeout,
    )
    # Its pods are gone; the namespace's thousands of Events may take minutes more.
    delete_namespace(base_ns, env)

    namespace = f"bench-delete-{run_id}"
    watcher = watched_namespace(kube, kubeconfig, namespace)
    create_all(kube, workloads_path(namespace), [workload(f"gone-{i:05d}") for i in range(count)])
    pods = {f"gone-{i:05d}-0" for i in range(count)}
    if not watcher.wait_for(pods, 900):
        print("deletion: not every workload's pod bound within 900 s", file=sys.stderr)
    time.sleep(10)  # the Running statuses land
    plans_before = operator_plans(metrics_port)
    ours = timed_delete(
        ["llmworkloads", "--all"],
        namespace,
        owners_path=workloads_path(namespace),
        owners_selector=None,
        pods_selector=LABEL_WORKLOAD,
        count=count,
        kube=kube,
        env=env,
        pids=pids,
        timeout_seconds=timeout,
    )
    plans = operator_plans(metrics_port) - plans_before
    delete_namespace(namespace, env)

    def line(deletion: Deletion, owners: str) -> str:
        return (
            f"{deletion.seconds:.1f} s (kubectl sent the DELETEs in "
            f"{deletion.returned_seconds:.1f} s; last pod gone after "
            f"{deletion.pods_gone_seconds:.1f} s, last of the {owners} after "
            f"{deletion.owners_gone_seconds:.1f} s{'' if deletion.complete else ', INCOMPLETE'})"
        )

    report(
        figures, f"delete {count} LLMWorkloads (--all)", line(ours, "workloads"), "<= 2x baseline"
    )
    report(
        figures,
        f"baseline: delete {count} ConfigMaps owning a pod each",
        line(base, "ConfigMaps"),
        "",
    )
    report(
        figures,
        "deletion: ratio wattsched/baseline",
        f"{ours.seconds / base.seconds:.2f}; plans solved meanwhile: {plans:.0f}",
        "<= 2",
    )
    report(figures, "API writes per workload, deletion", ours.writes, "")
    report(figures, "API writes per plain pod, deletion baseline", base.writes, "")
    report(figures, "CPU seconds during the deletion", ours.cpu, "")
    report(figures, "CPU seconds during the deletion baseline", base.cpu, "")


# `--scale`: 2,000 KWOK nodes (about 16,000 GPUs in sandbox/nodes.yaml's product mix) and 10,000
# workloads; INFO logs every round's timings, for the longest round.
SCALE: dict[str, Any] = {
    "nodes": 2000,
    "burst": 10000,
    "delete": 10000,
    "rss_workloads": 10000,
    "operator_log_level": "INFO",
}

ROUND_LOG = re.compile(
    r"round of (\d+) workloads: decided in ([\d.]+) s \(plan: ([^)]*)\), applied in ([\d.]+) s"
)


def longest_round(log: Path) -> str | None:
    """The longest planning round in an operator log at INFO level (None without such lines)."""
    rounds = [m for m in map(ROUND_LOG.search, log.read_text(errors="replace").splitlines()) if m]
    if not rounds:
        return None
    worst = max(rounds, key=lambda m: float(m[2]) + float(m[4]))
    total = float(worst[2]) + float(worst[4])
    return (
        f"{total:.1f} s of {len(rounds)} rounds ({worst[1]} workloads: decided in {worst[2]} s, "
        f"of it plan {worst[3]}; applied in {worst[4]} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rss-workloads", type=int, default=10000)
    parser.add_argument(
        "--delete",
        type=int,
        default=0,
        help="after the burst: delete this many bound LLMWorkloads with --all, against as many "
        "ConfigMaps each owning a plain pod (kube-controller-manager's garbage collector)",
    )
    parser.add_argument(
        "--rss-seconds", type=int, default=240, help="how long to sample RSS after creating them"
    )
    parser.add_argument(
        "--rss-until-written",
        action="store_true",
        help="sample each operator's RSS until every workload's status is written (at most "
        "--rss-write-out-seconds), then --rss-seconds more",
    )
    parser.add_argument("--rss-write-out-seconds", type=int, default=3600)
    parser.add_argument(
        "--rss-clear-statuses",
        action="store_true",
        help="remove every status before starting the second operator, so it writes them all",
    )
    parser.add_argument(
        "--rss-namespace",
        default="",
        help="measure only the operator started against the LLMWorkloads already in this "
        "namespace (left by an earlier --keep-rss-workloads): none created, no 'saw them arrive'",
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
        "--agent-interval-seconds",
        type=float,
        default=None,
        help="the simulated agent's heartbeat interval (default: nodes / "
        f"{AGENT_HEARTBEATS_PER_SECOND:.0f} per s, at least {AGENT_INTERVAL_MIN_SECONDS:.0f} s); "
        f"the operator's heartbeat timeout is {HEARTBEAT_TIMEOUT_INTERVALS:.0f} intervals, at "
        f"least {HEARTBEAT_TIMEOUT_MIN_SECONDS:.0f} s",
    )
    parser.add_argument(
        "--sandbox-dir", default=str(Path(tempfile.gettempdir()) / "wattsched-sandbox-bench")
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="the large run: defaults become "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SCALE.items())
        + " (each can still be given)",
    )
    if "--scale" in sys.argv[1:]:
        parser.set_defaults(**SCALE)
    args = parser.parse_args()
    print(
        f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {load_average()}",
        flush=True,
    )

    env = {**os.environ, "SANDBOX_DIR": args.sandbox_dir, "SANDBOX_NODES": str(args.nodes)}
    # 2,000 nodes were not all Ready within 120 s at a load average of 50 on this 2-core machine.
    env.setdefault("SANDBOX_READY_SECONDS", str(max(120, args.nodes // 4)))
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
    cleared = wait_earlier_runs_gone(env, 600)
    print(f"earlier runs' namespaces gone after {cleared:.1f} s", flush=True)
    logs = Path(args.sandbox_dir) / "logs"
    run_id = str(int(time.time()))
    figures: list[tuple[str, str, str]] = []

    interval = args.agent_interval_seconds or agent_interval_seconds(args.nodes)
    heartbeat_timeout = heartbeat_timeout_seconds(interval)
    report(
        figures,
        "simulated agent heartbeat / operator heartbeat timeout",
        f"every {interval:.1f} s / {heartbeat_timeout:.1f} s ({args.nodes} nodes at "
        f"{args.nodes / interval:.1f} heartbeats/s; timeout {HEARTBEAT_TIMEOUT_INTERVALS:.0f} "
        "intervals)",
        "",
    )
    agent_args = [PYTHON, "-m", "wattsched_cli.main", "agent", "--backend", "simulated"]
    agent_args += ["--all-nodes", "--metrics-port", "0", "--interval-seconds", f"{interval:g}"]
    agent_args += ["--kubeconfig", str(kubeconfig)]
    operator_args = [PYTHON, "-m", "wattsched_cli.main", "operator", "--standalone"]
    metrics_port = free_port()
    operator_args += ["--kubeconfig", str(kubeconfig), "--metrics-port", str(metrics_port)]
    operator_args += ["--health-port", "0"]
    operator_args += ["--debounce-seconds", "0.2", "--log-level", args.operator_log_level]
    operator_args += ["--heartbeat-timeout-seconds", f"{heartbeat_timeout:g}"]

    with (
        background(agent_args, logs / "bench-agents.log", env) as agent,
        background(operator_args, logs / "bench-operator.log", env) as operator,
    ):
        run_dir = Path(args.sandbox_dir) / "run"
        pids = {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}
        pids |= {"operator": operator.pid, "agent": agent.pid, "bench clients": os.getpid()}
        time.sleep(10)  # first plan: every node's profile written
        # The single applies measure a running operator, not its start: wait for the agents.
        confirm_seconds = max(300.0, args.nodes / 5)
        waited = wait_profiles_confirmed(kube, args.nodes, timeout_seconds=confirm_seconds)
        print(
            f"every NodePowerProfile confirmed {waited + 10:.1f} s after the operator started"
            if waited is not None
            else f"not every NodePowerProfile confirmed {confirm_seconds + 10:.0f} s after the "
            "operator started",
            flush=True,
        )
        idle_rss = rss_megabytes(operator.pid)

        # 1. Single applies, one after another.
        if args.singles:
            namespace = f"bench-single-{run_id}"
            watcher = watched_namespace(kube, kubeconfig, namespace)
            latencies: list[float] = []
            slowest: list[tuple[float, str, str]] = []  # latency, name, UTC time of the apply
            for i in range(args.singles):
                name = f"single-{i:04d}"
                started = time.monotonic()
                started_utc = utc_now()
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
                slowest.append((latencies[-1], name, started_utc))
            if latencies:
                print(distribution(latencies), flush=True)
                singles_log = logs / "bench-singles.tsv"  # each apply, to match the operator's log
                singles_log.write_text("".join(f"{n}\t{t}\t{s:.3f}\n" for s, n, t in slowest))
                slow = sorted(slowest, reverse=True)[:5]
                print("slowest applies: " + ", ".join(f"{n} {t} {s:.2f} s" for s, n, t in slow))
                p50 = f"{percentile(latencies, 0.5):.2f} s"
                report(figures, "apply -> bound, p50", p50, "<= 2 s")
                report(
                    figures, "apply -> bound, p99", f"{percentile(latencies, 0.99):.2f} s", "<= 2 s"
                )
                report(figures, "apply -> bound, mean", f"{statistics.mean(latencies):.2f} s", "")
            delete_workloads(kube, namespace, timeout_seconds=300, env=env)

        # 2. Burst, and the plain-pod baseline.
        if args.burst:
            base_ns = f"bench-baseline-{run_id}"
            base_watch = watched_namespace(kube, kubeconfig, base_ns)
            names = {f"pod-{i:05d}" for i in range(args.burst)}
            requests_before = api_requests(env)
            cpu_before = cpu_by_process(pids)
            started = time.monotonic()
            create_all(kube, pods_path(base_ns), [plain_pod(n) for n in sorted(names)])
            base_ok = base_watch.wait_for(names, 600)
            base_requests = api_requests(env)
            base_writes = writes_per_object(requests_before, base_requests, args.burst)
            base_api_seconds = request_seconds(requests_before, base_requests)
            base_cpu = cpu_used(cpu_before, cpu_by_process(pids))
            base_seconds = max(base_watch.bound.values()) - started if base_ok else float("nan")
            base_load = load_average()
            # Until every pod is Running (KWOK's status writes and the scheduler's Events landed).
            base_settled = wait_settled(kube, pods_path(base_ns), args.burst, 300)
            base_settled_writes = writes_per_object(requests_before, api_requests(env), args.burst)
            # The baseline's pods go at once (KWOK runs no kubelet to wait for), so the burst finds
            # every GPU free even on a loaded machine, where a graceful namespace deletion of 1,000
            # pods can take longer than its timeout.
            sh(
                "kubectl",
                "delete",
                "pods",
                "--all",
                "-n",
                base_ns,
                "--grace-period=0",
                "--force",
                "--wait=false",  # kubectl's own wait can hang on a loaded API server's watch
                env=env,
                check=False,
            )
            wait_empty(kube, pods_path(base_ns), None, 300)
            delete_namespace(base_ns, env)
            # ... and the agents have reported their GPUs free (else the first rounds find part
            # of the burst no room, and its Admitted and Unschedulable Events count as writes).
            wait_no_other_holders(
                kube, max(120.0, 1.5 * interval + 30), profile_poll_seconds(args.nodes)
            )

            burst_ns = f"bench-burst-{run_id}"
            burst_watch = watched_namespace(kube, kubeconfig, burst_ns)
            names = {f"burst-{i:05d}" for i in range(args.burst)}
            requests_before = api_requests(env)
            cpu_before = cpu_by_process(pids)
            started = time.monotonic()
            create_all(kube, workloads_path(burst_ns), [workload(n) for n in sorted(names)])
            created_seconds = time.monotonic() - started
            pods = {f"{n}-0" for n in names}
            burst_ok = burst_watch.wait_for(pods, 900)
            burst_requests = api_requests(env)
            burst_writes = writes_per_object(requests_before, burst_requests, args.burst)
            burst_api_seconds = request_seconds(requests_before, burst_requests)
            burst_cpu = cpu_used(cpu_before, cpu_by_process(pids))
            burst_load = load_average()
            # Until every workload's status says Running: the operator's status writes and Events
            # that land after the last binding are counted too.
            settled = wait_settled(kube, workloads_path(burst_ns), args.burst, 300)
            settled_seconds = time.monotonic() - started
            settled_writes = writes_per_object(requests_before, api_requests(env), args.burst)
            bound = [burst_watch.bound[p] for p in pods if p in burst_watch.bound]
            burst_seconds = (max(bound) - started) if bound else float("nan")
            rate = len(bound) / burst_seconds if bound else 0.0
            base_rate = args.burst / base_seconds if base_ok else float("nan")
            report(
                figures,
                f"burst of {args.burst}: placed/s",
                f"{rate:.1f}/s ({len(bound)} bound in {burst_seconds:.1f} s"
                f"{'' if burst_ok else ', INCOMPLETE'}; created in {created_seconds:.1f} s)",
                "",
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
                "ratio >= 0.9",
            )
            report(
                figures,
                "machine load at the end of the burst / baseline",
                f"{burst_load} / {base_load}",
                "",
            )
            # Every API write (not leases) from the first create to the last binding, per object:
            # the window of issue 18's goal (its 7.9 writes per workload against 4.4 per plain pod).
            report(
                figures, "API writes per workload, burst, to the last binding", burst_writes, "<= 6"
            )
            report(
                figures, "API writes per plain pod, baseline, to the last binding", base_writes, ""
            )
            # ... and until every status says Running (all later writes of the object landed, and
            # the agents' heartbeats of that time).
            report(
                figures,
                "API writes per workload, burst, until every status is Running"
                f" ({settled_seconds:.1f} s{'' if settled else ', TIMED OUT'})",
                settled_writes,
                "",
            )
            report(
                figures,
                f"API writes per plain pod, baseline, until every pod is Running"
                f"{'' if base_settled else ' (TIMED OUT)'}",
                base_settled_writes,
                "",
            )
            report(figures, "CPU seconds during the burst", burst_cpu, "")
            report(figures, "CPU seconds during the baseline", base_cpu, "")
            report(
                figures,
                "kube-apiserver request seconds, burst to the last binding",
                burst_api_seconds,
                "",
            )
            report(
                figures,
                "kube-apiserver request seconds, baseline to the last binding",
                base_api_seconds,
                "",
            )
            report(
                figures,
                f"operator RSS with the burst's {args.burst} workloads",
                f"{rss_megabytes(operator.pid):.0f} MB (idle {idle_rss:.0f} MB)",
                "",
            )
            delete_workloads(kube, burst_ns, timeout_seconds=600, env=env)

        if args.delete:
            measure_deletion(
                args.delete,
                kube=kube,
                kubeconfig=kubeconfig,
                env=env,
                pids=pids,
                metrics_port=metrics_port,
                run_id=run_id,
                figures=figures,
            )

        # 3. RSS with many workloads in the cluster (most cannot be placed: GPUs run out), first
        # for the operator that sees them arrive, then for a fresh one started against them.
        if args.rss_workloads == 0:
            print_table(args, figures)
            return 0
        rss_ns = args.rss_namespace or f"bench-rss-{run_id}"
        rss_count = args.rss_workloads

        def rss(process: subprocess.Popen[bytes], series: str) -> str:
            if not args.rss_until_written:
                return sample_rss(process, args.rss_seconds)
            return sample_rss_until_written(
                process,
                kube,
                workloads_path(rss_ns),
                rss_count,
                after_seconds=args.rss_seconds,
                timeout_seconds=args.rss_write_out_seconds,
                series=logs / series,
            )

        if args.rss_namespace:
            rss_count = len(kube.list(workloads_path(rss_ns), keep=lambda b: {}))
            print(
                f"{rss_count} LLMWorkloads in namespace {rss_ns}: only the operator started "
                "against them is measured"
            )
        else:
            kube.create("/api/v1/namespaces", {"metadata": {"name": rss_ns}})
            rss_started = time.monotonic()
            create_all(
                kube,
                workloads_path(rss_ns),
                [workload(f"many-{i:05d}") for i in range(rss_count)],
            )
            created_rss_seconds = time.monotonic() - rss_started
            print(f"created {rss_count} in {created_rss_seconds:.0f} s, {load_average()}")
            # The peak comes while the operator writes every workload's status, after the plan.
            report(
                figures,
                f"operator RSS with {rss_count} workloads, saw them arrive",
                f"{rss(operator, 'bench-rss-arrived.tsv')} (idle {idle_rss:.0f} MB; "
                f"{load_average()})",
                "<= 300 MB",
            )
            # Where GPUs are plenty (2,000 nodes), most of them are placed meanwhile: how many.
            rss_bound = sum(
                1
                for pod in kube.list(
                    pods_path(rss_ns), keep=lambda p: {"spec": p.get("spec") or {}}
                )
                if pod["spec"].get("nodeName")
            )
            rss_elapsed = time.monotonic() - rss_started
            report(
                figures,
                f"RSS step: pods of the {rss_count} workloads bound",
                f"{rss_bound} after {rss_elapsed:.0f} s from the first create "
                f"({rss_bound / rss_elapsed:.1f}/s; created in {created_rss_seconds:.0f} s)",
                "",
            )
        stop(operator, "bench-operator")
        if args.rss_clear_statuses:
            cleared = clear_statuses(kube, workloads_path(rss_ns))
            print(f"removed the status of {cleared} workloads, {load_average()}", flush=True)
        with background(operator_args, logs / "bench-operator-restarted.log", env) as restarted:
            report(
                figures,
                f"operator RSS with {rss_count} workloads, started against them",
                f"{rss(restarted, 'bench-rss-restarted.tsv')} ({load_average()})",
                "<= 300 MB",
            )
            if args.keep_rss_workloads:
                print(f"kept the {rss_count} LLMWorkloads in namespace {rss_ns}")
            else:
                delete_workloads(kube, rss_ns, timeout_seconds=900, env=env)

    print_table(args, figures)
    return 0


def print_table(args: argparse.Namespace, figures: list[tuple[str, str, str]]) -> None:
    longest = longest_round(Path(args.sandbox_dir) / "logs" / "bench-operator.log")
    if longest is not None:
        report(figures, "longest planning round", longest, "")
    width = max(len(f[0]) for f in figures)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nOperator benchmark: {args.nodes} KWOK GPU nodes, sandbox {args.sandbox_dir}")
    print(f"load average at the end (1, 5, 15 min): {load}")
    print(f"{'figure':<{width}}  {'measured':<70} goal")
    for name, value, goal in figures:
        print(f"{name:<{width}}  {value:<70} {goal}")


if __name__ == "__main__":
    raise SystemExit(main())

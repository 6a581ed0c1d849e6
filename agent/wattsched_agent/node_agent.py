"""The agent's loop: apply each node's NodePowerProfile, write its status, serve its metrics.

`NodeAgent` holds one node's GPUs (an `NvmlBackend`, over real NVML or `SimulatedNvml`) and where it
learns which GPU each pod holds (a `DeviceSource`: the kubelet's PodResources API, or a simulated
kubelet), and does one reconcile at a time: apply each pod's limit in spec to exactly the GPUs the
pod holds and the idle limit to free GPUs (clamped, read back), leave other teams' GPUs alone,
sample every GPU, and return the status to write. When the device mapping cannot be read, the last
one read is kept (a kubelet restart moves no device); when none was ever read, no limit is set and
`Applied` is False (reason DeviceMappingUnavailable), so the operator counts the node at maximum.
`AgentRunner` drives one or many `NodeAgent`s: it reconciles on every spec change
(a watch) and every `interval_seconds` (heartbeat, and re-applying limits lost on a driver reload),
and on shutdown applies the exit policy. A node whose status was written for a spec change less
than half an interval before a heartbeat pass is left to the next one: that write was its
heartbeat (one status write per applied generation, not two). A heartbeat pass writes its nodes a
chunk at a time and serves spec changes in between. Not for: NVML details
(`nvml_backend`) or status layout (`reconcile`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from wattsched_agent.dcgm_metrics import GpuMetrics, PodRef, render_metrics
from wattsched_agent.kube_access import CONNECTIONS, KubeAccess
from wattsched_agent.nvml_backend import ClockOutcome, GpuFault, LimitOutcome, NvmlBackend
from wattsched_agent.podresources import PodDevices, PodResourcesError
from wattsched_agent.reconcile import (
    GpuHolder,
    PlacedPod,
    build_status,
    gpu_clock_targets,
    gpu_targets,
    holders_by_index,
    pod_refs,
    stopped_status,
)
from wattsched_agent.simulated_kubelet import SimulatedKubelet
from wattsched_agent.simulated_nvml import SimulatedNvml
from wattsched_api.errors import ApiValidationError
from wattsched_api.meta import format_time
from wattsched_api.nodepowerprofile import (
    Backend,
    DeviceMapping,
    MappingSource,
    NodePowerProfile,
    parse_nodepowerprofile,
)

log = logging.getLogger(__name__)


class ExitPolicy(StrEnum):
    """What happens to the GPUs' power limits when the agent stops."""

    LEAVE = "leave"
    RESTORE = "restore"


class DeviceSource(Protocol):
    """Where an agent reads which GPUs each pod holds (PodResources client, simulated kubelet)."""

    @property
    def where(self) -> str: ...

    def list_gpu_pods(self) -> tuple[PodDevices, ...]:
        """Pods holding `nvidia.com/gpu` devices; raises `PodResourcesError` when unreadable."""
        ...


class NodeAgent:
    """One node's GPUs. Thread-safe: the metrics server reads while the loop reconciles.

    `kubelet` is set on a simulated node: the agent tells it which pods are bound there, and it
    allocates their GPUs (read back through `devices`, which may serve it over PodResources).
    """

    def __init__(
        self,
        node_name: str,
        backend: NvmlBackend,
        devices: DeviceSource,
        simulation: SimulatedNvml | None = None,
        kubelet: SimulatedKubelet | None = None,
    ) -> None:
        self.node_name = node_name
        self.backend = backend
        self.devices = devices
        self.simulation = simulation
        self.kubelet = kubelet
        self._lock = threading.RLock()
        self._open_faults: list[GpuFault] = backend.open()
        self._holders: dict[int, GpuHolder] = {}
        self._mapping = DeviceMapping(
            MappingSource.UNAVAILABLE, message=f"not read yet from {devices.where}"
        )
        self._defaults_restored = False
        self.ready = not any(fault.index is None for fault in self._open_faults)

    def _read_mapping(self, now: datetime) -> tuple[PodDevices, ...] | None:
        """The device mapping now, or None (and `_mapping` says why) when it cannot be read."""
        try:
            mapping = self.devices.list_gpu_pods()
        except PodResourcesError as error:
            if self._mapping.source is MappingSource.UNAVAILABLE:
                self._mapping = DeviceMapping(MappingSource.UNAVAILABLE, message=str(error))
            else:
                if self._mapping.source is MappingSource.POD_RESOURCES:
                    log.warning("%s: keeping the last device mapping: %s", self.node_name, error)
                self._mapping = DeviceMapping(
                    MappingSource.LAST_KNOWN, self._mapping.read_time, str(error)
                )
            return None
        if self._mapping.source is not MappingSource.POD_RESOURCES:
            log.info("%s: device mapping read from %s", self.node_name, self.devices.where)
        self._mapping = DeviceMapping(MappingSource.POD_RESOURCES, format_time(now))
        return mapping

    def observe_pods(self, pods: Sequence[PlacedPod], now: datetime | None = None) -> None:
        """Read which GPU each pod holds; on a simulated node, allocate them and make them busy.

        `pods` are the pods bound to this node that request GPUs, as the API server lists them.
        """
        with self._lock:
            identities = self.backend.identities
            if self.kubelet is not None:
                uuids = [identities[i].uuid for i in sorted(identities)]
                self.kubelet.allocate(pods, uuids)
            mapping = self._read_mapping(now or datetime.now(UTC))
            if mapping is not None:
                self._holders = holders_by_index(mapping, identities, pods)
            if self.simulation is not None:
                for index in range(self.backend.gpu_count):
                    holder = self._holders.get(index)
                    pod = None if holder is None else holder.pod
                    if pod is None:
                        self.simulation.set_utilisation(index, 0.0)
                    else:
                        self.simulation.set_utilisation(index, pod.utilisation, pod.workload_type)

    def reconcile(self, profile: NodePowerProfile, now: datetime | None = None) -> dict[str, Any]:
        """Apply the profile's limits and return the status to write (as a JSON object)."""
        with self._lock:
            limits: dict[int, float] = {}
            clocks = {}
            if self._mapping.source is not MappingSource.UNAVAILABLE:
                limits = gpu_targets(profile.spec, self._holders, self.backend.gpu_count)
                clocks = gpu_clock_targets(profile.spec, self._holders)
            outcomes: list[LimitOutcome] = [
                self.backend.apply_limit(index, watts) for index, watts in sorted(limits.items())
            ]
            # Limits first: a clock is no cap, and the limits are what the budget rests on.
            clock_outcomes: list[ClockOutcome] = [
                self.backend.apply_clocks(index, clock_range.min_mhz, clock_range.max_mhz)
                for index, clock_range in sorted(clocks.items())
            ]
            clock_outcomes += [
                self.backend.reset_clocks(index)
                for index in sorted(self.backend.locked_clocks_mhz)
                if index not in clocks
            ]
            samples = [self.backend.sample(index) for index in range(self.backend.gpu_count)]
            faults = [fault for fault in self._open_faults if fault.index is None]
            faults += [
                sample.fault
                for sample in samples
                if sample.fault is not None and sample.index not in limits
            ]
            return build_status(
                profile=profile,
                backend=Backend(self.backend.name),
                ready=self.ready,
                identities=self.backend.identities,
                samples=samples,
                outcomes=outcomes,
                other_faults=faults,
                now=now or datetime.now(UTC),
                holders=self._holders,
                mapping=self._mapping,
                clock_outcomes=clock_outcomes,
                locked_mhz=self.backend.locked_clocks_mhz,
            ).to_dict()

    def metrics_text(self) -> str:
        with self._lock:
            pods: dict[int, PodRef] = pod_refs(self._holders)
            gpus = [
                GpuMetrics(
                    self.backend.identities.get(index),
                    self.backend.sample(index),
                    pods.get(index),
                )
                for index in range(self.backend.gpu_count)
            ]
        return render_metrics(self.node_name, gpus)

    def stop(self, policy: ExitPolicy) -> None:
        """Apply the exit policy: leave the limits and clocks, or restore every GPU's default
        limit and unlock the clocks it locked."""
        with self._lock:
            self.ready = False
            if policy is not ExitPolicy.RESTORE:
                return
            self._defaults_restored = True
            for index in range(self.backend.gpu_count):
                outcome = self.backend.restore_default(index)
                if outcome.fault is not None:
                    log.warning("%s", outcome.fault.message)
            for index in sorted(self.backend.locked_clocks_mhz):
                clock_outcome = self.backend.reset_clocks(index)
                if clock_outcome.fault is not None:
                    log.warning("%s", clock_outcome.fault.message)

    def stopped_status(self, profile: NodePowerProfile) -> dict[str, Any]:
        """The status merge patch saying the agent stopped (call after `stop`)."""
        with self._lock:
            return stopped_status(
                profile=profile,
                backend=Backend(self.backend.name),
                defaults_restored=self._defaults_restored,
                identities=self.backend.identities,
                samples=[self.backend.sample(index) for index in range(self.backend.gpu_count)],
                now=datetime.now(UTC),
            )


# A pass over at most this many nodes, or this share of the nodes served if more, reads each
# one's profile and pods by itself (`workers` at a time) instead of listing the whole cluster's:
# at 2,286 nodes and 10,000 pods a whole list is megabytes, and an operator round changes tens
# of profiles.
FEW_NODES = 4
FEW_NODES_SHARE = 1 / 16
# A heartbeat pass writes this many nodes at a time, serving spec changes in between.
HEARTBEAT_CHUNK_NODES = 2 * CONNECTIONS


@dataclass
class HeartbeatPass:
    """A heartbeat pass under way: what it read, and the nodes it has still to write."""

    pending: list[str]
    profiles: dict[str, dict[str, Any]]
    pods: dict[str, list[PlacedPod]]
    read_at: float  # time.monotonic() of the read


class AgentRunner:
    """Reconciles every node agent on spec changes and on a fixed interval.

    A spec change (seen by the watch) reconciles only the nodes whose profile changed; every
    `interval_seconds` all nodes are reconciled (heartbeat, pods, limits lost on a driver reload)
    but those whose status was written less than half an interval ago (`to_reconcile`), so a
    node's status is written at least every 1.5 intervals and a spec change costs one write.
    Status patches go out `workers` at a time, so one process serving hundreds of simulated nodes
    confirms a round of new limits in about the time of one patch per worker, and a stop request
    skips the nodes not yet reached. A heartbeat pass reads every profile and pod once and writes
    `heartbeat_chunk` nodes at a time, serving the spec changes seen meanwhile between chunks (a
    node written for one is left out of the rest of the pass): at thousands of nodes a pass takes
    minutes, and new limits are confirmed within about one chunk's writes, not after the pass.
    """

    def __init__(
        self,
        kube: KubeAccess,
        agents: Mapping[str, NodeAgent],
        *,
        single_node: str | None,
        interval_seconds: float,
        exit_policy: ExitPolicy,
        workers: int = CONNECTIONS,
        heartbeat_chunk: int = HEARTBEAT_CHUNK_NODES,
    ) -> None:
        self.kube = kube
        self.agents = dict(agents)
        self.single_node = single_node
        self.interval_seconds = interval_seconds
        self.exit_policy = exit_policy
        self.heartbeat_chunk = heartbeat_chunk
        self.few_nodes = max(FEW_NODES, int(len(self.agents) * FEW_NODES_SHARE))
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._changed: set[str] = set()
        self._changed_lock = threading.Lock()
        # When each node's status was last written (time.monotonic), by the pool's threads.
        self._written: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(workers, len(self.agents))), thread_name_prefix="reconcile"
        )

    @staticmethod
    def _profile(profiles: Mapping[str, Mapping[str, Any]], name: str) -> NodePowerProfile | None:
        """The node's profile, typed; None when there is none or it is invalid (logged)."""
        if name not in profiles:
            return None
        try:
            return parse_nodepowerprofile(profiles[name])
        except ApiValidationError as error:
            log.error("%s", error)
            return None

    def spec_changed(self, name: str) -> None:
        """Called by the watch: reconcile this node's profile soon."""
        with self._changed_lock:
            self._changed.add(name)
        self._wake.set()

    def _take_changed(self) -> set[str]:
        with self._changed_lock:
            changed, self._changed = self._changed, set()
        return changed

    def to_reconcile(self, changed: Collection[str], *, heartbeat: bool, now: float) -> set[str]:
        """The nodes a pass reconciles at `now` (time.monotonic): those whose spec `changed`,
        and on a `heartbeat` pass every node whose status was not written in the last half
        interval (a write since then, for a spec change, was its heartbeat)."""
        names = {name for name in changed if name in self.agents}
        if heartbeat:
            recent = now - self.interval_seconds / 2
            names.update(n for n in self.agents if self._written.get(n, -math.inf) <= recent)
        return names

    def _for_each(
        self,
        names: Collection[str],
        action: Callable[[str], None],
        what: str,
        *,
        until_stopped: bool = False,
    ) -> int:
        """Run `action` on each node name, `workers` at a time; returns how many failed (logged).

        With `until_stopped`, nodes not yet started when a stop is requested are skipped.
        """

        def guarded(name: str) -> bool:
            if until_stopped and self.stop_event.is_set():
                return True
            try:
                action(name)
            except Exception as error:  # one node's failure never stops the others
                log.warning("%s of %s failed: %s", what, name, error)
                return False
            return True

        return sum(1 for ok in self._pool.map(guarded, sorted(names)) if not ok)

    def _read(
        self, names: Collection[str]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[PlacedPod]]]:
        """The profiles of `names` and the GPU pods bound to them: one list of each for the whole
        cluster, or, for a few nodes (a spec change; `few_nodes`), each node's own (a field
        selector, as a node's own agent reads them) instead of every pod in the cluster each
        time."""
        if self.single_node is not None or len(names) > self.few_nodes:
            # A new spec often names pods created since the last heartbeat: read who holds what.
            return self.kube.profiles(self.single_node), self.kube.gpu_pods(self.single_node)

        def read_one(name: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[PlacedPod]]]:
            return self.kube.profiles(name), self.kube.gpu_pods(name)

        profiles: dict[str, dict[str, Any]] = {}
        pods: dict[str, list[PlacedPod]] = {}
        for node_profiles, node_pods in self._pool.map(read_one, sorted(names)):
            profiles |= node_profiles
            pods |= node_pods
        return profiles, pods

    def tick(self, only: Collection[str] | None = None) -> int:
        """One pass: pods -> device mapping -> limits -> status, for every node (`only` None) or
        for the named nodes only (spec changes, the nodes due a heartbeat). Returns the failures."""
        names = self.agents.keys() if only is None else [n for n in only if n in self.agents]
        if not names:
            return 0
        profiles, pods = self._read(names)
        return self._write(names, profiles, pods)

    def _write(
        self,
        names: Collection[str],
        profiles: Mapping[str, Mapping[str, Any]],
        pods: Mapping[str, list[PlacedPod]],
    ) -> int:
        """Reconcile `names` from what was read and write each one's status; the failures."""
        for name in names:
            self.agents[name].observe_pods(pods.get(name, []))

        def reconcile(name: str) -> None:
            profile = self._profile(profiles, name)
            if profile is not None:
                self.kube.patch_status(name, self.agents[name].reconcile(profile))
                self._written[name] = time.monotonic()

        return self._for_each(names, reconcile, "reconcile", until_stopped=True)

    def start_heartbeat(self, now: float) -> HeartbeatPass | None:
        """Read every profile and pod for the nodes due a heartbeat at `now` (None: none due)."""
        due = self.to_reconcile((), heartbeat=True, now=now)
        if not due:
            return None
        profiles, pods = self._read(due)
        return HeartbeatPass(pending=sorted(due), profiles=profiles, pods=pods, read_at=now)

    def heartbeat_step(self, heartbeat: HeartbeatPass) -> int:
        """Write the next `heartbeat_chunk` nodes of a heartbeat pass from its read, leaving out
        those written since that read (a spec change, from a newer read). Returns the failures;
        the pass is done when `heartbeat.pending` is empty."""
        chunk = heartbeat.pending[: self.heartbeat_chunk]
        del heartbeat.pending[: self.heartbeat_chunk]
        stale = [n for n in chunk if self._written.get(n, -math.inf) < heartbeat.read_at]
        return self._write(stale, heartbeat.profiles, heartbeat.pods) if stale else 0

    def run(self) -> None:
        """Loop until `request_stop()`, then apply the exit policy.

        Spec changes are served before each chunk of a heartbeat pass, so a pass over thousands
        of nodes does not hold back the confirmation of new limits for its whole length."""
        watcher = threading.Thread(
            target=self.kube.watch_profiles,
            args=(self.single_node, self.spec_changed, self.stop_event),
            name="watch-nodepowerprofiles",
            daemon=True,
        )
        watcher.start()
        next_heartbeat = time.monotonic()
        heartbeat: HeartbeatPass | None = None
        while not self.stop_event.is_set():
            self._wake.clear()
            # What fails is retried at the next heartbeat (a node not written is due).
            try:
                changed = self._take_changed()
                if changed:
                    self.tick(self.to_reconcile(changed, heartbeat=False, now=time.monotonic()))
                now = time.monotonic()
                if heartbeat is None and now >= next_heartbeat:
                    next_heartbeat = now + self.interval_seconds
                    heartbeat = self.start_heartbeat(now)
                if heartbeat is not None:
                    self.heartbeat_step(heartbeat)
                    if not heartbeat.pending:
                        heartbeat = None
                    continue  # the next chunk, after the spec changes seen meanwhile
            except Exception as error:  # the agent keeps running through API outages
                log.warning("reconcile failed, retrying at the next heartbeat: %s", error)
                heartbeat = None
            self._wake.wait(max(0.0, next_heartbeat - time.monotonic()))
        self.shutdown()

    def request_stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    def shutdown(self) -> None:
        """Apply the exit policy on every node and say so in each profile's status."""
        for agent in self.agents.values():
            agent.stop(self.exit_policy)
        try:
            profiles = self.kube.profiles(self.single_node)
        except Exception as error:  # best effort on the way out
            log.warning("could not read profiles at shutdown: %s", error)
            self._pool.shutdown(wait=False, cancel_futures=True)
            return

        def mark_stopped(name: str) -> None:
            profile = self._profile(profiles, name)
            if profile is not None:
                self.kube.patch_status(name, self.agents[name].stopped_status(profile))

        self._for_each(self.agents.keys(), mark_stopped, "marking stopped")
        self._pool.shutdown(wait=False, cancel_futures=True)

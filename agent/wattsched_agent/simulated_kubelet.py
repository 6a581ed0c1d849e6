"""The kubelet's device allocation on a simulated (KWOK) node, where no kubelet or device plugin
runs.

`SimulatedKubelet` decides which simulated GPUs each pod bound to the node holds, as a device plugin
would: a new pod gets free GPUs, lowest index first (pods in order of creation), and keeps them
until it is gone; another team's pod is allocated like ours. It answers `list_gpu_pods` like the
PodResources client, and the simulated agent serves it over the real PodResources proto when given
`--pod-resources-dir` (see `podresources.PodResourcesServer`). Not for real nodes: there the kubelet
is the truth (`podresources.PodResourcesClient`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from wattsched_agent.podresources import PodDevices
from wattsched_agent.reconcile import PlacedPod


class SimulatedKubelet:
    """Sticky allocation of one node's GPU UUIDs to the pods bound to it. Thread-safe."""

    where = "the simulated kubelet"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pod: dict[tuple[str, str], tuple[str, ...]] = {}

    def allocate(self, pods: Sequence[PlacedPod], device_ids: Sequence[str]) -> None:
        """Keep the allocations of pods still here, free the others', allocate new pods.

        `device_ids` are the node's GPUs in index order. A pod that does not fit in the free GPUs
        gets none (the real kubelet would refuse it: UnexpectedAdmissionError).
        """
        with self._lock:
            present = {(pod.namespace, pod.name): pod for pod in pods}
            kept = {key: ids for key, ids in self._by_pod.items() if key in present}
            used = {device for ids in kept.values() for device in ids}
            free = [device for device in device_ids if device not in used]
            for pod in sorted(pods, key=lambda pod: (pod.created, pod.namespace, pod.name)):
                key = (pod.namespace, pod.name)
                if key in kept or pod.gpus > len(free):
                    continue
                kept[key], free = tuple(free[: pod.gpus]), free[pod.gpus :]
            self._by_pod = kept

    def list_gpu_pods(self) -> tuple[PodDevices, ...]:
        with self._lock:
            return tuple(
                PodDevices(namespace, name, ids)
                for (namespace, name), ids in sorted(self._by_pod.items())
            )

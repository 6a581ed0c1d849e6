"""The agent's few Kubernetes API calls: NodePowerProfiles, GPU pods, GPU nodes.

The agent needs no operator framework: it GETs/WATCHes NodePowerProfiles, PATCHes their status
subresource (JSON merge patch), lists the pods with GPUs bound to its node(s) (wattsched's and other
teams') and reads its node's GPU labels. Every call returns plain dicts. Not for: deciding
anything (see `reconcile`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from kubernetes import client, config, watch

from wattsched_agent.reconcile import PlacedPod, gpus_requested
from wattsched_api.llmworkload import WorkloadType
from wattsched_api.meta import GROUP, VERSION
from wattsched_api.nodepowerprofile import PLURAL
from wattsched_api.vocabulary import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    POD_FINISHED_PHASES,
    SIMULATED_UTILISATION_ANNOTATION,
    WORKLOAD_LABEL,
    WORKLOAD_TYPE_ANNOTATION,
)

COUNT_LABEL = "nvidia.com/gpu.count"
GPU_NODE_SELECTOR = "nvidia.com/gpu.present=true"
REQUEST_TIMEOUT_SECONDS = 10
# Connections kept open to the API server: the all-nodes agent patches many statuses at once.
CONNECTIONS = 16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuNodeInfo:
    """A GPU node as its labels describe it (GPU feature discovery)."""

    name: str
    product: str
    gpu_count: int


def node_gpu_info(node: Mapping[str, Any]) -> GpuNodeInfo:
    metadata = node.get("metadata") or {}
    name = str(metadata.get("name", "?"))
    labels = metadata.get("labels") or {}
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    product = labels.get(GPU_PRODUCT_LABEL)
    count_text = labels.get(COUNT_LABEL) or allocatable.get(GPU_RESOURCE)
    if not product or count_text is None:
        raise ValueError(
            f"node {name}: needs label {GPU_PRODUCT_LABEL} and label {COUNT_LABEL} or allocatable "
            f"{GPU_RESOURCE} to simulate its GPUs"
        )
    return GpuNodeInfo(name, str(product), int(count_text))


def placed_pod(pod: Mapping[str, Any]) -> PlacedPod | None:
    """A running or pending pod with GPUs, or None for pods that hold no GPU now.

    `managed` says whether wattsched created it (the `wattsched.io/workload` label).
    """
    metadata = pod.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return None
    if (pod.get("status") or {}).get("phase") in POD_FINISHED_PHASES:
        return None
    gpus, container = gpus_requested(pod.get("spec") or {})
    if gpus == 0:
        return None
    annotations = metadata.get("annotations") or {}
    annotation = annotations.get(SIMULATED_UTILISATION_ANNOTATION)
    utilisation = 1.0 if annotation is None else min(1.0, max(0.0, float(annotation)))
    # The operator writes the LLMWorkload's spec.type; pods without it (or with another value)
    # count as Inference.
    workload_type = annotations.get(WORKLOAD_TYPE_ANNOTATION)
    if workload_type not in {kind.value for kind in WorkloadType}:
        workload_type = WorkloadType.INFERENCE.value
    return PlacedPod(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        container=container,
        gpus=gpus,
        created=str(metadata.get("creationTimestamp", "")),
        utilisation=utilisation,
        workload_type=str(workload_type),
        managed=bool((metadata.get("labels") or {}).get(WORKLOAD_LABEL)),
    )


class KubeAccess:
    """Kubernetes API calls made by the agent (kubeconfig, or in-cluster when none is given)."""

    def __init__(self, kubeconfig: str | None, pool_size: int = CONNECTIONS) -> None:
        configuration = client.Configuration()
        if kubeconfig:
            try:
                config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
            except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
                # The CLI reports a ConfigException as an unusable kubeconfig, in one line.
                raise config.ConfigException(
                    f"{kubeconfig}: not a usable kubeconfig: {error}"
                ) from error
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except config.ConfigException as error:
                raise config.ConfigException(
                    f"no --kubeconfig given and not running in a pod ({error})"
                ) from error
        # One connection per concurrent status patch (see AgentRunner's workers).
        configuration.connection_pool_maxsize = pool_size
        api_client = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(response.data)
        return decoded

    def read_node(self, node_name: str) -> dict[str, Any]:
        """The Node object (raises the client's ApiException, 404 when there is no such node)."""
        return self._json(
            self.core.read_node(
                node_name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        )

    def gpu_nodes(
        self, node_name: str | None, selector: str = GPU_NODE_SELECTOR
    ) -> list[GpuNodeInfo]:
        """The named node, or every node matching the label selector."""
        if node_name is not None:
            return [node_gpu_info(self.read_node(node_name))]
        nodes = self._json(
            self.core.list_node(
                label_selector=selector,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )
        return sorted(
            (node_gpu_info(node) for node in nodes.get("items") or []), key=lambda n: n.name
        )

    def profiles(self, node_name: str | None) -> dict[str, dict[str, Any]]:
        """NodePowerProfiles by name (only the named node's when node_name is given)."""
        selector = f"metadata.name={node_name}" if node_name else None
        listing = self._json(
            self.custom.list_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                field_selector=selector,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )
        return {item["metadata"]["name"]: item for item in listing.get("items") or []}

    def patch_status(self, name: str, status: Mapping[str, Any]) -> None:
        self.custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            PLURAL,
            name,
            {"status": dict(status)},
            _content_type="application/merge-patch+json",
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )

    def gpu_pods(self, node_name: str | None) -> dict[str, list[PlacedPod]]:
        """Pods holding GPUs (wattsched's and other teams'), by node name."""
        selector = f"spec.nodeName={node_name}" if node_name else None
        listing = self._json(
            self.core.list_pod_for_all_namespaces(
                field_selector=selector,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )
        by_node: dict[str, list[PlacedPod]] = {}
        for pod in listing.get("items") or []:
            node = (pod.get("spec") or {}).get("nodeName")
            placed = placed_pod(pod)
            if node and placed is not None:
                by_node.setdefault(str(node), []).append(placed)
        return by_node

    def watch_profiles(
        self, node_name: str | None, on_spec_change: Callable[[str], None], stop: threading.Event
    ) -> None:
        """Call `on_spec_change(name)` whenever a profile's generation changes, until `stop`.

        Status updates (the agent's own patches) do not change the generation and are ignored.
        """
        generations: dict[str, int] = {}
        selector = f"metadata.name={node_name}" if node_name else None
        while not stop.is_set():
            watcher = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in watcher.stream(  # type: ignore[no-untyped-call]
                    self.custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    PLURAL,
                    field_selector=selector,
                    timeout_seconds=30,
                ):
                    if stop.is_set():
                        break
                    obj = event["object"]
                    metadata = (obj.get("metadata") or {}) if isinstance(obj, dict) else {}
                    name = str(metadata.get("name", ""))
                    generation = int(metadata.get("generation") or 0)
                    if generations.get(name) != generation or event["type"] == "DELETED":
                        generations[name] = generation
                        on_spec_change(name)
            except Exception as error:
                log.warning("watch of %s failed, retrying: %s", PLURAL, error)
                stop.wait(1.0)
            finally:
                watcher.stop()  # type: ignore[no-untyped-call]

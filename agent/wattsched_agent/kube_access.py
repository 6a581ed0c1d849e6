"""The agent's few Kubernetes API calls: NodePowerProfiles, GPU pods, GPU nodes.

The agent needs no operator framework: it lists and watches NodePowerProfiles (`ProfileWatch`:
resumes from the last resourceVersion, lists again on 410 Gone, backs off on failures such as
504 "Too large resource version"), PATCHes their status subresource (JSON merge patch), lists
the pods with GPUs bound to its node(s) (wattsched's and other teams') and reads its node's GPU
labels. Every call returns plain dicts. Not for: deciding anything (see `reconcile`).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

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
# Objects per page of a cluster-wide list: each page is one request within the timeout above.
# Unpaged, the all-nodes agent's list of 2,000 burst pods at 2,286 nodes ran past it at four
# heartbeats in a row (docs/benchmarks.md), and those passes wrote nothing.
LIST_PAGE_SIZE = 500
# Connections kept open to the API server: the all-nodes agent patches many statuses at once.
CONNECTIONS = 16
# A watch request ends after this long; the next resumes from the last resourceVersion seen.
WATCH_SECONDS = 30
# Waits after failed lists or watches (see `Backoff`): the first is about the 1 s the API server
# asks for with "Too large resource version" (Retry-After), doubling up to the last.
WATCH_BACKOFF_FIRST_SECONDS = 1.0
WATCH_BACKOFF_MAX_SECONDS = 30.0
HTTP_GONE = 410

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

    def _paged(
        self, call: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[list[dict[str, Any]], str]:
        """Every item of a list call, in pages of `LIST_PAGE_SIZE` (one request each), and the
        list's resourceVersion. The pages are one consistent snapshot (the API server's continue
        token); a token that expired between pages (410) raises as any failed request does."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self._json(
                call(
                    *args,
                    limit=LIST_PAGE_SIZE,
                    _continue=token,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT_SECONDS,
                    **kwargs,
                )
            )
            items.extend(page.get("items") or [])
            metadata = page.get("metadata") or {}
            token = metadata.get("continue") or None
            if token is None:
                return items, str(metadata.get("resourceVersion") or "")

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
        nodes, _ = self._paged(self.core.list_node, label_selector=selector)
        return sorted((node_gpu_info(node) for node in nodes), key=lambda n: n.name)

    def profiles(self, node_name: str | None) -> dict[str, dict[str, Any]]:
        """NodePowerProfiles by name (only the named node's when node_name is given)."""
        items, _ = self.list_profiles(node_name)
        return {item["metadata"]["name"]: item for item in items}

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
        pods, _ = self._paged(self.core.list_pod_for_all_namespaces, field_selector=selector)
        by_node: dict[str, list[PlacedPod]] = {}
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            placed = placed_pod(pod)
            if node and placed is not None:
                by_node.setdefault(str(node), []).append(placed)
        return by_node

    def list_profiles(self, node_name: str | None) -> tuple[list[dict[str, Any]], str]:
        """Every NodePowerProfile (only the named node's when node_name is given) and the list's
        resourceVersion, to watch from."""
        selector = f"metadata.name={node_name}" if node_name else None
        return self._paged(
            self.custom.list_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            field_selector=selector,
        )

    def watch_profile_events(
        self, node_name: str | None, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        """The watch events after `resource_version` (bookmarks included), for at most
        WATCH_SECONDS; raises the client's ApiException for an ERROR event (410 Gone, 504 Too
        large resource version)."""
        selector = f"metadata.name={node_name}" if node_name else None
        watcher = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            yield from watcher.stream(  # type: ignore[no-untyped-call]
                self.custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
                field_selector=selector,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
            )
        finally:
            watcher.stop()  # type: ignore[no-untyped-call]

    def watch_profiles(
        self, node_name: str | None, on_spec_change: Callable[[str], None], stop: threading.Event
    ) -> None:
        """Call `on_spec_change(name)` whenever a profile's generation changes or it is deleted,
        until `stop` (see `ProfileWatch`)."""
        ProfileWatch(
            list_profiles=lambda: self.list_profiles(node_name),
            watch_events=lambda version: self.watch_profile_events(node_name, version),
            on_spec_change=on_spec_change,
            stop=stop,
        ).run()


class Backoff:
    """Waits after consecutive failures: doubling from `first_seconds` up to `max_seconds`, each
    drawn between half and all of that (jitter, so many agents do not retry in step)."""

    def __init__(
        self,
        first_seconds: float = WATCH_BACKOFF_FIRST_SECONDS,
        max_seconds: float = WATCH_BACKOFF_MAX_SECONDS,
        draw: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.first_seconds = first_seconds
        self.max_seconds = max_seconds
        self.draw = draw
        self.failures = 0

    def next_seconds(self) -> float:
        ceiling = min(self.max_seconds, self.first_seconds * 2**self.failures)
        self.failures += 1
        return self.draw(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class ProfileWatch:
    """List, then watch, NodePowerProfiles (as client-go's reflector does) and report each one
    whose generation changed or that was deleted.

    Status patches (the agent's own writes) do not change the generation and are not reported.
    The list gives every profile's generation and a resourceVersion; each watch resumes from the
    last resourceVersion seen (events and bookmarks), so a watch that ends (WATCH_SECONDS) or
    breaks loses no event and does not replay every profile. Failures:
    - 410 Gone: the resourceVersion is older than the API server's watch history. List again and
      compare generations: profiles changed or deleted meanwhile are reported then.
    - 504 "Too large resource version" (reason Timeout, cause ResourceVersionTooLarge, Retry-After
      1 s): the API server's watch cache has not caught up with the resourceVersion asked for
      within its wait, as on a loaded API server. Wait and resume from the same resourceVersion.
    - Anything else (connection refused, a timeout): wait and resume the same way.
    Every failure waits (`Backoff`, from 1 s doubling to 30 s) so a failing API server is not
    asked in a loop; a watch that ends normally resets the wait.
    """

    def __init__(
        self,
        *,
        list_profiles: Callable[[], tuple[list[dict[str, Any]], str]],
        watch_events: Callable[[str], Iterable[dict[str, Any]]],
        on_spec_change: Callable[[str], None],
        stop: threading.Event,
        backoff: Backoff | None = None,
    ) -> None:
        self.list_profiles = list_profiles
        self.watch_events = watch_events
        self.on_spec_change = on_spec_change
        self.stop = stop
        self.backoff = backoff or Backoff()
        self.generations: dict[str, int] = {}
        # Where the next watch starts; None: list first.
        self.resource_version: str | None = None

    def relisted(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Report the profiles whose generation differs from the one last seen, and those seen
        before but no longer listed (deleted while no watch ran)."""
        listed: dict[str, int] = {}
        for item in items:
            metadata = item.get("metadata") or {}
            listed[str(metadata.get("name", ""))] = int(metadata.get("generation") or 0)
        for name in sorted(set(self.generations) - set(listed)):
            del self.generations[name]
            self.on_spec_change(name)
        for name, generation in sorted(listed.items()):
            if self.generations.get(name) != generation:
                self.generations[name] = generation
                self.on_spec_change(name)

    def observe(self, event: Mapping[str, Any]) -> None:
        """One watch event: report a changed generation or a deletion; keep its resourceVersion."""
        obj = event.get("raw_object", event.get("object"))
        metadata = (obj.get("metadata") or {}) if isinstance(obj, dict) else {}
        version = metadata.get("resourceVersion")
        if event.get("type") != "BOOKMARK":
            name = str(metadata.get("name", ""))
            generation = int(metadata.get("generation") or 0)
            if event.get("type") == "DELETED":
                self.generations.pop(name, None)
                self.on_spec_change(name)
            elif self.generations.get(name) != generation:
                self.generations[name] = generation
                self.on_spec_change(name)
        if version:
            self.resource_version = str(version)

    def run(self) -> None:
        """Until `stop`: list when there is no resourceVersion to resume from, then watch."""
        while not self.stop.is_set():
            try:
                if self.resource_version is None:
                    items, version = self.list_profiles()
                    self.relisted(items)
                    self.resource_version = version
                for event in self.watch_events(self.resource_version):
                    if self.stop.is_set():
                        return
                    self.observe(event)
                self.backoff.reset()
                continue
            except ApiException as error:
                if error.status == HTTP_GONE:
                    log.info("watch of %s expired (410 Gone): listing again", PLURAL)
                    self.resource_version = None
                else:
                    log.warning(
                        "watch of %s failed (%s %s), resuming from resourceVersion %s",
                        PLURAL,
                        error.status,
                        error.reason,
                        self.resource_version,
                    )
            except Exception as error:
                log.warning(
                    "watch of %s failed, resuming from resourceVersion %s: %s",
                    PLURAL,
                    self.resource_version,
                    error,
                )
            self.stop.wait(self.backoff.next_seconds())

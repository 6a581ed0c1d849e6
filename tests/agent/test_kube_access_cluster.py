"""The agent's cluster-wide lists against the sandbox's API server: read in pages, one request
each, and nothing lost between pages (nodes, NodePowerProfiles, GPU pods)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.agent.conftest import apply_profile, gpu_pod
from wattsched_agent import kube_access
from wattsched_agent.kube_access import GPU_NODE_SELECTOR, KubeAccess

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster
NODES = ("gpu-a100-00", "gpu-a100-01", "gpu-h100-00")


class Pages:
    """Wraps a list call of the client: counts its requests and the items each returned."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.limits: list[int | None] = []
        self.sizes: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.limits.append(kwargs.get("limit"))
        response = self.call(*args, **kwargs)
        self.sizes.append(len(json.loads(response.data).get("items") or []))
        return response


@pytest.fixture
def kube(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> KubeAccess:
    monkeypatch.setattr(kube_access, "LIST_PAGE_SIZE", 2)
    return KubeAccess(str(sandbox.kubeconfig))


@pytest.fixture
def profiles(sandbox: Sandbox, crds: list[str]) -> Iterator[tuple[str, ...]]:
    for node in NODES:
        apply_profile(sandbox, node, idle_watts=250)
    yield NODES
    sandbox.kubectl("delete", "nodepowerprofile", *NODES, "--ignore-not-found")


def test_every_profile_is_listed_in_pages_of_the_page_size(
    sandbox: Sandbox, kube: KubeAccess, profiles: tuple[str, ...]
) -> None:
    pages = Pages(kube.custom.list_cluster_custom_object)
    kube.custom.list_cluster_custom_object = pages  # type: ignore[method-assign]
    items, version = kube.list_profiles(None)
    names = [item["metadata"]["name"] for item in items]
    expected = sandbox.kubectl("get", "nodepowerprofiles", "-o", "name").stdout.split()
    assert sorted(names) == sorted(name.split("/", 1)[1] for name in expected)
    assert set(profiles) <= set(names)
    assert len(pages.sizes) == -(-len(names) // 2) >= 2
    assert set(pages.limits) == {2}
    assert max(pages.sizes) == 2
    assert version  # the list's resourceVersion, to watch from
    assert kube.profiles(NODES[0]).keys() == {NODES[0]}


def test_every_gpu_node_and_gpu_pod_is_listed_across_pages(
    sandbox: Sandbox, kube: KubeAccess, namespace: str
) -> None:
    nodes = Pages(kube.core.list_node)
    kube.core.list_node = nodes  # type: ignore[method-assign]
    listed = [node.name for node in kube.gpu_nodes(None)]
    expected = sandbox.kubectl("get", "nodes", "-l", GPU_NODE_SELECTOR, "-o", "name").stdout
    assert listed == sorted(name.split("/", 1)[1] for name in expected.split())
    assert len(nodes.sizes) >= 2

    for index, node in enumerate(NODES):
        pod = gpu_pod(f"paged-{index}", namespace, node, 1, wattsched=False)
        sandbox.kubectl("apply", "-f", "-", input=json.dumps(pod))
    pods = Pages(kube.core.list_pod_for_all_namespaces)
    kube.core.list_pod_for_all_namespaces = pods  # type: ignore[method-assign]
    by_node = kube.gpu_pods(None)
    ours = {
        node: [p.name for p in placed if p.namespace == namespace]
        for node, placed in by_node.items()
    }
    assert {node: names for node, names in ours.items() if names} == {
        node: [f"paged-{index}"] for index, node in enumerate(NODES)
    }
    assert len(pods.sizes) >= 2
    assert set(pods.limits) == {2}

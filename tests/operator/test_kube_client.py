"""The operator's JSON client against the sandbox's API server: lists come in pages."""

from __future__ import annotations

import pytest

from tests.conftest import Sandbox
from wattsched_operator.kube import Kube

pytestmark = pytest.mark.cluster


def test_a_list_longer_than_a_page_returns_every_object_each_kept_as_asked(
    sandbox: Sandbox, namespace: str
) -> None:
    kube = Kube(str(sandbox.kubeconfig))
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    names = {f"page-{i}" for i in range(5)}
    for name in names:
        kube.create(path, {"metadata": {"name": name, "labels": {"paged": "yes"}}})

    kept = kube.list(
        path, "paged=yes", keep=lambda body: {"name": body["metadata"]["name"]}, page_size=2
    )

    assert sorted(kept, key=lambda k: k["name"]) == [{"name": n} for n in sorted(names)]
    assert len(kube.list(path, "paged=yes", page_size=10)) == len(names)

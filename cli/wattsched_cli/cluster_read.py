"""Read the objects a plan is made from out of a live cluster, for the read-only CLI commands
(`wattsched plan --from-cluster`, `wattsched status`).

Lists what the operator lists (Nodes, every LLMWorkload, EnergyBudgets, NodePowerProfiles and the
pods labelled `wattsched.io/workload`) and turns every failure to reach or read the cluster (no or
a bad kubeconfig, an API server that does not answer, an HTTP error) into one `ClusterReadError`
whose message says what failed and what to check. Not for writing anything.
"""

from __future__ import annotations

from typing import Any

import urllib3
from kubernetes import config

from wattsched_api.commandline import (
    EXIT_CLUSTER,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    CommandError,
    one_line,
)
from wattsched_api.meta import API_VERSION
from wattsched_api.vocabulary import WORKLOAD_LABEL
from wattsched_operator.kube import (
    GROUP_PATH,
    Kube,
    KubeError,
    budgets_path,
    cluster_error,
    profiles_path,
)
from wattsched_operator.snapshot import Body, ClusterObjects


class ClusterReadError(CommandError):
    """The cluster could not be reached or read; the message is one line for the user, the exit
    code 3 (4 where the wattsched CRDs are not installed)."""

    def __init__(self, message: str, exit_code: int = EXIT_CLUSTER) -> None:
        super().__init__(message, exit_code)


def connect(kubeconfig: str | None) -> Kube:
    """A client for the cluster `kubeconfig` (or $KUBECONFIG, ~/.kube/config, in-cluster) names."""
    try:
        return Kube(kubeconfig)
    except (config.ConfigException, OSError) as error:
        known = cluster_error(error, kubeconfig)
        if known is not None:
            raise ClusterReadError(str(known), known.exit_code) from None
        where = kubeconfig or "the default kubeconfig ($KUBECONFIG or ~/.kube/config)"
        raise ClusterReadError(
            f"cannot load {where}: {str(error).splitlines()[0] if str(error) else error!r}; "
            "pass --kubeconfig or set KUBECONFIG"
        ) from None


def list_objects(kube: Kube, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
    """Every object at `path`, or ClusterReadError naming the path and the cause."""
    try:
        return kube.list(path, label_selector)
    except KubeError as error:
        hint = {
            401: "the kubeconfig's credentials were refused",
            403: "the kubeconfig's user may not list these objects",
            404: "is the wattsched CRD installed? (kubectl apply --server-side -f crds/)",
        }.get(error.status, "")
        message = error.message.splitlines()[0] if error.message else ""
        raise ClusterReadError(
            f"GET {path}: HTTP {error.status}: {message}" + (f" ({hint})" if hint else ""),
            {401: EXIT_CLUSTER, 403: EXIT_CLUSTER, 404: EXIT_NOT_FOUND}.get(
                error.status, EXIT_FAILED
            ),
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        known = cluster_error(error, kube.kubeconfig)
        if known is not None:  # the CLI's own words for an API server that does not answer
            raise ClusterReadError(str(known), known.exit_code) from None
        raise ClusterReadError(
            f"GET {path}: the API server did not answer ({one_line(error)}); "
            "is the cluster up and the kubeconfig's server address right?"
        ) from None


def _with_kind(items: list[dict[str, Any]], api_version: str, kind: str) -> tuple[Body, ...]:
    """List items as `kubectl get -o yaml` prints them: each with its apiVersion and kind (the API
    server leaves them out of the items of a core list)."""
    return tuple({"apiVersion": api_version, "kind": kind, **item} for item in items)


def read_cluster(kube: Kube) -> ClusterObjects:
    """The objects the operator plans from, as the API server returns them."""
    return ClusterObjects(
        nodes=_with_kind(list_objects(kube, "/api/v1/nodes"), "v1", "Node"),
        workloads=_with_kind(
            list_objects(kube, f"{GROUP_PATH}/llmworkloads"), API_VERSION, "LLMWorkload"
        ),
        budgets=_with_kind(list_objects(kube, budgets_path()), API_VERSION, "EnergyBudget"),
        profiles=_with_kind(list_objects(kube, profiles_path()), API_VERSION, "NodePowerProfile"),
        pods=_with_kind(list_objects(kube, "/api/v1/pods", WORKLOAD_LABEL), "v1", "Pod"),
    )

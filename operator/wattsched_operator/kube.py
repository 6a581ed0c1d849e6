"""A small synchronous JSON client for the few Kubernetes calls the planning loop makes.

Wraps the `kubernetes` package's authenticated transport (kubeconfig or in-cluster) and sends and
receives plain dicts on explicit paths, so pods and custom objects need no generated models and no
discovery. The loop runs these calls in worker threads. Not for watching: kopf does that.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from wattsched_operator.commandline import one_line

GROUP_PATH = "/apis/wattsched.io/v1alpha1"
MERGE_PATCH = "application/merge-patch+json"
# Objects per page of a list: bounds the memory of one response whatever the cluster holds.
LIST_PAGE_SIZE = 500
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeError(Exception):
    """A Kubernetes API call that failed; `status` is the HTTP status (0 when none came back)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.method = method
        self.path = path
        self.status = status
        self.message = _api_message(body)


def _api_message(body: str) -> str:
    """The `message` of a Kubernetes Status body, or the body itself."""
    try:
        status = json.loads(body)
    except ValueError:
        return body[:1000]
    message = status.get("message") if isinstance(status, dict) else None
    return message if isinstance(message, str) else body[:1000]


def workloads_path(namespace: str, name: str = "") -> str:
    base = f"{GROUP_PATH}/namespaces/{namespace}/llmworkloads"
    return f"{base}/{name}" if name else base


def budgets_path(name: str = "") -> str:
    return f"{GROUP_PATH}/energybudgets/{name}" if name else f"{GROUP_PATH}/energybudgets"


def profiles_path(name: str = "") -> str:
    base = f"{GROUP_PATH}/nodepowerprofiles"
    return f"{base}/{name}" if name else base


def pods_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/pods"
    return f"{base}/{name}" if name else base


def load_kubeconfig(kubeconfig: str | None, configuration: client.Configuration) -> None:
    """Load `kubeconfig` (None: $KUBECONFIG or ~/.kube/config) into `configuration`.

    Raises ConfigException for a file that is missing, not YAML or not a kubeconfig.
    """
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    except config.ConfigException:
        raise
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
        raise config.ConfigException(
            f"{kubeconfig or 'the kubeconfig'}: not a usable kubeconfig: {one_line(error)}"
        ) from error


def default_namespace(kubeconfig: str | None) -> str:
    """The namespace a command uses when none is given, as kubectl does: the kubeconfig's current
    context's namespace, else the pod's own namespace when running in a cluster, else `default`.
    """
    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        active = None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
        raise config.ConfigException(
            f"{kubeconfig or 'the kubeconfig'}: not a usable kubeconfig: {one_line(error)}"
        ) from error
    if active is not None:
        return str((active.get("context") or {}).get("namespace") or "default")
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


class Kube:
    """Authenticated JSON calls: get, list, create, merge-patch, delete."""

    def __init__(self, kubeconfig: str | None = None, pool_size: int = 32) -> None:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            load_kubeconfig(kubeconfig, configuration)
        configuration.connection_pool_maxsize = pool_size
        self._api = client.ApiClient(configuration)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        parse: bool = True,
    ) -> dict[str, Any]:
        """One call; the response body as a dict (empty when `parse` is False, to save memory)."""
        serialized = self._api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(*serialized, _request_timeout=30)
        except client.ApiException as error:
            raise KubeError(
                method, path, int(error.status or 0), str(error.body or error)
            ) from error
        raw = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            text = raw.decode() if isinstance(raw, bytes) else str(raw or "")
            raise KubeError(method, path, response.status, text)
        if not parse or not raw:
            return {}
        parsed: dict[str, Any] = json.loads(raw)  # bytes: no decoded copy of a large body
        return parsed

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def list(
        self,
        path: str,
        label_selector: str | None = None,
        *,
        keep: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        page_size: int = LIST_PAGE_SIZE,
    ) -> list[dict[str, Any]]:
        """Every object at `path`, fetched in pages of `page_size` (`limit` + `continue`).

        `keep` turns each object into what the caller holds on to, page by page, so a list of
        thousands of objects never has all of their full bodies in memory at once.
        """
        query = {"limit": str(page_size)}
        if label_selector:
            query["labelSelector"] = label_selector
        items: list[dict[str, Any]] = []
        while True:
            page = self.request("GET", path, query=query)
            items += map(keep, page.get("items") or []) if keep else page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            query["continue"] = token

    def create(self, path: str, body: Mapping[str, Any], parse: bool = True) -> dict[str, Any]:
        return self.request("POST", path, body=dict(body), parse=parse)

    def merge_patch(self, path: str, body: Mapping[str, Any], parse: bool = True) -> dict[str, Any]:
        return self.request("PATCH", path, body=dict(body), content_type=MERGE_PATCH, parse=parse)

    def write(self, path: str, body: Mapping[str, Any], patch: bool = True) -> None:
        """A create (POST) or merge-patch whose response is not needed."""
        if patch:
            self.merge_patch(path, body, parse=False)
        else:
            self.create(path, body, parse=False)

    def delete(self, path: str, grace_period_seconds: int | None = None) -> None:
        """Delete; already gone is fine. A grace period of 0 needs no kubelet to confirm."""
        options = (
            None if grace_period_seconds is None else {"gracePeriodSeconds": grace_period_seconds}
        )
        try:
            self.request("DELETE", path, options, parse=False)
        except KubeError as error:
            if error.status != 404:
                raise

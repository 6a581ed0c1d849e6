"""A small synchronous JSON client for the few Kubernetes calls the planning loop makes.

Wraps the `kubernetes` package's authenticated transport (kubeconfig or in-cluster) and sends and
receives plain dicts on explicit paths, so pods and custom objects need no generated models and no
discovery. The loop runs these calls in worker threads. Not for watching: kopf does that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config

GROUP_PATH = "/apis/wattsched.io/v1alpha1"
MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """A Kubernetes API call that failed; `status` is the HTTP status (0 when none came back)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
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


class Kube:
    """Authenticated JSON calls: get, list, create, merge-patch, delete."""

    def __init__(self, kubeconfig: str | None = None, pool_size: int = 32) -> None:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
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
        text = raw.decode() if isinstance(raw, bytes) else str(raw or "")
        if not 200 <= response.status <= 299:
            raise KubeError(method, path, response.status, text)
        if not parse:
            return {}
        parsed: dict[str, Any] = json.loads(text) if text else {}
        return parsed

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        items: list[dict[str, Any]] = self.request("GET", path, query=query).get("items") or []
        return items

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

"""A small synchronous JSON client for the few Kubernetes calls the planning loop makes.

Wraps the `kubernetes` package's authenticated transport (kubeconfig or in-cluster) and sends and
receives plain dicts on explicit paths, so pods and custom objects need no generated models and no
discovery. The loop runs these calls in worker threads; `watch_lines` streams a watch for the
operator's own watches (`watch`).
"""

from __future__ import annotations

import builtins
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client, config

from wattsched_api.commandline import (
    EXIT_CLUSTER,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    CommandError,
    one_line,
)

GROUP_PATH = "/apis/wattsched.io/v1alpha1"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Objects per page of a list: bounds the memory of one response whatever the cluster holds.
LIST_PAGE_SIZE = 500
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# The API server decodes JSON with Go's encoding/json, which refuses objects nested deeper than
# 10,000 levels (its scanner's maxNestingDepth); under the free-form parts of a CRD schema (an
# LLMWorkload's spec.template) nothing else bounds the depth. kopf and this client decode with
# Python's json, whose C decoder counts each level against the interpreter's recursion limit
# (1,000 by default): one LLMWorkload 990 levels deep stopped the watch, and the operator with it.
API_SERVER_MAX_JSON_DEPTH = 10_000
# kopf copies and compares bodies with copy.deepcopy and recursive generators (two frames a level),
# on top of the frames of the event loop and kopf's reactor. Measured: decoding, encoding, copying
# and diffing a 10,000-level object at this limit needs under 8 MiB of C stack (Linux's default,
# for the main thread and every thread) on CPython 3.11.
RECURSION_LIMIT = 3 * API_SERVER_MAX_JSON_DEPTH + 2_000


def decode_any_stored_object() -> None:
    """Raise the interpreter's recursion limit (never lower it) so that this process decodes,
    copies and compares any object the API server stores: one tenant's 10,000-level LLMWorkload
    must not stop the operator or the CLI commands that read the cluster."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))


# The HTTP statuses the operator tells apart in a failed call (`KubeError.status`).
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
HTTP_TOO_MANY_REQUESTS = 429


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


def _kubeconfig_hint(flag: str | None = None) -> str:
    """Which kubeconfig was used: the --kubeconfig flag's file when given (and not just $KUBECONFIG,
    which some flags default to), else $KUBECONFIG's."""
    kubeconfig = os.environ.get("KUBECONFIG")
    if flag and flag != kubeconfig:
        return f"--kubeconfig {flag}"
    return f"KUBECONFIG={kubeconfig}" if kubeconfig else "KUBECONFIG unset: ~/.kube/config"


def _http_error(status: int, what: str, message: str) -> CommandError:
    if status in (401, 403):
        return CommandError(
            f"the API server refused {what} (HTTP {status}: {message}): check the credentials "
            "in your kubeconfig and that your RBAC role allows it",
            EXIT_CLUSTER,
        )
    if status == 404:
        return CommandError(
            f"{what}: not found (HTTP 404: {message}): check the name and namespace, and that "
            "the wattsched CRDs are installed (kubectl apply -f crds/, or the chart)",
            EXIT_NOT_FOUND,
        )
    return CommandError(f"{what}: HTTP {status}: {message}", EXIT_FAILED)


def cluster_error(error: BaseException, kubeconfig: str | None = None) -> CommandError | None:
    """The one-line error for a Kubernetes client failure, or None for anything else.

    `kubeconfig` is the file the command's --kubeconfig named (None: $KUBECONFIG or the default).
    """
    if isinstance(error, config.ConfigException):
        return CommandError(
            f"no usable kubeconfig ({_kubeconfig_hint(kubeconfig)}): {error}: set KUBECONFIG or "
            "--kubeconfig to your cluster's kubeconfig",
            EXIT_CLUSTER,
        )
    if isinstance(error, urllib3.exceptions.MaxRetryError | urllib3.exceptions.HTTPError):
        pool = getattr(error, "pool", None)
        server = f"{pool.scheme}://{pool.host}:{pool.port}" if pool is not None else "?"
        reason = str(getattr(error, "reason", None) or error)
        reason = reason[reason.index("[Errno") :] if "[Errno" in reason else reason
        return CommandError(
            f"cannot reach the API server {server} ({reason}): check that the cluster is up "
            f"and that the kubeconfig ({_kubeconfig_hint(kubeconfig)}) names the right server",
            EXIT_CLUSTER,
        )
    if isinstance(error, KubeError):
        return _http_error(error.status, f"{error.method} {error.path}", error.message)
    if isinstance(error, client.ApiException):
        return _http_error(int(error.status or 0), "a Kubernetes API call", str(error.reason))
    return None


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


def services_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/services"
    return f"{base}/{name}" if name else base


def load_kubeconfig(kubeconfig: str | None, configuration: client.Configuration) -> None:
    """Load `kubeconfig` (None: $KUBECONFIG or ~/.kube/config) into `configuration`.

    Raises ConfigException for a file that is missing, not YAML or not a kubeconfig.
    """
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
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
        self.kubeconfig = kubeconfig  # the file --kubeconfig named, for error messages
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            load_kubeconfig(kubeconfig, configuration)
        configuration.connection_pool_maxsize = pool_size
        decode_any_stored_object()
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
        items, _ = self.list_with_version(path, label_selector, keep=keep, page_size=page_size)
        return items

    def list_with_version(
        self,
        path: str,
        label_selector: str | None = None,
        *,
        keep: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        page_size: int = LIST_PAGE_SIZE,
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        """As `list`, with the list's resourceVersion (where a watch of the same path starts)."""
        query = {"limit": str(page_size)}
        if label_selector:
            query["labelSelector"] = label_selector
        items: builtins.list[dict[str, Any]] = []
        while True:
            page = self.request("GET", path, query=query)
            items += map(keep, page.get("items") or []) if keep else page.get("items") or []
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion") or "")
            query["continue"] = token

    def watch_lines(
        self,
        path: str,
        query: Mapping[str, str],
        *,
        read_timeout_seconds: float,
        opened: Callable[[Any], None] = lambda response: None,
    ) -> Iterator[bytes]:
        """The lines of a watch (`?watch=1`) at `path`, one JSON event each, as they come; ends
        when the server ends the watch. `opened` gets the response (closing it from another
        thread ends the iteration). A refused watch raises `KubeError`."""
        serialized = self._api.param_serialize(
            "GET",
            path,
            query_params=[("watch", "1"), *query.items()],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(
                *serialized, _request_timeout=(30, read_timeout_seconds)
            ).response
        except client.ApiException as error:
            raise KubeError(
                "GET", path, int(error.status or 0), str(error.body or error)
            ) from error
        try:
            if not 200 <= response.status <= 299:
                raise KubeError(
                    "GET", path, response.status, response.data.decode(errors="replace")
                )
            opened(response)
            rest = b""
            for chunk in response.stream(64 * 1024, decode_content=True):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                yield from (line for line in lines if line.strip())
            if rest.strip():
                yield rest
        finally:
            response.release_conn()

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
            if error.status != HTTP_NOT_FOUND:
                raise

"""Which pod-creation failures the operator reports on the workload (and retries with backoff)
instead of retrying at once."""

from __future__ import annotations

import json

import pytest

from wattsched_operator.apply import refuses_the_pod
from wattsched_operator.kube import KubeError

POD_SECURITY = (
    'pods "escalate-0" is forbidden: violates PodSecurity "restricted:latest": '
    'unrestricted capabilities (container "main" must not include "SYS_ADMIN")'
)


def status_body(code: int, message: str) -> str:
    return json.dumps({"kind": "Status", "status": "Failure", "code": code, "message": message})


def test_the_api_servers_message_is_read_from_its_status_body() -> None:
    error = KubeError("POST", "/api/v1/namespaces/a/pods", 403, status_body(403, POD_SECURITY))
    assert error.message == POD_SECURITY


def test_a_body_that_is_not_json_is_kept_as_the_message() -> None:
    assert KubeError("POST", "/x", 502, "bad gateway").message == "bad gateway"


def test_pod_security_rejection_refuses_the_pod() -> None:
    error = KubeError("POST", "/api/v1/namespaces/a/pods", 403, status_body(403, POD_SECURITY))
    assert refuses_the_pod(error)


def test_an_invalid_pod_refuses_the_pod() -> None:
    message = 'Pod "x-0" is invalid: spec.containers[0].image: Required value'
    assert refuses_the_pod(KubeError("POST", "/p", 422, status_body(422, message)))


def test_a_malformed_pod_refuses_the_pod() -> None:
    # What the API server answers for `image: 123` in the template (a 400, not a 422).
    message = (
        'Pod in version "v1" cannot be handled as a Pod: json: cannot unmarshal number into '
        "Go struct field Container.spec.containers.image of type string"
    )
    assert refuses_the_pod(KubeError("POST", "/p", 400, status_body(400, message)))


@pytest.mark.parametrize("code", [403, 404, 413])
def test_every_other_refusal_is_reported_too(code: int) -> None:
    # An RBAC denial, a quota, a namespace being deleted, a too-large pod: reported on the
    # workload and retried with backoff, never in a hot loop.
    assert refuses_the_pod(KubeError("POST", "/p", code, status_body(code, "refused")))


def test_a_conflict_throttling_or_server_error_is_retried() -> None:
    assert not refuses_the_pod(KubeError("POST", "/p", 409, status_body(409, "exists")))
    assert not refuses_the_pod(KubeError("POST", "/p", 429, status_body(429, "slow down")))
    assert not refuses_the_pod(KubeError("POST", "/p", 500, status_body(500, "etcd")))

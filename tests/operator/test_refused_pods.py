"""Which pod-creation failures the operator reports on the workload instead of retrying."""

from __future__ import annotations

import json

from wattsched_operator.kube import KubeError
from wattsched_operator.loop import refuses_the_template

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


def test_pod_security_rejection_refuses_the_template() -> None:
    error = KubeError("POST", "/api/v1/namespaces/a/pods", 403, status_body(403, POD_SECURITY))
    assert refuses_the_template(error)


def test_an_invalid_pod_refuses_the_template() -> None:
    message = 'Pod "x-0" is invalid: spec.containers[0].image: Required value'
    assert refuses_the_template(KubeError("POST", "/p", 422, status_body(422, message)))


def test_an_rbac_denial_is_the_operators_problem_not_the_templates() -> None:
    message = (
        'pods is forbidden: User "system:serviceaccount:w:op" cannot create resource "pods" '
        'in API group "" in the namespace "a"'
    )
    assert not refuses_the_template(KubeError("POST", "/p", 403, status_body(403, message)))


def test_a_conflict_or_server_error_is_retried() -> None:
    assert not refuses_the_template(KubeError("POST", "/p", 409, status_body(409, "exists")))
    assert not refuses_the_template(KubeError("POST", "/p", 500, status_body(500, "etcd")))

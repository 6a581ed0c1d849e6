"""Objects nested as deep as the API server allows (10,000 levels under a free-form field) cost
the operator neither its process nor a round: they decode, are cached, and are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from wattsched_api import ApiValidationError, parse_llmworkload
from wattsched_api.llmworkload import MAX_TEMPLATE_DEPTH
from wattsched_operator.cache import WORKLOADS, ClusterCache
from wattsched_operator.handlers import record
from wattsched_operator.kube import API_SERVER_MAX_JSON_DEPTH


def nested(levels: int) -> Any:
    """A value of `levels` nested objects: {"a": {"a": ... 1}}."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def workload(template_extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "deep", "namespace": "team", "uid": "u1", "resourceVersion": "1"},
        "spec": {
            "type": "Inference",
            "model": {"name": "m", "parametersBillions": 8},
            "gpu": {"count": 1},
            "slo": {"tokensPerSecond": 10},
            "template": {
                "spec": {"containers": [{"name": "main", "image": "x"}], "x": template_extra}
            },
        },
    }


@pytest.mark.parametrize("levels", [MAX_TEMPLATE_DEPTH, API_SERVER_MAX_JSON_DEPTH])
def test_a_template_deeper_than_the_limit_is_refused_naming_the_field_and_the_limit(
    levels: int,
) -> None:
    with pytest.raises(ApiValidationError) as caught:
        parse_llmworkload(workload(nested(levels)))
    message = str(caught.value)
    assert "spec.template:" in message
    assert f"more than {MAX_TEMPLATE_DEPTH} levels" in message
    assert "\n" not in message


def test_a_template_as_deep_as_a_real_pod_template_is_accepted() -> None:
    # spec.template.spec.x + 12 levels: deeper than any PodTemplateSpec field path.
    parsed = parse_llmworkload(workload(nested(12)))
    assert parsed.spec.template["spec"]["x"] == nested(12)


def test_the_cache_keeps_a_10000_level_object_without_recursing_through_it() -> None:
    cache = ClusterCache()
    body = workload(nested(API_SERVER_MAX_JSON_DEPTH))
    assert record(cache, WORKLOADS, "ADDED", body)
    kept = cache.get(WORKLOADS, "team/deep")
    assert kept is not None
    assert kept["spec"]["template"]["spec"]["x"] == body["spec"]["template"]["spec"]["x"]


def test_the_operators_recursion_limit_decodes_copies_and_diffs_what_the_api_server_accepts() -> (
    None
):
    # kopf decodes every watch event with json.loads, copies bodies with copy.deepcopy and diffs
    # them recursively. Under Python's default limit (1,000) a 990-level object killed the watch;
    # under the operator's, the deepest object the API server stores goes through all three, in
    # the main thread and in a worker thread (a fresh interpreter: the limit is process-wide).
    script = """
import copy, json, sys, threading
from kopf._cogs.structs import diffs
from wattsched_operator.kube import API_SERVER_MAX_JSON_DEPTH, RECURSION_LIMIT
sys.setrecursionlimit(RECURSION_LIMIT)
line = sys.stdin.read()
def work():
    body = json.loads(line)
    copied = copy.deepcopy(body)
    assert list(diffs.diff(copied, body)) == []
    json.dumps(copied)
work()
thread = threading.Thread(target=work)
thread.start()
thread.join()
print("ok")
"""
    levels = API_SERVER_MAX_JSON_DEPTH - 10  # the rest of the body adds the other levels
    deep_text = '{"a":' * levels + "1" + "}" * levels  # json.dumps here would recurse
    line = json.dumps(workload("DEEP")).replace('"DEEP"', deep_text)
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        input=line,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
    # And under the default limit, the same line is what stopped the operator.
    default = subprocess.run(
        [sys.executable, "-c", "import json, sys; json.loads(sys.stdin.read())"],
        check=False,
        input=line,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "RecursionError" in default.stderr

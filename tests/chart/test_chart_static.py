"""The chart without a cluster: lint, values documentation and schema, CRD links, rendered defaults.

What is rendered is checked here (security settings, RBAC rules, selectors); whether the API server
accepts it and what it allows is checked on the sandbox (test_chart_cluster.py, test_rbac.py).
Not for: behaviour on a cluster.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import (
    CHART_DIR,
    REPO_ROOT,
    Chart,
    HelmError,
    Manifest,
    ci_values_files,
    find,
)

SIMULATED = ("agent.backend=simulated",)


def _pod_spec(manifest: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def _container(manifest: Manifest) -> dict[str, Any]:
    containers = _pod_spec(manifest)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _rules(manifests: list[Manifest], name_suffix: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = find(manifests, "ClusterRole", name_suffix)["rules"]
    return rules


@pytest.mark.parametrize("values_file", ci_values_files(), ids=lambda p: p.name)
def test_lint_strict_passes_for_every_ci_scenario(chart: Chart, values_file: Path) -> None:
    result = chart.helm("lint", "--strict", str(chart.directory), "--values", str(values_file))
    assert "0 chart(s) failed" in result.stdout


def test_every_ci_scenario_renders_something_different(chart: Chart) -> None:
    renders = {path.name: chart.render_text((path,)) for path in ci_values_files()}
    assert len(renders) >= 5
    assert len(set(renders.values())) == len(renders), "two ci scenarios render the same objects"


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every property the schema itself defines (not inside free-form Kubernetes objects)."""
    paths: dict[str, dict[str, Any]] = {}
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths[path] = sub
        paths.update(_schema_paths(sub, f"{path}."))
    return paths


def _values_key_lines(text: str) -> list[tuple[str, int]]:
    """(dotted key path, line index) of every mapping key in values.yaml, nested ones included.

    Keys inside list items are the list's data (described by the list key's comment), not values.
    """
    keys: list[tuple[str, int]] = []

    def walk(node: yaml.Node | None, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            keys.append((path, key.start_mark.line))
            walk(value, f"{path}.")

    walk(yaml.compose(text), "")
    return keys


def _has_comment(lines: list[str], index: int) -> bool:
    """A comment line directly above line `index`, or a comment at the end of it."""
    above = index > 0 and lines[index - 1].strip().startswith("#")
    return above or re.search(r"\s#\s", lines[index]) is not None


def test_values_key_lines_finds_nested_keys_and_comments() -> None:
    text = "# -- a\na:\n  b: 1\n  # -- c\n  c: 2  # inline\n  d: [x]\n"
    keys = _values_key_lines(text)
    assert keys == [("a", 1), ("a.b", 2), ("a.c", 4), ("a.d", 5)]
    lines = text.splitlines()
    assert [path for path, index in keys if not _has_comment(lines, index)] == ["a.b", "a.d"]


def test_every_chart_value_has_a_comment_above_it() -> None:
    text = (CHART_DIR / "values.yaml").read_text()
    lines = text.splitlines()
    uncommented = [
        f"{path} (line {index + 1})"
        for path, index in _values_key_lines(text)
        if not _has_comment(lines, index)
    ]
    assert uncommented == [], f"values without a comment above them or at their end: {uncommented}"


def test_every_value_in_values_yaml_is_in_the_schema() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    documented = _schema_paths(schema)

    def walk(node: dict[str, Any], sub_schema: dict[str, Any], prefix: str) -> list[str]:
        missing = []
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path not in documented:
                missing.append(path)
                continue
            child = documented[path]
            if isinstance(value, dict) and "properties" in child:
                missing += walk(value, child, f"{path}.")
        return missing

    assert walk(values, schema, "") == []


def test_schema_describes_every_property_and_closes_every_object() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    paths = _schema_paths(schema)
    assert len(paths) > 100
    assert [path for path, sub in paths.items() if not sub.get("description")] == []
    open_objects = [
        path
        for path, sub in paths.items()
        if "properties" in sub and sub.get("additionalProperties") is not False
    ]
    assert open_objects == []
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("assignment", "complaint"),
    [
        ("operator.replicaz=2", "replicaz"),
        ("agent.backend=dcgm", "backend"),
        ("operator.replicas=3", "replicas"),
        ("agent.nvml.capabilities[0]=NET_ADMIN", "capabilities"),
        ("agent.securityContext.capabilities.add[0]=SYS_ADMIN", "securityContext"),
        ("image.digest=latest", "digest"),
        ("operator.horizonHours=-1", "horizonHours"),
    ],
)
def test_schema_rejects_values_it_does_not_allow(
    chart: Chart, assignment: str, complaint: str
) -> None:
    with pytest.raises(HelmError, match=complaint):
        chart.render(set_values=(assignment,))


def test_two_operator_replicas_without_peering_are_refused(chart: Chart) -> None:
    with pytest.raises(HelmError, match="peering"):
        chart.render(set_values=("operator.replicas=2", "peering.enabled=false"))


def test_chart_crds_are_identical_copies_of_the_repository_crds() -> None:
    sources = sorted(path.name for path in (REPO_ROOT / "crds").glob("*.yaml"))
    assert sources, "no CRDs in crds/"
    for name in sources:
        copy = CHART_DIR / "crds" / name
        assert not copy.is_symlink(), f"charts/wattsched/crds/{name}: a link (helm warns); copy it"
        assert copy.read_bytes() == (REPO_ROOT / "crds" / name).read_bytes(), (
            f"charts/wattsched/crds/{name} differs from crds/{name}: run `make chart-crds`"
        )
    chart_only = {path.name for path in (CHART_DIR / "crds").glob("*.yaml")} - set(sources)
    assert chart_only == {"kopf.dev_clusterkopfpeerings.yaml"}


def test_helm_template_needs_no_kube_version_and_warns_about_nothing(chart: Chart) -> None:
    """Our helm is built with helm's Kubernetes version link flags (sandbox/build.sh): without
    them it assumes v1.20 and the chart's kubeVersion refuses it; links in the chart would make
    it print `found symbolic link` warnings."""
    result = chart.helm("template", "wattsched", str(chart.directory), "--include-crds")
    assert result.stderr == ""
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = {doc["kind"] for doc in documents}
    assert {"CustomResourceDefinition", "Deployment", "DaemonSet"} <= kinds
    lint = chart.helm("lint", str(chart.directory))
    assert "symbolic link" not in lint.stdout + lint.stderr


def test_packaged_chart_carries_exactly_the_repository_crds(chart: Chart, tmp_path: Path) -> None:
    chart.helm("package", str(chart.directory), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("wattsched-*.tgz")
    with tarfile.open(package) as archive:
        packaged = {
            Path(member.name).name: archive.extractfile(member).read().decode()  # type: ignore[union-attr]
            for member in archive.getmembers()
            if member.name.startswith("wattsched/crds/")
        }
    expected = {path.name: path.read_text() for path in (REPO_ROOT / "crds").glob("*.yaml")}
    expected["kopf.dev_clusterkopfpeerings.yaml"] = (
        CHART_DIR / "crds" / "kopf.dev_clusterkopfpeerings.yaml"
    ).read_text()
    assert packaged == expected
    for name, text in packaged.items():
        documents = [doc for doc in yaml.safe_load_all(text) if doc]
        assert [doc["kind"] for doc in documents] == ["CustomResourceDefinition"], name


def test_operator_runs_non_root_read_only_without_privileges(chart: Chart) -> None:
    deployment = find(chart.render(), "Deployment", "-operator")
    pod = _pod_spec(deployment)
    container = _container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")


def test_operator_probes_hit_its_health_endpoint(chart: Chart) -> None:
    container = _container(find(chart.render(), "Deployment", "-operator"))
    health_port = next(p for p in container["ports"] if p["name"] == "health")
    assert health_port["containerPort"] == 8080
    assert "--health-port=8080" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_operator_uses_peering_by_default_and_standalone_without_it(chart: Chart) -> None:
    default = _container(find(chart.render(), "Deployment", "-operator"))
    assert "--peering=wattsched" in default["args"]
    standalone = find(
        chart.render(set_values=("peering.enabled=false",)), "Deployment", "-operator"
    )
    assert "--standalone" in _container(standalone)["args"]
    assert standalone["spec"]["strategy"] == {"type": "Recreate"}


def test_operator_plans_a_day_ahead_by_default_and_the_horizon_is_a_value(chart: Chart) -> None:
    default = _container(find(chart.render(), "Deployment", "-operator"))
    assert "--horizon-hours=24" in default["args"]
    off = find(chart.render(set_values=("operator.horizonHours=0",)), "Deployment", "-operator")
    assert "--horizon-hours=0" in _container(off)["args"]


def test_nvml_agent_gets_sys_admin_and_nothing_else(chart: Chart) -> None:
    daemonset = find(chart.render(), "DaemonSet", "-agent")
    pod = _pod_spec(daemonset)
    security = _container(daemonset)["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["runtimeClassName"] == "nvidia"
    # The one hostPath: the kubelet's PodResources socket directory, read-only (which GPU is whose).
    host_paths = [volume for volume in pod["volumes"] if "hostPath" in volume]
    assert host_paths == [
        {
            "name": "pod-resources",
            "hostPath": {"path": "/var/lib/kubelet/pod-resources", "type": "Directory"},
        }
    ]
    mounts = {m["name"]: m for m in _container(daemonset)["volumeMounts"]}
    assert mounts["pod-resources"]["readOnly"] is True
    assert mounts["pod-resources"]["mountPath"] == "/var/lib/kubelet/pod-resources"
    args = _container(daemonset)["args"]
    assert "--pod-resources-socket=/var/lib/kubelet/pod-resources/kubelet.sock" in args
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")
    assert not pod.get("hostIPC")
    env = {item["name"]: item.get("value") for item in _container(daemonset)["env"]}
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    requests = _container(daemonset)["resources"]["requests"]
    assert "nvidia.com/gpu" not in requests, "the agent must not take a GPU from workloads"


def test_simulated_agent_runs_non_root_without_capabilities(chart: Chart) -> None:
    daemonset = find(chart.render(set_values=SIMULATED), "DaemonSet", "-agent")
    pod = _pod_spec(daemonset)
    container = _container(daemonset)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "runtimeClassName" not in pod
    assert "NVIDIA_VISIBLE_DEVICES" not in {item["name"] for item in container["env"]}
    assert not any("hostPath" in volume for volume in pod["volumes"])


def test_agent_runs_on_gpu_nodes_and_knows_its_node(chart: Chart) -> None:
    daemonset = find(chart.render(), "DaemonSet", "-agent")
    pod = _pod_spec(daemonset)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    container = _container(daemonset)
    node_name = next(item for item in container["env"] if item["name"] == "NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "--node-name=$(NODE_NAME)" in container["args"]


def test_no_role_grants_secrets_wildcards_or_escalation(chart: Chart) -> None:
    manifests = (
        chart.render(values_files=(CHART_DIR / "ci" / "workload-namespaces-values.yaml",))
        + chart.render()
    )
    rules = [rule for m in manifests if m["kind"] in {"ClusterRole", "Role"} for rule in m["rules"]]
    assert rules
    forbidden_resources = {
        "secrets",
        "configmaps",
        "pods/exec",
        "pods/attach",
        "serviceaccounts/token",
    }
    forbidden_verbs = {"*", "escalate", "bind", "impersonate", "deletecollection"}
    for rule in rules:
        assert "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
        assert not forbidden_resources & set(rule["resources"]), rule
        assert not forbidden_verbs & set(rule["verbs"]), rule
        assert "rbac.authorization.k8s.io" not in rule["apiGroups"], rule


def test_operator_never_writes_profile_status_and_agent_never_writes_profile_spec(
    chart: Chart,
) -> None:
    manifests = chart.render()
    operator_rules = _rules(manifests, "-operator")
    agent_rules = _rules(manifests, "-agent")
    assert not any("nodepowerprofiles/status" in rule["resources"] for rule in operator_rules)
    agent_profile_verbs = {
        verb
        for rule in agent_rules
        if "nodepowerprofiles" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert agent_profile_verbs == {"get", "list", "watch"}


def test_workload_namespaces_move_pod_writes_into_role_bindings(chart: Chart) -> None:
    manifests = chart.render(values_files=(CHART_DIR / "ci" / "workload-namespaces-values.yaml",))
    cluster_pod_verbs = {
        verb
        for rule in _rules(manifests, "-operator")
        if "pods" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert cluster_pod_verbs == {"get", "list", "watch"}
    bindings = [m for m in manifests if m["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert {b["roleRef"]["name"] for b in bindings} == {"wattsched-operator-workload-pods"}
    args = _container(find(manifests, "Deployment", "-operator"))["args"]
    assert [arg for arg in args if arg.startswith("--namespace=")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_own_node_policy_matches_only_the_agent_service_account(chart: Chart) -> None:
    manifests = chart.render()
    policy = find(manifests, "ValidatingAdmissionPolicy", "-agent-own-node")
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == (
        'request.userInfo.username == "system:serviceaccount:wattsched-system:wattsched-agent"'
    )
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert {"nodepowerprofiles", "nodepowerprofiles/status"} <= set(rules[0]["resources"])
    binding = find(manifests, "ValidatingAdmissionPolicyBinding", "-agent-own-node")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }


def test_service_monitors_select_their_services_metrics_port(chart: Chart) -> None:
    manifests = chart.render(values_files=(CHART_DIR / "ci" / "monitoring-values.yaml",))
    monitors = [m for m in manifests if m["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        component = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        service = find(manifests, "Service", f"-{component}")
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        port_names = {port["name"] for port in service["spec"]["ports"]}
        assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= port_names
    assert not [m for m in chart.render() if m["kind"] == "ServiceMonitor"]


def test_services_select_the_pods_that_serve_metrics(chart: Chart) -> None:
    manifests = chart.render()
    for component, workload_kind in (("operator", "Deployment"), ("agent", "DaemonSet")):
        service = find(manifests, "Service", f"-{component}")
        workload = find(manifests, workload_kind, f"-{component}")
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        container_ports = {port["name"] for port in _container(workload)["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports


def test_pod_disruption_budget_selects_the_operator(chart: Chart) -> None:
    manifests = chart.render()
    budget = find(manifests, "PodDisruptionBudget", "-operator")
    deployment = find(manifests, "Deployment", "-operator")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


def test_default_energy_budget_is_rendered_only_when_enabled(chart: Chart) -> None:
    assert not [m for m in chart.render() if m["kind"] == "EnergyBudget"]
    budget = find(
        chart.render(values_files=(CHART_DIR / "ci" / "sandbox-values.yaml",)), "EnergyBudget"
    )
    assert budget["spec"] == {"powerCapWatts": 40000, "pue": 1.3}
    assert "namespace" not in budget["metadata"]


def _dashboard_expressions(chart: Chart) -> str:
    config_map = find(chart.render(), "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["wattsched.json"])
    return " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )


def test_dashboard_covers_power_cap_energy_tokens_per_joule_and_solve_time(chart: Chart) -> None:
    expressions = _dashboard_expressions(chart)
    for metric in (
        "wattsched_budget_cap_watts",  # the cap
        "DCGM_FI_DEV_POWER_USAGE",  # measured cluster power
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",  # energy per workload pod
        "vllm:generation_tokens_total",  # tokens per joule
        "wattsched_plan_solve_seconds_bucket",  # plan solve time
    ):
        assert metric in expressions


def test_dashboard_uses_only_metrics_the_operator_exports(chart: Chart) -> None:
    from wattsched_operator.metrics import OperatorMetrics  # noqa: PLC0415

    registry = OperatorMetrics().registry
    families = list(registry.collect())
    exported = (
        {sample.name for family in families for sample in family.samples}
        | {family.name for family in families}
        | {f"{family.name}_total" for family in families if family.type == "counter"}
    )
    referenced = set(re.findall(r"\bwattsched_[a-z_]+", _dashboard_expressions(chart)))
    assert referenced
    assert referenced - exported == set()


def test_helm_test_pod_checks_operator_health_and_metrics(chart: Chart) -> None:
    pod = find(chart.render(), "Pod", "-helm-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert '"http://wattsched-operator.wattsched-system.svc:8080/healthz"' in script
    assert '"http://wattsched-operator.wattsched-system.svc:9090/metrics"' in script
    compile(script, "helm-test", "exec")


def test_tokens_query_value_reaches_the_operators_telemetry_config(chart: Chart) -> None:
    from wattsched_operator.run import parse_args as parse_operator_args  # noqa: PLC0415
    from wattsched_operator.run import telemetry_config  # noqa: PLC0415

    values_file = CHART_DIR / "ci" / "monitoring-values.yaml"
    tokens_query = yaml.safe_load(values_file.read_text())["operator"]["tokensQuery"]
    # quotes and braces that must survive rendering into the container's args
    assert '"' in tokens_query
    assert "{window}" in tokens_query
    operator_args = _container(
        find(chart.render(values_files=(values_file,)), "Deployment", "-operator")
    )["args"]
    assert f"--tokens-query={tokens_query}" in operator_args
    config = telemetry_config(parse_operator_args(operator_args[1:]))
    assert config is not None
    assert config.token_query == tokens_query


def test_heartbeat_timeout_value_reaches_the_operator(chart: Chart) -> None:
    from wattsched_operator.run import parse_args as parse_operator_args  # noqa: PLC0415

    def timeout(*set_values: str) -> float:
        args = _container(find(chart.render(set_values=set_values), "Deployment", "-operator"))
        seconds: float = parse_operator_args(args["args"][1:]).heartbeat_timeout_seconds
        return seconds

    assert timeout() == 30
    assert timeout("operator.heartbeatTimeoutSeconds=45") == 45
    with pytest.raises(HelmError, match="heartbeatTimeoutSeconds"):
        chart.render(set_values=("operator.heartbeatTimeoutSeconds=0",))


def test_tokens_query_is_left_to_the_operator_default_unless_set(chart: Chart) -> None:
    operator_args = _container(find(chart.render(), "Deployment", "-operator"))["args"]
    assert not [arg for arg in operator_args if arg.startswith("--tokens-query")]


def test_tokens_query_without_prometheus_url_is_refused(chart: Chart) -> None:
    with pytest.raises(HelmError, match=r"operator\.tokensQuery needs operator\.prometheusUrl"):
        chart.render(set_values=("operator.tokensQuery=sum(rate(x[{window}]))",))


@pytest.mark.parametrize("values_file", ci_values_files(), ids=lambda p: p.name)
def test_rendered_arguments_are_accepted_by_the_components(chart: Chart, values_file: Path) -> None:
    from wattsched_agent.cli import parse_args as parse_agent_args  # noqa: PLC0415
    from wattsched_operator.run import parse_args as parse_operator_args  # noqa: PLC0415

    manifests = chart.render(values_files=(values_file,))
    operator_args = _container(find(manifests, "Deployment", "-operator"))["args"]
    assert operator_args[0] == "operator"
    parsed = parse_operator_args(operator_args[1:])
    assert parsed.health_port == 8080
    assert parsed.metrics_port == 9090
    assert parsed.standalone == (not _peering_enabled(values_file))
    for daemonset in (m for m in manifests if m["kind"] == "DaemonSet"):
        agent_args = _container(daemonset)["args"]
        assert agent_args[0] == "agent"
        node_args = [arg.replace("$(NODE_NAME)", "gpu-h100-00") for arg in agent_args[1:]]
        parsed_agent = parse_agent_args(node_args)
        assert parsed_agent.node_name == "gpu-h100-00"
        assert parsed_agent.metrics_port == 9401


def _peering_enabled(values_file: Path) -> bool:
    values = yaml.safe_load(values_file.read_text()) or {}
    return bool(values.get("peering", {}).get("enabled", True))


B200_EXTENSION: dict[str, Any] = {
    "sources": {"b200-test": "figures for this test only"},
    "products": {
        "B200": {
            "labels": ["NVIDIA-B200"],
            "memory_gib": {"value": 179, "source": "b200-test"},
            "min_watts": {"value": 400, "source": "b200-test"},
            "default_watts": {"value": 1000, "source": "b200-test"},
            "max_watts": {"value": 1000, "source": "b200-test"},
            "idle_watts": {"value": 120, "source": "b200-test"},
            "relative_speed": {
                kind: {"value": 2.0, "source": "b200-test"}
                for kind in ("Inference", "BatchInference", "Training", "FineTuning")
            },
        }
    },
}


def test_the_catalogue_is_extended_from_values_without_a_new_image(
    chart: Chart, tmp_path: Path
) -> None:
    from wattsched_operator.run import parse_args as parse_operator_args  # noqa: PLC0415

    values = tmp_path / "catalogue-values.yaml"
    values.write_text(yaml.safe_dump({"operator": {"catalogue": B200_EXTENSION}}))
    manifests = chart.render(values_files=(values,))
    config_map = find(manifests, "ConfigMap", "-catalogue")
    assert yaml.safe_load(config_map["data"]["catalogue.yaml"]) == B200_EXTENSION
    deployment = find(manifests, "Deployment", "-operator")
    args = _container(deployment)["args"]
    assert "--catalogue-file=/etc/wattsched/catalogue/catalogue.yaml" in args
    mounts = {m["name"]: m for m in _container(deployment)["volumeMounts"]}
    assert mounts["catalogue"] == {
        "name": "catalogue",
        "mountPath": "/etc/wattsched/catalogue",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    assert volumes["catalogue"]["configMap"]["name"] == config_map["metadata"]["name"]
    # What the operator reads from the mounted file: the shipped products plus the B200.
    mounted = tmp_path / "catalogue.yaml"
    mounted.write_text(config_map["data"]["catalogue.yaml"])
    file_args = [
        f"--catalogue-file={mounted}" if arg.startswith("--catalogue-file") else arg for arg in args
    ]
    parsed = parse_operator_args(file_args[1:])
    assert parsed.catalogue.products["B200"].max_watts.value == 1000
    assert parsed.catalogue.aliases["B200"] == "B200"
    assert "H100-80GB" in parsed.catalogue.products


def test_no_catalogue_values_render_no_catalogue_config_map(chart: Chart) -> None:
    manifests = chart.render()
    assert not [m for m in manifests if str(m["metadata"]["name"]).endswith("-catalogue")]
    args = _container(find(manifests, "Deployment", "-operator"))["args"]
    assert not [a for a in args if a.startswith("--catalogue-file")]


def test_queue_and_peak_queries_reach_the_operators_telemetry_config(
    chart: Chart, tmp_path: Path
) -> None:
    from wattsched_operator.run import parse_args as parse_operator_args  # noqa: PLC0415
    from wattsched_operator.run import telemetry_config  # noqa: PLC0415

    queue = 'sum by (namespace, pod) (vllm:num_requests_waiting{job="vllm"}) * 200'
    peak = (
        "max_over_time(sum by (namespace, pod) "
        "(rate(vllm:generation_tokens_total[1m]))[{window}:30s])"
    )
    values_file = tmp_path / "values.yaml"
    values_file.write_text(
        yaml.safe_dump(
            {
                "operator": {
                    "prometheusUrl": "http://prometheus:9090",
                    "queueQuery": queue,
                    "peakTokensQuery": peak,
                }
            }
        )
    )
    operator_args = _container(
        find(chart.render(values_files=(values_file,)), "Deployment", "-operator")
    )["args"]
    config = telemetry_config(parse_operator_args(operator_args[1:]))
    assert config is not None
    assert (config.queue_query, config.peak_token_query) == (queue, peak)


@pytest.mark.parametrize("value", ["queueQuery", "peakTokensQuery"])
def test_queue_and_peak_queries_without_prometheus_url_are_refused(
    chart: Chart, value: str
) -> None:
    with pytest.raises(HelmError, match=rf"operator\.{value} needs operator\.prometheusUrl"):
        chart.render(set_values=(f"operator.{value}=sum(x)",))


def test_the_charts_default_budget_is_never_an_example_budget() -> None:
    """`kubectl apply -f examples/` after `helm install` must not rewrite the chart's budget."""
    examples = {
        doc["metadata"]["name"]
        for path in (REPO_ROOT / "examples").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "EnergyBudget"
    }
    assert examples, "examples/ has no EnergyBudget: the test checks nothing"
    for values in [CHART_DIR / "values.yaml", *ci_values_files()]:
        budget = (yaml.safe_load(values.read_text()) or {}).get("defaultEnergyBudget") or {}
        if "name" in budget:
            assert budget["name"] not in examples, f"{values.name}: {budget['name']}"

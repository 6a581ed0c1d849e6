"""The CRD YAML in crds/ follows the API conventions (Kueue's): spec/status with a status
subresource, bounded strings and lists (so CEL cost stays under the API server's budget), conditions
as a list-map keyed by type, descriptions everywhere, printer columns that point at real fields, and
no copy anywhere in the repository that drifts from crds/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
CRD_FILES = sorted(CRD_DIR.glob("*.yaml"))
SKIP_DIRS = {".git", ".venv", ".sandbox", "node_modules", "__pycache__", ".mypy_cache"}

EXPECTED = {
    "LLMWorkload": {
        "scope": "Namespaced",
        "short": ["llmw"],
        "columns": [
            "Type",
            "Phase",
            "Reason",
            "GPUs/Replica",
            "Replicas",
            "Variant",
            "Power(W)",
            "Age",
        ],
        "wide": ["Node(s)", "Tokens/J", "Energy(kWh)", "Done", "Nodes/Replica"],
    },
    "EnergyBudget": {
        "scope": "Cluster",
        "short": ["eb"],
        "columns": ["Cap(W)", "Allocated(W)", "Measured(W)", "Headroom(W)", "Age"],
        "wide": ["Nodes", "Energy(kWh)", "Carbon(kg)", "Left(kWh)", "Projected(kWh)", "Source"],
    },
    "NodePowerProfile": {
        "scope": "Cluster",
        "short": ["npp"],
        "columns": ["Node", "GPUs", "Target(W)", "Applied(W)", "Draw(W)", "Ready", "Age"],
        "wide": ["Backend", "Clocks(MHz)", "Heartbeat"],
    },
}


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


CRDS = {load(path)["spec"]["names"]["kind"]: load(path) for path in CRD_FILES}


def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    result: dict[str, Any] = only
    return result


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_there_is_one_crd_file_per_kind() -> None:
    assert sorted(CRDS) == sorted(EXPECTED)
    assert len(CRD_FILES) == len(EXPECTED)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_crd_names_scope_and_version(kind: str) -> None:
    crd = CRDS[kind]
    plural = crd["spec"]["names"]["plural"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{plural}.wattsched.io"
    assert crd["spec"]["group"] == "wattsched.io"
    assert crd["spec"]["scope"] == EXPECTED[kind]["scope"]
    assert crd["spec"]["names"]["shortNames"] == EXPECTED[kind]["short"]
    assert crd["spec"]["names"]["categories"] == ["wattsched"]
    served = version(crd)
    assert (served["name"], served["served"], served["storage"]) == ("v1alpha1", True, True)
    assert served["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_field_has_a_description_and_bounded_size(kind: str) -> None:
    schema = version(CRDS[kind])["schema"]["openAPIV3Schema"]
    problems = []
    for path, node in walk(schema):
        if path in {"", ".apiVersion", ".kind", ".metadata"} or path.startswith(".spec.template."):
            continue
        inside_list_or_map = path.endswith(("[]", "{}"))
        if not inside_list_or_map and not node.get("description"):
            problems.append(f"{path}: no description")
        if node.get("type") == "string" and not ("maxLength" in node or "enum" in node):
            problems.append(f"{path}: string without maxLength or enum")
        if node.get("type") == "array" and "maxItems" not in node:
            problems.append(f"{path}: list without maxItems")
    assert problems == []


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_spec_and_status_are_split_and_conditions_are_a_map_keyed_by_type(kind: str) -> None:
    schema = version(CRDS[kind])["schema"]["openAPIV3Schema"]
    assert schema["required"] == ["spec"]
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["required"] == [
        "type",
        "status",
        "lastTransitionTime",
        "reason",
        "message",
    ]


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_cel_rule_has_a_message_naming_a_field(kind: str) -> None:
    schema = version(CRDS[kind])["schema"]["openAPIV3Schema"]
    rules = [
        (path, rule)
        for path, node in walk(schema)
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert rules
    for path, rule in rules:
        assert "spec." in rule["message"], f"{path}: {rule['message']}"


def resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    """The schema node a printer column's JSONPath reads; a filter (`[?(@.type=="X")]`) selects
    list items."""
    node: dict[str, Any] | None = schema
    for part in re.sub(r"\[\?\(@\.[^)]*\)\]", "[]", json_path).strip(".").split("."):
        if node is None:
            return None
        if part in {"metadata"} and node is schema:
            return {"type": "object"}
        name, items = part.removesuffix("[]"), part.endswith("[]")
        node = (node.get("properties") or {}).get(name)
        if items and node is not None:
            node = node.get("items")
    return node


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_printer_columns_and_wide_columns_point_at_typed_fields(kind: str) -> None:
    served = version(CRDS[kind])
    schema = served["schema"]["openAPIV3Schema"]
    columns = served["additionalPrinterColumns"]
    assert [c["name"] for c in columns if c.get("priority", 0) == 0] == EXPECTED[kind]["columns"]
    assert [c["name"] for c in columns if c.get("priority", 0) == 1] == EXPECTED[kind]["wide"]
    for column in columns:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        field = resolve(schema, column["jsonPath"])
        assert field is not None, f"{column['name']}: {column['jsonPath']} is not in the schema"
        expected_type = {"integer": "integer", "number": "number", "string": "string"}
        if field.get("format") == "date-time":
            assert column["type"] == "date"
        elif field["type"] == "boolean":
            assert column["type"] == "boolean"
        else:
            assert column["type"] == expected_type[field["type"]], column["name"]


@pytest.mark.parametrize(
    ("kind", "field"),
    [("LLMWorkload", "type"), ("LLMWorkload", "gpu.count"), ("LLMWorkload", "gpu.nodesPerReplica")],
)
def test_fields_that_would_orphan_pods_are_immutable(kind: str, field: str) -> None:
    schema = version(CRDS[kind])["schema"]["openAPIV3Schema"]["properties"]["spec"]
    node = resolve(schema, field)
    assert node is not None
    rules = [rule["rule"] for rule in node.get("x-kubernetes-validations", [])]
    assert "self == oldSelf" in rules


def wattsched_crd_copies() -> Iterator[Path]:
    """Every YAML file outside crds/ that holds a wattsched.io CRD (symlinks followed)."""
    stack = [REPO_ROOT]
    while stack:
        directory = stack.pop()
        for entry in directory.iterdir():
            if entry.name in SKIP_DIRS or entry == CRD_DIR:
                continue
            if entry.is_dir():
                stack.append(entry)
            elif entry.suffix in {".yaml", ".yml"} and "wattsched.io" in entry.read_text(
                errors="replace"
            ):
                text = entry.read_text()
                if "kind: CustomResourceDefinition" in text and "group: wattsched.io" in text:
                    yield entry


def test_no_copy_of_a_crd_drifts_from_crds() -> None:
    copies = list(wattsched_crd_copies())
    drifted = [
        str(path.relative_to(REPO_ROOT))
        for path in copies
        if not (CRD_DIR / path.name).is_file()
        or path.read_bytes() != (CRD_DIR / path.name).read_bytes()
    ]
    assert drifted == [], f"copies differ from crds/ (run `make chart-crds`): {drifted}"


def test_the_helm_chart_ships_every_crd() -> None:
    chart_crds = REPO_ROOT / "charts" / "wattsched" / "crds"
    for path in CRD_FILES:
        assert (chart_crds / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_the_api_reference_documents_every_field_with_its_description(kind: str) -> None:
    reference = " ".join((REPO_ROOT / "docs" / "api.md").read_text().split())
    schema = version(CRDS[kind])["schema"]["openAPIV3Schema"]
    missing = []
    for part in ("spec", "status"):
        for path, node in walk(schema["properties"][part], part):
            if path in {"spec", "status"} or path.endswith(("[]", "{}")):
                continue  # the kinds' roots and list items are described by their parents
            if path.startswith(("spec.template.", "status.conditions[]")):
                continue  # a PodTemplateSpec and metav1.Condition: documented upstream
            description = " ".join(node.get("description", "").split())
            if f"`{path}`" not in reference or description not in reference:
                missing.append(path)
    assert missing == [], f"docs/api.md does not describe: {missing}"

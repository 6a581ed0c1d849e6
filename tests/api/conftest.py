"""Fixtures for the API tests: every example object, and every invalid manifest of the shared table.

`example` runs a test once per wattsched object in examples/ (and its subdirectories) and in
offline/ (the inputs of `wattsched simulate`); `invalid_case` once per entry of
invalid_manifests.yaml, with the manifest built (base object + JSON merge patch). The unit tests and
the cluster tests use the same objects, so the typed models and the API server are held to one list.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattsched_api.meta import merge_patch

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"
OFFLINE_DIR = REPO_ROOT / "offline"
WATTSCHED_KINDS = ("LLMWorkload", "EnergyBudget", "NodePowerProfile")


@dataclass(frozen=True)
class Example:
    source: str  # file name, and the document's position when the file has several
    manifest: dict[str, Any]


@dataclass(frozen=True)
class InvalidCase:
    name: str
    manifest: dict[str, Any]
    field: str  # the field path the rejection must name


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def wattsched_examples() -> list[Example]:
    """Every LLMWorkload, EnergyBudget and NodePowerProfile in examples/ and its subdirectories and
    in offline/ (snapshots excluded), named by the path under examples/ or as offline/<file>."""
    found = []
    paths = [(path, path.relative_to(EXAMPLES_DIR)) for path in EXAMPLES_DIR.rglob("*.yaml")]
    paths += [(path, path.relative_to(REPO_ROOT)) for path in OFFLINE_DIR.rglob("*.yaml")]
    for path, relative in sorted(paths):
        documents = load_yaml_documents(path)
        if any(doc.get("kind") == "List" for doc in documents):
            continue  # a `wattsched plan` snapshot, not a manifest to apply
        name = relative.as_posix()
        for index, doc in enumerate(documents):
            if doc.get("kind") in WATTSCHED_KINDS:
                source = name if len(documents) == 1 else f"{name}#{index}"
                found.append(Example(source=source, manifest=doc))
    return found


def invalid_cases() -> list[InvalidCase]:
    table = yaml.safe_load((Path(__file__).parent / "invalid_manifests.yaml").read_text())
    cases = []
    for index, entry in enumerate(table["cases"]):
        base_name = entry["base"]
        if base_name in table["bases"]:
            base = table["bases"][base_name]
        else:
            (base,) = load_yaml_documents(REPO_ROOT / base_name)
        manifest = copy.deepcopy(merge_patch(base, entry["patch"]))  # its own: edited below
        # A unique name per case, so cluster tests can apply them side by side.
        name = f"invalid-{index:02d}"
        manifest["metadata"] = {"name": name}
        if manifest["kind"] == "NodePowerProfile" and entry["field"] != "spec.nodeName":
            manifest["spec"]["nodeName"] = name
        cases.append(InvalidCase(name=entry["name"], manifest=manifest, field=entry["field"]))
    return cases


EXAMPLES = wattsched_examples()
INVALID_CASES = invalid_cases()


@pytest.fixture(params=EXAMPLES, ids=[example.source for example in EXAMPLES])
def example(request: pytest.FixtureRequest) -> Example:
    result: Example = request.param
    return copy.deepcopy(result)


@pytest.fixture(params=INVALID_CASES, ids=[case.name for case in INVALID_CASES])
def invalid_case(request: pytest.FixtureRequest) -> InvalidCase:
    result: InvalidCase = request.param
    return copy.deepcopy(result)


@pytest.fixture
def example_manifests() -> dict[str, dict[str, Any]]:
    """Every example manifest by file name (a fresh copy per test)."""
    return {example.source: copy.deepcopy(example.manifest) for example in EXAMPLES}

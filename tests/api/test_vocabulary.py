"""The API's vocabulary is one: docs/api.md documents every word of it, and no component spells a
word of it itself (each imports it from `wattsched_api.vocabulary`)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import pytest

from wattsched_api import vocabulary
from wattsched_api.meta import format_time, parse_time, read_timestamp

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("operator", "agent", "cli", "simulator")
# Kubernetes' own Pod and Node condition type, read by the operator and written by the simulated
# cluster; the same word as wattsched's Ready condition, so it cannot be told apart here.
KUBERNETES_WORDS = {"Ready"}


def _words() -> set[str]:
    enums = (
        vocabulary.ConditionType,
        vocabulary.Reason,
        vocabulary.EventReason,
        vocabulary.Phase,
        vocabulary.PodPhase,
        vocabulary.Source,
        vocabulary.EnergySource,
    )
    words = {member.value for enum in enums for member in enum}
    return words | set(_names())


def _names() -> Iterator[str]:
    """The label, annotation, env and finalizer names."""
    for name in dir(vocabulary):
        if name.endswith(("_LABEL", "_ANNOTATION", "_ENV", "_FINALIZER", "_RESOURCE")):
            yield str(getattr(vocabulary, name))


@pytest.mark.parametrize(
    "enum", [vocabulary.ConditionType, vocabulary.Reason, vocabulary.EventReason, vocabulary.Phase]
)
def test_docs_api_names_every_condition_type_reason_event_and_phase(enum: type[StrEnum]) -> None:
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [m.value for m in enum if not re.search(rf"\b{m.value}\b", doc)]
    assert missing == []


def test_docs_api_names_every_wattsched_label_annotation_and_env() -> None:
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in _names() if name not in doc]
    assert missing == []


def test_no_component_spells_a_word_of_the_vocabulary_itself() -> None:
    words = _words() - KUBERNETES_WORDS
    found = []
    for component in COMPONENTS:
        for path in sorted((ROOT / component).rglob("*.py")):
            if "podresources_v1" in path.parts:  # generated gRPC code
                continue
            tree = ast.parse(path.read_text(), str(path))
            exported = {  # `__all__` names Python objects (class Applied), not API words
                id(item)
                for node in ast.walk(tree)
                if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                for item in ast.walk(node.value)
            }
            for node in ast.walk(tree):
                if id(node) in exported:
                    continue
                if isinstance(node, ast.Constant) and node.value in words:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_a_timestamp_read_back_is_rfc3339_or_none() -> None:
    assert read_timestamp("2026-12-05T12:00:10Z") == datetime(2026, 12, 5, 12, 0, 10, tzinfo=UTC)
    assert read_timestamp("2026-12-05T13:00:10+01:00") == datetime(
        2026, 12, 5, 12, 0, 10, tzinfo=UTC
    )
    # Events' eventTime (metav1.MicroTime) has microseconds.
    assert read_timestamp("2026-12-05T12:00:10.123456Z") == datetime(
        2026, 12, 5, 12, 0, 10, 123456, tzinfo=UTC
    )
    for unreadable in (None, "", "not a time", "2026-12-05T12:00:10", 1764936010):
        assert read_timestamp(unreadable) is None


def test_a_formatted_time_parses_back_to_the_same_second() -> None:
    moment = datetime(2026, 12, 5, 12, 0, 10, tzinfo=UTC)
    assert parse_time(format_time(moment)) == moment
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time("2026-12-05 noon")

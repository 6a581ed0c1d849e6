"""The JSON merge patch (RFC 7386) a status write is: `wattsched_api.meta.merge_patch`, applied
by the operator's status writer, the simulator's API stand-in and the invalid-manifest table."""

from __future__ import annotations

from typing import Any

import pytest

from wattsched_api.meta import merge_patch


def test_a_merge_patch_removes_nulls_and_merges_objects_without_changing_its_inputs() -> None:
    target = {"a": {"x": 1, "y": 2}, "b": 1}
    patch = {"a": {"x": None, "z": 3}, "b": None, "c": [1]}
    assert merge_patch(target, patch) == {"a": {"y": 2, "z": 3}, "c": [1]}
    assert target == {"a": {"x": 1, "y": 2}, "b": 1}
    assert patch == {"a": {"x": None, "z": 3}, "b": None, "c": [1]}


def test_a_status_write_is_a_merge_patch() -> None:
    status = {"phase": "Pending", "progress": {"completedTokens": 1.0, "fraction": 0.1}}
    patched = merge_patch(status, {"phase": "Running", "progress": {"fraction": None}, "x": [1]})
    assert patched == {"phase": "Running", "progress": {"completedTokens": 1.0}, "x": [1]}
    assert status["phase"] == "Pending"


def test_null_removes_a_key_and_a_missing_key_stays_missing() -> None:
    assert merge_patch({"a": 1, "b": 2}, {"a": None}) == {"b": 2}
    assert merge_patch({"b": 2}, {"a": None}) == {"b": 2}


def test_nested_objects_merge_at_every_depth() -> None:
    target = {"spec": {"power": {"capWatts": 700, "floorWatts": 100}, "name": "x"}}
    patch = {"spec": {"power": {"capWatts": 500}}}
    assert merge_patch(target, patch) == {
        "spec": {"power": {"capWatts": 500, "floorWatts": 100}, "name": "x"}
    }


@pytest.mark.parametrize("before", [[1, 2, 3], {"a": 1}, "text", 7])
def test_a_list_replaces_whatever_was_there(before: Any) -> None:
    assert merge_patch({"k": before, "other": 1}, {"k": [4]}) == {"k": [4], "other": 1}


def test_an_object_patched_onto_a_non_object_or_a_missing_key_drops_its_nulls() -> None:
    assert merge_patch({"k": [1]}, {"k": {"a": 1, "b": None}}) == {"k": {"a": 1}}
    assert merge_patch({}, {"k": {"a": {"b": None}, "c": 2}}) == {"k": {"a": {}, "c": 2}}


@pytest.mark.parametrize("patch", [[1, 2], "text", 3, 0.5, True])
def test_a_patch_that_is_not_an_object_replaces_the_target(patch: Any) -> None:
    assert merge_patch({"a": 1}, patch) == patch


def test_an_object_patch_on_a_target_that_is_not_an_object_starts_from_empty() -> None:
    assert merge_patch([1, 2], {"a": 1, "b": None}) == {"a": 1}
    assert merge_patch(None, {"a": {"b": 1}}) == {"a": {"b": 1}}

"""What the three wattsched kinds share: API group/version, object metadata, conditions,
RFC 3339 times (the one parser every component uses) and the JSON merge patch a status write is
(the one definition: the operator's writer, the simulator and the tests apply it). The names and
words of the API (labels, annotations, env, phases, condition types and reasons) are in
`wattsched_api.vocabulary`.

Not for Kubernetes client calls; these are plain values read from and written to JSON objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from wattsched_api.errors import ApiValidationError
from wattsched_api.fields import Fields, JsonObject, describe

GROUP = "wattsched.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def parse_time(text: str) -> datetime:
    """An RFC 3339 date-time (with zone) as an aware datetime; ValueError otherwise."""
    if _RFC3339.match(text) is None:
        raise ValueError(f"{text!r} is not an RFC 3339 date-time such as 2026-12-01T18:00:00Z")
    return datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))


def read_timestamp(value: object) -> datetime | None:
    """A timestamp read back from an object (a status, a pod, an Event): None when absent or not
    an RFC 3339 date-time (a status without one starts afresh)."""
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def merge_patch(target: Any, patch: Any) -> Any:
    """`target` with the JSON merge patch `patch` applied (RFC 7386): objects merge key by key,
    null removes a key, anything else (a list, a scalar, a non-object patch) replaces. Neither
    input is changed; the result shares the values it did not merge with them."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, seconds precision (as Kubernetes writes metav1.Time)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_time(fields: Fields, name: str) -> str | None:
    """A date-time field, validated, kept as written (so objects round-trip unchanged)."""
    text = fields.optional_string(name, max_length=64)
    if text is None:
        return None
    try:
        parse_time(text)
    except ValueError as error:
        raise fields.error(name, str(error)) from None
    return text


@dataclass(frozen=True)
class ObjectMeta:
    """The parts of metadata wattsched reads. `namespace` is None for cluster-scoped kinds."""

    name: str
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None
    deletion_timestamp: str | None = None

    @property
    def key(self) -> str:
        """`namespace/name`, or `name` for cluster-scoped objects."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def to_dict(self) -> dict[str, Any]:
        """The metadata a manifest carries (server-set fields such as uid are left out)."""
        out: dict[str, Any] = {"name": self.name}
        if self.namespace is not None:
            out["namespace"] = self.namespace
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def read_metadata(obj: JsonObject, *, kind: str, namespaced: bool) -> ObjectMeta:
    """Metadata of `obj`; errors name the kind (and the name once known)."""
    raw = obj.get("metadata")
    if not isinstance(raw, dict):
        raise ApiValidationError(kind, "", "metadata", "is required (an object with a name)")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ApiValidationError(kind, "", "metadata.name", "is required")
    namespace = raw.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise ApiValidationError(kind, name, "metadata.namespace", "must be a string")
    if namespaced and not namespace:
        namespace = "default"
    if not namespaced:
        namespace = None
    shown = f"{namespace}/{name}" if namespace else name
    fields = Fields(raw, kind=kind, name=shown, path="metadata")
    generation = raw.get("generation")
    if generation is not None and (isinstance(generation, bool) or not isinstance(generation, int)):
        raise fields.error("generation", f"must be an integer, got {describe(generation)}")
    uid = raw.get("uid")
    deletion = raw.get("deletionTimestamp")
    return ObjectMeta(
        name=name,
        namespace=namespace,
        labels=fields.string_map("labels", max_properties=1024, max_length=63),
        annotations=fields.string_map("annotations", max_properties=1024, max_length=262144),
        generation=generation,
        uid=uid if isinstance(uid, str) else None,
        deletion_timestamp=deletion if isinstance(deletion, str) else None,
    )


def check_kind(obj: JsonObject, kind: str) -> None:
    """Reject an object of another kind or API version."""
    name = ""
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
        name = metadata["name"]
    if obj.get("kind") != kind:
        raise ApiValidationError(
            kind, name, "kind", f"must be {kind}, got {describe(obj.get('kind'))}"
        )
    if obj.get("apiVersion") != API_VERSION:
        raise ApiValidationError(
            kind,
            name,
            "apiVersion",
            f"must be {API_VERSION}, got {describe(obj.get('apiVersion'))}",
        )


def read_envelope(obj: JsonObject, *, kind: str, namespaced: bool) -> tuple[ObjectMeta, Fields]:
    """Check kind and apiVersion, read metadata, and return the top-level fields left to read."""
    check_kind(obj, kind)
    metadata = read_metadata(obj, kind=kind, namespaced=namespaced)
    top = Fields(obj, kind=kind, name=metadata.key, path="")
    for envelope_field in ("apiVersion", "kind", "metadata"):
        top.raw(envelope_field)
    return metadata, top


def object_to_dict(
    kind: str, metadata: ObjectMeta, spec: dict[str, Any], status: dict[str, Any]
) -> dict[str, Any]:
    """An object as the API server stores it; an empty status is left out."""
    out: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": metadata.to_dict(),
        "spec": spec,
    }
    if status:
        out["status"] = status
    return out


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


_CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


@dataclass(frozen=True)
class Condition:
    """A metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: str
    observed_generation: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "status": self.status.value,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition_time,
        }
        if self.observed_generation is not None:
            out["observedGeneration"] = self.observed_generation
        return out


def read_conditions(fields: Fields, name: str = "conditions") -> tuple[Condition, ...]:
    items = fields.objects(name, max_items=16) or []
    fields.unique_by(name, items, lambda item: item.data.get("type"))
    conditions = []
    for item in items:
        transition = read_time(item, "lastTransitionTime")
        if transition is None:
            raise item.error("lastTransitionTime", "is required")
        conditions.append(
            Condition(
                type=item.string("type", max_length=316, min_length=1),
                status=ConditionStatus(
                    item.string("status", max_length=8, enum=tuple(ConditionStatus))
                ),
                reason=item.string(
                    "reason", max_length=1024, min_length=1, pattern=_CONDITION_REASON
                ),
                message=item.string("message", max_length=32768, default=""),
                last_transition_time=transition,
                observed_generation=item.optional_integer(
                    "observedGeneration", minimum=0, maximum=2**63 - 1
                ),
            )
        )
        item.finish()
    return tuple(conditions)


def set_condition(conditions: tuple[Condition, ...], new: Condition) -> tuple[Condition, ...]:
    """`conditions` with `new` in place of the one of the same type.

    The transition time is kept when the status did not change (as meta.SetStatusCondition does).
    """
    kept = new
    for old in conditions:
        if old.type == new.type and old.status == new.status:
            kept = Condition(
                type=new.type,
                status=new.status,
                reason=new.reason,
                message=new.message,
                last_transition_time=old.last_transition_time,
                observed_generation=new.observed_generation,
            )
    if any(c.type == new.type for c in conditions):
        return tuple(kept if c.type == new.type else c for c in conditions)
    return (*conditions, kept)

"""Typed, validated reading of one JSON object of a Kubernetes resource, field by field.

Each read checks the type and the same limits as the CRD schema (enum, range, length, item count)
and raises `ApiValidationError` naming the object and the full field path. Reading an object ends
with `finish()`, which rejects fields the schema does not have (as `kubectl apply --validate=strict`
does).
Not a general OpenAPI validator: the per-kind modules say which fields exist and which rules hold.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from wattsched_api.errors import ApiValidationError

JsonObject = Mapping[str, Any]

# A Kubernetes memory quantity with a unit (`80Gi`, `40960Mi`, `100G`): suffixes and their bytes.
# A bare number would mean bytes, never what a memory floor per GPU means, so a unit is required.
QUANTITY_BYTES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
MEMORY_QUANTITY_PATTERN = r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)"


def present(pairs: Iterable[tuple[str, object]]) -> dict[str, Any]:
    """The (key, value) pairs whose value is set, as a JSON object: what a status or spec does
    not know it leaves out."""
    return {key: value for key, value in pairs if value is not None}


def quantity_gibibytes(quantity: str) -> float:
    """GiB in a memory quantity that matches MEMORY_QUANTITY_PATTERN (`40960Mi` -> 40.0)."""
    match = re.fullmatch(MEMORY_QUANTITY_PATTERN, quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a memory quantity such as 80Gi")
    return float(match.group(1)) * QUANTITY_BYTES[match.group(2)] / 2**30


def nesting_depth(value: object, *, limit: int) -> int:
    """How many levels of objects and lists `value` nests (a scalar is 0, `{}` and `[]` are 1).

    Iterative, so it never recurses however deep a value goes, and it stops counting at
    `limit + 1`: enough to say a value is too deep without walking all of it.
    """
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


# Kubernetes label syntax (k8s.io/apimachinery validation.IsQualifiedName, IsValidLabelValue): a
# name of at most 63 characters of [A-Za-z0-9-_.] that begins and ends alphanumeric; a key may
# have a DNS-subdomain prefix (at most 253 characters) and '/' before its name.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
LABEL_KEY_RULE = (
    "must be a label key: an optional DNS subdomain and '/', then at most 63 characters of "
    "A-Z, a-z, 0-9, '-', '_' and '.', beginning and ending with a letter or digit"
)
LABEL_VALUE_RULE = (
    "must be a label value: empty, or at most 63 characters of A-Z, a-z, 0-9, '-', '_' and '.', "
    "beginning and ending with a letter or digit"
)


def is_label_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return _LABEL_NAME.fullmatch(name) is not None


def is_label_value(value: str) -> bool:
    return value == "" or _LABEL_NAME.fullmatch(value) is not None


# Renders at most a few items and levels of a value: a full repr of a YAML alias bomb (a billion
# shared references) or of a 10,000-level object would never finish, or overflow the stack.
_SHORT_REPR = reprlib.Repr()  # Python 3.11 takes no limits as arguments
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 76


def describe(value: object) -> str:
    """A short rendering of a bad value for an error message (bounded work for any value)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Fields:
    """One JSON object at `path` inside the object `kind` `name` (for error messages)."""

    def __init__(self, data: object, *, kind: str, name: str, path: str) -> None:
        self.kind = kind
        self.name = name
        self.path = path
        if not isinstance(data, Mapping):
            raise ApiValidationError(kind, name, path, f"must be an object, got {describe(data)}")
        self.data: JsonObject = data
        self._read: set[str] = set()

    def field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ApiValidationError:
        return ApiValidationError(
            self.kind, self.name, self.field(name) if name else self.path, problem
        )

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        self._read.add(name)
        return self.data.get(name)

    def finish(self) -> None:
        """Reject fields that the schema does not define."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown field (check the spelling against docs/api.md)")

    # -- scalars -----------------------------------------------------------------------------------

    def optional_string(
        self,
        name: str,
        *,
        max_length: int,
        min_length: int = 0,
        enum: tuple[str, ...] | None = None,
        pattern: str | None = None,
    ) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {describe(value)}")
        if enum is not None and value not in enum:
            raise self.error(name, f"must be one of {', '.join(enum)}; got {describe(value)}")
        if len(value) > max_length:
            raise self.error(name, f"must be at most {max_length} characters, got {len(value)}")
        if len(value) < min_length:
            raise self.error(name, f"must be at least {min_length} characters")
        if pattern is not None and re.fullmatch(pattern, value) is None:
            raise self.error(name, f"{describe(value)} must match {pattern}")
        return value

    def string(
        self,
        name: str,
        *,
        max_length: int,
        min_length: int = 0,
        enum: tuple[str, ...] | None = None,
        pattern: str | None = None,
        default: str | None = None,
    ) -> str:
        value = self.optional_string(
            name, max_length=max_length, min_length=min_length, enum=enum, pattern=pattern
        )
        if value is not None:
            return value
        if default is None:
            raise self.error(name, "is required")
        return default

    def optional_integer(self, name: str, *, minimum: int, maximum: int) -> int | None:
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise self.error(name, f"must be an integer, got {describe(value)}")
        if not minimum <= value <= maximum:
            raise self.error(name, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def integer(self, name: str, *, minimum: int, maximum: int, default: int | None = None) -> int:
        value = self.optional_integer(name, minimum=minimum, maximum=maximum)
        if value is not None:
            return value
        if default is None:
            raise self.error(name, "is required")
        return default

    def optional_number(
        self, name: str, *, minimum: float, maximum: float, exclusive_minimum: bool = False
    ) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(name, f"must be a number, got {describe(value)}")
        if exclusive_minimum and value <= minimum:
            raise self.error(name, f"must be greater than {minimum:g}, got {value:g}")
        if value < minimum or value > maximum:
            raise self.error(name, f"must be between {minimum:g} and {maximum:g}, got {value:g}")
        return float(value)

    def number(
        self,
        name: str,
        *,
        minimum: float,
        maximum: float,
        exclusive_minimum: bool = False,
        default: float | None = None,
    ) -> float:
        value = self.optional_number(
            name, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum
        )
        if value is not None:
            return value
        if default is None:
            raise self.error(name, "is required")
        return default

    def optional_memory_quantity(self, name: str, *, maximum_gib: float) -> str | None:
        """A memory quantity with a unit (`80Gi`), as written; at most `maximum_gib` GiB."""
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str) or re.fullmatch(MEMORY_QUANTITY_PATTERN, value) is None:
            raise self.error(
                name,
                f"must be a memory quantity with a unit such as 80Gi or 40960Mi, got "
                f"{describe(value)}",
            )
        if quantity_gibibytes(value) > maximum_gib:
            raise self.error(name, f"must be at most {maximum_gib:g}Gi, got {value}")
        return value

    def optional_boolean(self, name: str) -> bool | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {describe(value)}")
        return value

    # -- containers --------------------------------------------------------------------------------

    def optional_section(self, name: str) -> Fields | None:
        value = self.raw(name)
        if value is None:
            return None
        return Fields(value, kind=self.kind, name=self.name, path=self.field(name))

    def section(self, name: str) -> Fields:
        found = self.optional_section(name)
        if found is None:
            raise self.error(name, "is required")
        return found

    def objects(self, name: str, *, max_items: int, min_items: int = 0) -> list[Fields] | None:
        """The items of a list of objects, or None when the list is absent."""
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, got {describe(value)}")
        if len(value) > max_items:
            raise self.error(name, f"must have at most {max_items} items, got {len(value)}")
        if len(value) < min_items:
            raise self.error(name, f"must have at least {min_items} item(s)")
        return [
            Fields(item, kind=self.kind, name=self.name, path=f"{self.field(name)}[{index}]")
            for index, item in enumerate(value)
        ]

    def strings(
        self,
        name: str,
        *,
        max_items: int,
        max_length: int,
        min_length: int = 0,
        unique: bool = False,
    ) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(name, f"must be a list of strings, got {describe(value)}")
        if len(value) > max_items:
            raise self.error(name, f"must have at most {max_items} items, got {len(value)}")
        seen: set[str] = set()
        for index, item in enumerate(value):
            field = f"{name}[{index}]"
            if not isinstance(item, str):
                raise self.error(field, f"must be a string, got {describe(item)}")
            if not min_length <= len(item) <= max_length:
                raise self.error(field, f"must be {min_length} to {max_length} characters long")
            if unique and item in seen:
                raise self.error(field, f"duplicate value {describe(item)}")
            seen.add(item)
        return tuple(value)

    def string_map(self, name: str, *, max_properties: int, max_length: int) -> dict[str, str]:
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(name, f"must be a map of strings, got {describe(value)}")
        if len(value) > max_properties:
            raise self.error(name, f"must have at most {max_properties} entries, got {len(value)}")
        for key, item in value.items():
            if not isinstance(item, str) or len(item) > max_length:
                raise self.error(
                    f"{name}[{key}]", f"must be a string of at most {max_length} chars"
                )
        return {str(key): item for key, item in value.items()}

    def unique_by(self, name: str, items: list[Fields], key: Callable[[Fields], object]) -> None:
        """Reject a list-map whose items repeat a key (the API server says "Duplicate value")."""
        seen: set[object] = set()
        for index, item in enumerate(items):
            value = key(item)
            if value in seen:
                raise self.error(f"{name}[{index}]", f"duplicate value {describe(value)}")
            seen.add(value)

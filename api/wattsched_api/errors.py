"""The one error type the API models raise: it names the object, the field and what is allowed.

Not for transport or Kubernetes API errors (those come from the client); only for objects that do
not match the wattsched API (bad snapshots, old objects, hand-made dicts).
"""

from __future__ import annotations


class ApiValidationError(ValueError):
    """An object does not match the API. `str()` reads `Kind namespace/name: field: problem`."""

    def __init__(self, kind: str, name: str, field: str, problem: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.problem = problem
        where = f"{kind} {name}" if name else kind
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")

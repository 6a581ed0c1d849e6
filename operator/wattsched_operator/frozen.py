"""Read-only JSON values: the form in which the operator's cache keeps the bodies it holds and
shares what repeats across them (`cache.SharedValues`). A `FrozenDict` or `FrozenList` never
changes after it is made, so what is computed from one may be kept as long as it is (the parse
cache of `snapshot` shares a parsed spec between the workloads that hold the same one). Not for
anything else: plain dicts and lists stay the working form everywhere.
"""

from __future__ import annotations

import copy
from typing import Any, NoReturn

_READ_ONLY = (
    "a cached body is shared between objects and read-only: copy it (dict(...), list(...) or "
    "copy.deepcopy) and change the copy"
)


class FrozenDict(dict[str, Any]):
    """A JSON object of a cached body: a dict that refuses changes in place (`TypeError`), because
    the cache shares one copy of it between every object that holds the same value. Copies
    (`dict(...)`, `{**...}`, `copy.copy`, `copy.deepcopy`) are plain, changeable dicts."""

    __slots__ = ()

    def _refuse(self, *_: Any, **__: Any) -> NoReturn:
        raise TypeError(_READ_ONLY)

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {key: copy.deepcopy(value, memo) for key, value in self.items()}

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


class FrozenList(list[Any]):
    """A JSON array of a cached body, shared and read-only like `FrozenDict`."""

    __slots__ = ()

    def _refuse(self, *_: Any, **__: Any) -> NoReturn:
        raise TypeError(_READ_ONLY)

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = remove = pop = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [copy.deepcopy(value, memo) for value in self]

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))

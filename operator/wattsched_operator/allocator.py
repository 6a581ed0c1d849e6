"""How many malloc arenas the operator's process uses (glibc only).

glibc gives a thread that allocates while the others hold theirs an arena of its own, up to eight
per core, and keeps each arena's free memory for that arena. The operator's threads (its watches,
the API calls run with `asyncio.to_thread`, the Kubernetes client's) take the objects larger than
pymalloc's 512 bytes from malloc: big dicts, JSON pages, status patches. With 10,000 workloads
each of 15 arenas kept its own high-water mark, about 80 MiB of RSS in all (docs/benchmarks.md,
issue 18). At most `MALLOC_ARENAS` arenas share that memory instead.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameter for the most arenas malloc creates (malloc.h).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Tell glibc's malloc to create at most `arenas` arenas from now on (threads started before
    keep theirs); call it before the process starts threads. Whether the limit was set: not
    where the C library is not glibc, nor where `MALLOC_ARENA_MAX` in the environment already
    chose one (glibc reads it itself)."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_ARENA_MAX" in os.environ:
        return False
    # The process's own symbols hold glibc's (no `find_library`: it runs ldconfig at start-up).
    return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas))

"""The operator's process keeps to a few malloc arenas (`allocator`), counted by glibc itself."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from wattsched_operator.allocator import limit_malloc_arenas

REPO = Path(__file__).resolve().parents[2]

# Eight threads allocate from malloc (bytes objects above pymalloc's 512 bytes) while all are
# alive, then the process prints how many arenas glibc's `malloc_info` reports.
SCRIPT = """
import ctypes, ctypes.util, sys, threading
from wattsched_operator.allocator import limit_malloc_arenas
if sys.argv[1] == "limit":
    assert limit_malloc_arenas(2)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.open_memstream.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
all_alive = threading.Barrier(8)
held = []
def allocate():
    all_alive.wait()
    held.append([bytes(2048) for _ in range(100)])
    all_alive.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
text, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(text.value.decode().count("<heap nr="))
"""


def arenas_after_eight_threads(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    return int(result.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_threads_of_the_operator_share_two_malloc_arenas_instead_of_one_each() -> None:
    assert arenas_after_eight_threads("limit") == 2
    # Without the limit glibc gives each allocating thread an arena (up to 8 per core).
    assert arenas_after_eight_threads("default") > 2


def test_an_arena_limit_the_environment_chose_is_left_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False

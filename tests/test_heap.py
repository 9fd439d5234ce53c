"""What freeze_startup_heap leaves out of the garbage collector's full passes, and the cap on
glibc's malloc arenas (counted from glibc's own malloc_info report, in a child process)."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys

import pytest

from server.heap import freeze_startup_heap
from tests.e2e.server_process import REPO_ROOT


class _Loaded:
    """Stands for what a process loads at startup and keeps (a module, a model's layer)."""


def _traced_ids() -> set[int]:
    return {id(o) for o in gc.get_objects()}  # what a full pass traces: generations 0 to 2


def test_objects_alive_at_the_freeze_are_left_out_and_later_ones_are_traced():
    loaded = [_Loaded() for _ in range(1000)]
    assert id(loaded[0]) in _traced_ids()
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(loaded)
        made_later = [_Loaded()]
        traced = _traced_ids()
        assert id(loaded[0]) not in traced and id(loaded) not in traced
        assert id(made_later[0]) in traced
    finally:
        gc.unfreeze()  # the suite's process goes on collecting its tests' garbage


# Eight threads alive at once calling malloc (ctypes releases the GIL around the call), then
# the number of arenas glibc reports: a thread's first malloc while the others hold theirs
# takes a new arena up to the cap, whatever the scheduling.
_ARENAS = """
import ctypes, ctypes.util, re, sys, tempfile, threading
from server.heap import cap_malloc_arenas
print("capped", cap_malloc_arenas() if sys.argv[1] == "cap" else False)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
started = threading.Barrier(8)
def churn():
    libc.free(libc.malloc(4096))  # the thread's first malloc takes it an arena...
    started.wait()  # ...while every other thread holds one (on one core too)
    for _ in range(20000):
        libc.free(libc.malloc(4096))
threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
path = tempfile.mktemp()
report = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, report)
libc.fclose(report)
print("arenas", len(re.findall('<heap nr="', open(path).read())))
"""


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", _ARENAS, mode], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
                         | env)
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    return lines["capped"], int(lines["arenas"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the arena cap is glibc's")
def test_malloc_arenas_are_capped_unless_malloc_arena_max_is_set():
    assert _arenas("cap") == ("True", 2)
    capped, uncapped = _arenas("no-cap")
    assert capped == "False" and uncapped > 2  # what the cap prevents: an arena per thread
    capped, arenas = _arenas("cap", MALLOC_ARENA_MAX="3")  # glibc's own setting is left be
    assert capped == "False" and arenas <= 3

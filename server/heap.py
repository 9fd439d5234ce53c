"""The process heap over a long life: glibc's malloc arenas capped, and the garbage
collector's full passes kept off what a served process loaded at startup.

glibc gives each thread that allocates concurrently an arena of its own, up to eight per
core. A server's threads (the event loop, the engine thread, adapter loaders, the tokenizer's
pool, off-loop workers) each allocate and free in their own arenas, whose free space no other
thread reuses and which rarely shrink: under the soak's mixed traffic the server's resident
memory grew 23% in four minutes after warm-up, and 4% with two arenas (981 -> 1204 MiB
against 785 -> 818 MiB). So a served process caps them at two unless MALLOC_ARENA_MAX is set.

A full (generation 2) pass traces every tracked object, holds the interpreter lock from start
to end on whichever thread it falls, and so stops the event loop, the engine thread and every
worker thread alike. A served process carries hundreds of thousands of long-lived objects
(torch, transformers, the tokenizer, the model's modules), and tracing them took about 200 ms
on a 2-core machine: a large answer's allocations (n echoed choices with top logprobs) made a
pass due, and health checks waited that long. Once the model is loaded, those objects are
moved to the collector's permanent generation, so later passes trace only what requests make.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger(__name__)


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the rest of the process's life; call it first thing, before
    threads allocate. MALLOC_ARENA_MAX, when set, is glibc's own setting and is left to it.
    Returns whether the cap was set here (False also where the C library is not glibc)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt arenas, macOS no mallopt)
        return False
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        return False
    log.info("malloc: at most %d arenas (MALLOC_ARENA_MAX overrides it)", arenas)
    return True


def freeze_startup_heap() -> int:
    """Collect once, then leave every object alive now out of later passes; call it when a
    process has loaded what it keeps for its whole life. Returns how many objects that is."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d objects loaded at startup left out of its full passes",
             frozen)
    return frozen

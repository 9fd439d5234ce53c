"""The garbage collector's full passes, kept off what a served process loaded at startup.

A full (generation 2) pass traces every tracked object, holds the interpreter lock from start
to end on whichever thread it falls, and so stops the event loop, the engine thread and every
worker thread alike. A served process carries hundreds of thousands of long-lived objects
(torch, transformers, the tokenizer, the model's modules), and tracing them took about 200 ms
on a 2-core machine: a large answer's allocations (n echoed choices with top logprobs) made a
pass due, and health checks waited that long. Once the model is loaded, those objects are
moved to the collector's permanent generation, so later passes trace only what requests make.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then leave every object alive now out of later passes; call it when a
    process has loaded what it keeps for its whole life. Returns how many objects that is."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d objects loaded at startup left out of its full passes",
             frozen)
    return frozen

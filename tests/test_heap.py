"""What freeze_startup_heap leaves out of the garbage collector's full passes."""

from __future__ import annotations

import gc

from server.heap import freeze_startup_heap


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

"""Rows of a tensor allocated once (the prompt table, the prefix cache's pool), handed out
and given back by index.

Given-back rows are reused first; rows never used are handed out only after them, in order,
so a tensor left unzeroed on a CPU commits memory only for the rows that were ever written.
"""

from __future__ import annotations


class RowAllocator:
    """Not thread-safe: its owner locks (or owns it from one thread)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._given_back: list[int] = []  # a stack
        self._fresh = 0  # rows from here on were never used

    @property
    def free(self) -> int:
        return len(self._given_back) + self.capacity - self._fresh

    @property
    def reusable(self) -> int:
        """Free rows that were written before (taken first)."""
        return len(self._given_back)

    @property
    def written(self) -> int:
        """Rows ever handed out: on a CPU, the rows whose memory is committed."""
        return self._fresh

    def take(self, n: int) -> list[int]:
        """n free rows (the caller checked `free`)."""
        if n > self.free:
            raise ValueError(f"{n} rows asked of {self.free} free")
        reused = [self._given_back.pop() for _ in range(min(n, len(self._given_back)))]
        fresh = list(range(self._fresh, self._fresh + n - len(reused)))
        self._fresh += len(fresh)
        return reused + fresh

    def give_back(self, rows: list[int]) -> None:
        self._given_back.extend(reversed(rows))

"""Live counters of a mount, shared by the processes that serve it.

One `Counters` holds an int64 per (slot, name) in an anonymous MAP_SHARED mmap. The mount's parent
makes it with one slot per worker BEFORE it forks; each forked worker calls `use_slot(i)` and from
then on adds only to its own slot, so no two processes ever write the same word (no cross-process
lock). `snapshot()`, called by whichever worker answers the stats xattr, sums every slot.

Layout: slot-major, `slots * len(names)` native-endian int64; the word of (slot, name) is at
`slot * len(names) + position of name`. Within a process, `add` takes a lock (the trio thread and the
reader's threads count at once); `use_slot` makes a new lock, so a lock held by another thread of the
parent at fork time cannot block the child. A snapshot read while a worker writes sees each word
either before or after the write (aligned 8-byte stores), never torn.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Mapping, Sequence

_WORD = 8


class Counters:
    """Named int64 counters, one set per slot, summed over the slots by `snapshot`."""

    def __init__(self, names: Sequence[str], slots: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.names: tuple[str, ...] = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError("counter names must be distinct")
        self.slots = slots
        self._position = {name: i for i, name in enumerate(self.names)}
        size = max(1, slots * len(self.names)) * _WORD
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._words = memoryview(self._map).cast("q")
        self._base = 0
        self._lock = threading.Lock()

    def use_slot(self, slot: int) -> None:
        """This process writes slot `slot` from now on (a worker calls it right after fork)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in 0..{self.slots - 1}")
        self._lock = threading.Lock()
        self._base = slot * len(self.names)

    def add(self, name: str, n: int = 1) -> None:
        """Add `n` to `name` in this process's slot; KeyError for a name not given at construction."""
        i = self._base + self._position[name]
        with self._lock:
            self._words[i] += n

    def add_many(self, counts: Mapping[str, int]) -> None:
        """Add several counts at once (one lock); KeyError, before adding anything, for an unknown name."""
        base, position = self._base, self._position
        indexes = [(base + position[name], n) for name, n in counts.items()]
        with self._lock:
            words = self._words
            for i, n in indexes:
                words[i] += n

    def snapshot(self) -> dict[str, int]:
        """Every counter, summed over all slots."""
        words, width = self._words, len(self.names)
        return {name: sum(words[slot * width + i] for slot in range(self.slots))
                for i, name in enumerate(self.names)}

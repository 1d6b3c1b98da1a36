"""The C heap of a merge held to its memory budget.

glibc hands out a block's float32 temporaries (a few MiB each) from its heap once the mmap threshold is raised
(:func:`keep_freed_memory`), so each block reuses the pages of the one before instead of faulting in fresh ones —
page faults were half of task arithmetic's CPU time. The price is fragmentation: a small result kept across
blocks (a chunk's norm, a count) can be placed where a freed temporary was; the next temporary no longer fits
there and the heap grows by a block's temporaries per block. A first pass of slerp's norms over a 128256 × 4096
embedding grew the resident size to 3.4 GB that way, every page of it free.

:func:`release_over_budget` hands the free pages back (``malloc_trim``) when the resident size passes
:data:`CEILING` of the budget, and again only after it has grown by :data:`REGROWTH` since: a working set that
is legitimately near the budget is not trimmed block after block. Called after every block by the first passes
(:class:`~mergescope.merge.row_source.RowBlocks`), the executor and the analysis. Without glibc or ``/proc``
all of this is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import os

#: the fraction of the budget the resident size may reach before free heap pages are handed back
CEILING = 0.8
#: growth of the resident size after a release before the next one
REGROWTH = 128 << 20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_state = {"ceiling": None, "floor": 0}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks up to 32 MiB in its heap and trim the heap only past 64 MiB free: the float32
    temporaries of each block then reuse the same pages."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def hold_to_budget(budget: int | None) -> None:
    """From now on :func:`release_over_budget` holds the resident size near ``budget`` bytes (None: never)."""
    _state["ceiling"] = None if budget is None else int(CEILING * budget)
    _state["floor"] = 0


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (``malloc_trim``), so earlier temporaries stop counting."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident set size in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no os.sysconf (Windows)
        return 0


def release_over_budget() -> bool:
    """Hand the free heap pages back when the resident size is past the ceiling set by
    :func:`hold_to_budget` and has grown by :data:`REGROWTH` since the last release; True when it did."""
    ceiling = _state["ceiling"]
    if ceiling is None:
        return False
    resident = resident_bytes()
    if resident <= max(ceiling, _state["floor"] + REGROWTH):
        return False
    give_back_free_memory()
    _state["floor"] = resident_bytes()
    return True

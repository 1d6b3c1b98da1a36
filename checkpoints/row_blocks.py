"""Row blocks: how many rows of a tensor are processed at once, from a memory budget.

Every streaming pass (the analysis, the executor, a TIES trim's counting pass) reads a large tensor a row
range at a time (:meth:`~mergescope.checkpoints.Checkpoint.read_rows`), so its memory is set by the block
size, not by the tensor's size or the number of models. The block size comes from a budget for the whole
process: the budget less :data:`RUNTIME_BYTES` (the interpreter, torch, small tensors' buffers) is shared by
the entries in flight, at ``bytes_per_entry`` each — what the caller holds per entry of a block (every
input's stored bytes times the reads in flight, its float32 working copies, the output being written).
"""

from __future__ import annotations

import math

#: the host memory a streaming command aims to stay under unless told otherwise (``--memory-budget``)
DEFAULT_MEMORY_BUDGET = 1_500_000_000
#: what the process holds besides block data: python, torch, mergescope, the page tables of its threads
RUNTIME_BYTES = 600_000_000
#: the inputs' stored bytes in one block at most, whatever the budget (4M entries of four bf16 inputs): larger
#: blocks are no faster (4× larger measured the same on both benchmark fixtures), they only hold more memory;
#: a cap on bytes rather than entries keeps memory flat as models are added
MAX_SET_BYTES = 32 << 20
#: block starts fall on multiples of this many entries (TIES' counting pass counts per chunk of 4096)
ALIGN_ENTRIES = 1 << 12

_UNITS = (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
          ("B", 1))


def parse_size(value: int | str, what: str) -> int:
    """Bytes from an int or a size like ``1.5GB``, ``800MB``, ``2GiB``; a one-line error naming ``what``."""
    from .errors import MergescopeError

    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().upper().replace(" ", "")
    for unit, scale in _UNITS:
        number = text[: -len(unit)]
        if text.endswith(unit) and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return int(float(number) * scale)
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise MergescopeError(f"{what} {value!r}: use bytes or a size like 1.5GB")


def block_entries(budget: int, bytes_per_entry: float, stored_per_entry: float) -> int:
    """Entries per block: (budget − :data:`RUNTIME_BYTES`) / bytes_per_entry, and at most
    :data:`MAX_SET_BYTES` / stored_per_entry (the inputs' stored bytes per entry); at least one aligned unit."""
    cap = MAX_SET_BYTES / max(stored_per_entry, 1)
    return max(ALIGN_ENTRIES, int(min(cap, (budget - RUNTIME_BYTES) / max(bytes_per_entry, 1))))


def rows_per_block(shape: tuple[int, ...], entries: int, align: int = ALIGN_ENTRIES) -> int:
    """Rows of a tensor of ``shape`` per block of at most ``entries`` entries (more when one aligned unit is
    more), a multiple of the rows that make a whole number of ``align`` entries (so every block starts aligned);
    all rows when the tensor fits. A 0-dim tensor is one row."""
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if shape else 1
    if rows * row_numel <= entries or row_numel == 0:
        return max(rows, 1)
    unit = align // math.gcd(align, row_numel)
    return min(rows, max(unit, entries // row_numel // unit * unit))


def row_ranges(rows: int, per_block: int) -> list[tuple[int, int]]:
    """[a, b) row ranges of ``per_block`` rows (the last shorter) covering ``rows``."""
    return [(start, min(start + per_block, rows)) for start in range(0, rows, per_block)] or [(0, 0)]

"""One output tensor's inputs read from their checkpoints a row range at a time: the
:class:`~mergescope.merge.magnitude_counts.FlatBlocks` source of a method's first pass (TIES' trims) when
the tensor is too large to hold whole; score sources (:class:`~mergescope.merge.magnitude_counts.Scores`) of the
streamed selections are built on it.

Blocks are read on a thread one ahead of their use, so reading and counting overlap; each block holds the
base's and the asked models' rows in their stored dtype, then is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from mergescope.checkpoints import Checkpoint
from mergescope.checkpoints.dtypes import ITEMSIZE
from mergescope.checkpoints.heap import release_over_budget
from mergescope.checkpoints.read_ahead import read_ahead
from mergescope.checkpoints.read_buffers import ReadBuffers
from mergescope.checkpoints.row_blocks import row_ranges

from .aligned_rows import AlignedRows

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


class RowBlocks:
    """Flat blocks of ``reads[0]`` (the base) and ``reads[1:]`` (the models, numbered from 0), each
    ``rows`` rows of tensors of ``shape``, read from ``checkpoints`` onto ``device`` (through ``aligned`` for an
    embedding or head merged by token); a pass may gather ``gather_bytes`` besides its blocks. ``on_block(pass,
    rows done, rows)`` hears of every block a pass has finished with (progress: a first pass reads no output)."""

    def __init__(self, checkpoints: dict[str, Checkpoint], reads: list[tuple[str, str]], shape: tuple[int, ...],
                 rows: int, device: str, gather_bytes: int | None = None, aligned: AlignedRows | None = None,
                 on_block: Callable[[int, int, int], None] | None = None) -> None:
        import torch

        self.inputs = [(checkpoints[ref], name) for ref, name in reads]
        self.aligned = aligned  # an embedding or head merged by token: rows of the output vocabulary
        self.shape, self.rows, self.device = shape, rows, torch.device(device)
        self.gather_bytes = gather_bytes
        self.on_block, self.passes = on_block, 0
        self.row_numel = 1
        for size in shape[1:]:
            self.row_numel *= size
        self.numel = shape[0] * self.row_numel

    def _read(self, which: list[int], start: int, stop: int, buffers: list | None = None) -> list[torch.Tensor]:
        tensors = []
        for slot, i in enumerate(which):
            if self.aligned is not None:
                tensors.append(self.aligned.rows(i, start, stop).reshape(-1))
                continue
            checkpoint, name = self.inputs[i]
            spec = checkpoint.spec(name)
            buffer = None
            if buffers is not None:
                buffer = ReadBuffers.slot(buffers, slot, (stop - start) * spec.row_numel * ITEMSIZE[spec.dtype])
            tensors.append(checkpoint.read_rows(name, start, stop, device=str(self.device), buffer=buffer).reshape(-1))
        return tensors

    def blocks(self, models: list[int]) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
        which = [0, *(m + 1 for m in models)]
        buffers = ReadBuffers(2, len(which))  # the block in use and the one being read

        def read(rows: tuple[int, int]) -> tuple[list, list]:
            taken = buffers.take()
            return self._read(which, *rows, taken), taken

        self.passes += 1
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergescope-pass") as pool:
            try:
                ranges = row_ranges(self.shape[0], self.rows)
                for (start, stop), future in read_ahead(ranges, read, pool, 0):
                    (base, *blocks), taken = future.result()
                    yield start * self.row_numel, base, blocks
                    buffers.give_back(taken)
                    release_over_budget()  # a pass's kept results can fragment the heap (checkpoints/heap.py)
                    if self.on_block is not None:
                        self.on_block(self.passes, stop, self.shape[0])
            finally:  # left early (an error): a read still queued must not wait for a set
                buffers.give_back([None] * len(which))

    def span(self, model: int | None, start: int, stop: int) -> torch.Tensor:
        first, last = start // self.row_numel, -(-stop // self.row_numel)
        values = self._read([0 if model is None else model + 1], first, last)[0]
        skip = first * self.row_numel
        return values[start - skip : stop - skip]

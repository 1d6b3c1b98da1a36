"""One output tensor's inputs read from their checkpoints a row range at a time: the
:class:`~mergescope.merge.magnitude_counts.FlatBlocks` source of a method's first pass (TIES' trims) when
the tensor is too large to hold whole.

Blocks are read on a thread one ahead of their use, so reading and counting overlap; each block holds the
base's and the asked models' rows in their stored dtype, then is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from mergescope.checkpoints import Checkpoint
from mergescope.checkpoints.read_ahead import read_ahead
from mergescope.checkpoints.row_blocks import row_ranges

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


class RowBlocks:
    """Flat blocks of ``reads[0]`` (the base) and ``reads[1:]`` (the models, numbered from 0), each
    ``rows`` rows of tensors of ``shape``, read from ``checkpoints`` onto ``device``; a pass may gather
    ``gather_bytes`` besides its blocks."""

    def __init__(self, checkpoints: dict[str, Checkpoint], reads: list[tuple[str, str]], shape: tuple[int, ...],
                 rows: int, device: str, gather_bytes: int | None = None) -> None:
        import torch

        self.inputs = [(checkpoints[ref], name) for ref, name in reads]
        self.shape, self.rows, self.device = shape, rows, torch.device(device)
        self.gather_bytes = gather_bytes
        self.row_numel = 1
        for size in shape[1:]:
            self.row_numel *= size
        self.numel = shape[0] * self.row_numel

    def _read(self, which: list[int], start: int, stop: int) -> list[torch.Tensor]:
        return [self.inputs[i][0].read_rows(self.inputs[i][1], start, stop, device=str(self.device)).reshape(-1)
                for i in which]

    def blocks(self, models: list[int]) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
        which = [0, *(m + 1 for m in models)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergescope-pass") as pool:
            ranges = row_ranges(self.shape[0], self.rows)
            for (start, _), future in read_ahead(ranges, lambda r: self._read(which, *r), pool, 0):
                base, *blocks = future.result()
                yield start * self.row_numel, base, blocks

    def span(self, model: int | None, start: int, stop: int) -> torch.Tensor:
        first, last = start // self.row_numel, -(-stop // self.row_numel)
        values = self._read([0 if model is None else model + 1], first, last)[0]
        skip = first * self.row_numel
        return values[start - skip : stop - skip]

"""An embedding's or head's inputs aligned to the output vocabulary's rows a row block at a time: what the
executor, the exact preview and a two-phase method's first pass read when a tensor merged by token
(:class:`~mergescope.merge.vocabulary_merge.RowAlignment`) is too large to hold whole.

Output rows ``a:b`` of input i are gathered from input i's own rows ``maps[i][a:b]`` (read with
:meth:`~mergescope.checkpoints.Checkpoint.read_row_list`), the rest from the fill rows. The fill rows (a donor's
row, the holders' float32 mean, zeros) are computed once per tensor from the rows they need only, with
:meth:`RowAlignment.fill_rows_from` — the same sums as :meth:`RowAlignment.align` computes on whole tensors, so
every block has the bits of the whole-tensor alignment. Padding rows (``pad_to_multiple_of``) are each input's
float32 mean real row, computed once per tensor from that input's aligned rows read a block of
:data:`PAD_READ_ENTRIES` entries at a time (:func:`~mergescope.merge.vocabulary_merge.mean_real_row`: fixed
64-row chunks, so the bits of the mean over the whole rows that :meth:`RowAlignment.align` takes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from mergescope.checkpoints import Checkpoint
from mergescope.checkpoints.dtypes import torch_dtype

from .vocabulary_merge import RowAlignment, mean_real_row

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)

#: entries of one input's aligned rows read at a time for its padding row (4 MB of float32)
PAD_READ_ENTRIES = 1 << 20


class AlignedRows:
    """Inputs ``inputs`` ((checkpoint, tensor name) pairs, in the alignment's input order) under ``alignment``,
    read onto ``device`` by output row blocks (:meth:`rows`)."""

    def __init__(self, inputs: list[tuple[Checkpoint, str]], alignment: RowAlignment, device: str) -> None:
        import torch

        self.inputs, self.alignment, self.device = inputs, alignment, device
        specs = [checkpoint.spec(name) for checkpoint, name in inputs]
        self.dtype = alignment.aligned_dtype([torch_dtype(spec.dtype) for spec in specs])
        self.row_shape = tuple(specs[0].shape[1:])
        sources = alignment.fill_sources()
        held = {}
        for i, ((checkpoint, name), rows) in enumerate(zip(inputs, sources)):
            listed = sorted(rows)
            values = checkpoint.read_row_list(name, listed, device=device)
            held.update({(i, row): values[k] for k, row in enumerate(listed)})
        self.fills = alignment.fill_rows_from(lambda i, row: held[(i, row)], self.row_shape, torch.device(device))
        self.pads: list = []
        if alignment.rows > alignment.real_rows:
            for i in range(len(inputs)):
                self.pads.append(mean_real_row(self._real_blocks(i)).to(self.dtype))

    def _real_blocks(self, i: int) -> Iterator:
        """Input ``i``'s aligned real rows, :data:`PAD_READ_ENTRIES` entries (at least a row) at a time."""
        real = self.alignment.real_rows
        step = max(1, PAD_READ_ENTRIES // max(math.prod(self.row_shape), 1))
        for start in range(0, real, step):
            yield self._real_rows(i, start, min(start + step, real))

    def _real_rows(self, i: int, start: int, stop: int):
        checkpoint, name = self.inputs[i]
        own = sorted(set(self.alignment.own_rows(i, start, stop)))
        values = checkpoint.read_row_list(name, own, device=self.device)
        return self.alignment.align_rows(i, values, start, stop, self.fills, self.dtype, held=own)

    def rows(self, i: int, start: int, stop: int):
        """Output rows ``start:stop`` of input ``i``: ``align(...)[i][start:stop]`` to the bit."""
        import torch

        real = self.alignment.real_rows
        parts = []
        if start < real:
            parts.append(self._real_rows(i, start, min(stop, real)))
        if stop > real:
            count = stop - max(start, real)
            parts.append(self.pads[i].expand(count, *self.row_shape).contiguous())  # a method may work in place
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def task_aligned_rows(checkpoints: dict[str, Checkpoint], task, device: str) -> AlignedRows:
    """The aligned row reader of an embedding or head task (``task.vocabulary`` set)."""
    return AlignedRows([(checkpoints[ref], name) for ref, name in task.reads], task.vocabulary, device)

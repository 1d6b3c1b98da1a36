"""The TIES trim of the analysis's trimmed statistics (``density < 1``): which entries of each task vector a
TIES merge keeps — the ``trim_count`` entries of largest |τ|, ties lowest flat index first — over one tensor.

|τ| is the magnitude the analysis trims (:func:`trim_magnitude`): |θ − θ₀| in float32 (a LoRA's |Δ|), NaN
and ±Inf counted as 0. A tensor of one row block is trimmed in memory (:func:`trim_masks`); a larger one gets
each model's cut (t, c) from a first pass over its row blocks (:func:`streamed_cuts`: the streamed TIES cuts
of :mod:`mergescope.merge.magnitude_trim` over :class:`MagnitudeBlocks`), then each block's keep mask from its
own |τ| (:func:`block_masks`). Both select the same entries, so the statistics equal those of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from mergescope.merge.magnitude_trim import abs_task_vector, keep_mask, streamed_magnitude_cuts
from mergescope.merge.sparsify import top_magnitude_mask, trim_count

from .tensor_pass import TaskInput

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: float32 bytes of |τ| the trim of one tensor may hold at once; above it the models are trimmed one by one
TRIM_MEMORY_BYTES = 256 << 20


def trim_magnitude(item: TaskInput, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The |τ| the analysis trims, float32 (fresh, or written into ``out``): |θ − θ₀| (no float copy of θ₀), a
    LoRA's |Δ|, zeros for a model that lacks the tensor; NaN and ±Inf → 0."""
    import torch

    if out is None:
        out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    if item.values is None:
        return out.zero_()
    if item.is_delta:
        magnitude = out.copy_(item.values).abs_()
    else:
        magnitude = abs_task_vector(item.values, base, out=out)
    return magnitude.nan_to_num_(nan=0.0, posinf=0.0)


def _grown(buffer, numel: int, device):
    """``buffer``'s first ``numel`` float32 entries, made anew when it is too small."""
    import torch

    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer


def trim_masks(base: torch.Tensor, inputs: list[TaskInput], density: float, pool: Executor) -> list:
    """Each task vector's top-``density`` mask over a tensor held whole (one row block).

    The models run in parallel unless their |τ| copies together would exceed :data:`TRIM_MEMORY_BYTES`, so
    peak memory does not grow with the number of cores or models.
    """
    import torch

    def mask(item: TaskInput):
        if item.values is None:
            return torch.zeros_like(base, dtype=torch.bool)
        return top_magnitude_mask(trim_magnitude(item, base), density, absolute=True)

    if 4 * base.numel() * len(inputs) > TRIM_MEMORY_BYTES:
        return [mask(item) for item in inputs]
    return list(pool.map(mask, inputs))


class MagnitudeBlocks:
    """A :class:`~mergescope.merge.magnitude_counts.FlatBlocks` over one tensor's trimmed magnitudes: model i
    is :func:`trim_magnitude` of model i, the base zeros (so |model − base| is that magnitude), read a row
    block at a time with ``read(unit)`` → (base, inputs) over ``units`` (row blocks of ``row_numel`` entries a
    row, starting on 4096-entry multiples). A block's magnitudes are written into buffers reused by the next
    block (fresh ones per block, with small samples kept between them, grow the C heap by a block per block)."""

    def __init__(self, units: list, read: Callable, row_numel: int, device, gather_bytes: int | None) -> None:
        import torch

        self.units, self.read, self.row_numel = units, read, row_numel
        self.numel = (units[-1].stop - units[0].start) * row_numel
        self.device, self.gather_bytes = torch.device(device), gather_bytes
        self.magnitudes: dict[int, torch.Tensor] = {}
        self.zeros = self.base = None

    def _zeros(self, count: int):
        if self.zeros is None or self.zeros.numel() < count:
            self.zeros = _grown(None, count, self.device).zero_()
        return self.zeros[:count]

    def _float_base(self, base):
        """The block's base in float32, in a reused buffer (θ − θ₀ against a bf16 θ₀ would allocate a float32
        temporary per block)."""
        self.base = _grown(self.base, base.numel(), self.device)
        return self.base[: base.numel()].copy_(base)

    def _magnitude(self, model: int, base, inputs):
        buffer = self.magnitudes[model] = _grown(self.magnitudes.get(model), base.numel(), self.device)
        return trim_magnitude(inputs[model], base, out=buffer[: base.numel()])

    def blocks(self, models: list[int]) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
        for unit in self.units:
            base, inputs = self.read(unit)
            base = self._float_base(base)
            magnitudes = [self._magnitude(i, base, inputs) for i in models]
            yield unit.start * self.row_numel, self._zeros(base.numel()), magnitudes
            del base, inputs, magnitudes

    def span(self, model: int | None, start: int, stop: int) -> torch.Tensor:
        import torch

        if model is None:
            return self._zeros(stop - start)
        parts = []
        for unit in self.units:
            first, last = unit.start * self.row_numel, unit.stop * self.row_numel
            if last <= start or first >= stop:
                continue
            base, inputs = self.read(unit)
            magnitude = self._magnitude(model, self._float_base(base), inputs)
            parts.append(magnitude[max(start, first) - first : min(stop, last) - first].clone())
        return torch.cat(parts)


def streamed_cuts(source: MagnitudeBlocks, present: list[bool], density: float) -> list[tuple[torch.Tensor, int]]:
    """Each model's cut (t, c) over the whole tensor from passes over ``source``; a model not ``present``
    keeps nothing."""
    count = trim_count(source.numel, density)
    return streamed_magnitude_cuts(source, [count if p else 0 for p in present], gather_bytes=source.gather_bytes)


class BlockTrim:
    """The keep masks of a tensor's row blocks from the whole tensor's cuts, each block's |τ| written into one
    reused buffer."""

    def __init__(self, cuts: list) -> None:
        self.cuts = cuts
        self.buffer = self.base = None

    def masks(self, base: torch.Tensor, inputs: list[TaskInput], start: int) -> list:
        """The keep masks of the row block starting at flat entry ``start``."""
        numel = base.numel()
        self.buffer, self.base = _grown(self.buffer, numel, base.device), _grown(self.base, numel, base.device)
        magnitude, base = self.buffer[:numel], self.base[:numel].copy_(base)
        return [keep_mask(trim_magnitude(item, base, out=magnitude), threshold, last_tie - start)
                for item, (threshold, last_tie) in zip(inputs, self.cuts)]

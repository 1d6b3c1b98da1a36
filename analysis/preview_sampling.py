"""Sampling for the sampled plan preview: which rows of a tensor, reading only them, their Gram estimate, and
the cache that keeps samples between previews.

A tensor of more than ``sample_size`` entries is sampled by rows (dim 0; the entries of a 1-D tensor): the
R rows are cut into r = ⌊sample_size / row width⌋ strata of equal length (±1), and one row is drawn uniformly
in each, from a generator seeded by (seed, tensor name). A sampled row stands for its stratum's L rows, so
Σ over the tensor ≈ Σ over the sampled rows of L·(…) — the Horvitz–Thompson estimate, unbiased. Sampling
whole rows keeps the per-row semantics of methods that work row by row (DELLA's ranks, model_stock's and
arcee_fusion's per-row statistics).
"""

from __future__ import annotations

import math
import os
import threading
from typing import TYPE_CHECKING

from mergescope.checkpoints import Checkpoint, CheckpointError, SafetensorsCheckpoint, TensorInfo
from mergescope.checkpoints.dtypes import torch_dtype
from mergescope.merge.tensor_merge import tensor_seed

from .retention import MergeGram

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


class SampleCache:
    """Sampled rows of input tensors, kept between previews: keyed by checkpoint fingerprint, tensor name,
    sample size and sampling seed, so a changed file or setting is re-read."""

    def __init__(self) -> None:
        self._items: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            return self._items.get(key)

    def put(self, key: tuple, value) -> None:
        with self._lock:
            self._items[key] = value

    def __len__(self) -> int:
        return len(self._items)


def sample_rows(shape: tuple[int, ...], sample_size: int, seed: int, tensor: str):
    """The stratified row sample of a tensor (see the module docstring): ``(rows, lengths)`` as int64 tensors —
    the sampled row indices, ascending, and the stratum length each stands for — or None to use the whole
    tensor (it has at most ``sample_size`` entries or one row per stratum)."""
    import torch

    numel = math.prod(shape)
    if numel <= sample_size or not shape:
        return None
    count = shape[0] if len(shape) > 1 else numel
    width = numel // count
    strata = max(1, min(count, sample_size // max(width, 1)))
    if strata >= count:
        return None
    bounds = torch.arange(strata + 1, dtype=torch.int64) * count // strata
    lengths = bounds[1:] - bounds[:-1]
    generator = torch.Generator().manual_seed(tensor_seed(seed, "preview-sample\0" + tensor))
    offsets = (torch.rand(strata, generator=generator, dtype=torch.float64) * lengths).long().clamp_(max=lengths - 1)
    return bounds[:-1] + offsets, lengths


def sample_gram(base, vectors: list, row_lengths) -> MergeGram:
    """Σ over the sampled rows of L_row·(vₐ − θ₀)(v_b − θ₀) for the vectors [θ₁…θₙ, θ_m] (each row's entries
    weighted by its stratum length): the estimate of the whole tensor's Gram matrix. Differences in float32
    (exact for bf16 weights), products in float64."""
    import torch

    rows = len(row_lengths)
    flat_base = base.reshape(rows, -1).float()
    x = torch.stack([v.reshape(rows, -1).float() - flat_base for v in vectors]).double()
    x *= row_lengths.to(torch.float64).sqrt().reshape(1, rows, 1)
    x = x.reshape(len(vectors), -1)
    return MergeGram(len(vectors) - 1, (x @ x.T).numpy())


def read_rows(checkpoint: Checkpoint, name: str, rows) -> torch.Tensor:
    """Rows ``rows`` (ascending) of tensor ``name`` along dim 0 (entries of a 1-D tensor), in its stored dtype.

    From a safetensors file only those rows' bytes are read (one positioned read per row, inside the tensor's
    validated byte range); from other checkpoints (LoRA, .bin) the tensor is read whole and indexed.
    """
    import torch

    spec = checkpoint.spec(name)
    readable = isinstance(checkpoint, SafetensorsCheckpoint) and isinstance(spec, TensorInfo) and hasattr(os, "preadv")
    if not readable:
        whole = checkpoint.read(name)
        matrix = whole.reshape(whole.shape[0], -1) if whole.dim() > 1 else whole
        return matrix.index_select(0, rows).reshape(len(rows), *spec.shape[1:])
    row_bytes = spec.nbytes // (spec.shape[0] if len(spec.shape) > 1 else spec.numel)
    out = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    try:
        with open(spec.file, "rb", buffering=0) as f:
            for k, row in enumerate(rows.tolist()):
                _pread_exactly(f.fileno(), view[k * row_bytes : (k + 1) * row_bytes], spec.offset + row * row_bytes)
    except OSError as exc:
        raise CheckpointError(f"{spec.file}: cannot read tensor {name!r}: {exc.strerror or exc}") from None
    return out.view(torch_dtype(spec.dtype)).reshape(len(rows), *spec.shape[1:])


def _pread_exactly(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise CheckpointError(
                f"tensor data ends past the end of the file at byte {offset + done}; the file was truncated"
            )
        done += got

"""The fused statistics of one tensor, computed chunk by chunk.

For each chunk of c elements the base and the models go into one float32 buffer
``X = [θ₀; τ₁; …; τₙ; Σᵢτᵢ]`` ((n+2) × c, cache-sized; τᵢ = θᵢ − θ₀ is exact in float32 for bf16 and
fp16 weights). ``X Xᵀ`` gives every norm and dot product. It is formed as a batch of products over
``GRAM_BLOCK`` = 1024 columns each, summed in float64: one float32 product over a long chunk loses ~1e-5
relative (~1e-4 over a GPU-sized chunk), blocks of 1024 keep the error near 3e-7, for a quarter of the
cost of float64 products. ‖Σ τ‖ comes from its own row, never from Σᵢⱼ⟨τᵢ, τⱼ⟩, so ``cancellation``
stays exact when task vectors nearly cancel. The signs S = sign(τ) feed
:class:`~.sign_patterns.SignAccumulator`. Memory beyond the inputs is a few (n+2) × c buffers.

On the CPU a large tensor is split into contiguous slices computed by ``workers`` threads at once (each
with its own buffers; torch's kernels release the GIL), and the slices' sums are added.

Non-finite values are detected from the Gram matrix (a NaN or Inf anywhere makes it non-finite) so the
fast path never tests elements; only then is the slice recomputed with those elements zeroed and counted.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .sign_patterns import SignAccumulator
from .sums import TaskVectorSums

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_CHUNK = 1 << 18
#: columns per float32 partial product of the Gram matrix; the partials are summed in float64
GRAM_BLOCK = 1 << 10


@dataclass
class TaskInput:
    """One model's contribution to a tensor: its weights θᵢ, or its task vector τᵢ when ``is_delta``
    (LoRA), or nothing (``values is None``: the model lacks the tensor, τᵢ taken as 0). ``values`` is
    flat and may be in any float dtype; it is converted chunk by chunk."""

    values: torch.Tensor | None
    is_delta: bool = False


@dataclass
class TensorPassResult:
    sums: TaskVectorSums
    non_finite: list[int]  # NaN/Inf values in the base, then in each model's own values


def tensor_sums(
    base: torch.Tensor,
    inputs: list[TaskInput],
    *,
    trim_masks: list[torch.Tensor] | None = None,
    chunk: int = DEFAULT_CHUNK,
    pool: Executor | None = None,
    workers: int = 1,
    patterns: bool = False,
) -> TensorPassResult:
    """Sums of ``[θ₀, τ₁…τₙ]`` over one tensor (``base`` and every input flat, same numel, same device).

    With a thread ``pool`` and ``workers > 1``, slices of at least ``chunk`` elements run in parallel.
    ``patterns`` keeps the sign-pattern histogram and pattern mass (see :mod:`.sums`).
    """
    numel = base.numel()
    parts = max(1, min(workers, numel // max(chunk, 1))) if pool is not None else 1
    bounds = [numel * k // parts for k in range(parts + 1)]
    slices = list(zip(bounds, bounds[1:]))
    if parts == 1:
        return _slice_sums(base, inputs, trim_masks, chunk, 0, numel, patterns)
    futures = [pool.submit(_slice_sums, base, inputs, trim_masks, chunk, a, b, patterns) for a, b in slices]
    results = [f.result() for f in futures]
    total = results[0]
    for result in results[1:]:
        total.sums.add(result.sums)
        total.non_finite = [x + y for x, y in zip(total.non_finite, result.non_finite)]
    return total


def _slice_sums(base, inputs, trim_masks, chunk, start, stop, patterns=False) -> TensorPassResult:
    base = base[start:stop]
    inputs = [TaskInput(None if i.values is None else i.values[start:stop], i.is_delta) for i in inputs]
    masks = None if trim_masks is None else [m[start:stop] for m in trim_masks]
    result = _chunked_sums(base, inputs, masks, chunk, sanitize=False, patterns=patterns)
    if not np.isfinite(result.sums.gram).all() or not np.isfinite(result.sums.max_abs).all():
        result = _chunked_sums(base, inputs, masks, chunk, sanitize=True, patterns=patterns)
    return result


def _chunked_sums(base, inputs, trim_masks, chunk, sanitize: bool, patterns: bool = False) -> TensorPassResult:
    import torch

    n = len(inputs)
    numel = base.numel()
    device = base.device
    chunk = max(1, min(chunk, numel))
    padded_chunk = -(-chunk // GRAM_BLOCK) * GRAM_BLOCK
    buffer = torch.empty((n + 2, padded_chunk), dtype=torch.float32, device=device)
    sign_buffer = torch.empty((n, chunk), dtype=torch.float32, device=device)
    gram = torch.zeros((n + 2, n + 2), dtype=torch.float64, device=device)
    max_abs = torch.zeros(n, dtype=torch.float32, device=device)
    signs = SignAccumulator(n, chunk, device, patterns=patterns)
    trimmed = SignAccumulator(n, chunk, device) if trim_masks is not None else None
    non_finite = torch.zeros(n + 1, dtype=torch.int64, device=device)

    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        width = stop - start
        padded = -(-width // GRAM_BLOCK) * GRAM_BLOCK
        x = buffer[:, :width]
        x[0].copy_(base[start:stop])
        for i, item in enumerate(inputs, 1):
            if item.values is None:
                x[i].zero_()
            elif item.is_delta:
                x[i].copy_(item.values[start:stop])
            elif sanitize:  # count the model's own NaN/Inf, not those τ inherits from the base
                x[i].copy_(item.values[start:stop])
                non_finite[i] += torch.count_nonzero(~torch.isfinite(x[i]))
                x[i].sub_(x[0])
            else:
                torch.sub(item.values[start:stop], x[0], out=x[i])  # computed in float32: x[0] is
        if sanitize:
            bad = ~torch.isfinite(x[: n + 1])
            non_finite[0] += torch.count_nonzero(bad[0])
            x[: n + 1].masked_fill_(bad, 0.0)
        tau = x[1 : n + 1]
        torch.sum(tau, 0, out=x[n + 1])
        if padded > width:
            buffer[:, width:padded].zero_()
        blocks = buffer[:, :padded].view(n + 2, -1, GRAM_BLOCK).transpose(0, 1)
        gram += torch.bmm(blocks, blocks.transpose(1, 2)).sum(0, dtype=torch.float64)
        torch.maximum(max_abs, torch.maximum(tau.amax(1), tau.amin(1).neg_()), out=max_abs)
        s = torch.sign(tau, out=sign_buffer[:, :width])
        signs.add(s, tau if patterns else None)
        if trimmed is not None:
            for i, mask in enumerate(trim_masks):
                s[i].mul_(mask[start:stop])
            trimmed.add(s)

    sums = TaskVectorSums(
        n=n,
        numel=numel,
        gram=gram.cpu().numpy(),
        max_abs=max_abs.double().cpu().numpy(),
        signs=signs.result(),
        trimmed=trimmed.result() if trimmed is not None else None,
    )
    return TensorPassResult(sums, [int(v) for v in non_finite.cpu()])

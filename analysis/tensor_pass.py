"""The fused statistics of one tensor, computed chunk by chunk.

For each chunk of c elements the base and the models are copied into one float32 buffer
``X = [θ₀; τ₁; …; τₙ]`` ((n+1) × c, cache-sized), and three small matrix products give almost everything:
``X Xᵀ`` (norms, dots, ‖θ₀‖, ‖Σ τ‖), ``S Sᵀ`` and ``|S| |S|ᵀ`` with S = sign(τ) (sign agreements and
nonzero counts, exact in float32 for c < 2²⁴). Column sums of S and |S| give the TIES conflict count.
Per-chunk results are accumulated in float64. Memory beyond the inputs is a few (n+1) × c buffers.

Non-finite values are detected from the Gram matrix (a NaN or Inf anywhere makes it non-finite) so the
fast path never tests elements; only then is the tensor recomputed with those elements zeroed and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .sums import SignCounts, TaskVectorSums

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_CHUNK = 1 << 18


@dataclass
class TaskInput:
    """One model's contribution to a tensor: its weights θᵢ, or its task vector τᵢ when ``is_delta``
    (LoRA), or nothing (``values is None``: the model lacks the tensor, τᵢ taken as 0). ``values`` is
    flat and may be in any float dtype; it is converted chunk by chunk."""

    values: "torch.Tensor | None"
    is_delta: bool = False


@dataclass
class TensorPassResult:
    sums: TaskVectorSums
    non_finite: list[int]  # per row: base first, then each model


def tensor_sums(
    base: "torch.Tensor",
    inputs: list[TaskInput],
    *,
    trim_masks: "list[torch.Tensor] | None" = None,
    chunk: int = DEFAULT_CHUNK,
) -> TensorPassResult:
    """Sums of ``[θ₀, τ₁…τₙ]`` over one tensor (``base`` and every input flat, same numel, same device)."""
    result = _tensor_sums(base, inputs, trim_masks, chunk, sanitize=False)
    if not np.isfinite(result.sums.gram).all() or not np.isfinite(result.sums.max_abs).all():
        result = _tensor_sums(base, inputs, trim_masks, chunk, sanitize=True)
    return result


def _tensor_sums(base, inputs, trim_masks, chunk, sanitize: bool) -> TensorPassResult:
    import torch

    n = len(inputs)
    numel = base.numel()
    device = base.device
    chunk = max(1, min(chunk, numel))
    buffer = torch.empty((n + 1, chunk), dtype=torch.float32, device=device)
    gram = torch.zeros((n + 1, n + 1), dtype=torch.float64, device=device)
    max_abs = torch.zeros(n, dtype=torch.float32, device=device)
    signs = _SignAccumulator(n, device)
    trimmed = _SignAccumulator(n, device) if trim_masks is not None else None
    non_finite = torch.zeros(n + 1, dtype=torch.int64, device=device)
    mask_buffer = torch.empty((n, chunk), dtype=torch.float32, device=device) if trim_masks is not None else None

    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        x = buffer[:, : stop - start]
        x[0].copy_(base[start:stop])
        for i, item in enumerate(inputs, 1):
            if item.values is None:
                x[i].zero_()
            else:
                x[i].copy_(item.values[start:stop])
                if not item.is_delta:
                    x[i].sub_(x[0])
        if sanitize:
            bad = ~torch.isfinite(x)
            non_finite += bad.sum(1)
            x.masked_fill_(bad, 0.0)
            gram += x.double() @ x.double().T
        else:
            gram += (x @ x.T).double()
        tau = x[1:]
        torch.maximum(max_abs, tau.abs().amax(1), out=max_abs)
        s = torch.sign(tau)
        signs.add(s)
        if trimmed is not None:
            m = mask_buffer[:, : stop - start]
            for i, mask in enumerate(trim_masks):
                m[i].copy_(mask[start:stop])
            trimmed.add(s.mul_(m))

    sums = TaskVectorSums(
        n=n,
        numel=numel,
        gram=gram.cpu().numpy(),
        max_abs=max_abs.double().cpu().numpy(),
        signs=signs.result(),
        trimmed=trimmed.result() if trimmed is not None else None,
    )
    return TensorPassResult(sums, [int(v) for v in non_finite.cpu()])


class _SignAccumulator:
    """Accumulates ``S Sᵀ``, ``|S| |S|ᵀ`` and the TIES conflict counts of sign matrices S (n × c)."""

    def __init__(self, n: int, device):
        import torch

        self.sign_dot = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.both = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.multi = torch.zeros((), dtype=torch.int64, device=device)
        self.conflict = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, s: "torch.Tensor") -> None:
        a = s.abs()
        self.sign_dot += (s @ s.T).double()
        self.both += (a @ a.T).double()
        nonzero = a.sum(0)  # P + N per element
        balance = s.sum(0).abs_()  # |P − N|
        several = nonzero >= 2
        self.multi += several.sum()
        self.conflict += (balance < nonzero).sum()  # implies P + N >= 2

    def result(self) -> SignCounts:
        return SignCounts(
            sign_dot=self.sign_dot.cpu().numpy().round().astype(np.int64),
            both_nonzero=self.both.cpu().numpy().round().astype(np.int64),
            multi_nonzero=int(self.multi),
            multi_conflict=int(self.conflict),
        )

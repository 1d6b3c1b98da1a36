"""Methods whose mixing coefficients come from the task vectors themselves: model_stock, sce.

model_stock (base + at least two models)
    With τᵢ = θᵢ − θ₀ (i = 1…N) and c the mean over all pairs i < j of cos(τᵢ, τⱼ) = ⟨τᵢ,τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6)
    (each clamped to [−1, 1]), the interpolation ratio is t = N·c / (1 + (N−1)·c) and
    θ = t·θ̄ + (1 − t)·θ₀ with θ̄ = (1/N)Σθᵢ. Where |1 + (N−1)c| < 1e-6 there is no finite ratio and t = 0 (the
    base is kept). A negative c gives t < 0 (extrapolation away from the models), as in mergekit.
    ``filter_wise``: one c and t per vector along the last dimension (per row of a matrix; a 1-D tensor is one
    vector) instead of one for the whole tensor.

sce (base + models; ``select_topk``)
    τᵢ = θᵢ − θ₀ stacked. Select: if select_topk < 1, keep only the entries whose variance across the models
    (population variance, Var_i τᵢ) is among the k largest, k = ⌊(number of entries with nonzero variance) ·
    select_topk⌋ computed in float32 as mergekit does (ties at the threshold: lowest index first); the others
    are zeroed in every τᵢ. Calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) over the selected vectors (uniform 1/n when
    that sum is < 1e-6). Erase: TIES' sign election on the unweighted τᵢ (elected sign = sign of Σᵢτᵢ, + on 0).
    θ = θ₀ + Σ_{agreeing} wᵢτᵢ / max(Σ_{agreeing} wᵢ, 1e-6). ``int8_mask`` never changes the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.methods.task_arithmetic import elect_signs
from mergescope.merge.sparsify import select_extreme

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


def model_stock(base, models, params, options, generator=None):
    """θ = t·mean(θᵢ) + (1 − t)·θ₀ with t = N·c̄ / (1 + (N−1)·c̄) from the mean pairwise cosine c̄ of the τᵢ."""
    import torch

    if base is None:
        raise MergescopeError("model_stock needs a base_model: set base_model in the plan")
    if len(models) < 2:
        where = options.get("tensor_name") or "tensor"
        raise MergescopeError(f"{where}: model_stock needs at least two models besides the base, got {len(models)}")
    shape = base.shape
    if options.get("filter_wise", False):
        if base.dim() == 1:
            base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
    else:
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]

    taus = [m - base for m in models]
    cosines = []
    for i, first in enumerate(taus):
        for second in taus[i + 1 :]:
            scale = (torch.norm(first, dim=-1) * torch.norm(second, dim=-1)).clamp(min=1e-6)
            cosines.append(((first * second).sum(dim=-1) / scale).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(models)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    ratio = torch.where(
        singular, torch.zeros_like(cosine),
        count * cosine / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(models) / count
    return (ratio * average + (1 - ratio) * base).reshape(shape)


def _variance_mask(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """The entries (shape of one τ) whose variance across the models is among the ⌊nonzero·fraction⌋ largest."""
    import torch

    if fraction <= 0:
        return torch.zeros(taus.shape[1:], dtype=torch.bool, device=taus.device)
    variance = torch.var(taus, dim=0, unbiased=False)
    count = int(torch.count_nonzero(variance) * fraction)  # a float32 product, as in mergekit
    keep = select_extreme(variance.reshape(-1), count, largest=True, low_index_first=True)
    return keep.reshape(variance.shape)


def sce(base, models, params, options, generator=None):
    """Select by variance, Calculate weights from mean squares, Erase minority signs (see the module docstring)."""
    import torch

    if base is None:
        raise MergescopeError("sce needs a base_model: set base_model in the plan")
    if not models:
        return base.clone()
    taus = torch.stack([m - base for m in models])
    fraction = float(options.get("select_topk", 1.0))
    if fraction < 1:
        taus = taus * _variance_mask(taus, fraction).to(taus.dtype).unsqueeze(0)

    agree = elect_signs(taus)
    energy = taus.square().reshape(len(models), -1).mean(dim=1)
    total = torch.sum(energy).item()
    weights = torch.ones_like(energy) / len(models) if abs(total) < 1e-6 else energy / total
    weights = weights.reshape((-1,) + (1,) * base.dim())
    kept = weights * agree
    return base + (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)

"""One tensor up close, for the TUI's drill-down: how each model's deltas are distributed, how much of
each task vector's energy the largest entries carry, and how the models' signs agree entry by entry.

With τᵢ = θᵢ − θ₀ over the tensor's entries (a seeded sample of at most ``max_entries`` of them on very
large tensors, so a drill-down answers in well under a second):

- histogram: counts of τᵢ in ``bins`` equal bins over [−a, a], a = the largest |τ| of any model;
- ``energy_kept[d][i]`` = Σ of the top ⌈d·N⌉ values of τᵢ² / Σ τᵢ²: how much of ‖τᵢ‖² a TIES-style trim at
  density d keeps (1 means the trim loses nothing);
- sign breakdown over entries: ``none`` (no model moved it), ``one`` (exactly one moved), ``agree`` (two or
  more moved, all in the same direction), ``conflict`` (two or more moved, in opposite directions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mergescope.checkpoints import Checkpoint

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)

DENSITIES = (0.1, 0.2, 0.5, 0.8)


@dataclass
class TensorDetail:
    name: str
    shape: tuple[int, ...]
    names: list[str]
    sampled: int | None  # entries in the sample, None when every entry was used
    limit: float  # the histogram covers [-limit, limit]
    histograms: list[list[int]]  # per model, counts per bin
    energy_kept: dict[float, list[float | None]] = field(default_factory=dict)
    signs: dict[str, int] = field(default_factory=dict)  # none / one / agree / conflict → entries
    entries: int = 0


def tensor_detail(
    base: Checkpoint, models: list[Checkpoint], names: list[str], tensor: str, *,
    bins: int = 41, densities: tuple[float, ...] = DENSITIES, max_entries: int = 1 << 22, seed: int = 0,
) -> TensorDetail:
    """Read ``tensor`` from the base and every model that has it (same shape) and describe its deltas."""
    import torch

    spec = base.spec(tensor)
    numel = math.prod(spec.shape)
    index = None
    if numel > max_entries:
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(numel, generator=generator)[:max_entries]
    theta0 = _flat(base.read(tensor), index)
    kept_names, deltas = [], []
    for model, name in zip(models, names):
        if tensor in model and model.spec(tensor).shape == spec.shape:
            kept_names.append(name)
            deltas.append(_flat(model.read(tensor), index) - theta0)
    limit = max((float(d.abs().max()) for d in deltas if d.numel()), default=0.0)
    histograms = [_histogram(d, bins, limit) for d in deltas]
    energy = {d: [_energy_kept(delta, d) for delta in deltas] for d in densities}
    return TensorDetail(tensor, tuple(spec.shape), kept_names, None if index is None else len(index), limit,
                        histograms, energy, _sign_breakdown(deltas), int(theta0.numel()))


def _flat(tensor, index):
    flat = tensor.reshape(-1).float()
    return flat if index is None else flat[index]


def _histogram(delta, bins: int, limit: float) -> list[int]:
    import torch

    if limit == 0:
        counts = [0] * bins
        counts[bins // 2] = int(delta.numel())
        return counts
    return [int(c) for c in torch.histc(delta, bins=bins, min=-limit, max=limit)]


def _energy_kept(delta, density: float) -> float | None:
    """Σ of the top ⌈d·N⌉ squared entries / Σ of all squared entries."""
    import torch

    squares = delta.double().square()
    total = float(squares.sum())
    if total == 0:
        return None
    k = max(1, math.ceil(density * squares.numel()))
    return float(torch.topk(squares, k, sorted=False).values.sum()) / total


def _sign_breakdown(deltas: list) -> dict[str, int]:
    import torch

    if not deltas:
        return {"none": 0, "one": 0, "agree": 0, "conflict": 0}
    signs = torch.stack([torch.sign(d) for d in deltas])
    positive = (signs > 0).sum(0)
    negative = (signs < 0).sum(0)
    moved = positive + negative
    return {
        "none": int((moved == 0).sum()),
        "one": int((moved == 1).sum()),
        "agree": int(((moved >= 2) & ((positive == 0) | (negative == 0))).sum()),
        "conflict": int(((positive > 0) & (negative > 0)).sum()),
    }

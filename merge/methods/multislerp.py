"""multislerp: spherical barycentric interpolation of several models, or of their task vectors.

multislerp (≥ 1 non-base model, per-model weight; base optional)
    On the task vectors (θᵢ − θ₀) when a base is given, else on θᵢ, each flattened: uᵢ = xᵢ/(‖xᵢ‖ + eps),
    weights divided by their sum when ``normalize_weights``; m = Σ wᵢuᵢ normalised; the tangent vectors
    vᵢ = uᵢ − ⟨uᵢ, m⟩m are averaged, v = Σ wᵢvᵢ, and mapped back, r = m cos‖v‖ + v sin‖v‖/‖v‖ (with eps added
    to ‖v‖); θ = (Σ wᵢ‖xᵢ‖)·r [+ θ₀]. This is one exponential-map step from the normalised Euclidean mean, not
    an iterated Karcher mean. One model: returned as is. If ‖m‖ < eps: two models fall back to
    w₁x₁ + w₂x₂ [+ θ₀], more models are an error. Sums over models run in model order; ‖xᵢ‖, ‖Σ wᵢuᵢ‖, ⟨uᵢ, m⟩
    and ‖v‖ are reduced in float32 per chunk of 4096 entries, then over the chunks (a norm as the norm of the
    chunks' norms), so a merge streamed in row blocks has the bits of a whole-tensor merge.

The scalars (:class:`Sphere`) are the whole-tensor part: :func:`multislerp_prepare` on whole tensors or
:func:`multislerp_stream_prepare` in four passes over row blocks; given them, θ is entry by entry
(:func:`multislerp_combine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.methods.chunks import SideBySide, chunk_norms, chunk_sums

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch



def _where(options: dict) -> str:
    return options.get("tensor_name") or "tensor"


def _inputs(first, rest: list, params: list, options: dict) -> tuple:
    """(base or None, models) from the inputs in read order: a plan without a base has one parameter set per
    input, so ``first`` is then the first model."""
    base, models = (first, list(rest)) if len(params) == len(rest) else (None, [first, *rest])
    if not models:
        raise MergescopeError(f"{_where(options)}: multislerp needs at least one model")
    return base, models


def _vectors(base, models: list) -> list:
    """The xᵢ in float32, flat: the task vectors with a base, else the models."""
    if base is None:
        return [m.float().reshape(-1) for m in models]
    base = base.float().reshape(-1)
    return [m.float().reshape(-1) - base for m in models]


def _weights(params: list, options: dict, device):
    import torch

    weights = torch.tensor([float(p["weight"]) for p in params], dtype=torch.float32, device=device)
    return weights / weights.sum() if options.get("normalize_weights", True) else weights


@dataclass
class Sphere:
    """multislerp's whole-tensor scalars; later fields are None until the pass that finds them."""

    weights: torch.Tensor
    eps: float
    norms: list  # ‖xᵢ‖
    mean_norm: torch.Tensor | None = None  # ‖Σ wᵢuᵢ‖
    dots: list | None = None  # ⟨uᵢ, m⟩
    length: torch.Tensor | None = None  # ‖v‖ + eps

    def block(self, start: int, stop: int) -> Sphere:
        return self

    @property
    def linear(self) -> bool:
        """‖m‖ < eps: the two-model linear fallback."""
        return bool(self.mean_norm < self.eps)

    def units(self, xs: list) -> list:
        return [x / (n + self.eps) for x, n in zip(xs, self.norms)]

    def mean(self, units: list):
        """Σ wᵢuᵢ in model order (normalised once ``mean_norm`` is known)."""
        total = units[0] * self.weights[0]
        for unit, weight in zip(units[1:], self.weights[1:]):
            total = total + unit * weight
        return total if self.mean_norm is None else total / self.mean_norm

    def tangent(self, units: list, mean):
        """v = Σ wᵢ(uᵢ − ⟨uᵢ, m⟩m) in model order."""
        total = (units[0] - self.dots[0] * mean) * self.weights[0]
        for unit, dot, weight in zip(units[1:], self.dots[1:], self.weights[1:]):
            total = total + (unit - dot * mean) * weight
        return total


def _check_mean(sphere: Sphere, count: int, options: dict) -> None:
    if sphere.linear and count != 2:
        raise MergescopeError(
            f"{_where(options)}: multislerp's weighted mean direction is zero (opposite task vectors whose "
            "weights cancel): change the weights"
        )


def _norm(chunk_norms):
    import torch

    return torch.linalg.vector_norm(chunk_norms)


def multislerp_prepare(first, rest, params, options, seed=None) -> list[Sphere]:
    """multislerp's scalars over whole tensors (inputs in read order, any float dtype, taken as float32)."""
    import torch

    base, models = _inputs(first, rest, params, options)
    xs = _vectors(base, models)
    sphere = Sphere(_weights(params, options, xs[0].device), float(options.get("eps", 1e-8)),
                    [_norm(chunk_norms(x)) for x in xs])
    if len(models) == 1:
        return [sphere]
    units = sphere.units(xs)
    sphere.mean_norm = _norm(chunk_norms(sphere.mean(units)))
    _check_mean(sphere, len(models), options)
    if sphere.linear:
        return [sphere]
    mean = sphere.mean(units)
    sphere.dots = [torch.sum(chunk_sums(unit * mean)) for unit in units]
    sphere.length = _norm(chunk_norms(sphere.tangent(units, mean))) + sphere.eps
    return [sphere]


def multislerp_combine(first, rest, spheres, params, options):
    """θ = (Σ wᵢ‖xᵢ‖)(m cos‖v‖ + v sin‖v‖/‖v‖) [+ θ₀] entry by entry given the scalars, in float32."""
    import torch

    base, models = _inputs(first, rest, params, options)
    if len(models) == 1:
        return models[0].float().clone()
    sphere = spheres[0]
    xs = _vectors(base, models)
    if sphere.linear:
        result = xs[0] * sphere.weights[0] + xs[1] * sphere.weights[1]
    else:
        units = sphere.units(xs)
        mean = sphere.mean(units)
        tangent = sphere.tangent(units, mean)
        result = mean * torch.cos(sphere.length) + tangent * (torch.sin(sphere.length) / sphere.length)
        result = result * (torch.stack(sphere.norms) * sphere.weights).sum()
    return result if base is None else result + base.float().reshape(-1)


def multislerp_stream_prepare(source, params, options, seed=None) -> list[Sphere] | None:
    """:func:`multislerp_prepare` in four passes over a block source (the ‖xᵢ‖; ‖Σ wᵢuᵢ‖; the ⟨uᵢ, m⟩; ‖v‖),
    each reduced once over all chunks: the same bits. None for a source without its inputs."""
    import torch

    reads = getattr(source, "inputs", None)
    if reads is None or source.numel == 0:
        return None

    def vectors():
        for _, first, rest in source.blocks(list(range(len(reads) - 1))):
            yield _vectors(*_inputs(first, rest, params, options))

    count = len(params)
    norms = [SideBySide() for _ in range(count)]
    for xs in vectors():
        for i, x in enumerate(xs):
            norms[i].append(chunk_norms(x))
    sphere = Sphere(_weights(params, options, source.device), float(options.get("eps", 1e-8)),
                    [_norm(n.cat()) for n in norms])
    if count == 1:
        return [sphere]
    mean_norms = SideBySide()
    for xs in vectors():
        mean_norms.append(chunk_norms(sphere.mean(sphere.units(xs))))
    sphere.mean_norm = _norm(mean_norms.cat())
    _check_mean(sphere, count, options)
    if sphere.linear:
        return [sphere]
    dots = [SideBySide() for _ in range(count)]
    for xs in vectors():
        units = sphere.units(xs)
        mean = sphere.mean(units)
        for i, unit in enumerate(units):
            dots[i].append(chunk_sums(unit * mean))
    sphere.dots = [torch.sum(d.cat()) for d in dots]
    tangent_norms = SideBySide()
    for xs in vectors():
        units = sphere.units(xs)
        tangent_norms.append(chunk_norms(sphere.tangent(units, sphere.mean(units))))
    sphere.length = _norm(tangent_norms.cat()) + sphere.eps
    return [sphere]


def multislerp(base, models, params, options, seed=None):
    """Barycentric interpolation on the hypersphere by one tangent-space step (see the module docstring)."""
    if not models:
        raise MergescopeError(f"{_where(options)}: multislerp needs at least one model")
    first, rest = (base, models) if base is not None else (models[0], models[1:])
    spheres = multislerp_prepare(first, rest, params, options)
    return multislerp_combine(first, rest, spheres, params, options).reshape(models[0].shape)

"""karcher: the Karcher (Fréchet) mean of the models' directions on the unit sphere, at their mean norm.

karcher (all inputs, equal weights; the base is an ordinary input)
    The weighted Karcher mean on the unit sphere of uᵢ = θᵢ/‖θᵢ‖ with αᵢ = 1/n, inputs of norm ≤ tol left out
    (the others' α renormalised): start from the normalised weighted mean (the first unit vector if its norm
    is < tol); repeat up to ``max_iter`` times: T = Σ αᵢ φᵢ/sin φᵢ (uᵢ − cos φᵢ·m) over the inputs with
    φᵢ = arccos⟨m, uᵢ⟩ ≥ tol (cos clamped to [−1, 1]); stop if ‖T‖ < tol; m ← cos‖T‖·m + sin‖T‖·T/‖T‖,
    renormalised when its norm is > tol. θ = (Σᵢ ‖θᵢ‖/n)·m, the mean norm over all inputs. One input: itself.
    All inputs of norm ≤ tol: zeros. (mergekit 0.1.5's karcher.)

How it is computed, so that it streams: m stays in the span of the uᵢ, so it is kept as coefficients,
m = (Σᵢ βᵢuᵢ)/ν (the sum over kept inputs in input order, float32 entry by entry; βᵢ and ν Python floats).
With cᵢ = αᵢφᵢ/sin φᵢ (0 when φᵢ < tol) and s = Σ cᵢ cos φᵢ, T = Σ cᵢuᵢ − s·m and the update is
β ← (cos‖T‖ − s·sin‖T‖/‖T‖)·β/ν + (sin‖T‖/‖T‖)·c, then ν ← ‖Σ βᵢuᵢ‖ (1 when that is ≤ tol). Every
whole-tensor number — ‖θᵢ‖, ‖Σ βᵢuᵢ‖ with ⟨Σ βᵢuᵢ, uⱼ⟩ (one pass), ‖T‖ (one pass) — is reduced in float32 per
chunk of 4096 entries (:mod:`.chunks`) and then once over the chunks, so the whole-tensor function and the
streamed first pass (:func:`karcher_stream_prepare`: 2 + 2·iterations passes over row blocks) give the same
scalars, and the merge (:func:`karcher_combine`, entry by entry) the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.methods.chunks import SideBySide, chunk_norms, chunk_sums

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)


def _where(options: dict) -> str:
    return options.get("tensor_name") or "tensor"


@dataclass
class KarcherMean:
    """karcher's whole-tensor scalars: θ = scale·(Σᵢ βᵢ·xᵢ/‖xᵢ‖)/ν over ``coefficients`` (input → βᵢ, inputs
    among ``kept``, those of norm > tol); nothing kept: zeros; ``single``: the one input as it is.
    ``iterations``: the updates made."""

    norms: list  # ‖xᵢ‖, float32 0-dim tensors
    kept: list[int]
    coefficients: dict[int, float]
    normaliser: float
    scale: float
    iterations: int = 0
    single: bool = False

    def block(self, start: int, stop: int) -> KarcherMean:
        return self

    def units(self, xs: list) -> dict:
        """uᵢ = xᵢ/‖xᵢ‖ of the kept inputs (float32 blocks)."""
        return {i: xs[i] / self.norms[i] for i in self.kept}

    def raw(self, units: dict):
        """Σ βᵢuᵢ in input order."""
        total = None
        for i, beta in self.coefficients.items():
            term = units[i] * beta
            total = term if total is None else total + term
        return total


def _norm(chunk_values: SideBySide) -> float:
    import torch

    return float(torch.linalg.vector_norm(chunk_values.cat()))


def _mean_pass(mean: KarcherMean, vectors: Callable[[], Iterator[list]]) -> tuple[float, dict[int, float]]:
    """‖Σ βᵢuᵢ‖ and ⟨Σ βᵢuᵢ, uⱼ⟩ for every kept j, from one pass."""
    import torch

    norms = SideBySide()
    dots = {j: SideBySide() for j in mean.kept}
    for xs in vectors():
        units = mean.units(xs)
        raw = mean.raw(units)
        norms.append(chunk_norms(raw))
        for j, unit in units.items():
            dots[j].append(chunk_sums(raw * unit))
    return _norm(norms), {j: float(torch.sum(d.cat())) for j, d in dots.items()}


def _tangent_pass(mean: KarcherMean, weights: dict[int, float], shift: float,
                  vectors: Callable[[], Iterator[list]]) -> float:
    """‖T‖ = ‖Σ cⱼuⱼ − s·m‖ from one pass (``weights``: the cⱼ, ``shift``: s)."""
    norms = SideBySide()
    for xs in vectors():
        units = mean.units(xs)
        tangent = None
        for j, c in weights.items():
            term = units[j] * c
            tangent = term if tangent is None else tangent + term
        norms.append(chunk_norms(tangent - (mean.raw(units) / mean.normaliser) * shift))
    return _norm(norms)


def karcher_scalars(vectors: Callable[[], Iterator[list]], count: int, options: dict) -> KarcherMean:
    """The scalars of :class:`KarcherMean` from passes of ``vectors()`` (each pass yields, block by block in
    order, the ``count`` inputs' float32 flat blocks, each block starting on a 4096-entry chunk)."""
    import torch

    max_iter = int(options.get("max_iter", 10))
    tol = float(options.get("tol", 1e-5))
    chunks = [SideBySide() for _ in range(count)]
    for xs in vectors():
        for i, x in enumerate(xs):
            chunks[i].append(chunk_norms(x))
    norms = [torch.linalg.vector_norm(c.cat()) for c in chunks]
    scale = sum(float(n) for n in norms) / count
    kept = [i for i, n in enumerate(norms) if float(n) > tol]
    if count == 1 or not kept:
        return KarcherMean(norms, kept, {}, 1.0, scale, single=count == 1)
    alpha = {i: 1.0 / len(kept) for i in kept}  # αᵢ = 1/n renormalised over the kept inputs
    mean = KarcherMean(norms, kept, dict(alpha), 1.0, scale)
    length, dots = _mean_pass(mean, vectors)
    if length < tol:  # the weighted mean vanishes: start from the first unit vector
        mean.coefficients = {kept[0]: 1.0}
        length, dots = _mean_pass(mean, vectors)
        length = 1.0
    mean.normaliser = length
    for _ in range(max_iter):
        cosines = {j: min(1.0, max(-1.0, dot / mean.normaliser)) for j, dot in dots.items()}
        weights = {}
        for j, cosine in cosines.items():
            angle = math.acos(cosine)
            if angle >= tol:
                weights[j] = alpha[j] * angle / math.sin(angle)
        if not weights:  # T = 0
            break
        shift = sum(c * cosines[j] for j, c in weights.items())
        tangent = _tangent_pass(mean, weights, shift, vectors)
        if tangent < tol:
            break
        along, across = math.cos(tangent), math.sin(tangent) / tangent
        before = mean.coefficients
        mean.coefficients = {i: (along - across * shift) * before.get(i, 0.0) / mean.normaliser
                             + across * weights.get(i, 0.0) for i in kept if i in before or i in weights}
        length, dots = _mean_pass(mean, vectors)
        mean.normaliser = length if length > tol else 1.0
        mean.iterations += 1
    return mean


def karcher_prepare(first, rest, params, options, seed=None) -> list[KarcherMean]:
    """karcher's scalars over whole tensors (inputs in read order, any float dtype, taken as float32)."""
    models = [first, *rest]

    def vectors():
        yield [m.float().reshape(-1) for m in models]

    return [karcher_scalars(vectors, len(models), options)]


def karcher_combine(first, rest, means, params, options):
    """θ = scale·(Σᵢ βᵢuᵢ)/ν entry by entry given the scalars, in float32."""
    import torch

    models = [first, *rest]
    mean = means[0]
    if mean.single:
        return models[0].float().clone()
    if not mean.coefficients:
        return torch.zeros_like(models[0], dtype=torch.float32)
    raw = mean.raw(mean.units([m.float() for m in models]))
    return (raw / mean.normaliser) * mean.scale


def karcher_stream_prepare(source, params, options, seed=None) -> list[KarcherMean] | None:
    """:func:`karcher_prepare` from passes over a block source (its base is the first input): the same bits.
    None for a source without its inputs."""
    reads = getattr(source, "inputs", None)
    if reads is None or source.numel == 0:
        return None

    def vectors():
        for _, first, rest in source.blocks(list(range(len(reads) - 1))):
            yield [x.float() for x in (first, *rest)]

    return [karcher_scalars(vectors, len(reads), options)]


def karcher(base, models, params, options, seed=None):
    """Karcher mean of the inputs' directions with equal weights, scaled to their mean norm."""
    if base is not None:
        raise ValueError("karcher treats the base model as an ordinary input: pass it among the models, with base=None")
    if not models:
        raise MergescopeError(f"{_where(options)}: karcher needs at least one model")
    means = karcher_prepare(models[0], models[1:], params, options)
    flat = [m.reshape(-1) for m in models]
    return karcher_combine(flat[0], flat[1:], means, params, options).reshape(models[0].shape)

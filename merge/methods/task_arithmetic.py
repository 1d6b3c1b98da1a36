"""The task-arithmetic family: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
della, della_linear.

All eight are one computation with two switches, a *trim* and a *sign election*. For a base θ₀ and models
θ₁…θₙ with weights wᵢ:

1. τᵢ = θᵢ − θ₀.
2. Trim: τ̃ᵢ = τᵢ ⊙ mᵢ for a 0/1 mask mᵢ chosen by the method from densityᵢ (and γᵢ or εᵢ); with
   ``rescale`` the result is multiplied by ‖τᵢ‖₁ / ‖τᵢ ⊙ mᵢ‖₁
   (see :func:`~.rescale.l1_rescale_factor`). A density ≥ 1 leaves τᵢ untouched — no trim,
   no rescale, no random draw.
3. Weight: δᵢ = wᵢ · τ̃ᵢ.
4. Without sign election: Δ = Σᵢ δᵢ and D = Σᵢ wᵢ (D := 1 when |D| < 1e-8).
   With sign election (TIES): per entry, the elected sign is s = +1 if Σᵢ δᵢ ≥ 0 else −1 — the sign of the
   *sum of the trimmed, weighted deltas*, not a count of signs, and ties (a zero sum) go to +. Entry i
   agrees when sign(δᵢ) = s; a zero δᵢ (trimmed or unchanged) never agrees. Δ = Σ_{agreeing} δᵢ and
   D = Σ_{agreeing} wᵢ, per entry (D := 1 where it is exactly 0). A negative weight flips δᵢ and so the
   side it votes for, and enters D negatively.
5. If ``normalize``: Δ ← Δ / D. Then Δ ← λ · Δ (``lambda``; applied after normalisation).
6. θ = θ₀ + Δ. With no models at all the result is θ₀.

``int8_mask`` only chose the storage type of mergekit's sign mask; it never changes a result and is accepted
and ignored. ``density`` (task_arithmetic), ``rescale`` (task_arithmetic) and ``int8_mask`` (methods without
election) are likewise accepted and unused, as in mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge import magnitude_counts, magnitude_trim, sparsify
from mergescope.merge.methods.rescale import streamed_rescale, whole_rescale

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


def elect_signs(deltas: torch.Tensor) -> torch.Tensor:
    """Boolean [n, …] mask of the entries of the stacked weighted deltas that agree with the elected sign.

    The elected sign is + where Σᵢ δᵢ ≥ 0 and − elsewhere; an entry agrees when its own sign equals it, so
    zeros never agree.
    """
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == elected


def disjoint_sums(deltas: torch.Tensor, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{agreeing} δᵢ, Σ_{agreeing} wᵢ) per entry for the stacked weighted deltas; ``deltas`` is overwritten.

    The same bits as summing ``deltas ⊙ elect_signs(deltas)`` and ``w ⊙ elect_signs(deltas)`` over models,
    in fewer passes: with s = ±1 the elected sign, δᵢ agrees ⇔ s·δᵢ > 0, so Σ_{agreeing} δᵢ =
    s · Σᵢ max(s·δᵢ, 0) — negation commutes with rounding, and torch's sum, which starts from +0, ignores
    the zeros of the models that disagree, whatever their sign. None agrees only where every δᵢ is zero;
    there Σᵢ δᵢ = +0, so s = +1 and the sum stays +0, as before. The agreement indicator is
    sign(max(s·δᵢ, 0)).
    """
    import torch

    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype).mul_(2).sub_(1)  # ties (a zero sum) go to +
    aligned = deltas.mul_(elected).relu_()  # s·δᵢ where δᵢ agrees, ±0 elsewhere
    merged = aligned.sum(dim=0).mul_(elected)
    agree = aligned.sign_()  # 1 where agreeing, ±0 elsewhere
    if any(w != 1 for w in weights):
        per_model = torch.tensor(weights, dtype=agree.dtype, device=agree.device)
        agree.mul_(per_model.reshape((-1,) + (1,) * (agree.dim() - 1)))
    return merged, agree.sum(dim=0)


@dataclass
class Trim:
    """What the whole-tensor phase decided for one model: the kept entries (None: all), the rescale factor
    ‖τ‖₁ / ‖τ ⊙ m‖₁ (None: no rescale), or that the whole task vector is dropped (``zero``).

    The kept entries are a mask; or (TIES) a ``threshold`` t and ``last_tie`` c: entry j is kept ⇔ |τⱼ| > t,
    or |τⱼ| = t and j ≤ c (:func:`~mergescope.merge.magnitude_trim.keep_mask`), with j counted from the start
    of the tensor or block the trim applies to; or (breadcrumbs) a ``band`` of two cuts of |τ|
    (:func:`~mergescope.merge.magnitude_trim.band_mask`); or (DARE, DELLA) a ``drop``, drawn block by block
    (:class:`~mergescope.merge.sparsify.RandomDrop`), ``offset`` being the tensor's flat index of the trim's
    entry 0. No full-size mask exists but an explicit one (a 1-D DELLA tensor).
    """

    mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: bool = False
    threshold: float | None = None
    last_tie: int = -1
    drop: sparsify.RandomDrop | None = None
    offset: int = 0
    band: tuple[magnitude_trim.Cut, magnitude_trim.Cut] | None = None

    @property
    def trims(self) -> bool:
        """The trim drops some entries (a rescale factor applies to it)."""
        return any(x is not None for x in (self.mask, self.threshold, self.drop, self.band))

    @property
    def row_numel(self) -> int | None:
        """Entries of a row that a block must hold whole (DELLA's ranks), else None."""
        return None if self.drop is None else self.drop.row_numel

    def block(self, start: int, stop: int) -> Trim:
        """The same trim restricted to flat entries ``start:stop``."""
        mask = None if self.mask is None else self.mask.reshape(-1)[start:stop]
        band = None if self.band is None else (self.band[0].block(start), self.band[1].block(start))
        return Trim(mask, self.scale, self.zero, self.threshold, self.last_tie - start, self.drop, self.offset + start,
                    band)

    def keep(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the kept entries of the block whose |τ| is ``magnitude`` (the entries this trim covers)."""
        import torch

        if self.zero:
            return torch.zeros(magnitude.shape, dtype=torch.bool, device=magnitude.device)
        if self.threshold is not None:
            threshold = torch.tensor(self.threshold, dtype=torch.float32, device=magnitude.device)
            return magnitude_trim.keep_mask(magnitude, threshold, self.last_tie)
        if self.mask is not None:
            return self.mask.reshape(magnitude.shape).bool()
        if self.band is not None:
            return magnitude_trim.band_mask(magnitude, *self.band)
        if self.drop is not None:
            return self.drop.keep(magnitude, self.offset)
        return torch.ones(magnitude.shape, dtype=torch.bool, device=magnitude.device)

    def apply_(self, delta: torch.Tensor) -> None:
        """τ ⊙ m, then × the rescale factor, in place on the untrimmed float32 τ ``delta``."""
        if self.threshold is not None:
            magnitude_trim.apply_cut_(delta, self.threshold, self.last_tie)
        elif self.mask is not None:
            delta.mul_(self.mask)  # × 1 or × 0, as mergekit's τ ⊙ m (so −τ·0 stays −0.0)
        elif self.band is not None:
            delta.mul_(magnitude_trim.band_mask(delta.abs(), *self.band))
        elif self.drop is not None:
            delta.mul_(self.drop.keep(delta, self.offset))
        else:
            return
        if self.scale is not None:
            delta.mul_(self.scale)


def prepare_trims(
    kind: str | None, base: torch.Tensor, models: list[torch.Tensor], params: list[dict], options: dict,
    seed: int | None,
) -> list[Trim]:
    """Step 2's whole-tensor part: each model's trim — TIES' thresholds and tie cuts (:func:`magnitude_trims`),
    DARE's and DELLA's random drops as data (drawn block by block from the tensor's draw ``seed``), breadcrumbs'
    bands of two cuts of |τ| — and, with ``rescale``, the L1 rescale factors (:func:`~.rescale.whole_rescale`).

    Everything after this is elementwise (:func:`combine_trimmed`), so a large tensor can be merged block by
    block with the same bits. Inputs may be in any float dtype; τ is formed in float32.
    """
    if kind == "magnitude":
        trims = magnitude_trims(base, models, params)
    else:
        trims = []
        for index, (model, p) in enumerate(zip(models, params)):
            trim = _planned_trim(kind, index, p, base.shape, options, seed)
            if trim is None:  # found from the whole |τ|: one float32 copy, absolute in place
                tau = magnitude_trim.abs_task_vector(model, base)
                if kind == "outliers":  # two cuts of |τ|, as streamed_outlier_trims finds them
                    trim = Trim(band=sparsify.outlier_band(tau, float(p["density"]), float(p.get("gamma", 0.01))))
                else:  # DELLA on a 1-D tensor: its one row is the whole tensor
                    trim = Trim(sparsify.della_mask(tau, float(p["density"]), float(p.get("epsilon", 0.15)),
                                                    _draw_seed(seed), index))
                del tau
            trims.append(trim)
    if not options.get("rescale", False):
        return trims
    return whole_rescale(trims, base, models, [i for i, trim in enumerate(trims) if trim.trims])


def _planned_trim(kind: str | None, index: int, p: dict, shape: tuple, options: dict, seed: int | None) -> Trim | None:
    """Model ``index``'s trim where it is data (no trim, a random drop, a dropped model), None where it is
    found from |τ| (breadcrumbs' band, a mask for DELLA on a 1-D tensor)."""
    density = float(p.get("density", 1.0))
    if kind is None or density >= 1:
        return Trim()
    if kind == "della" and density <= 0:
        return Trim(zero=True)
    if kind == "random":
        return Trim(drop=sparsify.RandomDrop(density, _draw_seed(seed), index))
    if kind == "della":
        epsilon = float(p.get("epsilon", 0.15))
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise MergescopeError(
                f"{options.get('tensor_name') or 'tensor'}: model {index + 1} has density {density:g} and epsilon "
                f"{epsilon:g}; DELLA needs 0 < density − epsilon and density + epsilon < 1: lower epsilon"
            )
        if len(shape) >= 2:
            return Trim(drop=sparsify.RandomDrop(density, _draw_seed(seed), index, epsilon, tuple(shape[1:])))
    return None


def _draw_seed(seed: int | None) -> int:
    if seed is None:
        raise ValueError("DARE and DELLA draw random masks: pass the tensor's draw seed (the global RNG is never used)")
    return seed


def magnitude_trims(base: torch.Tensor, models: list[torch.Tensor], params: list[dict]) -> list[Trim]:
    """TIES' trims as thresholds and tie cuts, all models found in one blockwise pass: no full-size |τ| or mask
    (:mod:`~mergescope.merge.magnitude_trim`). A density ≥ 1 keeps everything."""
    trims = [Trim() for _ in models]
    trimmed = [i for i, p in enumerate(params) if float(p.get("density", 1.0)) < 1]
    counts = [sparsify.trim_count(base.numel(), float(params[i]["density"])) for i in trimmed]
    cuts = magnitude_trim.top_magnitude_cuts(base, [models[i] for i in trimmed], counts)
    for i, (threshold, last_tie) in zip(trimmed, cuts):
        trims[i] = Trim(threshold=float(threshold), last_tie=last_tie)
    return trims


def streamed_trims(kind: str | None, source, params: list[dict], options: dict, seed: int | None) -> list[Trim] | None:
    """Step 2's whole-tensor part from passes over a :class:`~mergescope.merge.magnitude_counts.FlatBlocks`
    source of row blocks instead of whole tensors, with the bits of :func:`prepare_trims`: no trim (or every
    density ≥ 1); TIES' thresholds and tie cuts; DARE's and DELLA's drops (data); then, with ``rescale``, the
    L1 factors from one more pass (:func:`~.rescale.streamed_rescale`). Breadcrumbs' bands from one counting
    pass (:func:`streamed_outlier_trims`). None where the whole |τ| is needed (DELLA on a 1-D tensor)."""
    densities = [float(p.get("density", 1.0)) for p in params]
    if kind is None or all(d >= 1 for d in densities):
        return [Trim() for _ in params]
    if kind == "magnitude":
        trims = [Trim() for _ in params]
        trimmed = [i for i, d in enumerate(densities) if d < 1]
        counts = [sparsify.trim_count(source.numel, densities[i]) for i in trimmed]
        cuts = magnitude_trim.streamed_magnitude_cuts(_Subset(source, trimmed), counts,
                                                      gather_bytes=source.gather_bytes)
        for i, (threshold, last_tie) in zip(trimmed, cuts):
            trims[i] = Trim(threshold=float(threshold), last_tie=last_tie)
    elif kind == "outliers":
        trims = streamed_outlier_trims(source, params)
    else:
        shape = tuple(getattr(source, "shape", (source.numel,)))
        trims = [_planned_trim(kind, i, p, shape, options, seed) for i, p in enumerate(params)]
        if any(trim is None for trim in trims):
            return None
    if not options.get("rescale", False):
        return trims
    return streamed_rescale(trims, source, [i for i, trim in enumerate(trims) if trim.trims])


def streamed_outlier_trims(source, params: list[dict]) -> list[Trim]:
    """Breadcrumbs' trims without rescale as bands of two cuts of each model's |τ|, every model's cuts from one
    counting pass over the source (:func:`~mergescope.merge.magnitude_trim.select_cuts`); the cuts
    :func:`prepare_trims` finds on the whole |τ|."""
    trims = [Trim() for _ in params]
    trimmed = [i for i, p in enumerate(params) if float(p.get("density", 1.0)) < 1]
    selections = [selection for i in trimmed for selection in sparsify.outlier_selections(
        source.numel, float(params[i]["density"]), float(params[i].get("gamma", 0.01)), i)]
    cuts = magnitude_trim.select_cuts(magnitude_counts.TaskMagnitudes(source), selections,
                                      gather_bytes=source.gather_bytes)
    for position, i in enumerate(trimmed):
        trims[i] = Trim(band=sparsify.as_band(cuts[2 * position : 2 * position + 2]))
    return trims


class _Subset:
    """The models ``keep`` of a block source, renumbered 0…"""

    def __init__(self, source, keep: list[int]) -> None:
        self.source, self.keep = source, keep
        self.numel, self.device, self.gather_bytes = source.numel, source.device, source.gather_bytes

    def blocks(self, models: list[int]):
        return self.source.blocks([self.keep[i] for i in models])

    def span(self, model: int | None, start: int, stop: int):
        return self.source.span(None if model is None else self.keep[model], start, stop)


def combine_trimmed(
    base: torch.Tensor, models: list[torch.Tensor], trims: list[Trim], params: list[dict], options: dict, *, elect: bool
) -> torch.Tensor:
    """Steps 3–6, elementwise: weight the trimmed deltas, elect signs, normalise, scale, add to θ₀."""
    import torch

    base = base.float()
    # filled in place, one model at a time: peak memory is n deltas
    deltas = torch.empty((len(models), *base.shape), dtype=base.dtype, device=base.device)
    for i, (model, trim) in enumerate(zip(models, trims)):
        if trim.zero:
            deltas[i] = 0
            continue
        # τ = f32(model) − f32(base), as in the trim phase: the float32 copy is exact for bf16 models, and a
        # subtraction of two float32 tensors is twice as fast as one of mixed dtypes
        delta = deltas[i].copy_(model).sub_(base)
        trim.apply_(delta)
    weight_values = [float(p["weight"]) for p in params]
    weights = torch.tensor(weight_values, dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape((-1,) + (1,) * base.dim())
    if any(w != 1 for w in weight_values):  # × 1.0 changes no bits
        deltas.mul_(weights)

    if elect:
        merged, divisor = disjoint_sums(deltas, weight_values)
        divisor.masked_fill_(divisor == 0, 1)
    else:
        merged = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    del deltas

    if options.get("normalize", False):
        merged /= divisor
    scale = float(options.get("lambda", 1.0))
    if scale != 1:
        merged *= scale
    return base + merged


def generalized_task_arithmetic(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    params: list[dict],
    options: dict,
    seed: int | None,
    *,
    trim: str | None,
    elect: bool,
) -> torch.Tensor:
    """Steps 1–6 of the module docstring; ``trim`` ∈ {None, "magnitude", "outliers", "random", "della"}."""
    if base is None:
        raise MergescopeError("this merge method needs a base_model: set base_model in the plan")
    if len(params) != len(models):
        raise ValueError(f"{len(models)} models but {len(params)} parameter sets")
    if not models:
        return base.clone()
    trims = prepare_trims(trim, base, models, params, options, seed)
    return combine_trimmed(base, models, trims, params, options, elect=elect)


@dataclass(frozen=True)
class Variant:
    """One member of the family: its ``trim`` (None, "magnitude", "outliers", "random" or "della") and whether it
    elects signs (``elect``). :meth:`merge` is steps 1–6; :meth:`prepare` (the whole-tensor part of step 2) and
    :meth:`combine` (steps 3–6, elementwise) are the same computation in two phases, for block-by-block
    execution of large tensors with the same bits."""

    name: str
    trim: str | None
    elect: bool
    doc: str

    def merge(self, base, models, params, options, seed=None) -> torch.Tensor:
        return generalized_task_arithmetic(base, models, params, options, seed, trim=self.trim, elect=self.elect)

    def prepare(self, base, models, params, options, seed=None) -> list[Trim]:
        return prepare_trims(self.trim, base, models, params, options, seed)

    def combine(self, base, models, trims, params, options) -> torch.Tensor:
        return combine_trimmed(base, models, trims, params, options, elect=self.elect)

    def stream_prepare(self, source, params, options, seed=None) -> list[Trim] | None:
        return streamed_trims(self.trim, source, params, options, seed)


task_arithmetic = Variant("task_arithmetic", None, elect=False,
                          doc="θ₀ + λ·Σᵢ wᵢτᵢ [/ Σᵢ wᵢ if normalize]. No trim, no election.")
ties = Variant("ties", "magnitude", elect=True,
               doc="TIES: keep the max(1, ⌊density·n⌋) largest |τᵢ| (ties at the threshold: lowest index), elect "
                   "signs by the sum of the weighted trimmed deltas, disjoint weighted mean when normalize "
                   "(default on).")
dare_linear = Variant("dare_linear", "random", elect=False,
                      doc="DARE: keep each entry with probability density (per-chunk draws from the tensor's seed), "
                          "L1-rescale (default on), weighted sum.")
dare_ties = Variant("dare_ties", "random", elect=True,
                    doc="DARE's random drop followed by TIES' sign election; normalize defaults off.")
breadcrumbs = Variant("breadcrumbs", "outliers", elect=False,
                      doc="Model Breadcrumbs: drop the ⌊γ·n⌋ largest |τᵢ| and the smallest, keep ⌊density·n⌋; weighted "
                          "sum. density 1 (the default) drops nothing — not even the outliers.")
breadcrumbs_ties = Variant("breadcrumbs_ties", "outliers", elect=True,
                           doc="Model Breadcrumbs' trim followed by TIES' sign election.")
della = Variant("della", "della", elect=True,
                doc="DELLA: per-row magnitude-ranked keep probabilities in [density − ε, density + ε], L1 rescale, "
                    "TIES election, normalize on by default.")
della_linear = Variant("della_linear", "della", elect=False,
                       doc="DELLA's MagPrune drop followed by a weighted sum (no election).")

"""mergekit's merge methods as pure functions over one tensor's inputs.

Each method is a :class:`MergeMethod` in :data:`METHODS`; its ``function`` is called as

    function(base, models, params, options, seed) -> torch.Tensor

- ``base``: θ₀ (float32), or ``None``. See :attr:`MergeMethod.base_role` for which methods take it.
- ``models``: the other inputs θ₁…θₙ (float32, same shape and device as ``base``), in plan order, **without**
  the base. For ``base_role == "input"`` methods (linear, karcher, passthrough) mergekit gives the base no
  special role: the configured base_model is merged like any model (mergekit appends it last when the plan does
  not list it), so it belongs in ``models`` — with its own per-model parameters — and ``base`` must be None.
- ``params[i]``: model i's resolved per-model parameters, defaults filled (``weight``, ``density``, …).
- ``options``: the resolved method-level parameters, defaults filled (``normalize``, ``t``, ``lambda``, …),
  plus ``"tensor_name"`` (used in error messages).
- ``seed``: the output tensor's draw seed (an int, :func:`~mergescope.merge.tensor_merge.tensor_seed`), or
  None; only the ``random`` methods use it: entry j of model i is drawn from a generator of its own per chunk of
  entries, seeded from (seed, i, j's chunk) (:mod:`mergescope.merge.draws`), never from torch's global
  generator, so the draws of any block of a tensor are those of the whole tensor.

The result is float32 with the inputs' shape. The maths of every method, and each place it follows a mergekit
behaviour that may surprise, is in the docstring of its module: :mod:`.task_arithmetic` (task_arithmetic, ties,
dare_*, breadcrumbs*, della*), :mod:`.linear` (linear, nearswap, passthrough), :mod:`.spherical` (slerp),
:mod:`.karcher`, :mod:`.nuslerp`, :mod:`.multislerp` and :mod:`.adaptive` (model_stock, sce). Numbers follow
mergekit 0.1.5 run on float32 inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.methods import (
    adaptive,
    karcher,
    linear,
    multislerp,
    nuslerp,
    selective,
    spherical,
    task_arithmetic,
)
from mergescope.merge.methods.chunks import STAT_CHUNK

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

BASE_ROLES = ("required", "optional", "input")


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of a merge method, under mergekit's name.

    ``per_model``: set under ``models[i].parameters`` (a method-level value is the fallback for every model, as
    in mergekit); otherwise method-level. ``low``/``high``: the inclusive range in which the value means
    something. mergekit itself only checks types, and values outside the range act like the nearest bound
    (e.g. density 1.5 is density 1), so a validator may reject or warn. ``default`` is None for required ones.
    """

    name: str
    default: object
    per_model: bool
    required: bool = False
    low: float | None = None
    high: float | None = None
    value_type: type = float
    description: str = ""
    #: accepted because mergekit accepts it, but it never changes this method's result (``density`` in plain
    #: task arithmetic, ``int8_mask``): the plan builder neither offers nor writes it
    ignored: bool = False


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its name, its parameters and its tensor function, with what the executor may rely on.

    - ``base_role``: "required" (``base`` is θ₀ and must be given: :attr:`needs_base`), "optional" (θ₀ is used
      when the plan names a base_model, else None) or "input" (mergekit merges the base like any other model:
      pass it in ``models`` and base=None).
    - ``random``: the function draws from its ``seed``, so the executor derives one per output tensor.
    - ``elementwise``: the result at each entry depends only on the inputs at that entry (no norms, thresholds
      or draws), so the executor may apply ``function`` to a large tensor block by block, holding float32
      copies of one block only.
    - ``prepare`` and ``combine``: the same computation as ``function`` in two phases, given together or not at
      all: ``prepare(base, models, params, options, seed)`` decides per-model trims over the whole
      tensor; ``combine(base, models, trims, params, options)`` is elementwise given those trims (each
      restricted to the block with ``trim.block(start, stop)``), so a large tensor is combined block by block
      with the bits of ``function``; a trim whose ``row_numel`` is set (DELLA's) is given blocks of whole rows.
    - ``stream_prepare``: ``prepare(source, params, options, seed)`` from passes over a block source
      (:class:`~mergescope.merge.magnitude_counts.FlatBlocks`: the inputs read a row range at a time) instead
      of whole tensors, returning the same trims, or None when these parameters need the whole tensor; its
      source's blocks start on multiples of ``stream_align`` entries.
    """

    name: str
    description: str
    function: Callable[..., torch.Tensor]
    parameters: tuple[ParameterSpec, ...] = ()
    base_role: str = "required"
    random: bool = False
    elementwise: bool = False
    prepare: Callable[..., list] | None = None
    combine: Callable[..., torch.Tensor] | None = None
    stream_prepare: Callable[..., list | None] | None = None
    stream_align: int = 1 << 12

    def __post_init__(self) -> None:
        if self.base_role not in BASE_ROLES:
            raise ValueError(f"{self.name}: base_role {self.base_role!r} is not one of {BASE_ROLES}")
        if (self.prepare is None) != (self.combine is None):
            raise ValueError(f"{self.name}: give prepare and combine together, or neither")

    @property
    def needs_base(self) -> bool:
        """A plan must name a base_model: the function takes θ₀ as ``base``."""
        return self.base_role == "required"

    @property
    def two_phase(self) -> bool:
        """The method has ``prepare`` and ``combine``."""
        return self.prepare is not None

    def parameter(self, name: str) -> ParameterSpec:
        for spec in self.parameters:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _p(name, default=None, *, per_model=False, required=None, low=None, high=None, kind=float, doc="",
       ignored=False) -> ParameterSpec:
    required = default is None if required is None else required
    return ParameterSpec(name, default, per_model, required, low, high, kind, doc, ignored)


_WEIGHT = _p("weight", per_model=True, doc="the model's coefficient; required")
_DENSITY = _p("density", 1.0, per_model=True, low=0.0, high=1.0, doc="fraction of the task vector kept; 1 keeps all")
_INT8 = _p("int8_mask", False, kind=bool, doc="memory option of mergekit's sign mask; never changes the result",
          ignored=True)
_LAMBDA = _p("lambda", 1.0, doc="scale of the merged task vector, after normalisation")
_GAMMA = _p("gamma", 0.01, per_model=True, low=0.0, high=1.0, doc="fraction of largest-magnitude entries dropped")
_EPSILON = _p(
    "epsilon", 0.15, per_model=True, low=0.0, high=0.5,
    doc="keep probabilities span density ± epsilon by magnitude rank; needs 0 < density ± epsilon < 1",
)


def _task_arithmetic_family(
    variant: task_arithmetic.Variant, description: str, *, normalize: bool, rescale: bool,
    extra: tuple[ParameterSpec, ...] = (), random: bool = False, elementwise: bool = False,
) -> MergeMethod:
    """A member of :mod:`.task_arithmetic`'s family, with ``normalize`` and ``rescale`` defaulting as given."""
    untrimmed = variant.trim is None  # then density and rescale are accepted and unused, as in mergekit
    parameters = (
        _INT8,
        _p("normalize", normalize, kind=bool, doc="divide the merged task vector by the (agreeing) weights' sum"),
        _p("rescale", rescale, kind=bool, doc="scale each trimmed task vector back to its L1 norm", ignored=untrimmed),
        _LAMBDA,
        _WEIGHT,
        replace(_DENSITY, ignored=untrimmed),
    ) + extra
    # first passes start on STAT_CHUNK entries: the L1 rescale sums per chunk; draws need no alignment
    return MergeMethod(
        variant.name, description, variant.merge, parameters, random=random, elementwise=elementwise,
        prepare=variant.prepare, combine=variant.combine, stream_prepare=variant.stream_prepare,
        stream_align=STAT_CHUNK,
    )


_TA = task_arithmetic
_ALL = [
    MergeMethod("linear", "Weighted average of the models (model soup); the base is one more input", linear.linear,
                (_WEIGHT, _p("normalize", True, kind=bool, doc="divide by the sum of the weights")),
                base_role="input", elementwise=True),
    _task_arithmetic_family(_TA.task_arithmetic, "Base plus the weighted sum of task vectors",
                            normalize=False, rescale=False, elementwise=True),
    _task_arithmetic_family(_TA.ties, "Trim task vectors to the largest magnitudes, elect signs, average the agreeing "
                            "ones", normalize=True, rescale=False),
    _task_arithmetic_family(_TA.dare_linear, "Randomly drop task-vector entries (DARE), rescale, weighted sum",
                            normalize=False, rescale=True, random=True),
    _task_arithmetic_family(_TA.dare_ties, "Randomly drop task-vector entries (DARE), rescale, TIES sign election",
                            normalize=False, rescale=True, random=True),
    _task_arithmetic_family(_TA.breadcrumbs, "Drop the largest outliers and smallest entries of task vectors, "
                            "weighted sum", normalize=False, rescale=False, extra=(_GAMMA,)),
    _task_arithmetic_family(_TA.breadcrumbs_ties, "Model Breadcrumbs trim followed by TIES sign election",
                            normalize=False, rescale=False, extra=(_GAMMA,)),
    _task_arithmetic_family(_TA.della, "Drop entries with magnitude-ranked probabilities (DELLA), rescale, TIES sign "
                            "election", normalize=True, rescale=True, extra=(_EPSILON,), random=True),
    _task_arithmetic_family(_TA.della_linear, "Drop entries with magnitude-ranked probabilities (DELLA), rescale, "
                            "weighted sum", normalize=False, rescale=True, extra=(_EPSILON,), random=True),
    MergeMethod("slerp", "Spherical interpolation between the base (t=0) and one other model (t=1)", spherical.slerp,
                (_p("t", low=0.0, doc="interpolation factor; 0 is the base, 1 the other model (above 1 "
                    "extrapolates); required"),),
                prepare=spherical.slerp_prepare, combine=spherical.slerp_combine,
                stream_prepare=spherical.slerp_stream_prepare, stream_align=spherical.SLERP_BLOCK),
    MergeMethod("nearswap", "Take the other model's value where it is within t of the base", linear.nearswap,
                (_p("t", low=0.0, doc="similarity threshold; required"),), elementwise=True),
    MergeMethod("model_stock", "Interpolate base and model average by the task vectors' mean cosine",
                adaptive.model_stock,
                (_p("filter_wise", False, kind=bool, doc="one ratio per row instead of per tensor"),),
                prepare=adaptive.model_stock_prepare, combine=adaptive.model_stock_combine,
                stream_prepare=adaptive.model_stock_stream_prepare, stream_align=STAT_CHUNK),
    MergeMethod("sce", "Select high-variance entries, weight by mean square, erase minority signs", adaptive.sce,
                (_INT8, _p("select_topk", 1.0, low=0.0, high=1.0, doc="fraction of highest-variance entries kept")),
                prepare=adaptive.sce_prepare, combine=adaptive.sce_combine,
                stream_prepare=adaptive.sce_stream_prepare, stream_align=STAT_CHUNK),
    MergeMethod("nuslerp", "Spherical interpolation of two models (or their task vectors) by weight ratio",
                nuslerp.nuslerp,
                (_WEIGHT,
                 _p("nuslerp_row_wise", False, kind=bool, doc="slerp the vectors along dim 0 (needs flatten off)"),
                 _p("nuslerp_flatten", True, kind=bool, doc="slerp the whole tensor as one vector")),
                base_role="optional", prepare=nuslerp.nuslerp_prepare, combine=nuslerp.nuslerp_combine,
                stream_prepare=nuslerp.nuslerp_stream_prepare, stream_align=STAT_CHUNK),
    MergeMethod("multislerp", "Spherical barycentric interpolation of several models (or their task vectors)",
                multislerp.multislerp,
                (_WEIGHT, _p("normalize_weights", True, kind=bool, doc="divide the weights by their sum"),
                 _p("eps", 1e-8, low=0.0, doc="numerical guard")),
                base_role="optional", prepare=multislerp.multislerp_prepare, combine=multislerp.multislerp_combine,
                stream_prepare=multislerp.multislerp_stream_prepare, stream_align=STAT_CHUNK),
    MergeMethod("karcher", "Karcher mean of the models' directions on the sphere, at their mean norm",
                karcher.karcher,
                (_p("max_iter", 10, low=0, kind=int, doc="iterations at most"),
                 _p("tol", 1e-5, low=0.0, doc="convergence and zero-norm tolerance")),
                base_role="input", prepare=karcher.karcher_prepare, combine=karcher.karcher_combine,
                stream_prepare=karcher.karcher_stream_prepare, stream_align=STAT_CHUNK),
    MergeMethod("ram", "Keep changes only one model made; average those several made (Reinforced Agent Merging)",
                selective.ram, (_p("epsilon", 1e-5, low=0.0, doc="a change counts when |τ| exceeds it"),),
                elementwise=True),
    MergeMethod("ramplus_tl", "RAM, with each model's unique changes boosted by its overlap ratio (tensor-local)",
                selective.ramplus_tl,
                (_p("r", 0.1, low=0.0, doc="boost strength"), _p("alpha", 0.2, low=0.0, doc="cap of the overlap ratio"),
                 _p("epsilon", 1e-5, low=0.0, doc="a change counts when |τ| exceeds it")),
                prepare=selective.ramplus_prepare, combine=selective.ramplus_combine,
                stream_prepare=selective.ramplus_stream_prepare),
    MergeMethod("arcee_fusion", "Take the model's change only where it matters (|Δ|·KL above median + 1.5·IQR)",
                selective.arcee_fusion, prepare=selective.fusion_prepare, combine=selective.fusion_combine,
                stream_prepare=selective.fusion_stream_prepare),
    MergeMethod("passthrough", "Copy the single input's tensor (layer stacking is done by the plan)",
                linear.passthrough,
                (_p("scale", None, per_model=True, required=False,
                    doc="optional factor for the tensor; None leaves it"),),
                base_role="input", elementwise=True),
]

METHODS: dict[str, MergeMethod] = {method.name: method for method in _ALL}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a :class:`MergescopeError` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MergescopeError(f"unknown merge method {name!r}: use one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "ParameterSpec", "get_method"]

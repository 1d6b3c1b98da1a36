"""mergekit's merge methods as pure functions over one tensor's inputs.

Each method is a :class:`MergeMethod` in :data:`METHODS`; its ``function`` is called as

    function(base, models, params, options, generator) -> torch.Tensor

- ``base``: θ₀ (float32), or ``None``. See :attr:`MergeMethod.base_role` for which methods take it.
- ``models``: the other inputs θ₁…θₙ (float32, same shape and device as ``base``), in plan order, **without**
  the base. For ``base_role == "input"`` methods (linear, karcher, passthrough) mergekit gives the base no
  special role: the configured base_model is merged like any model (mergekit appends it last when the plan does
  not list it), so it belongs in ``models`` — with its own per-model parameters — and ``base`` must be None.
- ``params[i]``: model i's resolved per-model parameters, defaults filled (``weight``, ``density``, …).
- ``options``: the resolved method-level parameters, defaults filled (``normalize``, ``t``, ``lambda``, …),
  plus ``"tensor_name"`` (used in error messages).
- ``generator``: a ``torch.Generator`` on the tensors' device; only the ``random`` methods draw from it (never
  from torch's global generator), in model order, one draw per entry of each trimmed task vector.

The result is float32 with the inputs' shape. The maths of every method, and each place it follows a mergekit
behaviour that may surprise, is in the docstring of its module: :mod:`.task_arithmetic` (task_arithmetic, ties,
dare_*, breadcrumbs*, della*), :mod:`.linear` (linear, nearswap, passthrough), :mod:`.spherical` (slerp, nuslerp,
multislerp, karcher) and :mod:`.adaptive` (model_stock, sce). Numbers follow mergekit 0.1.5 run on float32
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.methods import adaptive, linear, selective, spherical, task_arithmetic

if TYPE_CHECKING:  # pragma: no cover
    import torch


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


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its name, its parameters and its tensor function.

    ``base_role``: "required" (``base`` is θ₀ and must be given; ``needs_base`` is True), "optional" (θ₀ is used
    when the plan names a base_model, else None) or "input" (mergekit merges the base like any other model: pass
    it in ``models`` and base=None).
    """

    name: str
    description: str
    needs_base: bool
    parameters: tuple[ParameterSpec, ...]
    random: bool
    function: Callable[..., torch.Tensor]
    base_role: str = "required"
    #: the result at each entry depends only on the inputs at that entry (no norms, thresholds or draws), so
    #: the executor may apply it to a large tensor block by block, holding float32 copies of one block only
    elementwise: bool = False

    def __post_init__(self) -> None:
        if self.base_role not in ("required", "optional", "input") or self.needs_base != (self.base_role == "required"):
            raise ValueError(f"{self.name}: inconsistent base_role {self.base_role!r} / needs_base {self.needs_base}")

    def parameter(self, name: str) -> ParameterSpec:
        for spec in self.parameters:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _p(name, default=None, *, per_model=False, required=None, low=None, high=None, kind=float, doc="") -> ParameterSpec:
    required = default is None if required is None else required
    return ParameterSpec(name, default, per_model, required, low, high, kind, doc)


_WEIGHT = _p("weight", per_model=True, doc="the model's coefficient; required")
_DENSITY = _p("density", 1.0, per_model=True, low=0.0, high=1.0, doc="fraction of the task vector kept; 1 keeps all")
_INT8 = _p("int8_mask", False, kind=bool, doc="memory option of mergekit's sign mask; never changes the result")
_LAMBDA = _p("lambda", 1.0, doc="scale of the merged task vector, after normalisation")


def _family(normalize: bool, rescale: bool, extra: tuple[ParameterSpec, ...] = ()) -> tuple[ParameterSpec, ...]:
    return (
        _INT8,
        _p("normalize", normalize, kind=bool, doc="divide the merged task vector by the (agreeing) weights' sum"),
        _p("rescale", rescale, kind=bool, doc="scale each trimmed task vector back to its L1 norm"),
        _LAMBDA,
        _WEIGHT,
        _DENSITY,
    ) + extra


_GAMMA = _p("gamma", 0.01, per_model=True, low=0.0, high=1.0, doc="fraction of largest-magnitude entries dropped")
_EPSILON = _p(
    "epsilon", 0.15, per_model=True, low=0.0, high=0.5,
    doc="keep probabilities span density ± epsilon by magnitude rank; needs 0 < density ± epsilon < 1",
)

_TA = task_arithmetic
_ALL = [
    MergeMethod("linear", "Weighted average of the models (model soup); the base is one more input",
                False, (_WEIGHT, _p("normalize", True, kind=bool, doc="divide by the sum of the weights")),
                False, linear.linear, "input", elementwise=True),
    MergeMethod("task_arithmetic", "Base plus the weighted sum of task vectors", True,
                _family(False, False), False, _TA.task_arithmetic, elementwise=True),
    MergeMethod("ties", "Trim task vectors to the largest magnitudes, elect signs, average the agreeing ones", True,
                _family(True, False), False, _TA.ties),
    MergeMethod("dare_linear", "Randomly drop task-vector entries (DARE), rescale, weighted sum", True,
                _family(False, True), True, _TA.dare_linear),
    MergeMethod("dare_ties", "Randomly drop task-vector entries (DARE), rescale, TIES sign election", True,
                _family(False, True), True, _TA.dare_ties),
    MergeMethod("breadcrumbs", "Drop the largest outliers and smallest entries of task vectors, weighted sum", True,
                _family(False, False, (_GAMMA,)), False, _TA.breadcrumbs),
    MergeMethod("breadcrumbs_ties", "Model Breadcrumbs trim followed by TIES sign election", True,
                _family(False, False, (_GAMMA,)), False, _TA.breadcrumbs_ties),
    MergeMethod("della", "Drop entries with magnitude-ranked probabilities (DELLA), rescale, TIES sign election",
                True, _family(True, True, (_EPSILON,)), True, _TA.della),
    MergeMethod("della_linear", "Drop entries with magnitude-ranked probabilities (DELLA), rescale, weighted sum",
                True, _family(False, True, (_EPSILON,)), True, _TA.della_linear),
    MergeMethod("slerp", "Spherical interpolation between the base (t=0) and one other model (t=1)", True,
                (_p("t", low=0.0, doc="interpolation factor; 0 is the base, 1 the other model (above 1 extrapolates); required"),),
                False, spherical.slerp),
    MergeMethod("nearswap", "Take the other model's value where it is within t of the base", True,
                (_p("t", low=0.0, doc="similarity threshold; required"),), False, linear.nearswap),
    MergeMethod("model_stock", "Interpolate base and model average by the task vectors' mean cosine", True,
                (_p("filter_wise", False, kind=bool, doc="one ratio per row instead of per tensor"),),
                False, adaptive.model_stock),
    MergeMethod("sce", "Select high-variance entries, weight by mean square, erase minority signs", True,
                (_INT8, _p("select_topk", 1.0, low=0.0, high=1.0, doc="fraction of highest-variance entries kept")),
                False, adaptive.sce),
    MergeMethod("nuslerp", "Spherical interpolation of two models (or their task vectors) by weight ratio", False,
                (_WEIGHT,
                 _p("nuslerp_row_wise", False, kind=bool, doc="slerp the vectors along dim 0 (needs flatten off)"),
                 _p("nuslerp_flatten", True, kind=bool, doc="slerp the whole tensor as one vector")),
                False, spherical.nuslerp, "optional"),
    MergeMethod("multislerp", "Spherical barycentric interpolation of several models (or their task vectors)", False,
                (_WEIGHT, _p("normalize_weights", True, kind=bool, doc="divide the weights by their sum"),
                 _p("eps", 1e-8, low=0.0, doc="numerical guard")),
                False, spherical.multislerp, "optional"),
    MergeMethod("karcher", "Karcher mean of the models' directions on the sphere, at their mean norm", False,
                (_p("max_iter", 10, low=0, kind=int, doc="iterations at most"),
                 _p("tol", 1e-5, low=0.0, doc="convergence and zero-norm tolerance")),
                False, spherical.karcher, "input"),
    MergeMethod("ram", "Keep changes only one model made; average those several made (Reinforced Agent Merging)", True,
                (_p("epsilon", 1e-5, low=0.0, doc="a change counts when |τ| exceeds it"),), False, selective.ram),
    MergeMethod("ramplus_tl", "RAM, with each model's unique changes boosted by its overlap ratio (tensor-local)", True,
                (_p("r", 0.1, low=0.0, doc="boost strength"), _p("alpha", 0.2, low=0.0, doc="cap of the overlap ratio"),
                 _p("epsilon", 1e-5, low=0.0, doc="a change counts when |τ| exceeds it")), False, selective.ramplus_tl),
    MergeMethod("arcee_fusion", "Take the model's change only where it matters (|Δ|·KL above median + 1.5·IQR)", True,
                (), False, selective.arcee_fusion),
    MergeMethod("passthrough", "Copy the single input's tensor (layer stacking is done by the plan)", False,
                (_p("scale", None, per_model=True, required=False, doc="optional factor for the tensor; None leaves it"),),
                False, linear.passthrough, "input", elementwise=True),
]

METHODS: dict[str, MergeMethod] = {method.name: method for method in _ALL}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a :class:`MergescopeError` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MergescopeError(f"unknown merge method {name!r}: use one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "ParameterSpec", "get_method"]

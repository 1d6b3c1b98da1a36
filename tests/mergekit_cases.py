"""The mergekit configurations the compatibility suite runs, with their tolerances and extra checks.

Each :class:`Case` is a mergekit YAML config with ``$name`` placeholders for the fixture models; the
expectation helpers check mergekit's own output from first principles where that is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mergekit_reference import assert_tensors_close, task_vector_stats


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float
    scale_atol: float = 0.0  # times the tensor's max |x|
    note: str = ""


F32 = Tol(1e-4, 1e-5, note="float32 in, out and arithmetic")
# bf16 output of float32 arithmetic: rounding the same float32 value may land one bf16 ulp
# (<= 2^-7 |x|) apart when the float32 results differ in their last bits.
BF16 = Tol(2.0**-7, 1e-6, note="bf16 output, float32 arithmetic")
# With dtype: bfloat16, mergekit computes in bf16: the task-arithmetic family, SCE, model_stock, nearswap,
# nuslerp, multislerp, RAM do all their arithmetic in the input dtype (linear and slerp upcast to float32
# internally, karcher only its norms); mergescope computes in float32. TIES in bf16 vs float32 inside
# mergekit itself: up to 3.75 bf16 ulps of the tensor's max |x| apart, on ~4 % of the elements.
BF16_ARITH = Tol(2.0**-7, 1e-6, scale_atol=2.0**-5, note="mergekit computes in bf16")


def assert_matches(ours: dict, theirs: dict, tol: Tol, label: str) -> None:
    assert_tensors_close(ours, theirs, rtol=tol.rtol, atol=tol.atol, scale_atol=tol.scale_atol, label=label)


# --------------------------------------------------------------------------------------------------
# Cases: mergekit configs over the fixtures ($base, $ft_a, ... float32; $bbase, $bft_a, ... bfloat16)


@dataclass
class Case:
    id: str
    config: str
    tol: Tol = F32
    out_dtype: torch.dtype = torch.float32
    layers: int = 4  # layers of the output model
    check: Callable[[dict, dict], None] | None = None  # (mergekit's tensors, fixture states) -> asserts
    args: tuple[str, ...] = ()  # extra mergekit-yaml arguments
    mergescope: bool = True  # also run mergescope and compare
    stats: Callable[[dict, dict], None] | None = None  # random methods: properties instead of equality
    trim_densities: dict[str, float] | None = None  # TIES on bf16 inputs: elements tied at a trim threshold


def _expect_linear_gradient(out: dict, states: dict) -> None:
    """weights ft_a [0.2, 0.8] (by layer; t = 0 for embeddings, final norm and lm_head), ft_b 0.1 on
    self_attn and 0.6 elsewhere, ft_c 0.3; normalized by their sum."""
    for name in out:
        t = int(name.split(".layers.")[1].split(".")[0]) / 3 if ".layers." in name else 0.0
        weights = {"ft_a": 0.2 + 0.6 * t, "ft_b": 0.1 if "self_attn" in name else 0.6, "ft_c": 0.3}
        expected = sum(w * states[m][name].double() for m, w in weights.items()) / sum(weights.values())
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def _expect_task_arithmetic(out: dict, states: dict) -> None:
    """base + 0.7 · (Σ w τ) with ft_a 0.5, ft_b 0.25 on mlp and 1.0 elsewhere; the base's own weight
    (listed among the models with weight 9) is ignored."""
    base = states["base"]
    for name in out:
        w_b = 0.25 if "mlp" in name else 1.0
        tau_a, tau_b = (states[m][name].double() - base[name].double() for m in ("ft_a", "ft_b"))
        tau = 0.5 * tau_a + w_b * tau_b
        torch.testing.assert_close(out[name].double(), base[name].double() + 0.7 * tau, rtol=1e-6, atol=1e-7, msg=name)


def _expect_slices(out: dict, states: dict) -> None:
    """ft_a layers 0-1 then ft_b layers 1-3, renumbered 0-4; o_proj scaled by 0.5 in the second slice;
    embeddings from the first slice's model, final norm and lm_head from the last slice's."""
    sources = [("ft_a", 0, 1.0), ("ft_a", 1, 1.0), ("ft_b", 1, 0.5), ("ft_b", 2, 0.5), ("ft_b", 3, 0.5)]
    for i, (model, j, o_scale) in enumerate(sources):
        for name in [n for n in states[model] if n.startswith(f"model.layers.{j}.")]:
            out_name = name.replace(f"model.layers.{j}.", f"model.layers.{i}.")
            scale = o_scale if "o_proj" in name else 1.0
            torch.testing.assert_close(out[out_name], states[model][name] * scale, rtol=0, atol=0, msg=out_name)
    assert torch.equal(out["model.embed_tokens.weight"], states["ft_a"]["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], states["ft_b"]["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], states["ft_b"]["model.norm.weight"])


def _expect_slerp_ends(out: dict, states: dict) -> None:
    """t gradient [0, 1] by layer: layer 0 (and embeddings, norm, lm_head: t = 0) is the base exactly,
    the last layer is ft_a exactly."""
    for name in out:
        if ".layers.0." in name or ".layers." not in name:
            assert torch.equal(out[name], states["base"][name]), name
        elif ".layers.3." in name:
            torch.testing.assert_close(out[name], states["ft_a"][name], rtol=1e-6, atol=1e-7, msg=name)


def _stats_check(density: float, *, rescaled: bool, epsilon: float | None = None) -> Callable[[dict, dict], None]:
    """One fine-tune (ft_c, weight 1) through a random drop: ~density of its task-vector entries kept,
    each tensor's kept entries scaled by one factor (the L1 rescale) or by exactly 1, and for DELLA the
    larger half of each row kept ~epsilon more often than the smaller half."""

    def check(out: dict, states: dict) -> None:
        stats = task_vector_stats(out, states["base"], states["ft_c"])
        assert abs(stats["kept"] - density) < 0.03, stats  # ~11k entries: 5σ < 0.025
        assert stats["residual"] < 1e-6, stats  # one factor per tensor
        if rescaled:
            assert stats["l1_ratio"] < 1e-5, stats  # every tensor's L1 norm is preserved
        else:
            assert stats["factor_min"] == pytest.approx(1.0, abs=1e-6), stats
            assert stats["factor_max"] == pytest.approx(1.0, abs=1e-6), stats
        gap = stats["top_kept"] - stats["bottom_kept"]
        if epsilon is None:
            assert abs(gap) < 0.04, stats  # DARE: magnitude-blind
        else:
            assert abs(gap - epsilon) < 0.05, stats  # DELLA: p = density ± epsilon by rank

    return check


CASES = [
    # --- linear -----------------------------------------------------------------------------------------
    Case("linear-gradient-filter", """
merge_method: linear
models:
  - model: $ft_a
    parameters: {weight: [0.2, 0.8]}
  - model: $ft_b
    parameters:
      weight:
        - filter: self_attn
          value: 0.1
        - value: 0.6
  - model: $ft_c
    parameters: {weight: 0.3}
dtype: float32
""", check=_expect_linear_gradient),
    Case("linear-base-listed-no-normalize", """
merge_method: linear
base_model: $base
models:
  - model: $base
    parameters: {weight: 0.4}
  - model: $ft_a
    parameters: {weight: 0.3}
  - model: $ft_b
    parameters: {weight: 0.5}
parameters: {normalize: false}
dtype: float32
"""),
    Case("linear-bf16", """
merge_method: linear
models:
  - model: $bft_a
    parameters: {weight: 1.0}
  - model: $bft_b
    parameters: {weight: [0.5, 2.0]}
  - model: $bft_c
    parameters: {weight: 0.25}
dtype: bfloat16
""", tol=BF16, out_dtype=torch.bfloat16),
    # --- task arithmetic family ---------------------------------------------------------------------------
    Case("task_arithmetic-lambda-filter", """
merge_method: task_arithmetic
base_model: $base
models:
  - model: $base
    parameters: {weight: 9.0}
  - model: $ft_a
    parameters: {weight: 0.5}
  - model: $ft_b
    parameters:
      weight:
        - filter: mlp
          value: 0.25
        - value: 1.0
parameters: {lambda: 0.7}
dtype: float32
""", check=_expect_task_arithmetic),
    Case("task_arithmetic-normalize-out-bf16", """
merge_method: task_arithmetic
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: [1.0, 0.2]}
  - model: $ft_b
    parameters: {weight: 0.6}
  - model: $ft_c
    parameters: {weight: 0.4}
parameters: {normalize: true}
dtype: float32
out_dtype: bfloat16
""", tol=BF16, out_dtype=torch.bfloat16),
    Case("ties-gradient-density", """
merge_method: ties
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 1.0, density: [0.3, 0.9]}
  - model: $ft_b
    parameters: {weight: 0.6, density: 0.5}
  - model: $ft_c
    parameters:
      weight: 0.8
      density:
        - filter: mlp
          value: 0.2
        - value: 0.7
parameters: {lambda: 1.3, int8_mask: true}
dtype: float32
"""),
    Case("ties-no-normalize", """
merge_method: ties
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 0.5, density: 0.6}
  - model: $ft_b
    parameters: {weight: 0.5, density: 0.6}
  - model: $ft_c
    parameters: {weight: 0.5, density: 0.6}
parameters: {normalize: false}
dtype: float32
"""),
    Case("ties-bf16-in-float32-math", """
merge_method: ties
base_model: $bbase
models:
  - model: $bft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: $bft_b
    parameters: {weight: 0.5, density: 0.7}
  - model: $bft_c
    parameters: {weight: 0.7, density: 0.6}
dtype: float32
out_dtype: bfloat16
""", tol=BF16, out_dtype=torch.bfloat16, trim_densities={"ft_a": 0.5, "ft_b": 0.7, "ft_c": 0.6}),
    Case("ties-bf16-math", """
merge_method: ties
base_model: $bbase
models:
  - model: $bft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: $bft_b
    parameters: {weight: 0.5, density: 0.7}
  - model: $bft_c
    parameters: {weight: 0.7, density: 0.6}
dtype: bfloat16
""", tol=BF16_ARITH, out_dtype=torch.bfloat16, trim_densities={"ft_a": 0.5, "ft_b": 0.7, "ft_c": 0.6}),
    Case("dare_linear-density1", """
merge_method: dare_linear
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 0.7, density: 1.0}
  - model: $ft_b
    parameters: {weight: [0.3, 0.9], density: 1.0}
  - model: $ft_c
    parameters: {weight: 0.4, density: 1.0}
parameters: {lambda: 0.9, normalize: true}
dtype: float32
"""),
    Case("dare_ties-density1", """
merge_method: dare_ties
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 0.7, density: 1.0}
  - model: $ft_b
    parameters: {weight: 0.9, density: 1.0}
  - model: $ft_c
    parameters: {weight: [0.2, 0.6], density: 1.0}
parameters: {int8_mask: true, normalize: true}
dtype: float32
"""),
    Case("breadcrumbs-gamma", """
merge_method: breadcrumbs
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 1.0, density: 0.8, gamma: 0.05}
  - model: $ft_b
    parameters: {weight: 0.5, density: [0.5, 0.9], gamma: 0.02}
  - model: $ft_c
    parameters: {weight: 0.7, density: 0.7}
parameters: {lambda: 1.1}
dtype: float32
"""),
    Case("breadcrumbs_ties-rescale", """
merge_method: breadcrumbs_ties
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 1.0, density: 0.6, gamma: 0.03}
  - model: $ft_b
    parameters: {weight: 0.8, density: 0.9, gamma: 0.01}
  - model: $ft_c
    parameters: {weight: 0.6, density: [0.4, 0.8], gamma: 0.05}
parameters: {rescale: true, normalize: true}
dtype: float32
"""),
    Case("della-density1", """
merge_method: della
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 1.0, density: 1.0, epsilon: 0.1}
  - model: $ft_b
    parameters: {weight: [0.2, 0.8], density: 1.0}
  - model: $ft_c
    parameters: {weight: 0.5, density: 1.0}
parameters: {lambda: 0.8}
dtype: float32
"""),
    Case("della_linear-density1", """
merge_method: della_linear
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 0.5, density: 1.0, epsilon: 0.05}
  - model: $ft_b
    parameters: {weight: 0.5, density: 1.0}
  - model: $ft_c
    parameters: {weight: 0.5, density: 1.0}
parameters: {normalize: true, int8_mask: true}
dtype: float32
"""),
    # --- spherical ------------------------------------------------------------------------------------------
    Case("slerp-gradient-filter", """
merge_method: slerp
base_model: $base
models:
  - model: $base
  - model: $ft_a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""),
    Case("slerp-ends", """
merge_method: slerp
base_model: $base
models:
  - model: $ft_a
parameters: {t: [0.0, 1.0]}
dtype: float32
""", check=_expect_slerp_ends),
    Case("slerp-bf16", """
merge_method: slerp
base_model: $bbase
models:
  - model: $bbase
  - model: $bft_c
parameters: {t: [0.2, 0.8]}
dtype: bfloat16
""", tol=BF16, out_dtype=torch.bfloat16),
    Case("nuslerp-task-vectors-row-wise", """
merge_method: nuslerp
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 0.3}
  - model: $ft_b
    parameters: {weight: [0.9, 0.4]}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
dtype: float32
"""),
    Case("nuslerp-no-base", """
merge_method: nuslerp
models:
  - model: $ft_b
    parameters: {weight: 1.0}
  - model: $ft_c
    parameters: {weight: 3.0}
dtype: float32
"""),
    Case("multislerp-base", """
merge_method: multislerp
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: [0.5, 1.0]}
  - model: $ft_b
    parameters: {weight: 0.3}
  - model: $ft_c
    parameters: {weight: 0.2}
parameters: {normalize_weights: false}
dtype: float32
"""),
    Case("multislerp-no-base", """
merge_method: multislerp
models:
  - model: $ft_a
    parameters: {weight: 1.0}
  - model: $ft_b
    parameters: {weight: 2.0}
  - model: $ft_c
    parameters: {weight: 1.0}
parameters: {eps: 1.0e-6}
dtype: float32
"""),
    Case("karcher", """
merge_method: karcher
models:
  - model: $ft_a
  - model: $ft_b
  - model: $ft_c
parameters: {max_iter: 25, tol: 1.0e-7}
dtype: float32
"""),
    # --- adaptive ------------------------------------------------------------------------------------------
    Case("model_stock", """
merge_method: model_stock
base_model: $base
models:
  - model: $ft_a
  - model: $ft_b
  - model: $ft_c
dtype: float32
"""),
    Case("model_stock-filter-wise-bf16", """
merge_method: model_stock
base_model: $bbase
models:
  - model: $bft_a
  - model: $bft_b
  - model: $bft_c
parameters: {filter_wise: true}
dtype: float32
out_dtype: bfloat16
""", tol=BF16, out_dtype=torch.bfloat16),
    Case("sce-topk", """
merge_method: sce
base_model: $base
models:
  - model: $ft_a
  - model: $ft_b
  - model: $ft_c
parameters: {select_topk: 0.4, int8_mask: true}
dtype: float32
"""),
    Case("nearswap", """
merge_method: nearswap
base_model: $base
models:
  - model: $ft_c
parameters: {t: [0.002, 0.02]}
dtype: float32
"""),
    # --- passthrough ------------------------------------------------------------------------------------------
    Case("passthrough-slices-scale", """
merge_method: passthrough
slices:
  - sources:
      - model: $ft_a
        layer_range: [0, 2]
  - sources:
      - model: $ft_b
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
dtype: float32
""", layers=5, check=_expect_slices),
    Case("passthrough-bf16", """
merge_method: passthrough
models:
  - model: $bft_b
    parameters:
      scale:
        - filter: down_proj
          value: 0.75
        - value: 1.0
dtype: bfloat16
""", tol=BF16, out_dtype=torch.bfloat16),
    # --- methods mergekit 0.1.5 has beyond the list --------------------------------------------------
    Case("arcee_fusion", """
merge_method: arcee_fusion
base_model: $base
models:
  - model: $base
  - model: $ft_b
dtype: float32
"""),
    Case("ram", """
merge_method: ram
base_model: $base
models:
  - model: $ft_a
  - model: $ft_b
  - model: $ft_c
parameters: {epsilon: 0.002}
dtype: float32
"""),
    Case("ramplus_tl", """
merge_method: ramplus_tl
base_model: $base
models:
  - model: $ft_a
  - model: $ft_b
  - model: $ft_c
parameters: {r: 0.2, alpha: 0.3, epsilon: 0.002}
dtype: float32
"""),
    # --- mergekit output options -----------------------------------------------------------------------------
    Case("sharded-output", """
merge_method: linear
models:
  - model: $ft_a
    parameters: {weight: 1.0}
  - model: $ft_b
    parameters: {weight: 1.0}
dtype: float32
""", args=("--out-shard-size", "10K"), mergescope=False),
]

# Random methods below density 1: mergekit and mergescope draw differently; both must show these properties.
STAT_CASES = [
    Case("dare_linear-density0.3", """
merge_method: dare_linear
base_model: $base
models:
  - model: $ft_c
    parameters: {weight: 1.0, density: 0.3}
dtype: float32
""", stats=_stats_check(0.3, rescaled=True)),
    Case("dare_ties-density0.5", """
merge_method: dare_ties
base_model: $base
models:
  - model: $ft_c
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
""", stats=_stats_check(0.5, rescaled=True)),
    Case("della-density0.5-epsilon0.2", """
merge_method: della
base_model: $base
models:
  - model: $ft_c
    parameters: {weight: 1.0, density: 0.5, epsilon: 0.2}
dtype: float32
""", stats=_stats_check(0.5, rescaled=True, epsilon=0.2)),
    Case("della_linear-density0.6-no-rescale", """
merge_method: della_linear
base_model: $base
models:
  - model: $ft_c
    parameters: {weight: 1.0, density: 0.6, epsilon: 0.1}
parameters: {rescale: false}
dtype: float32
""", stats=_stats_check(0.6, rescaled=False, epsilon=0.1)),
]

# Run through mergekit with the others, used by the tests at the end.
OTHER_CASES = [
    Case("ties-base-listed", """
merge_method: ties
base_model: $base
models:
  - model: $base
    parameters: {weight: 5.0, density: 0.1}
  - model: $ft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: $ft_b
    parameters: {weight: 0.5, density: 0.7}
dtype: float32
"""),
    Case("ties-base-unlisted", """
merge_method: ties
base_model: $base
models:
  - model: $ft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: $ft_b
    parameters: {weight: 0.5, density: 0.7}
dtype: float32
"""),
]

ALL_CASES = {case.id: case for case in CASES + STAT_CASES + OTHER_CASES}
assert len(ALL_CASES) == len(CASES) + len(STAT_CASES) + len(OTHER_CASES), "duplicate case ids"

"""Interpolation on spheres: slerp (nuslerp: :mod:`.nuslerp`, multislerp: :mod:`.multislerp`, karcher:
:mod:`.karcher`).

slerp (base + exactly one other model, parameter t)
    The whole tensor is one vector. With a = θ_base, b = θ₁ and the cosine c = ⟨a/‖a‖, b/‖b‖⟩ clamped to
    [−1, 1] (a norm ≤ 1e-8 counts as 1), θ = sin((1−t)φ)/sin φ · a + sin(tφ)/sin φ · b with φ = arccos c, applied to
    the *unnormalised* a and b (the norms are not re-interpolated). When |c| > 0.9995 — nearly colinear or
    nearly antipodal — it falls back to θ = (1−t)a + tb. t = 0 gives the base.

nuslerp: see :mod:`.nuslerp`.

multislerp: see :mod:`.multislerp`.

karcher: see :mod:`.karcher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.methods.chunks import SideBySide

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


#: entries per block of slerp's norms and cosine (as mergekit reduces them)
SLERP_BLOCK = 1 << 20


def _where(options: dict) -> str:
    return options.get("tensor_name") or "tensor"


def _check_slerp(base, models, options) -> None:
    if base is None:
        raise MergescopeError("slerp needs a base_model: set base_model in the plan")
    if len(models) != 1:
        raise MergescopeError(
            f"{_where(options)}: slerp merges the base with exactly one other model, got {len(models)}: fix the plan"
        )


@dataclass
class SlerpCoefficients:
    """slerp's whole-tensor part: θ = coef_a·a + coef_b·b entry by entry (the same for every block)."""

    coef_a: torch.Tensor
    coef_b: torch.Tensor

    def block(self, start: int, stop: int) -> SlerpCoefficients:
        return self


def slerp_coefficients(norm_a, norm_b, cosine_terms, t: float) -> SlerpCoefficients:
    """The coefficients from the norms of a and b and, given those, the per-block terms of the cosine
    (:func:`slerp_cosine_term`, one per block side by side in a 1-D tensor)."""
    import torch

    cosine = cosine_terms.sum().clamp(-1, 1)
    t = torch.tensor(float(t), dtype=torch.float32, device=cosine.device)
    linear = cosine.abs() > 0.9995
    angle = torch.acos(torch.where(linear, 0, cosine))
    sine = torch.sin(angle)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * angle) / sine)
    coef_b = torch.where(linear, t, torch.sin(t * angle) / sine)
    return SlerpCoefficients(coef_a, coef_b)


def slerp_norms(block_norms_a, block_norms_b):
    """‖a‖ and ‖b‖ (a norm ≤ 1e-8 counts as 1) from the norms of their blocks of :data:`SLERP_BLOCK` entries (1-D
    tensors)."""
    import torch

    norm_a = torch.linalg.vector_norm(block_norms_a)
    norm_b = torch.linalg.vector_norm(block_norms_b)
    return torch.where(norm_a > 1e-8, norm_a, 1), torch.where(norm_b > 1e-8, norm_b, 1)


def slerp_cosine_term(a_block, b_block, norm_a, norm_b):
    """One block's term of the cosine: Σ (a/‖a‖)(b/‖b‖) over the block."""
    return ((a_block / norm_a) * (b_block / norm_b)).sum()


def slerp_prepare(base, models, params, options, seed=None) -> list[SlerpCoefficients]:
    """slerp's coefficients over whole float tensors (any float dtype; blocks converted to float32)."""
    import torch

    _check_slerp(base, models, options)
    a, b = base.reshape(-1), models[0].reshape(-1)
    if a.numel() == 0:
        t = torch.tensor(float(options["t"]), dtype=torch.float32, device=a.device)
        return [SlerpCoefficients(1 - t, t)]
    blocks = range(0, a.numel(), SLERP_BLOCK)
    # Norms and the dot are reduced per block of 2²⁰ entries and then combined, as mergekit does: the same
    # rounding, so results agree bit for bit on tensors of any size.
    block_norms = [torch.stack([torch.linalg.vector_norm(x[i : i + SLERP_BLOCK].float()) for i in blocks])
                   for x in (a, b)]
    norm_a, norm_b = slerp_norms(*block_norms)
    terms = [slerp_cosine_term(a[i : i + SLERP_BLOCK].float(), b[i : i + SLERP_BLOCK].float(), norm_a, norm_b)
             for i in blocks]
    return [slerp_coefficients(norm_a, norm_b, torch.stack(terms), options["t"])]


def slerp_combine(base, models, coefficients, params, options):
    """θ = coef_a·a + coef_b·b, entry by entry, in float32."""
    c = coefficients[0]
    return c.coef_a * base.float() + c.coef_b * models[0].float()


def slerp_stream_prepare(source, params, options, seed=None) -> list[SlerpCoefficients] | None:
    """:func:`slerp_prepare` from two passes over a block source (the norms, then the cosine's terms): the same
    bits. Its blocks must start on multiples of :data:`SLERP_BLOCK` entries (the method's ``stream_align``); None
    when they do not."""
    import torch

    if len(params) != 1 or source.numel == 0:
        return None
    norms_a, norms_b = SideBySide(), SideBySide()
    for start, a, (b,) in source.blocks([0]):
        if start % SLERP_BLOCK:  # blocks not aligned to the norms' blocks: merge whole
            return None
        for i in range(0, a.numel(), SLERP_BLOCK):
            norms_a.append(torch.linalg.vector_norm(a[i : i + SLERP_BLOCK].float()))
            norms_b.append(torch.linalg.vector_norm(b[i : i + SLERP_BLOCK].float()))
    norm_a, norm_b = slerp_norms(norms_a.cat(), norms_b.cat())
    terms = SideBySide()
    for _, a, (b,) in source.blocks([0]):
        for i in range(0, a.numel(), SLERP_BLOCK):
            terms.append(slerp_cosine_term(a[i : i + SLERP_BLOCK].float(), b[i : i + SLERP_BLOCK].float(),
                                           norm_a, norm_b))
    return [slerp_coefficients(norm_a, norm_b, terms.cat(), options["t"])]


def slerp(base, models, params, options, seed=None):
    """Spherical interpolation from θ_base (t = 0) to θ₁ (t = 1), lerp when |cos| > 0.9995."""
    coefficients = slerp_prepare(base, models, params, options)
    return slerp_combine(base, models, coefficients, params, options).reshape(base.shape)


"""nuslerp: spherical interpolation of two models, or of their task vectors, by weight ratio.

nuslerp (exactly two non-base models, per-model weight; base optional)
    t = w₂/(w₁ + w₂) (0.5 when |w₁ + w₂| < 1e-6). With a base it interpolates the task vectors,
    θ = θ₀ + S(t, τ₁, τ₂), otherwise θ = S(t, θ₁, θ₂). S is slerp over vectors chosen by the options:
    ``nuslerp_flatten`` (default) — the whole tensor; else ``nuslerp_row_wise`` — the vectors along dim 0
    (the columns of a matrix; mergekit's naming); else the vectors along the last dim (rows). With u = x/max(‖x‖,
    1e-7) and c = ⟨u₁, u₂⟩ clamped to [−1, 1], φ = arccos c and S = (sin((1−t)φ)x₁ + sin(tφ)x₂)/sin φ; the lerp
    (1−t)x₁ + tx₂ only when 1 − c² ≤ 1e-16, i.e. exactly colinear in float32. Flattened, ‖x‖ and c are reduced
    in float32 per chunk of 4096 entries, then over the chunks (‖x‖ as the norm of the chunks' norms). Along
    dim 0 (columns), Σx₁², Σx₂² and Σx₁x₂ of each column are summed in float32 per chunk of
    :data:`~.chunks.ROW_CHUNK` (64) rows, the chunks' sums then added in row order, and c = Σx₁x₂/(max(‖x₁‖, 1e-7)·
    max(‖x₂‖, 1e-7)). Either way a merge streamed in row blocks has the bits of a whole-tensor merge.

The angle is the whole-tensor part (:func:`nuslerp_prepare`, or :func:`nuslerp_stream_prepare` from passes over
row blocks); given it, S is entry by entry (:func:`nuslerp_combine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.methods.chunks import RowSums, SideBySide, chunk_norms, chunk_sums

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

def _where(options: dict) -> str:
    return options.get("tensor_name") or "tensor"


def _check_two(models: list, options: dict) -> None:
    if len(models) != 2:
        raise MergescopeError(
            f"{_where(options)}: nuslerp merges exactly two models besides the base, got {len(models)}: fix the plan"
        )


def _inputs(first, rest: list, params: list, options: dict) -> tuple:
    """(base or None, x₁'s model, x₂'s model) from the inputs in read order: a plan without a base has one
    parameter set per input, so ``first`` is then the first model."""
    base, models = (first, rest) if len(params) == len(rest) else (None, [first, *rest])
    _check_two(models, options)
    return base, models[0], models[1]


def _vectors(base, first, second) -> tuple:
    """x₁, x₂ in float32: the task vectors with a base, else the models."""
    if base is None:
        return first.float(), second.float()
    base = base.float()
    return first.float() - base, second.float() - base


def _t(params: list) -> float:
    w1, w2 = (float(p["weight"]) for p in params)
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


@dataclass
class GreatArc:
    """nuslerp's whole-tensor part: t and the angle φ (with where it is colinear) of each vector — one for the
    tensor, one per ``length`` consecutive entries (rows), or one per entry modulo ``period`` (columns)."""

    t: float
    angle: torch.Tensor
    colinear: torch.Tensor
    length: int = 0
    period: int = 0

    def block(self, start: int, stop: int) -> GreatArc:
        """The arc of flat entries ``start:stop``, its angle broadcasting against the flat block."""
        import torch

        if self.length:
            first, last = start // self.length, -(-stop // self.length)
            skip = start - first * self.length

            def spread(x):
                return x[first:last].repeat_interleave(self.length)[skip : skip + stop - start]
        elif self.period:
            index = torch.arange(start, stop, device=self.angle.device) % self.period

            def spread(x):
                return x[index]
        else:
            return self
        return GreatArc(self.t, spread(self.angle), spread(self.colinear))


def _arc(cosine) -> tuple:
    """φ = arccos c (0 where colinear: 1 − c² ≤ 1e-16) and where it is colinear."""
    import torch

    colinear = (1 - cosine.square()) <= 1e-16
    return torch.acos(torch.where(colinear, 0, cosine)), colinear


def _chunk_cosines(x1, x2, norm1, norm2):
    """⟨x₁/n₁, x₂/n₂⟩ per chunk of a flat block starting on a chunk."""
    return chunk_sums((x1 / norm1) * (x2 / norm2))


def _whole_norm(chunk_norms):
    import torch

    return torch.linalg.vector_norm(chunk_norms, dim=-1, keepdim=True).clamp(min=1e-7)


def _vector_arc(x1, x2) -> tuple:
    """φ and colinear for each vector along the last dimension of x₁, x₂ ([vectors])."""
    import torch

    u1 = x1 / torch.norm(x1, dim=-1, keepdim=True).clamp(min=1e-7)
    u2 = x2 / torch.norm(x2, dim=-1, keepdim=True).clamp(min=1e-7)
    return _arc((u1 * u2).sum(dim=-1).clamp(-1, 1))


def _column_arc(columns: RowSums) -> tuple:
    """φ and colinear per column from Σx₁², Σx₂², Σx₁x₂ over its rows."""
    squares1, squares2, dot = columns.finish()
    norm1, norm2 = squares1.sqrt().clamp(min=1e-7), squares2.sqrt().clamp(min=1e-7)
    return _arc((dot / (norm1 * norm2)).clamp(-1, 1))


def _column_products(x1, x2):
    import torch

    return torch.stack([x1 * x1, x2 * x2, x1 * x2])


def nuslerp_prepare(first, rest, params, options, seed=None) -> list[GreatArc]:
    """nuslerp's angle over whole tensors (inputs in read order, any float dtype, taken as float32)."""
    base, m1, m2 = _inputs(first, rest, params, options)
    t = _t(params)
    x1, x2 = _vectors(base, m1, m2)
    if options.get("nuslerp_flatten", True):
        x1, x2 = x1.reshape(-1), x2.reshape(-1)
        norm1, norm2 = _whole_norm(chunk_norms(x1)), _whole_norm(chunk_norms(x2))
        cosine = _chunk_cosines(x1, x2, norm1, norm2).sum(dim=-1, keepdim=True).clamp(-1, 1)
        return [GreatArc(t, *_arc(cosine))]
    if x1.dim() < 2:  # one vector
        return [GreatArc(t, *_vector_arc(x1.reshape(1, -1), x2.reshape(1, -1)))]
    if options.get("nuslerp_row_wise", False):  # the vectors along dim 0, one per entry of a row
        columns = RowSums((3,), x1[0].numel(), x1.device)
        columns.add(_column_products(x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1)))
        return [GreatArc(t, *_column_arc(columns), period=x1[0].numel())]
    angle, colinear = _vector_arc(x1, x2)
    return [GreatArc(t, angle.reshape(-1), colinear.reshape(-1), length=x1.shape[-1])]


def nuslerp_combine(first, rest, arcs, params, options):
    """[θ₀ +] S(t, x₁, x₂) entry by entry given the angle, in float32."""
    import torch

    base, m1, m2 = _inputs(first, rest, params, options)
    x1, x2 = _vectors(base, m1, m2)
    arc = arcs[0]
    t, angle = arc.t, arc.angle
    slerped = (torch.sin((1 - t) * angle) * x1 + torch.sin(t * angle) * x2) / torch.sin(angle)
    result = torch.where(arc.colinear, (1 - t) * x1 + t * x2, slerped)
    return result if base is None else base.float() + result


def nuslerp_stream_prepare(source, params, options, seed=None) -> list[GreatArc] | None:
    """:func:`nuslerp_prepare` from passes over a block source: flattened, the chunks' norms, then (given the
    norms) the chunks' cosine terms, each reduced once; along the rows, each block's rows. None for the vectors
    along dim 0, a 1-D tensor taken as one vector, or a source without its tensor's shape."""

    if len(params) != 2 or source.numel == 0:
        return None
    t = _t(params)
    flatten = options.get("nuslerp_flatten", True)
    shape, reads = getattr(source, "shape", None), getattr(source, "inputs", None)
    if shape is None or reads is None or not flatten and len(shape) < 2:
        return None

    def pairs():
        for _, first, rest in source.blocks(list(range(len(reads) - 1))):
            yield _vectors(*_inputs(first, rest, params, options))
    if not flatten and options.get("nuslerp_row_wise", False):
        width = math.prod(shape[1:])
        columns = RowSums((3,), width, source.device)
        for x1, x2 in pairs():
            columns.add(_column_products(x1.reshape(-1, width), x2.reshape(-1, width)))
        return [GreatArc(t, *_column_arc(columns), period=width)]
    if not flatten:
        angles, colinear = SideBySide(), SideBySide()
        for x1, x2 in pairs():
            angle, flags = _vector_arc(x1.reshape(-1, shape[-1]), x2.reshape(-1, shape[-1]))
            angles.append(angle)
            colinear.append(flags)
        return [GreatArc(t, angles.cat(), colinear.cat(), length=shape[-1])]
    norms1, norms2 = SideBySide(), SideBySide()
    for x1, x2 in pairs():
        norms1.append(chunk_norms(x1))
        norms2.append(chunk_norms(x2))
    norm1, norm2 = _whole_norm(norms1.cat()), _whole_norm(norms2.cat())
    cosines = SideBySide()
    for x1, x2 in pairs():
        cosines.append(_chunk_cosines(x1, x2, norm1, norm2))
    cosine = cosines.cat()
    return [GreatArc(t, *_arc(cosine.sum(dim=-1, keepdim=True).clamp(-1, 1)))]


def nuslerp(base, models, params, options, seed=None):
    """θ = [θ₀ +] S(w₂/(w₁+w₂), x₁, x₂) with xᵢ = θᵢ − θ₀ when a base is given, else θᵢ."""
    _check_two(models, options)
    first, rest = (base, models) if base is not None else (models[0], models[1:])
    arcs = nuslerp_prepare(first, rest, params, options)
    flat = [x.reshape(-1) for x in (first, *rest)]
    numel = flat[0].numel()
    result = nuslerp_combine(flat[0], flat[1:], [arc.block(0, numel) for arc in arcs], params, options)
    return result.reshape(models[0].shape)

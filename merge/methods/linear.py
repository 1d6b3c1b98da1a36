"""Element-wise combinations: linear, nearswap, passthrough.

linear (model soup)
    θ = Σᵢ wᵢθᵢ, divided by Σᵢ wᵢ when ``normalize`` (the default). There is no base: mergekit merges the
    configured base_model as one more input with its own weight (it adds it when the plan does not list it).
    As in mergekit the division is not guarded: weights summing to 0 with normalize on give ±inf/NaN.

nearswap
    With a = θ_base and b the one other model, per entry w = clamp(t / max(|a − b|, 1e-6), 0, 1) and
    θ = w·b + (1 − w)·a: entries where the two models are within t of each other take b's value, entries far
    apart stay near the base (moving by at most t toward b).

passthrough
    The single input, times its optional per-model ``scale``.
"""

from __future__ import annotations

from mergescope.checkpoints.errors import MergescopeError

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)


def _count(name: str, models: list, wanted: int, options: dict, what: str) -> None:
    if len(models) != wanted:
        where = options.get("tensor_name") or "tensor"
        raise MergescopeError(
            f"{where}: {name} merges exactly {wanted} {what}, got {len(models)}: fix the plan's models"
        )


def _no_base(name: str, base) -> None:
    if base is not None:
        raise ValueError(f"{name} treats the base model as an ordinary input: pass it among the models, with base=None")


def linear(base, models, params, options, seed=None):
    """θ = Σᵢ wᵢθᵢ [/ Σᵢ wᵢ if normalize], accumulated in model order in float32."""
    import torch

    _no_base("linear", base)
    if not models:
        raise MergescopeError(f"{options.get('tensor_name') or 'tensor'}: linear needs at least one model")
    if len(params) != len(models):
        raise ValueError(f"{len(models)} models but {len(params)} parameter sets")
    weights = torch.tensor([float(p["weight"]) for p in params], dtype=torch.float32, device=models[0].device)
    result = torch.zeros_like(models[0])
    for model, weight in zip(models, weights.unbind(0)):
        result.addcmul_(model, weight)
    if options.get("normalize", True):
        result.div_(weights.sum())
    return result


def nearswap(base, models, params, options, seed=None):
    """w = clamp(t / max(|θ_base − θ₁|, 1e-6), 0, 1);  θ = w·θ₁ + (1 − w)·θ_base."""
    if base is None:
        raise MergescopeError("nearswap needs a base_model: set base_model in the plan")
    _count("nearswap", models, 1, options, "model besides the base")
    other = models[0]
    weight = (float(options["t"]) / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def passthrough(base, models, params, options, seed=None):
    """The one input unchanged, or times its per-model ``scale`` when one is set."""
    _no_base("passthrough", base)
    _count("passthrough", models, 1, options, "model")
    scale = params[0].get("scale") if params else None
    return models[0].clone() if scale is None else models[0] * float(scale)

"""Parameter settings as mergekit writes them, and how one resolves for one tensor.

A setting is one of:

* a scalar (``0.5``, ``true``);
* a list of scalars — a *gradient* over the layers: for layer position t ∈ [0, 1] (layer k of a slice of
  L layers has t = k / (L − 1), a single layer t = 1, tensors outside the layers t = 0) the value is the
  piecewise-linear interpolation ``(1 − f)·v[i] + f·v[i+1]`` with ``i + f = t · (len − 1)``; booleans and
  strings are not interpolated but picked at ``v[⌊t · (len − 1)⌋]``;
* ``{filter: SUBSTRING, value: SETTING}`` or a list of them: the first whose filter is absent, ``*`` or a
  substring of the tensor name applies; when none does, the setting is absent.

A parameter is looked up in scopes from the most specific (the model's own ``parameters``, then its
output slice's, then the plan's top-level ``parameters``) to its default; the first scope whose setting
resolves wins. Method-level parameters skip the model scope. This is mergekit's precedence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Setting = Any  # scalar | list[scalar] | {"filter", "value"} | list[{"filter", "value"}]


def is_scalar(value: object) -> bool:
    return isinstance(value, (bool, int, float, str))


def is_conditional(value: object) -> bool:
    return isinstance(value, Mapping) and "value" in value and set(value) <= {"filter", "value"}


def evaluate(setting: Setting, tensor_name: str, t: float, kind: type = float) -> Any:
    """The value of ``setting`` for ``tensor_name`` at layer position ``t``; None when no filter matches.

    ``kind`` is the parameter's type (float, int or bool): numeric gradients are interpolated in float
    and converted once at the end, as mergekit does.
    """
    if is_conditional(setting):
        setting = [setting]
    if is_scalar(setting):
        return coerce(setting, kind)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(is_scalar(v) for v in setting):
            values = [coerce(v, kind) for v in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            position = t * (len(values) - 1)
            lower = int(position)
            upper = min(len(values) - 1, lower + 1)
            fraction = position - lower
            return coerce((1 - fraction) * values[lower] + fraction * values[upper], kind)
        for condition in setting:
            pattern = condition.get("filter")
            if pattern is None or pattern == "*" or (tensor_name and str(pattern) in tensor_name):
                return evaluate(condition["value"], tensor_name, t, kind)
        return None
    raise TypeError(f"not a parameter setting: {setting!r}")


def coerce(value: object, kind: type) -> Any:
    """Convert a YAML scalar to the parameter's type (``"1e-3"`` → 0.001 for a float parameter)."""
    if kind is bool:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError(f"{value!r} is not a boolean")
        return bool(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an integer")
        number = float(value)
        if number != int(number):
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    return value


def resolve(
    name: str,
    scopes: Iterable[Mapping[str, Setting] | None],
    default: Any,
    *,
    tensor_name: str,
    t: float,
    kind: type,
) -> Any:
    """The first scope's setting of ``name`` that resolves for this tensor, else ``default``."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t, kind)
            if value is not None:
                return value
    return default

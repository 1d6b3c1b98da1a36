"""What a parameter search varies: ``--vary KEY=VALUES`` settings, the candidate plans they span.

``KEY`` is a path into the plan's YAML document: mapping keys and list indices joined by dots —
``parameters.density``, ``models.1.parameters.weight``, ``mergescope.seed``. The last key is created when
missing (so a parameter the plan leaves to its default can be searched), as are missing mappings on the
way; list indices must exist.

``VALUES`` is either

* ``a:b:step``: an inclusive grid a, a + step, … up to b, computed in decimal arithmetic from the text, so
  ``0.2:1.0:0.2`` is exactly 0.2, 0.4, 0.6, 0.8, 1.0 (no float drift, no missing end point); integers
  when a, b and step are all integers; or
* ``v1,v2,...``: the values themselves, each read as a YAML scalar (``0.5``, ``3``, ``true``, ``base``); or
* ``low:high`` (two numbers, no step): a continuous range, for the random and CMA-ES strategies
  (:mod:`.search_strategy`); its :attr:`Variable.bounds` are set and its ``values`` are empty.

A grid search runs the cartesian product of every variable's values (the last ``--vary`` changing
fastest); a random search draws N distinct points of that product with a seeded generator, so the same
seed gives the same candidates.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import yaml

from mergescope.checkpoints import MergescopeError

#: a grid larger than this is refused (use --random)
MAX_GRID = 10_000


@dataclass(frozen=True)
class Variable:
    """One ``--vary``: where in the plan (``key`` as typed, ``path`` parsed) and the values to try."""

    key: str
    path: tuple[str, ...]
    values: tuple
    bounds: tuple[float, float] | None = None  # a continuous range low:high (then ``values`` is empty)

    @property
    def continuous(self) -> bool:
        return self.bounds is not None


@dataclass
class Candidate:
    """One point of the search: its number (1-based, in grid order), the values set, the plan document."""

    number: int
    values: tuple
    document: dict


def parse_vary(spec: str) -> Variable:
    """``KEY=VALUES`` → :class:`Variable`; a one-line :class:`MergescopeError` when it is malformed."""
    key, equals, text = spec.partition("=")
    key = key.strip()
    if not equals or not key or not text.strip():
        raise MergescopeError(
            f"--vary {spec!r}: write KEY=a:b:step, KEY=v1,v2 or KEY=low:high "
            "(e.g. models.0.parameters.weight=0.2:1.0:0.2)"
        )
    path = tuple(part.strip() for part in key.split("."))
    if any(not part for part in path):
        raise MergescopeError(f"--vary {spec!r}: {key!r} has an empty part; join keys and indices with single dots")
    if text.count(":") == 1 and "," not in text:
        return Variable(key, path, (), continuous_range(*text.split(":"), spec=spec))
    values = tuple(_values(text.strip(), spec))
    if len(set(map(repr, values))) != len(values):
        raise MergescopeError(f"--vary {spec!r}: a value is listed twice")
    return Variable(key, path, values)


def continuous_range(low: str, high: str, *, spec: str = "") -> tuple[float, float]:
    """``low:high`` → ``(low, high)`` as floats; a one-line error unless both are finite and low < high."""
    try:
        bounds = float(low), float(high)
    except ValueError:
        raise MergescopeError(f"--vary {spec!r}: low:high needs two numbers, got {low!r}, {high!r}") from None
    if not all(math.isfinite(b) for b in bounds) or not bounds[0] < bounds[1]:
        raise MergescopeError(f"--vary {spec!r}: a range low:high needs finite numbers with low below high")
    return bounds


def _values(text: str, spec: str) -> list:
    if text.count(":") == 2 and "," not in text:
        return inclusive_grid(*text.split(":"), spec=spec)
    return [_scalar(part.strip(), spec) for part in text.split(",")]


def _scalar(text: str, spec: str) -> object:
    if not text:
        raise MergescopeError(f"--vary {spec!r}: an empty value between commas")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, (bool, int, float, str)):
        raise MergescopeError(f"--vary {spec!r}: {text!r} is not a single value (a number, true/false or a word)")
    return value


def inclusive_grid(start: str, stop: str, step: str, *, spec: str = "") -> list:
    """``start, start + step, …`` up to and including ``stop``, exact in decimal (``0.2:1.0:0.2`` → 5 values)."""
    try:
        a, b, s = Decimal(start.strip()), Decimal(stop.strip()), Decimal(step.strip())
    except InvalidOperation:
        raise MergescopeError(
            f"--vary {spec!r}: a:b:step needs three numbers, got {start!r}, {stop!r}, {step!r}"
        ) from None
    if not all(x.is_finite() for x in (a, b, s)):
        raise MergescopeError(f"--vary {spec!r}: a:b:step needs finite numbers")
    if s <= 0:
        raise MergescopeError(f"--vary {spec!r}: the step {step.strip()} must be positive")
    if b < a:
        raise MergescopeError(
            f"--vary {spec!r}: the grid runs from a up to b, so a ({start.strip()}) must not exceed b ({stop.strip()})"
        )
    count = int((b - a) / s) + 1
    if count > MAX_GRID:
        raise MergescopeError(f"--vary {spec!r}: {count} values; use a larger step")
    integral = all(
        x == x.to_integral_value() and "." not in t and "e" not in t.lower()
        for x, t in ((a, start), (b, stop), (s, step))
    )
    return [int(a + k * s) if integral else float(a + k * s) for k in range(count)]


def check_path(document: dict, variable: Variable) -> None:
    """Raise a one-line :class:`MergescopeError` unless ``variable``'s path can be set in ``document``."""
    sample = variable.values[0] if variable.values else variable.bounds[0]
    set_path(copy.deepcopy(document), variable.path, sample, key=variable.key)


def set_path(document: dict, path: tuple[str, ...], value: object, *, key: str = "") -> dict:
    """Set ``value`` at ``path`` in ``document`` (in place) and return it."""
    key = key or ".".join(path)
    node: object = document
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[:depth]) or "the plan"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise MergescopeError(
                    f"--vary {key}: {where} is a list of {len(node)}; {part!r} is not an index in it "
                    f"(0–{len(node) - 1})"
                )
            index = int(part)
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            name = int(part) if part.isdigit() and int(part) in node else part
            if last:
                node[name] = value
            elif node.get(name) is None:
                node[name] = {}
            node = node[name]
        else:
            raise MergescopeError(f"--vary {key}: {where} is {node!r}, not a mapping or a list; "
                                  "write it out as a mapping in the plan (e.g. {model: ..., parameters: {}})")
    return document


def grid_size(variables: list[Variable]) -> int:
    _refuse_ranges(variables, "a grid")
    return math.prod(len(v.values) for v in variables)


def grid_points(variables: list[Variable]) -> list[tuple]:
    """The cartesian product of the values, the last variable changing fastest."""
    size = grid_size(variables)
    if size > MAX_GRID:
        raise MergescopeError(
            f"the grid has {size} candidates (more than {MAX_GRID}); narrow it or sample with --random N"
        )
    return list(itertools.product(*(v.values for v in variables)))


def random_points(variables: list[Variable], count: int, seed: int) -> list[tuple]:
    """``count`` distinct points of the grid drawn with ``random.Random(seed)``, in grid order; the whole
    grid when it has no more than ``count`` points."""
    if count < 1:
        raise MergescopeError(f"--random {count}: sample at least one candidate")
    size = grid_size(variables)
    if count >= size:
        return list(itertools.product(*(v.values for v in variables)))
    indices = sorted(random.Random(seed).sample(range(size), count))
    return [_point_at(index, variables) for index in indices]


def _refuse_ranges(variables: list[Variable], what: str) -> None:
    ranges = [v.key for v in variables if v.continuous]
    if ranges:
        raise MergescopeError(
            f"--vary {ranges[0]}: a range low:high has no {what} of values; give a:b:step or v1,v2, "
            "or search it with --strategy random or --strategy cma"
        )


def _point_at(index: int, variables: list[Variable]) -> tuple:
    """The grid point at ``index`` of the product order (mixed radix, last variable fastest)."""
    point = []
    for variable in reversed(variables):
        index, digit = divmod(index, len(variable.values))
        point.append(variable.values[digit])
    return tuple(reversed(point))


def candidates(document: dict, variables: list[Variable], points: list[tuple], first: int = 1) -> list[Candidate]:
    """One plan document per point, each a deep copy of ``document`` with the values set, numbered from
    ``first``."""
    result = []
    for number, point in enumerate(points, first):
        candidate = copy.deepcopy(document)
        for variable, value in zip(variables, point):
            set_path(candidate, variable.path, value, key=variable.key)
        result.append(Candidate(number, point, candidate))
    return result

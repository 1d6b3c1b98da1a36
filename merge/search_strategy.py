"""How a parameter search picks its candidates: a grid, a seeded random sample, or CMA-ES.

Every strategy hands out candidates in **batches** and is told the batch's results in candidate order
(never in the order they finished), so the candidates depend only on the settings, the seed and the
scores — the same on one thread, on ``--jobs 2`` threads or on a Ray cluster.

* ``grid``: the cartesian product of the ``--vary`` values (:func:`.search_space.grid_points`), one batch.
* ``random``: N draws, one batch. Without continuous ranges: N distinct grid points
  (:func:`.search_space.random_points`); with ranges ``low:high``: each range uniform, each listed variable
  one of its values, from ``random.Random(seed)``.
* ``cma``: CMA-ES (Hansen's ``cma`` package) over the continuous ranges, each mapped to [0, 1]
  (x ↦ low + x·(high − low)) with the package's bound handling keeping x inside; it starts at the plan's own
  value where that is a number inside the range (else the middle) with step size σ₀ = 0.3. Each generation
  asks ``popsize`` candidates (the package's default 4 + ⌊3 ln n⌋ for n numbers, or ``--population``) and is
  told their losses −score; a candidate that could not be scored gets the worst loss seen so far plus the
  spread of the losses (1 when there is none), so the search moves away from it. ``--budget`` ends the search
  (the last generation is cut short and not told). Its random numbers come from a generator of its own
  (``numpy.random.default_rng(seed)``), not numpy's global state, so threads cannot disturb them.

``--layer-granularity K`` turns each range into G = ⌈L/K⌉ numbers for a model of L layers, written as a
mergekit gradient ``[v₁, …, v_G]``: layer k of L sits at t = k/(L−1) and takes the piecewise-linear
interpolation at t·(G−1) (so with K = 1 every layer has its own value; with K > 1 the G values are spread
evenly from the first layer to the last and the layers between are interpolated); embeddings, final norm
and head take v₁ (mergekit's t = 0).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mergescope.checkpoints import MergescopeError

from .search_space import Variable, grid_points, random_points

STRATEGIES = ("grid", "random", "cma")
SIGMA0 = 0.3
DIGITS = 6  # candidate values are rounded to this many decimals: readable plans, exact round trips


def layer_groups(layers: int, granularity: int | None) -> int:
    """G = ⌈L/K⌉ values per range for ``--layer-granularity K`` (1: a plain number)."""
    if granularity is None:
        return 1
    if granularity < 1:
        raise MergescopeError(f"--layer-granularity {granularity}: give a number of layers, 1 or more")
    if layers < 1:
        raise MergescopeError("--layer-granularity: the plan's models have no numbered layers to group")
    return math.ceil(layers / granularity)


@dataclass(frozen=True)
class Dimension:
    """One searched number: the variable it belongs to (index), its place in a gradient (None: a number)."""

    variable: int
    slot: int | None
    low: float
    high: float


def dimensions(variables: Sequence[Variable], groups: int) -> list[Dimension]:
    """The numbers a strategy searches: one per range, or ``groups`` per range when groups > 1."""
    dims = []
    for index, variable in enumerate(variables):
        if variable.continuous:
            low, high = variable.bounds
            slots = [None] if groups == 1 else list(range(groups))
            dims += [Dimension(index, slot, low, high) for slot in slots]
    return dims


def point_from_unit(unit: Sequence[float], dims: Sequence[Dimension], variables: Sequence[Variable],
                    fixed: Sequence[object] = ()) -> tuple:
    """Per-variable values from a point of the unit cube: low + x·(high − low), x clipped to [0, 1] and
    rounded to :data:`DIGITS` decimals; a gradient list where a range has several slots. ``fixed`` gives
    the values of listed (non-range) variables in order."""
    values: list[object] = []
    chosen = iter(fixed)
    for index, variable in enumerate(variables):
        mine = [(d, x) for d, x in zip(dims, unit) if d.variable == index]
        if not variable.continuous:
            values.append(next(chosen))
            continue
        numbers = [round(d.low + min(1.0, max(0.0, float(x))) * (d.high - d.low), DIGITS) for d, x in mine]
        values.append(numbers[0] if mine[0][0].slot is None else numbers)
    return tuple(values)


class FixedPoints:
    """Grid and random searches: every candidate is known up front and handed out as one batch."""

    def __init__(self, points: list[tuple]):
        self._points: list[tuple] | None = points
        self.total = len(points)

    def next_batch(self) -> list[tuple] | None:
        points, self._points = self._points, None
        return points

    def tell(self, scores: Sequence[float | None]) -> None:
        """Grid and random points do not depend on scores."""


def uniform_points(variables: Sequence[Variable], dims: Sequence[Dimension], count: int, seed: int) -> list[tuple]:
    """``count`` random points: each range uniform (on the unit cube, then mapped), each listed variable one
    of its values, in draw order from ``random.Random(seed)``."""
    if count < 1:
        raise MergescopeError(f"--random {count}: sample at least one candidate")
    rng = random.Random(seed)
    points = []
    for _ in range(count):
        unit = [rng.random() for _ in dims]
        fixed = [rng.choice(v.values) for v in variables if not v.continuous]
        points.append(point_from_unit(unit, dims, variables, fixed))
    return points


class CmaSearch:
    """CMA-ES over the unit cube of ``dims``, asked and told one generation at a time, up to ``budget``."""

    def __init__(self, variables: Sequence[Variable], dims: Sequence[Dimension], budget: int, seed: int,
                 start: Sequence[float], popsize: int | None = None):
        with warnings.catch_warnings():  # the package warns on import when matplotlib is missing
            warnings.simplefilter("ignore")
            import cma  # imported here: only a CMA search needs it
        if budget < 1:
            raise MergescopeError(f"--budget {budget}: evaluate at least one candidate")
        listed = [v.key for v in variables if not v.continuous]
        if listed:
            raise MergescopeError(f"--vary {listed[0]}: --strategy cma searches ranges only; write KEY=low:high")
        if not dims:
            raise MergescopeError("--strategy cma needs at least one range --vary KEY=low:high")
        rng = np.random.default_rng(seed)
        options = {"bounds": [0.0, 1.0], "seed": float("nan"), "verbose": -9,
                   "randn": lambda *shape: rng.standard_normal(shape)}
        if popsize is not None:
            if popsize < 2:
                raise MergescopeError(f"--population {popsize}: CMA-ES needs at least 2 candidates a generation")
            options["popsize"] = popsize
        if len(dims) == 1:
            # cma 4.5 in one dimension: its step-size cap derived from the bounds fails ("not yet initialized");
            # the bounds themselves still keep x inside [0, 1]
            options["maxstd"] = 1e9
        self._es = cma.CMAEvolutionStrategy(list(start), SIGMA0, options)
        self.popsize = int(self._es.popsize)
        self.total = budget
        self._variables, self._dims = list(variables), list(dims)
        self._asked: list[np.ndarray] = []
        self._left = budget
        self._losses: list[float] = []

    def next_batch(self) -> list[tuple] | None:
        if self._left <= 0:
            return None
        self._asked = [np.asarray(x) for x in self._es.ask()][: min(self.popsize, self._left)]
        self._left -= len(self._asked)
        return [point_from_unit(x, self._dims, self._variables) for x in self._asked]

    def tell(self, scores: Sequence[float | None]) -> None:
        """Tell the generation's scores in candidate order (None: not scored). A cut-short generation
        ends the search and is not told."""
        if len(scores) < self.popsize:
            return
        losses = [None if s is None or not math.isfinite(s) else -s for s in scores]
        self._losses += [x for x in losses if x is not None]
        spread = (max(self._losses) - min(self._losses)) if len(self._losses) > 1 else 0.0
        worst = (max(self._losses) if self._losses else 0.0) + (spread or 1.0)
        self._es.tell(self._asked, [worst if x is None else x for x in losses])


def start_point(document: dict, variables: Sequence[Variable], dims: Sequence[Dimension]) -> list[float]:
    """The unit-cube start of CMA-ES: the plan's value at each range where it is a number inside the range
    (every slot of a gradient the same), else the middle, 0.5."""
    start = []
    for dim in dims:
        value = _lookup(document, variables[dim.variable].path)
        inside = isinstance(value, (int, float)) and not isinstance(value, bool) and dim.low <= value <= dim.high
        start.append((value - dim.low) / (dim.high - dim.low) if inside else 0.5)
    return start


def _lookup(document: object, path: Sequence[str]) -> object:
    node = document
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def make_strategy(name: str, document: dict, variables: Sequence[Variable], *, seed: int, groups: int = 1,
                  budget: int | None = None, random_count: int | None = None, popsize: int | None = None):
    """The strategy object for ``--strategy name`` (see the module docstring); one-line errors for settings
    that do not fit it."""
    dims = dimensions(variables, groups)
    if name == "cma":
        return CmaSearch(variables, dims, budget if budget is not None else 40, seed,
                         start_point(document, variables, dims), popsize)
    if name == "random":
        count = random_count if random_count is not None else budget
        if count is None:
            raise MergescopeError("--strategy random: say how many candidates with --budget N (or --random N)")
        if dims:
            return FixedPoints(uniform_points(variables, dims, count, seed))
        return FixedPoints(random_points(list(variables), count, seed))
    if name == "grid":
        if groups > 1:
            raise MergescopeError("--layer-granularity needs ranges low:high and --strategy random or cma")
        points = grid_points(list(variables))
        return FixedPoints(points[:budget] if budget is not None else points)
    raise MergescopeError(f"--strategy {name}: choose one of {', '.join(STRATEGIES)}")

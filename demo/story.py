"""What the demo shows, as claims with numbers: each is a statistic of measured accuracies and a bound it
must meet. The README's demo section states these claims, ``benchmarks/demo_robustness.py`` measures them
over seeds and kernel settings, and ``tests/test_demo.py`` asserts them on one build — one list, so the
three cannot drift apart. Each bound is the worst value over 5 seeds × 2 kernel settings
(``python benchmarks/demo_robustness.py``) with a margin, so it holds on any machine's build, not one run's.

Scores are ``{name: {task: accuracy}}`` with the workspace's folders (``base``, ``ft_add``, …) and each
merged plan as ``merge:PLAN`` (``merge:task_arithmetic``, …). The statistic most claims use is the share of
a fine-tune's gain that a merge keeps,

    kept(m, i, t) = (acc_m(t) − acc_base(t)) / (acc_i(t) − acc_base(t))

1 when the merge is as good as fine-tune i on its task t, 0 at the base's level, below 0 under it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Scores = dict[str, dict[str, float]]

#: each full fine-tune and the task it learns
FINE_TUNES = {"ft_add": "add", "ft_reverse": "reverse", "ft_sort": "sort"}
#: the merges the claims read, by plan name (``plans/NAME.yml``)
MERGES = ("task_arithmetic", "negation", "task_arithmetic_all", "soup", "ties", "dare_ties", "slerp", "trap_other_base")


def gain(scores: Scores, model: str, task: str) -> float:
    """``acc_model(task) − acc_base(task)``."""
    return scores[model][task] - scores["base"][task]


def kept(scores: Scores, merge: str, model: str, task: str) -> float:
    """Share of ``model``'s gain on ``task`` that ``merge:{merge}`` keeps (see the module docstring)."""
    return gain(scores, f"merge:{merge}", task) / gain(scores, model, task)


@dataclass(frozen=True)
class Claim:
    """``statistic(scores) ≥ bound`` (or ``≤`` when ``at_most``)."""

    name: str
    text: str
    statistic: Callable[[Scores], float]
    bound: float
    at_most: bool = False

    def value(self, scores: Scores) -> float:
        return self.statistic(scores)

    def holds(self, scores: Scores) -> bool:
        value = self.value(scores)
        return value <= self.bound if self.at_most else value >= self.bound

    @property
    def condition(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}"


def _smallest_gain(s: Scores) -> float:
    return min(min(gain(s, m, t) for m, t in FINE_TUNES.items()), gain(s, "lora_sort", "sort"))


def _both_kept(s: Scores, merge: str) -> float:
    return min(kept(s, merge, "ft_add", "add"), kept(s, merge, "ft_sort", "sort"))


def _third_vector_cost(s: Scores) -> float:
    """How much more of add's and sort's gains θ₀ + τ_add + τ_sort keeps than θ₀ + τ_add + τ_reverse + τ_sort
    (the smaller of the two differences)."""
    return min(kept(s, "task_arithmetic", m, t) - kept(s, "task_arithmetic_all", m, t)
               for m, t in (("ft_add", "add"), ("ft_sort", "sort")))


CLAIMS: tuple[Claim, ...] = (
    Claim("fine_tunes_gain", "each fine-tune (and the LoRA) beats the base on its own task by at least (accuracy)",
          _smallest_gain, 0.15),
    Claim("task_arithmetic_keeps_both", "task arithmetic θ₀ + τ_add + τ_sort keeps at least this share of both gains",
          lambda s: _both_kept(s, "task_arithmetic"), 0.3),
    Claim("negation_removes_add", "negation θ₀ + τ_reverse − τ_add leaves at most this share of add's gain",
          lambda s: kept(s, "negation", "ft_add", "add"), -0.4, at_most=True),
    Claim("negation_keeps_reverse", "… keeps at least this share of reverse's gain",
          lambda s: kept(s, "negation", "ft_reverse", "reverse"), 0.25),
    Claim("negation_leaves_sort", "… and moves sort, which neither vector teaches, by at most (accuracy)",
          lambda s: abs(gain(s, "merge:negation", "sort")), 0.1, at_most=True),
    Claim("third_vector_costs", "adding τ_reverse to θ₀ + τ_add + τ_sort costs add and sort at least this share",
          _third_vector_cost, 0.2),
    Claim("soup_keeps_little", "a uniform soup of the three keeps at most this share of any gain",
          lambda s: max(kept(s, "soup", m, t) for m, t in FINE_TUNES.items()), 0.55, at_most=True),
    Claim("ties_loses_a_skill", "TIES of the three (density 0.5) keeps at most this share of its worst-kept gain",
          lambda s: min(kept(s, "ties", m, t) for m, t in FINE_TUNES.items()), 0.2, at_most=True),
    Claim("trap_destroys", "averaging with a fine-tune of another base leaves at most this accuracy on any task",
          lambda s: max(s["merge:trap_other_base"].values()), 0.05, at_most=True),
)

"""What the demo shows, as claims with numbers: each is a statistic of measured accuracies and a bound it
must meet. The README's demo section states these claims, ``benchmarks/demo_robustness.py`` measures them
over seeds and kernel settings, and ``tests/test_demo.py`` asserts them on one build — one list, so the
three cannot drift apart.

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


CLAIMS: tuple[Claim, ...] = (
    Claim("fine_tunes_gain", "each fine-tune (and the LoRA) beats the base on its own task by this much (smallest gain)",
          lambda s: min(min(gain(s, m, t) for m, t in FINE_TUNES.items()), gain(s, "lora_sort", "sort")), 0.25),
    Claim("task_arithmetic_keeps_both", "task arithmetic θ₀ + τ_add + τ_sort keeps this share of both gains (smaller one)",
          lambda s: min(kept(s, "task_arithmetic", "ft_add", "add"), kept(s, "task_arithmetic", "ft_sort", "sort")), 0.75),
    Claim("negation_removes_add", "negation θ₀ + τ_reverse − τ_add leaves this share of add's gain (below 0: under the base)",
          lambda s: kept(s, "negation", "ft_add", "add"), -0.5, at_most=True),
    Claim("negation_keeps_reverse", "… and keeps this share of reverse's gain",
          lambda s: kept(s, "negation", "ft_reverse", "reverse"), 0.75),
    Claim("negation_leaves_sort", "… and moves sort, which neither task vector teaches, by at most this much",
          lambda s: abs(gain(s, "merge:negation", "sort")), 0.15, at_most=True),
    Claim("soup_keeps_little", "a uniform soup keeps at most this share of any fine-tune's gain",
          lambda s: max(kept(s, "soup", m, t) for m, t in FINE_TUNES.items()), 0.5, at_most=True),
    Claim("trap_destroys", "averaging with a fine-tune of another base leaves at most this accuracy on any task",
          lambda s: max(s["merge:trap_other_base"].values()), 0.1, at_most=True),
)

"""The session's merges, for side-by-side comparison (pure, no Textual): each merge's plan, the plan it started
from, its demo scores and the retention its exact preview predicted; and the diff between two plans."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MergeRecord:
    """One merge made in the app."""

    output: Path
    plan_text: str  # the plan that ran (mergekit YAML)
    started_from: str  # the plan the builder started from: the plan file as opened, or its first plan
    retention: dict[str, float] = field(default_factory=dict)  # source → whole-model retention (exact preview)
    scores: dict[str, float] | None = None  # task → accuracy, once the demo scored it
    status: str = "running"  # running, done, failed, cancelled

    @property
    def method(self) -> str:
        for line in self.plan_text.splitlines():
            if line.startswith("merge_method:"):
                return line.split(":", 1)[1].strip()
        return "?"


def plan_diff(started_from: str, plan_text: str) -> list[str]:
    """The unified diff of ``plan_text`` against ``started_from`` (``-`` the plan it started from, ``+`` the
    one that ran), without the file headers; empty when they are the same plan text."""
    lines = difflib.unified_diff(started_from.splitlines(), plan_text.splitlines(), "started from", "ran",
                                 lineterm="", n=1)
    return [line for line in lines if not line.startswith(("---", "+++"))]

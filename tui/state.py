"""What the app knows, in one object: the session it opened, the analysis so far, the plan and the merge of
the moment, and the demo's scores.

:class:`~mergescope.tui.app.MergescopeApp` owns the state: only the app writes it, in its message handlers
(screens and workers post messages, which bubble up to the app). Screens read it as ``self.app.state``, hand
their widgets what they show, and redraw when the app publishes ``analysis_changed`` or ``scores_changed``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from mergescope.analysis import Progress, unique_names
from mergescope.analysis.preview import SampleCache
from mergescope.tui.history import MergeRecord
from mergescope.tui.session import Session

#: the base model's key in :attr:`AppState.demo_scores` (and its row key in the models table)
BASE_KEY = "<base>"


@dataclass
class AppState:
    """Everything the screens share, written only by the app (see the module docstring)."""

    #: the checkpoints opened from the command line (headers only) and the screen to start on
    session: Session
    #: where the analysis, the plan previews and the diagnosis run, and a merge's default: auto, cpu, cuda:N
    device: str = "auto"
    #: whether the analysis may come from (and goes into) the on-disk cache
    use_cache: bool = True
    #: the models' display names, unique, in session order: the analysis report's model keys
    names: list[str] = field(init=False)

    # --- the analysis (a thread worker streams it; the app takes each snapshot) ---------------------------
    #: the latest snapshot: a ``mergescope.analysis/1`` document as it fills in (empty before the first)
    report: dict = field(default_factory=dict)
    #: how far the pass has read (None before the first tensor, and when the report came from the cache)
    analysis_progress: Progress | None = None
    #: whether ``report`` is complete
    analysis_done: bool = False
    #: why the analysis stopped, when it failed (the app stays usable)
    analysis_error: str | None = None
    #: set on quit: the analysis stops between tensors
    analysis_cancel: threading.Event = field(default_factory=threading.Event)

    # --- plans and merges ---------------------------------------------------------------------------------
    #: the plan builder's last valid plan (mergekit YAML), what ``r`` runs from another screen
    plan_text: str | None = None
    #: the plan builder's output folder for that plan, where ``r`` merges it from any screen
    plan_output: str = "merged"
    #: the plan the builder started from (the plan file as opened, or its first plan), for the history's diff
    plan_started_from: str = ""
    #: source → whole-model retention of the builder's last exact preview (what a run of that plan keeps)
    plan_retention: dict[str, float] = field(default_factory=dict)
    #: the merges of this session, oldest first (the history screen, `h`)
    history: list[MergeRecord] = field(default_factory=list)
    #: the running merge's cancel flag (setting it stops the merge between tensors); None while none runs
    merge_cancel: threading.Event | None = None
    #: the output folder of the last merge that finished in the app, what ``d`` diagnoses
    last_merge: Path | None = None
    #: the plan preview's sampled rows, kept between previews so an edit re-reads nothing
    sample_cache: SampleCache = field(default_factory=SampleCache)

    # --- the demo workspace -------------------------------------------------------------------------------
    #: held-out accuracy per demo task of each model scored so far: by name (:data:`BASE_KEY` for the base,
    #: the output folder for a merge made in the app), then task
    demo_scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = unique_names(self.session.models)

    @property
    def merging(self) -> bool:
        """Whether a merge is running."""
        return self.merge_cancel is not None

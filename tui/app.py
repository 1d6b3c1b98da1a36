"""The Textual app behind ``mergescope inspect``.

What the screens share lives in one :class:`~mergescope.tui.state.AppState` (``app.state``): the session, the
latest analysis snapshot, the plan and the running merge, the demo's scores. The analysis runs in a thread
worker and reports through :class:`AnalysisUpdated` messages; screens subscribe to :attr:`analysis_changed`
and redraw from ``state.report``. Nothing heavy runs on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.signal import Signal

from mergescope.analysis import Progress
from mergescope.tui.commands import MergescopeCommands
from mergescope.tui.screens.plan_screen import PlanValidated
from mergescope.tui.screens.run_screen import (
    MergeCancelled, MergeFailed, MergeFinished, MergeScored, MergeStarted,
)
from mergescope.tui.session import Session
from mergescope.tui.state import BASE_KEY, AppState

#: the analysis sends a snapshot at most this often (seconds)
SNAPSHOT_EVERY = 0.25


@dataclass
class AnalysisUpdated(Message):
    """A new snapshot of the streaming analysis: the report so far and the pass's progress."""

    report: dict  # the ``mergescope.analysis/1`` document so far
    progress: Progress | None  # None before the first tensor, and for a report from the cache
    done: bool  # the report is complete
    error: str | None = None  # why the analysis stopped, when it failed


@dataclass
class ModelScored(Message):
    """Demo workspace: one model of the session scored on the demo tasks."""

    key: str  # the model's name; BASE_KEY for the base
    scores: dict[str, float]  # task → held-out accuracy


class MergescopeApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "mergescope"
    COMMANDS = App.COMMANDS | {MergescopeCommands}
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("p", "plan", "Plan"),
        Binding("r", "run", "Run"),
    ]

    def __init__(self, session: Session, *, device: str = "auto", use_cache: bool = True) -> None:
        super().__init__()
        self.state = AppState(session, device=device, use_cache=use_cache)
        #: published with the report after each analysis snapshot
        self.analysis_changed: Signal[dict] = Signal(self, "analysis_changed")
        #: published with ``state.demo_scores`` when a model's demo scores arrive
        self.scores_changed: Signal[dict] = Signal(self, "scores_changed")

    # --- start-up ----------------------------------------------------------------------------------
    def on_mount(self) -> None:
        from mergescope.tui.screens.overview_screen import OverviewScreen

        self.push_screen(OverviewScreen())
        self.run_analysis()
        if self.state.session.workspace is not None:
            self.score_workspace()
        if self.state.session.start == "plan":
            self.action_plan()
        elif self.state.session.start == "diagnosis":
            self.action_diagnose(self.state.session.merged_dir)

    @work(thread=True, exclusive=True, group="analysis")
    def run_analysis(self) -> None:
        """Stream the analysis (or take it from the cache), posting a snapshot every SNAPSHOT_EVERY seconds."""
        from mergescope.analysis import ReportBuilder, stream_analysis
        from mergescope.analysis.cache import AnalysisCache, cache_key

        base, models = self.state.session.base, self.state.session.models
        try:
            cache = AnalysisCache() if self.state.use_cache else None
            key = cache_key(base, models, self.state.names, 1.0)
            if cache is not None and (hit := cache.get(key)) is not None:
                self.post_message(AnalysisUpdated(hit, None, done=True))
                return
            builder = ReportBuilder(base, models, self.state.names, 1.0)
            last = 0.0
            progress = None
            for event in stream_analysis(base, models, self.state.names, device=self.state.device, cancel=self.state.analysis_cancel):
                builder.add(event)
                if isinstance(event, Progress):
                    progress = event
                    if time.monotonic() - last >= SNAPSHOT_EVERY:
                        self.post_message(AnalysisUpdated(builder.report(), progress, done=False))
                        last = time.monotonic()
            if self.state.analysis_cancel.is_set():
                return
            report = builder.report()
            if cache is not None:
                cache.put(key, report)
            self.post_message(AnalysisUpdated(report, progress, done=True))
        except Exception as exc:  # shown in the status line; the app stays usable
            self.post_message(AnalysisUpdated(self.state.report, None, done=False, error=str(exc)))

    def on_analysis_updated(self, message: AnalysisUpdated) -> None:
        self.state.report = message.report
        self.state.analysis_progress = message.progress
        self.state.analysis_done = message.done
        self.state.analysis_error = message.error
        self.analysis_changed.publish(self.state.report)

    @work(thread=True, group="demo-eval")
    def score_workspace(self) -> None:
        """Demo workspace: each model's held-out accuracy per task, shown in the models table as it comes."""
        from mergescope.demo.session import score_models

        session = self.state.session
        for key, scores in score_models([(BASE_KEY, session.base), *zip(self.state.names, session.models)]):
            self.post_message(ModelScored(key, scores))

    def on_model_scored(self, message: ModelScored) -> None:
        self._record_scores(message.key, message.scores)

    def _record_scores(self, key: str, scores: dict[str, float]) -> None:
        self.state.demo_scores[key] = scores
        self.scores_changed.publish(self.state.demo_scores)

    # --- what the screens report --------------------------------------------------------------------
    def on_plan_validated(self, message: PlanValidated) -> None:
        self.state.plan_text = message.plan_text

    def on_merge_started(self, message: MergeStarted) -> None:
        self.state.merge_cancel = message.cancel

    def on_merge_finished(self, message: MergeFinished) -> None:
        self.state.merge_cancel = None
        self.state.last_merge = message.output

    def on_merge_failed(self, message: MergeFailed) -> None:
        self.state.merge_cancel = None

    def on_merge_cancelled(self, message: MergeCancelled) -> None:
        self.state.merge_cancel = None

    def on_merge_scored(self, message: MergeScored) -> None:
        self._record_scores(str(message.output), message.scores)

    # --- actions -----------------------------------------------------------------------------------
    def action_help(self) -> None:
        from mergescope.tui.screens.help_screen import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_plan(self) -> None:
        from mergescope.tui.screens.plan_screen import PlanScreen

        if not isinstance(self.screen, PlanScreen):
            self.push_screen(PlanScreen(self.state.session.plan_path))

    def action_run(self) -> None:
        from mergescope.tui.screens.plan_screen import PlanScreen
        from mergescope.tui.screens.run_screen import RunScreen

        if self.state.merging:
            self.notify("a merge is already running", severity="warning")
            return
        if isinstance(self.screen, PlanScreen):
            self.screen.action_run()
            return
        if self.state.plan_text is None:
            self.notify("build a plan first: p opens the plan builder", severity="warning")
            self.action_plan()
            return
        self.push_screen(RunScreen(self.state.plan_text))

    def action_filter_tensors(self) -> None:
        """Every tensor of the model, filtered by name as you type."""
        from mergescope.tui.screens.layer_screen import LayerScreen

        self.push_screen(LayerScreen(None, filter_first=True))

    def action_cancel_merge(self) -> None:
        if self.state.merge_cancel is None:
            self.notify("no merge is running", severity="warning")
            return
        self.state.merge_cancel.set()
        self.notify("cancelling the merge after the current tensor")

    def action_diagnose(self, merged_dir=None) -> None:
        from mergescope.tui.screens.diagnosis_screen import DiagnosisScreen

        target = merged_dir or self.state.last_merge
        if target is None:
            self.notify("no merge to diagnose yet: run one (r) or open a merged folder", severity="warning")
            return
        self.push_screen(DiagnosisScreen(target))

    async def action_quit(self) -> None:
        if self.state.merge_cancel is None:
            self.state.analysis_cancel.set()
            self.exit()
            return
        from mergescope.tui.screens.confirm_screen import ConfirmScreen

        def answered(quit_now: bool | None) -> None:
            if quit_now:
                if self.state.merge_cancel is not None:
                    self.state.merge_cancel.set()
                self.state.analysis_cancel.set()
                self.exit()

        self.push_screen(ConfirmScreen("A merge is running. Cancel it and quit?"), answered)

"""The Textual app behind ``mergescope inspect``.

What the screens share lives in one :class:`~mergescope.tui.state.AppState` (``app.state``), which only the
app writes, in its message handlers. The analysis and the demo's scoring run in thread workers that report
through messages (:class:`AnalysisUpdated`, :class:`ModelScored`); the screens' own workers (plan checks,
merges) post messages that bubble up here. Screens subscribe to :attr:`MergescopeApp.analysis_changed` and
:attr:`MergescopeApp.scores_changed` and redraw from the state. Nothing heavy runs on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from textual import events, work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.scrollbar import ScrollBar
from textual.signal import Signal

from mergescope.analysis import Progress, ReportBuilder, stream_analysis
from mergescope.analysis.cache import AnalysisCache, cache_key
from mergescope.checkpoints import MergescopeError
from mergescope.demo.session import score_models
from mergescope.merge.plan import load_plan, plan_file_in
from mergescope.tui.commands import MergescopeCommands
from mergescope.tui.history import MergeRecord
from mergescope.tui.screens.confirm_screen import ConfirmScreen
from mergescope.tui.screens.diagnosis_screen import DiagnosisScreen
from mergescope.tui.screens.help_screen import HelpScreen
from mergescope.tui.screens.history_screen import HistoryScreen
from mergescope.tui.screens.layer_screen import LayerScreen
from mergescope.tui.screens.open_path_screen import OpenPathScreen
from mergescope.tui.screens.overview_screen import OverviewScreen
from mergescope.tui.screens.plan_screen import PlanScreen, PlanValidated, PreviewUpdated
from mergescope.tui.screens.run_screen import (
    MergeCancelled,
    MergeFailed,
    MergeFinished,
    MergeScored,
    MergeStarted,
    RunScreen,
)
from mergescope.tui.screens.search_screen import SearchScreen
from mergescope.tui.screens.tokens_screen import TokensScreen
from mergescope.tui.screens.too_small_screen import TooSmallScreen, too_small
from mergescope.tui.scrollbars import WholeCellScrollBarRender
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
        Binding("h", "history", "History"),
    ]

    def __init__(self, session: Session, *, device: str = "auto", use_cache: bool = True) -> None:
        super().__init__()
        ScrollBar.renderer = WholeCellScrollBarRender  # Textual's documented way to restyle scrollbars
        self._size_notice_dismissed = False
        self.state = AppState(session, device=device, use_cache=use_cache)
        #: published with the report after each analysis snapshot
        self.analysis_changed: Signal[dict] = Signal(self, "analysis_changed")
        #: published with ``state.demo_scores`` when a model's demo scores arrive
        self.scores_changed: Signal[dict] = Signal(self, "scores_changed")

    # --- start-up ----------------------------------------------------------------------------------
    def on_mount(self) -> None:
        session = self.state.session
        self.push_screen(OverviewScreen())
        self.run_analysis()
        if session.workspace is not None:
            self.score_workspace()
        if session.start == "plan":
            self.action_plan()
        elif session.start == "diagnosis":
            self.action_diagnose(session.merged_dir)
        elif session.start == "search":
            self.push_screen(SearchScreen(session.search_path))
        self._started = True
        self.call_after_refresh(self._check_size)

    @work(thread=True, exclusive=True, group="analysis")
    def run_analysis(self) -> None:
        """Stream the analysis (or take it from the cache), posting a snapshot every SNAPSHOT_EVERY seconds."""
        state = self.state
        base, models, names, cancel = state.session.base, state.session.models, state.names, state.analysis_cancel
        try:
            cache = AnalysisCache() if state.use_cache else None
            key = cache_key(base, models, names, 1.0)
            if cache is not None and (hit := cache.get(key)) is not None:
                self.post_message(AnalysisUpdated(hit, None, done=True))
                return
            builder = ReportBuilder(base, models, names, 1.0)
            last = 0.0
            progress = None
            for event in stream_analysis(base, models, names, device=state.device, cancel=cancel):
                builder.add(event)
                if isinstance(event, Progress):
                    progress = event
                    if time.monotonic() - last >= SNAPSHOT_EVERY:
                        self.post_message(AnalysisUpdated(builder.report(), progress, done=False))
                        last = time.monotonic()
            if cancel.is_set():
                return
            report = builder.report()
            if cache is not None:
                cache.put(key, report)
            self.post_message(AnalysisUpdated(report, progress, done=True))
        except Exception as exc:  # shown in the status line; the app stays usable
            self.post_message(AnalysisUpdated(state.report, None, done=False, error=str(exc)))

    @work(thread=True, group="demo-eval")
    def score_workspace(self) -> None:
        """Demo workspace: each model's held-out accuracy per task, shown in the models table as it comes."""
        session = self.state.session
        for key, scores in score_models([(BASE_KEY, session.base), *zip(self.state.names, session.models)]):
            self.post_message(ModelScored(key, scores))

    def on_resize(self, event: events.Resize) -> None:
        self._check_size(event.size.width, event.size.height)

    def _check_size(self, width: int | None = None, height: int | None = None) -> None:
        """Below 80x24 a notice covers the screens until the terminal is large enough (or Escape)."""
        if not getattr(self, "_started", False):
            return
        small = too_small(width or self.size.width, height or self.size.height)
        showing = isinstance(self.screen, TooSmallScreen)
        if small and not showing and not self._size_notice_dismissed:
            self.push_screen(TooSmallScreen(), lambda _: setattr(self, "_size_notice_dismissed", True))
        elif not small and showing:
            self.pop_screen()
        if not small:
            self._size_notice_dismissed = False

    # --- the state, from messages ------------------------------------------------------------------
    def on_analysis_updated(self, message: AnalysisUpdated) -> None:
        state = self.state
        state.report, state.analysis_progress = message.report, message.progress
        state.analysis_done, state.analysis_error = message.done, message.error
        self.analysis_changed.publish(state.report)

    def on_model_scored(self, message: ModelScored) -> None:
        self._record_scores(message.key, message.scores)

    def on_merge_scored(self, message: MergeScored) -> None:
        for record in self.state.history:
            if record.output == message.output:
                record.scores = message.scores
        self._record_scores(str(message.output), message.scores)

    def _record_scores(self, key: str, scores: dict[str, float]) -> None:
        self.state.demo_scores[key] = scores
        self.scores_changed.publish(self.state.demo_scores)

    def on_plan_validated(self, message: PlanValidated) -> None:
        self.state.plan_text, self.state.plan_output = message.plan_text, message.output
        self.state.plan_started_from = message.started_from

    def on_preview_updated(self, message: PreviewUpdated) -> None:
        """The builder's final exact preview: what a run of its plan keeps of each source (for the history)."""
        if message.cancel.is_set() or message.status != "exact preview":
            return
        whole = next((row for row in message.rows if row[0] == "all"), None)
        if whole is not None:
            self.state.plan_retention = {n: r for n, r in zip(message.names, whole[2]) if r is not None}

    def on_merge_started(self, message: MergeStarted) -> None:
        self.state.merge_cancel = message.cancel
        self.state.history.append(MergeRecord(message.output, message.plan_text, message.started_from,
                                              dict(self.state.plan_retention)))

    def on_merge_finished(self, message: MergeFinished) -> None:
        self.state.merge_cancel = None
        self.state.last_merge = message.output
        self._record_status("done")

    def on_merge_failed(self, message: MergeFailed) -> None:
        self.state.merge_cancel = None
        self._record_status("failed")

    def on_merge_cancelled(self, message: MergeCancelled) -> None:
        self.state.merge_cancel = None
        self._record_status("cancelled")

    def _record_status(self, status: str) -> None:
        if self.state.history:
            self.state.history[-1].status = status

    # --- actions -----------------------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_plan(self) -> None:
        if not isinstance(self.screen, PlanScreen):
            self.push_screen(PlanScreen(self.state.session.plan_path))

    def action_run(self) -> None:
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
        self.push_screen(RunScreen(self.state.plan_text, self.state.plan_output))

    def action_history(self) -> None:
        if not isinstance(self.screen, HistoryScreen):
            self.push_screen(HistoryScreen())

    def action_open_merged(self) -> None:
        """Ask for a merged folder (one holding mergekit_config.yml) and open its diagnosis."""
        def answered(path: str | None) -> None:
            if path is None:
                return
            folder = Path(path).expanduser()
            if not folder.is_dir() or plan_file_in(folder) is None:
                self.notify(f"{path}: not a merged folder (no mergekit_config.yml in it)", severity="error")
                return
            self.action_diagnose(folder)

        self.push_screen(OpenPathScreen("merged folder to diagnose:", self._start_path("merges")), answered)

    def action_open_plan(self) -> None:
        """Ask for a plan file and open it in the plan builder."""
        def answered(path: str | None) -> None:
            if path is None:
                return
            plan = Path(path).expanduser()
            try:
                load_plan(plan)
            except MergescopeError as exc:
                self.notify(str(exc).splitlines()[0], severity="error")
                return
            if isinstance(self.screen, PlanScreen):
                self.pop_screen()
            self.push_screen(PlanScreen(plan))

        self.push_screen(OpenPathScreen("plan file to open in the builder:", self._start_path("plans")), answered)

    def _start_path(self, folder: str) -> str:
        """Where a path prompt starts: the demo workspace's plans/ or merges/, else the current folder."""
        workspace = self.state.session.workspace
        return f"{workspace / folder}/" if workspace is not None else ""

    def action_tokens(self) -> None:
        """The tokens each model added to or lost from the base's vocabulary."""
        if not isinstance(self.screen, TokensScreen):
            self.push_screen(TokensScreen())

    def action_filter_tensors(self) -> None:
        """Every tensor of the model, filtered by name as you type."""
        self.push_screen(LayerScreen(None, filter_first=True))

    def action_cancel_merge(self) -> None:
        if self.state.merge_cancel is None:
            self.notify("no merge is running", severity="warning")
            return
        self.state.merge_cancel.set()
        self.notify("cancelling the merge after the current tensor")

    def action_diagnose(self, merged_dir: Path | str | None = None) -> None:
        target = merged_dir or self.state.last_merge
        if target is None:
            self.notify("no merge to diagnose yet: run one (r) or open a merged folder", severity="warning")
            return
        self.push_screen(DiagnosisScreen(target))

    async def action_quit(self) -> None:
        if not self.state.merging:
            self._stop_and_exit()
            return

        def answered(quit_now: bool | None) -> None:
            if quit_now:
                self._stop_and_exit()

        self.push_screen(ConfirmScreen("A merge is running. Cancel it and quit?"), answered)

    def _stop_and_exit(self) -> None:
        if self.state.merge_cancel is not None:
            self.state.merge_cancel.set()
        self.state.analysis_cancel.set()
        self.exit()

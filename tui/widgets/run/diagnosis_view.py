"""The diagnosis of a merged folder as one widget: summary, per-layer table, progress. Used by the
diagnosis screen and, after a merge, by the run panel. The pass runs in a thread worker that reports by the
messages below; once the view is gone (its screen closed), what the worker still posts is dropped."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Label, ProgressBar, Static

from mergescope.analysis import Progress
from mergescope.analysis.diagnosis import Diagnosis, stream_diagnosis
from mergescope.analysis.diagnosis_context import plan_context_for_folder
from mergescope.analysis.diagnosis_groups import GroupDiagnosis
from mergescope.checkpoints import Checkpoint, MergescopeError, open_checkpoint
from mergescope.tui.widgets.run.diagnosis_table import DiagnosisTable


@dataclass
class DiagnosisStarted(Message):
    """The merge's plan is resolved; the table gets a column block per source."""

    names: list[str]  # the sources' names


@dataclass
class GroupDiagnosed(Message):
    """One more layer group diagnosed."""

    group: GroupDiagnosis


@dataclass
class DiagnosisProgressed(Message):
    """How far the diagnosis has read."""

    progress: Progress


@dataclass
class DiagnosisFinished(Message):
    """The whole diagnosis: every group, the total and the summary."""

    diagnosis: Diagnosis


@dataclass
class DiagnosisFailed(Message):
    """The folder cannot be diagnosed (or the diagnosis was cancelled)."""

    error: str


def summary_text(diagnosis: Diagnosis) -> Text:
    """The summary sentences (findings first), then warnings."""
    text = Text()
    for sentence in diagnosis.summary:
        text.append("• ", style="bold")
        text.append(sentence + "\n")
    for warning in diagnosis.warnings[:5]:
        text.append("⚠ ", style="yellow")
        text.append(warning + "\n")
    return text


class DiagnosisView(Vertical):
    DEFAULT_CSS = """
    DiagnosisView { height: 1fr; }
    DiagnosisView #diagnosis-summary {
        height: auto; max-height: 9; padding: 0 1; border-bottom: solid $primary-background;
    }
    DiagnosisView #diagnosis-table { height: 1fr; width: 1fr; }
    DiagnosisView #diagnosis-status { height: 1; }
    DiagnosisView #diagnosis-bar { width: auto; margin-right: 1; }
    """

    def __init__(self, merged_dir: Path | str, *, base: Checkpoint, device: str, **kwargs) -> None:
        """``base``: the session's base (what the merge's plan names is read beside it when needed);
        ``device``: where the pass runs."""
        super().__init__(**kwargs)
        self.merged_dir = Path(merged_dir)
        self.base, self.device = base, device
        self.cancel = threading.Event()
        self.diagnosis: Diagnosis | None = None  # once finished
        self.error: str | None = None  # why it failed

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="diagnosis-summary"):
            yield Static(Text(f"diagnosing {self.merged_dir}…", style="dim"), id="diagnosis-text")
        yield Static("", id="diagnosis-table-slot")
        with Horizontal(id="diagnosis-status"):
            yield ProgressBar(id="diagnosis-bar", show_eta=True)
            yield Label("", id="diagnosis-label")

    def on_mount(self) -> None:
        self.run_diagnosis()

    def on_unmount(self) -> None:
        self.cancel.set()

    @work(thread=True, exclusive=True, group="diagnosis")
    def run_diagnosis(self) -> None:
        try:
            context = plan_context_for_folder(self.merged_dir, self.base)
            merged = open_checkpoint(str(self.merged_dir))
            self.post_message(DiagnosisStarted(context.names))
            for event in stream_diagnosis(context.base, context.sources, merged, names=context.names,
                                          references=context.references, context=context, device=self.device,
                                          cancel=self.cancel):
                if isinstance(event, GroupDiagnosis):
                    self.post_message(GroupDiagnosed(event))
                elif isinstance(event, Progress):
                    self.post_message(DiagnosisProgressed(event))
                elif isinstance(event, Diagnosis):
                    self.post_message(DiagnosisFinished(event))
        except MergescopeError as exc:
            self.post_message(DiagnosisFailed(str(exc)))
        except Exception as exc:  # never crash the app on a bad folder
            self.post_message(DiagnosisFailed(f"{type(exc).__name__}: {exc}"))

    def on_diagnosis_started(self, message: DiagnosisStarted) -> None:
        slot = self.query_one("#diagnosis-table-slot")
        table = DiagnosisTable(message.names, id="diagnosis-table")
        self.mount(table, after=slot)
        slot.remove()
        table.focus()

    def on_group_diagnosed(self, message: GroupDiagnosed) -> None:
        self.query_one(DiagnosisTable).add_group(message.group)

    def on_diagnosis_progressed(self, message: DiagnosisProgressed) -> None:
        progress = message.progress
        self.query_one("#diagnosis-bar", ProgressBar).update(total=progress.bytes_total or 1,
                                                             progress=progress.bytes_done)
        self.query_one("#diagnosis-label", Label).update(Text(progress.current, style="dim"))

    def on_diagnosis_finished(self, message: DiagnosisFinished) -> None:
        self.diagnosis = diagnosis = message.diagnosis
        self.query_one(DiagnosisTable).add_group(diagnosis.total, label="all")
        self.query_one("#diagnosis-text", Static).update(summary_text(diagnosis))
        self.query_one("#diagnosis-bar", ProgressBar).update(total=1, progress=1)
        self.query_one("#diagnosis-label", Label).update(Text("diagnosis done", style="green"))

    def on_diagnosis_failed(self, message: DiagnosisFailed) -> None:
        self.error = message.error
        failure = Text(f"cannot diagnose {self.merged_dir}: {message.error}", style="bold red")
        self.query_one("#diagnosis-text", Static).update(failure)
        self.query_one("#diagnosis-label", Label).update(Text("failed", style="red"))

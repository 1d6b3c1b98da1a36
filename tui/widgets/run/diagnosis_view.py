"""The diagnosis of a merged folder as one widget: summary, per-layer table, progress. Used by the
diagnosis screen and, after a merge, by the run panel. The pass runs in a thread worker."""

from __future__ import annotations

import threading
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, ProgressBar, Static

from mergescope.analysis import Progress
from mergescope.analysis.diagnosis import Diagnosis, GroupDiagnosis, stream_diagnosis
from mergescope.analysis.diagnosis_context import plan_context_for_folder
from mergescope.checkpoints import Checkpoint, MergescopeError, open_checkpoint
from mergescope.tui.widgets.run.diagnosis_table import DiagnosisTable


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
    DiagnosisView #diagnosis-table { height: 1fr; }
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
        self.diagnosis = None
        self.error: str | None = None

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
        app = self.app
        try:
            context = plan_context_for_folder(self.merged_dir, self.base)
            merged = open_checkpoint(str(self.merged_dir))
            app.call_from_thread(self._start_table, context.names)
            for event in stream_diagnosis(context.base, context.sources, merged, names=context.names,
                                          references=context.references, context=context, device=self.device,
                                          cancel=self.cancel):
                if isinstance(event, GroupDiagnosis):
                    app.call_from_thread(self._add_group, event)
                elif isinstance(event, Progress):
                    app.call_from_thread(self._progress, event)
                elif isinstance(event, Diagnosis):
                    app.call_from_thread(self._finished, event)
        except MergescopeError as exc:
            app.call_from_thread(self._failed, str(exc))
        except Exception as exc:  # never crash the app on a bad folder
            app.call_from_thread(self._failed, f"{type(exc).__name__}: {exc}")

    def _start_table(self, names: list[str]) -> None:
        slot = self.query_one("#diagnosis-table-slot")
        table = DiagnosisTable(names, id="diagnosis-table")
        self.mount(table, after=slot)
        slot.remove()
        table.focus()

    def _add_group(self, group: GroupDiagnosis) -> None:
        self.query_one(DiagnosisTable).add_group(group)

    def _progress(self, progress: Progress) -> None:
        bar = self.query_one("#diagnosis-bar", ProgressBar)
        bar.update(total=progress.bytes_total or 1, progress=progress.bytes_done)
        self.query_one("#diagnosis-label", Label).update(Text(progress.current, style="dim"))

    def _finished(self, diagnosis: Diagnosis) -> None:
        self.diagnosis = diagnosis
        self.query_one(DiagnosisTable).add_group(diagnosis.total, label="all")
        self.query_one("#diagnosis-text", Static).update(summary_text(diagnosis))
        self.query_one("#diagnosis-bar", ProgressBar).update(total=1, progress=1)
        self.query_one("#diagnosis-label", Label).update(Text("diagnosis done", style="green"))

    def _failed(self, message: str) -> None:
        self.error = message
        failure = Text(f"cannot diagnose {self.merged_dir}: {message}", style="bold red")
        self.query_one("#diagnosis-text", Static).update(failure)
        self.query_one("#diagnosis-label", Label).update(Text("failed", style="red"))

"""Run (`r`): confirm the output folder and device, then merge with a progress panel; `c` cancels.

The merge runs in a thread worker through the same executor as ``mergescope merge`` and reports through the
messages below; the screen redraws from them and they bubble up to the app, which keeps the merge's state.
Cancelling stops between tensors and leaves nothing behind. In a demo workspace a finished merge is then
scored on the demo tasks, in another worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Header, Input, Label, RichLog, Select, Static

from mergescope.checkpoints import MergescopeError, check_output_folder
from mergescope.demo.evaluate import evaluate
from mergescope.merge import executor
from mergescope.merge.job import build_job
from mergescope.merge.plan import parse_plan
from mergescope.merge.plan_commands import ALLOW_FLAG, plan_commands
from mergescope.tui.state import BASE_KEY
from mergescope.tui.widgets.run.diagnosis_view import DiagnosisView
from mergescope.tui.widgets.run.merge_progress import MergeProgressPanel
from mergescope.tui.widgets.tick_box import TickBox

#: where the run screen is: asking for the output, merging, or after the merge ended one of three ways
Phase = Literal["confirm", "running", "done", "failed", "cancelled"]


@dataclass
class MergeStarted(Message):
    """A merge into ``output`` started; setting ``cancel`` stops it between tensors."""

    output: Path
    cancel: threading.Event
    plan_text: str = ""  # the plan being merged
    started_from: str = ""  # the plan the builder started from


@dataclass
class MergeProgressed(Message):
    """The running merge wrote another tensor."""

    progress: executor.MergeProgress


@dataclass
class MergeFinished(Message):
    """The merge is written, complete, in ``output``."""

    output: Path


@dataclass
class MergeFailed(Message):
    """The merge stopped on an error; nothing was written to ``output``."""

    output: Path
    error: str


@dataclass
class MergeCancelled(Message):
    """The merge was cancelled; nothing was written to ``output``."""

    output: Path


@dataclass
class MergeScored(Message):
    """Demo workspace: the finished merge in ``output``, scored on the demo tasks."""

    output: Path
    scores: dict[str, float]  # task → held-out accuracy


@dataclass
class MergeScoringFailed(Message):
    """Demo workspace: the demo could not score the merge in ``output``."""

    output: Path
    error: str


#: what to press after a failed run (the form is shown again)
RETRY_HINT = ("change the output folder, or Tab to “replace the output folder” and Space to tick it, "
              "then Ctrl+G · Escape: back to the plan")


def scores_beside_sources(state, label: str, scores: dict[str, float], plan_text: str) -> Table:
    """The merge's demo scores under the base's and those of the models its plan merges (as far as scored), a
    column per task."""
    try:
        merged_refs = {entry.model for entry in parse_plan(plan_text).models or []}
    except MergescopeError:
        merged_refs = set()
    references = state.session.references[1:] or [m.source for m in state.session.models]
    sources = [name for name, ref in zip(state.names, references) if ref in merged_refs] or state.names
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    table.add_column("model or merge", no_wrap=True)
    for task in scores:
        table.add_column(task[:4], justify="right")
    for key, name in [(BASE_KEY, "base"), *((n, n) for n in sources)]:
        if key in state.demo_scores:
            table.add_row(name, *[f"{state.demo_scores[key].get(t, float('nan')):.0%}" for t in scores])
    table.add_row(Text(label, style="bold"), *[Text(f"{v:.0%}", style="bold") for v in scores.values()])
    return table


def device_options() -> list[tuple[str, str]]:
    """auto, cpu and every visible CUDA device."""
    options = [("auto (the GPU when there is one)", "auto"), ("cpu", "cpu")]
    try:
        count = torch.cuda.device_count()
        options += [(f"cuda:{i} {torch.cuda.get_device_name(i)}", f"cuda:{i}") for i in range(count)]
    except Exception:  # no CUDA build, no driver: the CPU it is
        pass
    return options


class RunScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+g", "start", "Start", show=True),
        Binding("c", "cancel", "Cancel merge"),
        Binding("d", "diagnose", "Diagnose"),
    ]

    def __init__(self, plan_text: str, output: str = "merged", started_from: str = "") -> None:
        super().__init__()
        self.plan_text, self.output, self.started_from = plan_text, output, started_from
        self.phase: Phase = "confirm"
        self.cancel = threading.Event()  # stops this screen's merge between tensors
        self.merged: Path | None = None  # the merge's output folder once it finished
        self.logged_tensors = 0  # the tensors done when the log last said so

    def compose(self) -> ComposeResult:
        device = self.app.state.device or "auto"
        yield Header()
        with Vertical(id="run-form"):
            yield Label("output folder", classes="field-label")
            yield Input(self.output, compact=True, id="run-output")
            yield Label("device", classes="field-label")
            yield Select(device_options(), value=device, allow_blank=False, compact=True, id="run-device")
            yield TickBox("replace the output folder if it exists", False, compact=True, id="run-force")
            yield Static(Text("Ctrl+G starts the merge · Escape goes back", style="bold"), id="run-hint")
        with Vertical(id="run-panel"):
            yield MergeProgressPanel(id="merge-progress")
        yield RichLog(id="run-log", wrap=True, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "run the plan"
        self.query_one("#run-panel").display = False
        self.query_one("#run-output").focus()
        self._say_what_is_not_run()

    def _say_what_is_not_run(self) -> None:
        """A plan is data: the app never runs a program the plan names; say so, with the exact command."""
        try:
            commands = plan_commands(parse_plan(self.plan_text, source="plan builder"))
        except MergescopeError:
            return  # the merge reports the plan's problems when it starts
        for command in commands:
            self.query_one(RichLog).write(
                f"not run: {command.key} {command.command!r} — the app never runs a plan's programs and merges every "
                f"model listed; `mergescope merge PLAN.yml {ALLOW_FLAG}` runs the selection"
            )

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_start()

    def action_start(self) -> None:
        if self.phase not in ("confirm", "failed"):
            return
        if self.app.state.merging:
            self.notify("a merge is already running", severity="warning")
            return
        output = Path(self.query_one("#run-output", Input).value or "merged")
        device = str(self.query_one("#run-device", Select).value)
        force = self.query_one("#run-force", Checkbox).value
        self.phase = "running"
        self.query_one("#run-form").display = False
        self.query_one("#run-panel").display = True
        self.query_one(MergeProgressPanel).reset()
        self.logged_tensors = 0
        self.query_one(RichLog).write(f"merging into {output} on {device}")
        self.post_message(MergeStarted(output, self.cancel, self.plan_text, self.started_from))
        self.run_merge(output, device, force)

    @work(thread=True, exclusive=True, group="merge")
    def run_merge(self, output: Path, device: str, force: bool) -> None:
        try:
            job = build_job(parse_plan(self.plan_text, source="plan builder"))
            if output.is_dir() and any(output.iterdir()) and not force:
                raise MergescopeError(f"{output}: folder exists and is not empty")
            check_output_folder(output, job.checkpoints.values(), overwrite=force)
            written = executor.run_merge(job, output, device=device, overwrite=force, cancel=self.cancel,
                                         on_event=lambda progress: self.post_message(MergeProgressed(progress)))
            self.post_message(MergeFinished(Path(written)))
        except executor.MergeCancelled:
            self.post_message(MergeCancelled(output))
        except MergescopeError as exc:
            self.post_message(MergeFailed(output, str(exc)))
        except Exception as exc:  # report, never crash the app
            self.post_message(MergeFailed(output, f"{type(exc).__name__}: {exc}"))

    @work(thread=True, group="demo-eval")
    def score_merge(self, output: Path) -> None:
        """Demo workspace: the new merge's held-out accuracy on the demo tasks."""
        try:
            scores = evaluate(output)
        except Exception as exc:  # a model the demo cannot score: say so, keep going
            self.post_message(MergeScoringFailed(output, str(exc)))
            return
        self.post_message(MergeScored(output, scores))

    # --- what the workers report ---------------------------------------------------------------------
    def on_merge_progressed(self, message: MergeProgressed) -> None:
        progress = message.progress
        self.query_one(MergeProgressPanel).show(progress)
        done = progress.tensors_done
        # a line per 25 tensors and at the end, once each: a tensor's blocks and first passes report too
        if done != self.logged_tensors and (done == progress.tensors_total or done % 25 == 0):
            self.logged_tensors = done
            self.query_one(RichLog).write(f"{done}/{progress.tensors_total} {progress.tensor}")

    def on_merge_finished(self, message: MergeFinished) -> None:
        state = self.app.state
        self.phase, self.merged = "done", message.output
        self.query_one(RichLog).write(f"done: {message.output} — its diagnosis below (d: full screen · Escape: back)")
        self.notify(f"merged into {message.output}")
        self.add_class("finished")
        diagnosis = DiagnosisView(message.output, base=state.session.base, device=state.device, id="run-diagnosis")
        self.mount(diagnosis, before=self.query_one(Footer))
        if state.session.workspace is not None:
            self.score_merge(message.output)

    def on_merge_cancelled(self, message: MergeCancelled) -> None:
        self.phase = "cancelled"
        self.query_one(RichLog).write(f"cancelled; nothing was written to {message.output}")

    def on_merge_failed(self, message: MergeFailed) -> None:
        """The bar stops, the form comes back, and the log says what to press next."""
        self.phase = "failed"
        self.query_one(MergeProgressPanel).stop(message.error)
        self.query_one(RichLog).write(f"failed: {message.error}")
        self.query_one(RichLog).write(RETRY_HINT)
        self.query_one("#run-form").display = True
        self.query_one("#run-output").focus()
        self.notify(f"{message.error or 'merge failed'} · {RETRY_HINT}", severity="error")

    def on_merge_scored(self, message: MergeScored) -> None:
        line = "  ".join(f"{task} {accuracy:.0%}" for task, accuracy in message.scores.items())
        log = self.query_one(RichLog)
        log.write(f"demo scores of {message.output}: {line}")
        log.write(scores_beside_sources(self.app.state, message.output.name, message.scores, self.plan_text))
        log.write("h: every merge of this session side by side, with its plan's diff")

    def on_merge_scoring_failed(self, message: MergeScoringFailed) -> None:
        self.query_one(RichLog).write(f"demo evaluation failed: {message.error}")

    # --- actions -------------------------------------------------------------------------------------
    def action_cancel(self) -> None:
        if self.phase == "running":
            self.cancel.set()
            self.query_one(RichLog).write("cancelling after the current tensor…")

    def action_diagnose(self) -> None:
        if self.merged is not None:
            self.app.action_diagnose(self.merged)

    def action_back(self) -> None:
        if self.phase == "running":
            self.notify("the merge is running: c cancels it", severity="warning")
            return
        self.app.pop_screen()

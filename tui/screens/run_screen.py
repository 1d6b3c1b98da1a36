"""Run (`r`): confirm the output folder and device, then merge with a progress panel; `c` cancels.

The merge runs in a thread worker through the same executor as ``mergescope merge``; its progress events
arrive as :class:`MergeEvent` messages. Cancelling stops between tensors and leaves nothing behind.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Header, Input, Label, RichLog, Select, Static

from mergescope.checkpoints import MergescopeError
from mergescope.tui.messages import MergeEvent
from mergescope.tui.widgets.run.diagnosis_view import DiagnosisView
from mergescope.tui.widgets.run.merge_progress import MergeProgressPanel


def device_options() -> list[tuple[str, str]]:
    """auto, cpu and every visible CUDA device."""
    options = [("auto (the GPU when there is one)", "auto"), ("cpu", "cpu")]
    try:
        import torch

        options += [(f"cuda:{i} {torch.cuda.get_device_name(i)}", f"cuda:{i}") for i in range(torch.cuda.device_count())]
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

    def __init__(self, plan_text: str, output: str = "merged") -> None:
        super().__init__()
        self.plan_text, self.output = plan_text, output
        self.state = "confirm"  # confirm | running | done | failed | cancelled
        self.out_dir: Path | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="run-form"):
            yield Label("output folder", classes="field-label")
            yield Input(self.output, compact=True, id="run-output")
            yield Label("device", classes="field-label")
            yield Select(device_options(), value=self.app.state.device if self.app.state.device != "" else "auto", allow_blank=False, compact=True, id="run-device")
            yield Checkbox("replace the output folder if it exists", False, compact=True, id="run-force")
            yield Static(Text("Ctrl+G starts the merge · Escape goes back", style="bold"), id="run-hint")
        with Vertical(id="run-panel"):
            yield MergeProgressPanel(id="merge-progress")
        yield RichLog(id="run-log", wrap=True, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "run the plan"
        self.query_one("#run-panel").display = False
        self.query_one("#run-output").focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_start()

    def action_start(self) -> None:
        if self.state != "confirm":
            return
        if self.app.state.merge_cancel is not None:
            self.notify("a merge is already running", severity="warning")
            return
        self.out_dir = Path(self.query_one("#run-output", Input).value or "merged")
        device = self.query_one("#run-device", Select).value
        force = self.query_one("#run-force", Checkbox).value
        self.state = "running"
        self.query_one("#run-form").display = False
        self.query_one("#run-panel").display = True
        self.app.state.merge_cancel = threading.Event()
        log = self.query_one(RichLog)
        log.write(f"merging into {self.out_dir} on {device}")
        self.run_merge(self.out_dir, str(device), force, self.app.state.merge_cancel)

    @work(thread=True, exclusive=True, group="merge")
    def run_merge(self, out_dir: Path, device: str, force: bool, cancel: threading.Event) -> None:
        from mergescope.merge.executor import MergeCancelled, run_merge
        from mergescope.merge.job import build_job
        from mergescope.merge.plan import parse_plan

        try:
            job = build_job(parse_plan(self.plan_text, source="plan builder"))
            out = run_merge(job, out_dir, device=device, overwrite=force, cancel=cancel,
                            on_event=lambda p: self.post_message(MergeEvent(p)))
            self.post_message(MergeEvent(finished=str(out)))
        except MergeCancelled:
            self.post_message(MergeEvent(cancelled=True))
        except MergescopeError as exc:
            self.post_message(MergeEvent(failed=str(exc)))
        except Exception as exc:  # report, never crash the app
            self.post_message(MergeEvent(failed=f"{type(exc).__name__}: {exc}"))

    def on_merge_event(self, event: MergeEvent) -> None:
        log = self.query_one(RichLog)
        if event.progress is not None:
            self.query_one(MergeProgressPanel).show(event.progress)
            if event.progress.tensors_done == event.progress.tensors_total or event.progress.tensors_done % 25 == 0:
                log.write(f"{event.progress.tensors_done}/{event.progress.tensors_total} {event.progress.tensor}")
            return
        self.app.state.merge_cancel = None
        if event.finished:
            self.state = "done"
            self.app.state.last_merge = Path(event.finished)
            log.write(f"done: {event.finished} — its diagnosis below (d: full screen · Escape: back)")
            self.notify(f"merged into {event.finished}")
            self.add_class("finished")
            state = self.app.state
            diagnosis = DiagnosisView(event.finished, base=state.session.base, device=state.device, id="run-diagnosis")
            self.mount(diagnosis, before=self.query_one(Footer))
            self.app.after_merge(Path(event.finished), log)
        elif event.cancelled:
            self.state = "cancelled"
            log.write(f"cancelled; nothing was written to {self.out_dir}")
        else:
            self.state = "failed"
            log.write(f"failed: {event.failed}")
            self.notify(event.failed or "merge failed", severity="error")

    def action_cancel(self) -> None:
        if self.state == "running" and self.app.state.merge_cancel is not None:
            self.app.state.merge_cancel.set()
            self.query_one(RichLog).write("cancelling after the current tensor…")

    def action_diagnose(self) -> None:
        if self.state == "done":
            self.app.action_diagnose(self.app.state.last_merge)

    def action_back(self) -> None:
        if self.state == "running":
            self.notify("the merge is running: c cancels it", severity="warning")
            return
        self.app.pop_screen()

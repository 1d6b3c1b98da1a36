"""The run panel's progress: overall bar, current tensor, throughput, ETA, host and GPU memory."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar

from mergescope.checkpoints.heap import resident_bytes
from mergescope.merge.executor import MergeProgress
from mergescope.tui.display import short
from mergescope.tui.formatting import human_bytes


def progress_line(progress: MergeProgress) -> Text:
    """``1.2 GB/s · ETA 0:12 · host 812 MB · GPU 3.1 GB`` from a MergeProgress."""
    eta = progress.eta_s
    parts = [f"{human_bytes(progress.throughput)}/s", f"ETA {_clock(eta)}" if eta is not None else "ETA —"]
    memory = resident_bytes()  # 0 where /proc is missing
    if memory:
        parts.append(f"host {human_bytes(memory)}")
    if progress.device_memory is not None:
        parts.append(f"GPU {human_bytes(progress.device_memory)}")
    return Text(" · ".join(parts))


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


class MergeProgressPanel(Vertical):
    DEFAULT_CSS = "MergeProgressPanel { height: auto; } MergeProgressPanel ProgressBar { width: 1fr; }"

    def compose(self) -> ComposeResult:
        yield ProgressBar(id="merge-bar", show_eta=False)
        yield Label("starting…", id="merge-tensor")
        yield Label("", id="merge-rates")

    def reset(self) -> None:
        """A new run: the bar pulses until the first tensor lands."""
        self.query_one("#merge-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#merge-tensor", Label).update("starting…")
        self.query_one("#merge-rates", Label).update("")

    def stop(self, error: str) -> None:
        """The run failed: the bar stops where it was (no pulse) and the failure replaces the tensor line."""
        bar = self.query_one("#merge-bar", ProgressBar)
        bar.update(total=bar.total or 1, progress=bar.progress)
        self.query_one("#merge-tensor", Label).update(Text(f"failed: {error}", style="bold red"))

    def show(self, progress: MergeProgress) -> None:
        self.query_one("#merge-bar", ProgressBar).update(total=progress.bytes_total or 1, progress=progress.bytes_done)
        self.query_one("#merge-tensor", Label).update(
            Text(f"{progress.tensors_done}/{progress.tensors_total}  {short(progress.tensor, 60)}")
        )
        self.query_one("#merge-rates", Label).update(progress_line(progress))

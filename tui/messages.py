"""Messages between the app's workers and its widgets."""

from __future__ import annotations

from textual.message import Message


class AnalysisUpdated(Message):
    """A new snapshot of the streaming analysis: the report so far and the pass's progress."""

    def __init__(self, report: dict, progress, done: bool, error: str | None = None) -> None:
        super().__init__()
        self.report, self.progress, self.done, self.error = report, progress, done, error


class LayerHighlighted(Message):
    """The cursor moved to a layer group in the heatmap."""

    def __init__(self, group: str) -> None:
        super().__init__()
        self.group = group


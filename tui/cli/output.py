"""What ``analyze`` and ``diagnose`` show besides their tables: a progress bar fed by the analysis pass, and the
``--json PATH|-`` document."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from mergescope.analysis import Progress as PassProgress
from mergescope.checkpoints import MergescopeError


class AnalysisProgressBar:
    """A rich progress bar on ``console`` (stderr) fed by the analysis pass' :class:`Progress` events; entering
    gives the ``on_event`` callback."""

    def __init__(self, console: Console):
        self.console = console

    def __enter__(self) -> Callable[[object], None]:
        self.bar = Progress(
            TextColumn("[bold]analysing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[current]}", style="dim"), console=self.console, transient=True,
            disable=not self.console.is_terminal,
        )
        self.bar.start()
        self.task = self.bar.add_task("analyse", total=None, current="")

        def on_event(event: object) -> None:
            if isinstance(event, PassProgress):
                self.bar.update(self.task, total=event.bytes_total, completed=event.bytes_done, current=event.current)

        return on_event

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def write_json(document: dict, destination: str, console: Console) -> None:
    """``--json PATH``: ``document`` as indented JSON to PATH (saying so on ``console``) or, for
    ``-``, to stdout. NaN and infinities are refused: the documents hold None where a ratio is undefined."""
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    if destination == "-":
        sys.stdout.write(text)
        return
    try:
        with open(destination, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise MergescopeError(f"{destination}: cannot write the JSON: {exc.strerror or exc}") from None
    console.print(f"wrote {destination}")

"""A checkbox whose state reads without colour: ``✓`` when ticked, blank when not."""

from __future__ import annotations

from textual.widgets import Checkbox


class TickBox(Checkbox):
    """:class:`~textual.widgets.Checkbox` with a ``✓`` inside when ticked (Textual's shows an ``X`` either way and
    tells the states apart by colour alone)."""

    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 — Textual's class attribute, read per instance here
        return "✓" if self.value else " "

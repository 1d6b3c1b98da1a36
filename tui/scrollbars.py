"""Scrollbars drawn in whole cells.

Textual draws a thumb's ends with eighth-block glyphs (▂ ▆ …) whose meaning is in their colours; in a 16-colour
or colourless terminal they read as stray sparkline bars inside the pane beside them. Here the thumb is whole
reversed cells only, which read as a bar in any terminal."""

from __future__ import annotations

from textual.scrollbar import ScrollBarRender


class WholeCellScrollBarRender(ScrollBarRender):
    """A scrollbar whose thumb is whole reversed cells (no partial-block glyphs at its ends)."""

    VERTICAL_BARS = [" "] * 8
    HORIZONTAL_BARS = [" "] * 8

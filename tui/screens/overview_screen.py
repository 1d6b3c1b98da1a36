"""Overview: the models, a per-layer heatmap of their task vectors, pairwise matrices and depth profiles."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Static

from mergescope.demo.manifest import read_manifest
from mergescope.tui.display import short
from mergescope.tui.screens.layer_screen import LayerScreen
from mergescope.tui.widgets.overview.depth_sparklines import DepthSparklines
from mergescope.tui.widgets.overview.layer_heatmap import LayerHeatmap, LayerHighlighted
from mergescope.tui.widgets.overview.models_table import ModelDetailsRequested, ModelsTable
from mergescope.tui.widgets.overview.pair_matrices import PairMatrices
from mergescope.tui.widgets.overview.total_matrix import TotalMatrix, rows_needed

#: below this width the heatmap and the side pane take turns (Tab switches) instead of sitting side by side
NARROW = 120


def warnings_text(report: dict, limit: int = 12) -> Text:
    """The analysis' warnings, one line each, grouped by code (the most severe first)."""
    order = ["different_base", "architecture_mismatch", "vocab_mismatch", "shape_mismatch", "tokenizer_mismatch",
             "non_finite", "missing_tensor", "extra_tensor"]
    rank = {code: i for i, code in enumerate(order)}
    found = sorted(report.get("warnings", []), key=lambda w: rank.get(w["code"], len(order)))
    text = Text("warnings\n", style="bold")
    if not found:
        text.append("none so far\n" if report.get("groups") is not None else "…\n", style="dim")
    for warning in found[:limit]:
        text.append("⚠ ", style="yellow")
        text.append(warning["message"] + "\n")
    if len(found) > limit:
        text.append(f"… and {len(found) - limit} more (mergescope analyze --json)\n", style="dim")
    return text


class OverviewScreen(Screen):
    BINDINGS = [
        Binding("enter", "drill", "Layer", show=True),
        Binding("slash", "app.filter_tensors", "Filter", show=True),
        Binding("d", "diagnose", "Diagnose", show=False),
        Binding("t", "app.tokens", "Tokens", show=False),
        Binding("tab", "next_pane", "Pane", show=False),
        Binding("shift+tab", "next_pane(-1)", "Pane", show=False),
    ]
    PANES = ("#heatmap", "#side", "#models")

    def compose(self) -> ComposeResult:
        session, names = self.app.state.session, self.app.state.names
        tasks = list((read_manifest(session.workspace) or {}).get("tasks", {})) if session.workspace else []
        yield Header()
        yield ModelsTable(session.base, session.models, names, tasks, id="models")
        with Horizontal(id="main"):
            with Vertical(id="heat-pane"):
                yield LayerHeatmap(names, list(session.base.groups()), id="heatmap")
                yield TotalMatrix(names, id="total-matrix")
            with VerticalScroll(id="side"):
                yield PairMatrices(names, id="pairs")
                yield DepthSparklines(names, id="depth")
                yield Static(id="warnings")
        with Horizontal(id="status"):
            yield ProgressBar(id="analysis-bar", show_eta=True)
            yield Label("", id="analysis-label")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"base: {self.app.state.session.base.name}"
        self.app.analysis_changed.subscribe(self, self.show_analysis)
        self.app.scores_changed.subscribe(self, lambda scores: self.query_one(ModelsTable).show_scores(scores))
        self.query_one("#heatmap").focus()
        self.show_analysis(None)

    def on_resize(self) -> None:
        self.set_class(self.size.width < NARROW, "narrow")
        self._show_focused_pane()
        self.call_after_refresh(self._place_total_matrix)

    def _place_total_matrix(self) -> None:
        """The whole model's matrix goes in the rows the heatmap leaves empty (narrow terminals only): shown
        when the heatmap's header and rows and the matrix's header and rows all fit in the pane."""
        pane, heatmap = self.query_one("#heat-pane"), self.query_one(LayerHeatmap)
        needed = (heatmap.row_count + 1) + rows_needed(self.app.state.names)
        self.query_one(TotalMatrix).display = self.has_class("narrow") and needed <= pane.size.height

    def show_analysis(self, _=None) -> None:
        """Redraw from the app's latest analysis snapshot."""
        state = self.app.state
        report, done = state.report, state.analysis_done
        self.query_one(ModelsTable).update_report(report, done)
        heatmap = self.query_one(LayerHeatmap)
        heatmap.update_report(report)
        self.query_one(PairMatrices).show(report, heatmap.current_group)
        self.query_one(TotalMatrix).show(report)
        self.query_one(DepthSparklines).show(report)
        self.query_one("#warnings", Static).update(warnings_text(report))
        bar, label = self.query_one("#analysis-bar", ProgressBar), self.query_one("#analysis-label", Label)
        progress = state.analysis_progress
        if state.analysis_error:
            label.update(Text(f"analysis failed: {state.analysis_error}", style="bold red"))
        elif done:  # the status line gives its row to the heatmap and matrix; the title says it is done
            bar.update(total=1, progress=1)
            label.update(Text("analysis done", style="green"))
            self.query_one("#status").display = False
            hint = " · Tab: layer matrices" if self.has_class("narrow") else ""
            self.sub_title = f"base: {state.session.base.name} · analysed{hint}"
        elif progress is not None:
            bar.update(total=progress.bytes_total or 1, progress=progress.bytes_done)
            label.update(Text(short(progress.current, 40), style="dim"))
        else:
            label.update(Text("reading headers…", style="dim"))

    def on_layer_highlighted(self, message: LayerHighlighted) -> None:
        self.query_one(PairMatrices).show(group=message.group)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "heatmap":
            self.action_drill()

    def on_descendant_focus(self) -> None:
        self._show_focused_pane()

    def _show_focused_pane(self) -> None:
        """In a narrow terminal only one of heatmap and side pane shows: the one holding the focus."""
        heatmap, side = self.query_one("#heat-pane"), self.query_one("#side")
        if not self.has_class("narrow"):
            heatmap.display = side.display = True
            return
        focused = self.focused
        side_focused = focused is not None and (focused is side or side in focused.ancestors)
        side.display, heatmap.display = side_focused, not side_focused

    def action_next_pane(self, step: int = 1) -> None:
        """Tab: heatmap → pairs/depth/warnings → models → heatmap (the side pane shows when it gets the focus)."""
        panes = [self.query_one(selector) for selector in self.PANES]
        focused = self.focused
        current = next((i for i, pane in enumerate(panes)
                        if focused is pane or (focused is not None and pane in focused.ancestors)), 0)
        target = panes[(current + step) % len(panes)]
        (self.query_one("#heat-pane") if target.id == "heatmap" else target).display = True
        target.focus()

    def on_model_details_requested(self, message: ModelDetailsRequested) -> None:
        self.notify(self.query_one(ModelsTable).details(message.key, self.app.state.report), title="model",
                    timeout=8)

    def action_drill(self) -> None:
        group = self.query_one(LayerHeatmap).current_group
        if group is not None:
            self.app.push_screen(LayerScreen(group))

    def action_diagnose(self) -> None:
        self.app.action_diagnose()

"""The TUI's overview, drill-down, help and palette, driven with Pilot at 80x24.

Numbers on screen are checked against numpy computed here from the fixture's own tensors."""

from __future__ import annotations

import math

import numpy as np

from mergescope.tui.app import AnalysisUpdated, MergescopeApp
from mergescope.tui.display import fmt_rel
from mergescope.tui.session import open_session
from mergescope.tui.widgets.overview.layer_heatmap import LayerHighlighted
from tui_fixtures import Posted, run, static_text, wait_for_analysis


def group_rel(states, model: str, group: str) -> float:
    """‖τ‖/‖θ₀‖ over the tensors of ``group``, in float64."""
    names = [n for n in states["base"] if n.startswith(group + ".")]
    delta = sum(float(np.sum((states[model][n].double() - states["base"][n].double()).numpy() ** 2)) for n in names)
    base = sum(float(np.sum(states["base"][n].double().numpy() ** 2)) for n in names)
    return math.sqrt(delta) / math.sqrt(base)


def cell_text(table, row: str, column: str) -> str:
    return str(table.get_cell(row, column))


def test_overview_heatmap_and_badges(workspace):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b", "ft_c"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            heatmap = app.screen.query_one("#heatmap")
            for group in ("model.layers.0", "model.layers.3"):
                for model in ("ft_a", "ft_b", "ft_c"):
                    assert cell_text(heatmap, group, model) == fmt_rel(group_rel(workspace, model, group))
            models = app.screen.query_one("#models")
            assert "✓base" in cell_text(models, "ft_b", "checks")
            # narrow terminal: Tab brings the side pane (pairwise matrices) into view
            assert not app.screen.query_one("#side").display
            await pilot.press("tab")
            assert app.screen.query_one("#side").display
            await pilot.pause(0.1)
            matrices = app.screen.query_one("#pairs")
            pairs = static_text(matrices, width=matrices.size.width)  # as drawn: 80 columns leave ~76
            assert "-1.00" in pairs  # ft_c = base − τ_a: cosine −1 with ft_a (in full, not cut to "-1.…")
            assert "100%" in pairs  # ... and every entry in sign conflict
    run(body)


def test_overview_wide_shows_everything(workspace):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b", "ft_c"]), use_cache=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_for_analysis(app, pilot)
            assert app.screen.query_one("#side").display and app.screen.query_one("#heatmap").display
    run(body)


def test_different_base_badge(workspace, tmp_path):
    from builders import llama_config, llama_state, write_model

    write_model(tmp_path / "stranger", llama_state(llama_config(layers=4), seed=7), llama_config(layers=4))

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "stranger"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            models = app.screen.query_one("#models")
            assert "✗base" in cell_text(models, "stranger", "checks")
            assert "✓base" in cell_text(models, "ft_a", "checks")
            # the first plan leaves the flagged model out
            await pilot.press("p")
            await pilot.pause(0.2)
            assert [(row.name, row.included) for row in app.screen.form.models] == [("ft_a", True), ("stranger", False)]
    run(body)


def test_drill_down_filter_and_tensor(workspace):
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b", "ft_c"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await wait_for_analysis(app, pilot)
            # the analysis reported through AnalysisUpdated: snapshots, the last one complete
            updates = posted.of(AnalysisUpdated)
            assert updates[-1].done and updates[-1].error is None and app.state.report is updates[-1].report
            assert [m["name"] for m in updates[-1].report["models"]] == ["ft_a", "ft_b", "ft_c"]
            await pilot.press("down", "down")  # embed_tokens → layers.0 → layers.1
            assert [m.group for m in posted.of(LayerHighlighted)][-2:] == ["model.layers.0", "model.layers.1"]
            await pilot.press("enter")
            screen = app.screen
            assert type(screen).__name__ == "LayerScreen" and screen.group == "model.layers.1"
            table = screen.query_one("#tensors")
            expected = [n for n in workspace["base"] if n.startswith("model.layers.1.")]
            assert table.row_count == len(expected)
            await pilot.press("slash", *"mlp")
            assert table.row_count == len([n for n in expected if "mlp" in n])
            await pilot.press("enter")  # leave the filter box
            await pilot.press("enter")  # open the highlighted tensor
            await app.workers.wait_for_complete()
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "TensorScreen"
            tensor = app.screen.tensor
            assert "mlp" in tensor
            text = static_text(app.screen.query_one("#detail"))
            assert "sign agreement" in text
            await pilot.press("escape", "escape")
            assert type(app.screen).__name__ == "OverviewScreen"
    run(body)


def test_help_palette_and_quit(workspace):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("question_mark")
            assert type(app.screen).__name__ == "HelpScreen"
            await pilot.press("escape")
            await pilot.press("ctrl+p")
            await pilot.pause(0.1)
            await pilot.press(*"plan builder")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await pilot.pause(0.3)
            assert type(app.screen).__name__ == "PlanScreen"
            await pilot.press("escape")
            await pilot.press("q")
            await pilot.pause(0.1)
        assert app.return_code == 0
    run(body)


def test_filter_every_tensor_from_the_overview(workspace):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("slash", *"q_proj")
            table = app.screen.query_one("#tensors")
            assert table.row_count == len([n for n in workspace["base"] if "q_proj" in n])
            assert table.row_count > 1
    run(body)


def test_pair_matrices_keep_full_numbers_at_80_columns():
    """Six models, two scopes: side by side they need ~78 columns, so at the ~76 an 80-column terminal
    leaves they stack, and every off-diagonal cosine is printed in full."""
    from rich.console import Console

    from mergescope.tui.widgets.overview.pair_matrices import matrices

    names = [f"model_{i}" for i in range(6)]
    stats = {"pairs": [{"a": a, "b": b, "cosine": -0.123, "sign_conflict": 0.5}
                       for i, a in enumerate(names) for b in names[i + 1:]]}
    for width, expected in ((76, "stacked"), (200, "side by side")):
        console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
        console.print(matrices(names, [("all", stats), ("layers.0", stats)], width))
        text = console.export_text()
        assert text.count("-0.12") == 2 * 30, expected  # 30 ordered off-diagonal pairs per scope
        assert max(len(line.rstrip()) for line in text.splitlines()) <= width
        assert (text.count("cosine") == 2) == (expected == "stacked")

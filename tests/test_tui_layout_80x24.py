"""What has to be visible at 80x24 without scrolling or Tab: the models with scores and badges, distinguishable
column labels with their legend, the whole model's pairwise matrix under the heatmap (its numbers checked against
float64 here), every diagnosed source (the table scrolls by source), a fourth model in the plan preview, a notice
when the terminal is too small, and focus and ticks that read without colour."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

import mergescope.demo.session as demo_session
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import parse_plan
from mergescope.tui.app import MergescopeApp
from mergescope.tui.display import abbreviations
from mergescope.tui.scrollbars import WholeCellScrollBarRender
from mergescope.tui.session import open_session
from mergescope.tui.state import BASE_KEY
from tui_fixtures import demo_like, run, static_text, wait_for_analysis

TASKS = ("add", "reverse", "sort")


async def wait_for(pilot, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


def flat_tau(states, name):
    return np.concatenate([(states[name][k] - states["base"][k]).double().numpy().ravel() for k in states["base"]])


@pytest.fixture
def demo_workspace(tmp_path, monkeypatch):
    scores = {name: dict.fromkeys(TASKS, 0.25 + 0.1 * i) for i, name in enumerate(["base", "ft_add", "ft_reverse",
              "ft_sort", "lora_sort", "trap_other_base", "trap_grown_vocab"])}
    monkeypatch.setattr(demo_session, "evaluate", lambda folder: scores[folder.name])
    folder, states = demo_like(tmp_path)
    return folder, scores, states


def test_overview_shows_names_scores_badges_and_the_whole_model_matrix_at_80x24(demo_workspace):
    folder, scores, workspace = demo_workspace

    async def body():
        app = MergescopeApp(open_session([str(folder)]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await wait_for(pilot, lambda: "trap_grown_vocab" in app.state.demo_scores)
            await pilot.pause(0.3)
            screen = app.screen
            models = screen.query_one("#models")
            # name, the scores, the badges first; every row and column on screen (no scrolling)
            assert [str(c.label) for c in models.ordered_columns][:5] == ["model", "add", "reve", "sort", "checks"]
            assert models.max_scroll_x == 0 and models.max_scroll_y == 0 and models.region.right <= 80
            assert str(models.get_cell("trap_grown_vocab", "sort")) == f"{scores['trap_grown_vocab']['sort']:.0%}"
            assert str(models.get_cell(BASE_KEY, "add")) == "25%"
            assert "✗base" in str(models.get_cell("trap_other_base", "checks"))
            # the details on demand: Enter on a row
            models.focus()
            models.move_cursor(row=6)
            await pilot.press("enter")
            await pilot.pause(0.1)
            assert any(str(folder / "trap_grown_vocab") in str(n.message) for n in app._notifications)
            # heatmap labels: unique, the same as the matrix's, explained by the legend under the heatmap
            heatmap = screen.query_one("#heatmap")
            labels = [str(c.label) for c in heatmap.ordered_columns][1:]
            assert len(set(labels)) == 6 and labels == abbreviations(app.state.names, 5)
            matrix = screen.query_one("#total-matrix")
            assert matrix.display and matrix.region.bottom <= 23 and matrix.region.height >= 7
            text = static_text(matrix)
            assert "t.oth trap_other_base" in text and "t.gro trap_grown_vocab" in text
            # cosine above the diagonal, sign conflict below, against float64 here
            rows = {line.split()[0]: line.split()[1:7] for line in text.splitlines()[1:7]}
            tau = {name: flat_tau(workspace, source) for name, source in
                   (("ft_add", "ft_a"), ("ft_reverse", "ft_b"), ("ft_sort", "ft_c"))}
            cos = float(tau["ft_add"] @ tau["ft_reverse"] / np.linalg.norm(tau["ft_add"])
                        / np.linalg.norm(tau["ft_reverse"]))
            both = (tau["ft_add"] != 0) & (tau["ft_reverse"] != 0)
            conflict = float(np.mean(np.sign(tau["ft_add"][both]) != np.sign(tau["ft_reverse"][both])))
            assert rows["ft_ad"][1] == f"{cos:+.2f}" and rows["ft_re"][0] == f"{conflict * 100:.0f}%"
            assert rows["ft_ad"][2] == "-1.00" and rows["ft_so"][0] == "100%"  # ft_c = base − τ_a

    run(body)


def test_scrollbars_have_no_partial_block_glyphs():
    bar = WholeCellScrollBarRender.render_bar(size=10, virtual_size=37, window_size=10, position=3.3)
    segments = list(bar.segments)
    assert {segment.text for segment in segments} == {" "}
    assert any(segment.style.reverse for segment in segments)  # the thumb: reversed cells, visible without colour


def test_diagnosis_reaches_every_source_and_says_whom_it_lost_to(workspace, tmp_path):
    plan = "merge_method: ties\nbase_model: base\nmodels:\n" + "".join(
        f"  - {{model: {m}, parameters: {{weight: 1.0, density: 0.5}}}}\n" for m in ("ft_a", "ft_b", "ft_c"))
    run_merge(build_job(parse_plan(plan)), tmp_path / "merged")

    async def body():
        app = MergescopeApp(open_session(["merged"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: getattr(app.screen, "diagnosis", None) is not None)
            await pilot.pause(0.2)
            table = app.screen.query_one("#diagnosis-table")
            table.focus()
            assert table.region.right <= 80 and table.max_scroll_x > 0
            for _ in range(4):
                await pilot.press("right")
            await pilot.pause(0.1)
            widths = [c.get_render_width(table) for c in table.ordered_columns]
            assert sum(widths) - table.scroll_x <= table.scrollable_content_region.width  # ft_c's block in view
            row = [str(cell) for cell in table.get_row("all")]
            # ft_c = base − τ_a: ft_a opposes it at every entry, so ft_a is whom it lost to
            assert row[-1] == "ft_a" and str(table.ordered_columns[-1].label).strip() == "with"

    run(body)


def test_plan_preview_shows_a_fourth_model_at_80x24(workspace, tmp_path):
    shutil.copytree(tmp_path / "ft_b", tmp_path / "ft_d")

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b", "ft_c", "ft_d"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            table = app.screen.query_one("#preview")
            await wait_for(pilot, lambda: len(table.names) == 4 and table.row_count > 0)
            await pilot.pause(0.2)
            widths = [c.get_render_width(table) for c in table.ordered_columns]
            assert len(widths) == 6 and sum(widths) <= table.scrollable_content_region.width

    run(body)


def test_a_terminal_smaller_than_80x24_says_so(workspace):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(60, 20)) as pilot:
            await pilot.pause(0.3)
            assert type(app.screen).__name__ == "TooSmallScreen"
            assert "60x20" in static_text(app.screen.query_one("#too-small-size"))
            await pilot.resize_terminal(80, 24)
            await pilot.pause(0.3)
            assert type(app.screen).__name__ == "OverviewScreen"
            await pilot.resize_terminal(80, 23)  # an 80x24 terminal running tmux, whose status line takes a row
            await pilot.pause(0.3)
            assert type(app.screen).__name__ == "OverviewScreen"

    run(body)


def test_focus_and_ticks_read_without_colour(workspace):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            await pilot.pause(0.3)
            screen = app.screen
            current = screen.query_one("#method").query_one("SelectCurrent")
            screen.query_one("#method").focus()
            await pilot.pause(0.1)
            assert current.rich_style.reverse  # reverse video: visible in 16 colours and without colour
            screen.query_one("#base").focus()
            await pilot.pause(0.1)
            assert not current.rich_style.reverse
            box = screen.query_one("#use-1")
            assert "✓" in str(box.render())
            box.focus()
            await pilot.press("space")
            await pilot.pause(0.1)
            assert not box.value and "✓" not in str(box.render()) and "X" not in str(box.render())

    run(body)

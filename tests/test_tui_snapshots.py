"""Layout snapshots of the main screens at 80x24 and 160x48 (pytest-textual-snapshot; accept changes with
``pytest tests/test_tui_snapshots.py --snapshot-update`` after looking at the report)."""

from __future__ import annotations

import time

import pytest

from mergescope.tui.app import MergescopeApp
from mergescope.tui.session import open_session
from tui_fixtures import static_text

SIZES = [(80, 24), (160, 48)]


@pytest.fixture
def app(workspace):
    return MergescopeApp(open_session(["base", "ft_a", "ft_b", "ft_c"]), use_cache=False)


async def analysed(pilot) -> None:
    app = pilot.app
    deadline = time.monotonic() + 30
    while not app.state.analysis_done and time.monotonic() < deadline:
        await pilot.pause(0.05)
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_overview(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=analysed)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer(snap_compare, app, size):
    async def drill(pilot):
        await analysed(pilot)
        await pilot.press("down", "down", "enter")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=drill)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_plan_builder(snap_compare, app, size):
    async def plan(pilot):
        await analysed(pilot)
        await pilot.press("p")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            status = pilot.app.screen.query("#preview-status")
            if status and static_text(status.first()).startswith("exact"):
                break
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=plan)


def test_demo_overview(snap_compare, tmp_path, monkeypatch):
    """A demo-like workspace at 80x24: names, scores and badges of all seven models and the whole model's
    pairwise matrix with its legend on one screen."""
    import mergescope.demo.session as demo_session
    from tui_fixtures import DEMO_NAMES, demo_like

    names = ["base", *DEMO_NAMES]
    monkeypatch.setattr(demo_session, "evaluate",
                        lambda folder: dict.fromkeys(("add", "reverse", "sort"), 0.3 + 0.1 * names.index(folder.name)))
    folder, _ = demo_like(tmp_path)
    demo_app = MergescopeApp(open_session([str(folder)]), use_cache=False)

    async def scored(pilot):
        await analysed(pilot)
        deadline = time.monotonic() + 30
        while "trap_grown_vocab" not in pilot.app.state.demo_scores and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    assert snap_compare(demo_app, terminal_size=(80, 24), run_before=scored)


def test_help(snap_compare, app):
    async def help_screen(pilot):
        await analysed(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=(80, 24), run_before=help_screen)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_diagnosis(snap_compare, workspace, tmp_path, size):
    from mergescope.merge.executor import run_merge
    from mergescope.merge.job import build_job
    from mergescope.merge.plan import parse_plan

    plan = "merge_method: ties\nbase_model: base\nmodels:\n" + "".join(
        f"  - {{model: {m}, parameters: {{weight: 1.0, density: 0.5}}}}\n" for m in ("ft_a", "ft_b", "ft_c"))
    run_merge(build_job(parse_plan(plan)), tmp_path / "merged")
    app = MergescopeApp(open_session(["merged"]), use_cache=False)

    async def diagnosed(pilot):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            screen = pilot.app.screen
            if getattr(screen, "diagnosis", None) is not None and pilot.app.state.analysis_done:
                break
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=diagnosed)


def test_tensor(snap_compare, app):
    async def tensor(pilot):
        await analysed(pilot)
        await pilot.press("down", "down", "enter", "enter")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(80, 24), run_before=tensor)


def write_search_file(path) -> None:
    """A small CMA search over two task-arithmetic weights of ft_a and ft_b, written as mergescope tune does."""
    from mergescope.merge.search_store import SearchStore
    from mergescope.merge.yaml_lines import dump_yaml

    keys = ["models.0.parameters.weight", "models.1.parameters.weight"]
    plan = {"merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "ft_a", "parameters": {"weight": 1.0}},
                       {"model": "ft_b", "parameters": {"weight": 1.0}}], "dtype": "float32"}
    store = SearchStore(path, {"plan": dump_yaml(plan), "plan_path": "plan.yml", "vary": keys, "strategy": "cma",
                               "seed": 0, "eval_cmd": "python eval.py {model}", "budget": 8}, resume=False)
    points = [(0.9, 0.1), (0.4, 0.7), (0.6, 0.2), (1.2, 0.9), (0.7, 0.0), (0.3, 0.3)]
    scores = [0.61, 0.55, 0.66, None, 0.64, 0.52]
    for number, (point, score) in enumerate(zip(points, scores), 1):
        plan["models"][0]["parameters"]["weight"], plan["models"][1]["parameters"]["weight"] = point
        status, message = ("ok", "") if score is not None else ("failed", "eval command exited with status 1")
        store.record(number, 1 + (number - 1) // 4, point, dump_yaml(plan), status, score, 2.0 + number / 10,
                     "local", "host", message)
    store.close()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_search(snap_compare, workspace, tmp_path, size):
    write_search_file(tmp_path / "search.db")
    app = MergescopeApp(open_session(["search.db"]), device="cpu", use_cache=False)

    async def previewed(pilot) -> None:
        from mergescope.tui.plan_preview import RELATIVE_NORM
        from mergescope.tui.screens.search_screen import SearchScreen

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (  # the exact preview made after the analysis finished
            isinstance(pilot.app.screen, SearchScreen)
            and "exact" in static_text(pilot.app.screen.query_one("#best-preview-status"))
            and pilot.app.screen.query_one("#best-preview").norm_heading == RELATIVE_NORM
        ):
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=previewed)

"""Plan builder at 80x24, what it writes and where: saving over an existing plan file asks first (or saves
as), keeps the file's comments beside the keys the plan still has and writes no parameter the method ignores;
`r` from any screen merges into the builder's output folder, whose default follows the method; a failed run
stops its bar and says which keys to press; an emptied weight is one problem at its model's line."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergescope.tui.app import MergescopeApp
from mergescope.tui.screens.plan_screen import PlanRejected
from mergescope.tui.session import open_session
from test_tui_plan_run import log_lines, set_input, start_run, wait_until
from tui_fixtures import Posted, run, static_text, wait_for_analysis

PLAN = """\
# my TIES plan: keep this header
merge_method: ties
base_model: base
models:
# the strong one first
- model: ft_a
  parameters:
    weight: 1.0  # tuned by hand
    density: 0.5  # TIES trim
- model: ft_b
  parameters:
    weight: 1.0
    density: 0.5
parameters:
  normalize: true
dtype: float32  # as trained
# end of plan
"""


async def switch_method(pilot, screen, method: str) -> None:
    before = screen.query_one("#param-0-weight")
    screen.query_one("#method").value = method
    await wait_until(pilot, lambda: screen.query("#param-0-weight") and
                     screen.query("#param-0-weight").first() is not before)


def test_saving_over_a_plan_file_asks_keeps_comments_and_drops_ignored_parameters(workspace, tmp_path):
    (tmp_path / "plans").mkdir()
    plan_file = tmp_path / "plans" / "ties.yml"
    plan_file.write_text(PLAN)

    async def body():
        app = MergescopeApp(open_session(["plans/ties.yml"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            screen = app.screen
            assert type(screen).__name__ == "PlanScreen"
            await switch_method(pilot, screen, "task_arithmetic")
            screen.query_one("#method").focus()
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "ConfirmScreen"
            await pilot.press("n")  # keep the file: the cursor goes to the file field (save as)
            await pilot.pause(0.1)
            assert plan_file.read_text() == PLAN
            assert app.screen.focused is screen.query_one("#plan-file")
            screen.query_one("#method").focus()
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "ConfirmScreen"
            await pilot.press("y")
            await pilot.pause(0.1)

    run(body)
    text = plan_file.read_text()
    document = yaml.safe_load(text)
    assert document["merge_method"] == "task_arithmetic"
    # task arithmetic ignores density: neither the value nor its comment is written
    assert "density" not in text and "TIES trim" not in text
    assert [m["parameters"] for m in document["models"]] == [{"weight": 1.0}, {"weight": 1.0}]
    lines = text.splitlines()
    assert lines[0] == "# my TIES plan: keep this header"
    assert lines[lines.index("- model: ft_a") - 1].strip() == "# the strong one first"
    assert any(line.strip() == "weight: 1.0  # tuned by hand" for line in lines)
    assert "dtype: float32  # as trained" in lines and lines[-1] == "# end of plan"


def test_r_from_the_overview_runs_into_the_builders_output(workspace, tmp_path):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            screen = app.screen
            output = screen.query_one("#output")
            assert output.value == "ties-merged"  # named after the plan's method …
            await switch_method(pilot, screen, "task_arithmetic")
            assert output.value == "task_arithmetic-merged"  # … as it is now
            await set_input(pilot, app, "#output", "my_out")
            await switch_method(pilot, screen, "linear")
            assert output.value == "my_out"  # a folder the user typed stays
            await pilot.pause(0.3)
            await pilot.press("escape")
            assert type(app.screen).__name__ == "OverviewScreen"
            await pilot.press("r")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "RunScreen"
            assert app.screen.query_one("#run-output").value == "my_out"

    run(body)


def test_a_failed_run_stops_the_bar_and_says_what_to_press(workspace, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("not a merge")

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await start_run(pilot, app, "taken")
            await wait_until(pilot, lambda: app.screen.phase == "failed")
            screen = app.screen
            bar = screen.query_one("#merge-bar")
            assert bar.total is not None  # no longer the pulsing "starting…" bar
            assert static_text(screen.query_one("#merge-tensor")).startswith("failed: taken")
            log = " ".join(log_lines(app))
            assert "--force" not in log and "Ctrl+G" in log and "Space" in log
            # as it says: tick "replace", Ctrl+G, and the merge runs
            screen.query_one("#run-force").focus()
            await pilot.press("space", "ctrl+g")
            await wait_until(pilot, lambda: screen.phase in ("done", "failed"), timeout=30)
            assert screen.phase == "done"

    run(body)
    assert (tmp_path / "taken" / "model.safetensors").exists()


def test_an_emptied_weight_is_one_problem_at_its_models_line(workspace):
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b", "ft_c"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            await set_input(pilot, app, "#param-1-weight", "")
            await wait_until(pilot, lambda: [m for m in posted.of(PlanRejected) if not m.cancel.is_set()])
            return [m for m in posted.of(PlanRejected) if not m.cancel.is_set()][-1].problem, app.state.plan_text

    problem, last_valid = run(body)
    [line] = problem.splitlines()
    # the line ft_b's entry has in the plan as the builder writes it (the last valid text has the same layout)
    expected = next(i for i, text in enumerate(last_valid.splitlines(), 1) if text.strip() == "- model: ft_b")
    assert line.startswith(f"merge-plan.yml as saved:{expected}: ft_b: parameter weight is required by ties")
    assert "more tensors" in line
    assert not Path("merge-plan.yml").exists()

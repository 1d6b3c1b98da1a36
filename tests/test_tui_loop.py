"""The loop at 80x24: open a merged folder and a plan file from the command palette; a run's demo scores beside
the base's and the fine-tunes' (also when the app was opened on a workspace's plan file); the session's merges
side by side with their retention (checked against float64 here) and each plan's diff against the plan it
started from."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml

import mergescope.demo.session as demo_session
import mergescope.tui.screens.run_screen as run_screen
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import parse_plan
from mergescope.tui.app import MergescopeApp
from mergescope.tui.session import open_session
from tui_fixtures import demo_like, run, static_text, wait_for_analysis


async def wait_for(pilot, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


async def palette(pilot, command: str) -> None:
    await pilot.press("ctrl+p")
    await pilot.pause(0.3)
    await pilot.press(*command)
    await pilot.pause(0.5)
    await pilot.press("enter")
    await pilot.pause(0.3)


def test_the_palette_opens_a_merged_folder_and_a_plan_file(workspace, tmp_path):
    plan = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - {model: ft_a, parameters: {weight: 0.5}}\n"
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "half.yml").write_text(plan)
    run_merge(build_job(parse_plan(plan)), tmp_path / "merged")

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await palette(pilot, "open a merged")
            assert type(app.screen).__name__ == "OpenPathScreen"
            await pilot.press(*"nowhere", "enter")
            await pilot.pause(0.2)
            assert type(app.screen).__name__ == "OverviewScreen"  # refused, with a notice
            assert any("not a merged folder" in str(n.message) for n in app._notifications)
            await palette(pilot, "open a merged")
            await pilot.press(*"merged", "enter")
            await wait_for(pilot, lambda: type(app.screen).__name__ == "DiagnosisScreen")
            assert app.screen.merged_dir == Path("merged")
            await wait_for(pilot, lambda: app.screen.diagnosis is not None)
            await pilot.press("escape")
            await palette(pilot, "open a plan")
            await pilot.press(*"plans/half.yml", "enter")
            await wait_for(pilot, lambda: type(app.screen).__name__ == "PlanScreen")
            assert app.screen.plan_path == Path("plans/half.yml") and app.screen.form.method == "task_arithmetic"
            assert app.screen.query_one("#param-0-weight").value == "0.5"

    run(body)


def test_runs_are_kept_side_by_side_with_the_base_and_fine_tunes(tmp_path, monkeypatch):
    folder, states = demo_like(tmp_path)
    accuracy = {"base": 0.5, "ft_add": 0.9, "ft_reverse": 0.8, "ft_sort": 0.7, "lora_sort": 0.6,
                "trap_other_base": 0.1, "trap_grown_vocab": 0.4, "task_arithmetic": 0.65, "second": 0.75}
    evaluate = lambda path: {"add": accuracy[Path(path).name], "sort": 0.25}  # noqa: E731
    monkeypatch.setattr(demo_session, "evaluate", evaluate)
    monkeypatch.setattr(run_screen, "evaluate", evaluate)
    monkeypatch.chdir(tmp_path)
    (folder / "plans").mkdir()
    plan = {"merge_method": "task_arithmetic", "base_model": str(folder / "base"),
            "models": [{"model": str(folder / "ft_add"), "parameters": {"weight": 1.0}},
                       {"model": str(folder / "ft_reverse"), "parameters": {"weight": 1.0}}]}
    (folder / "plans" / "ta.yml").write_text("# two skills\n" + yaml.safe_dump(plan, sort_keys=False))

    async def body():
        app = MergescopeApp(open_session([str(folder / "plans" / "ta.yml")]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            screen = app.screen
            # opened on a plan file inside the workspace: the workspace's models are scored all the same
            await wait_for(pilot, lambda: "ft_reverse" in app.state.demo_scores)
            assert screen.query_one("#output").value == str(folder / "merges" / "task_arithmetic")
            weight = screen.query_one("#param-1-weight")
            weight.focus()
            await pilot.press("end", *["backspace"] * 5, *"0.5")
            await wait_for(pilot, lambda: app.state.plan_retention and "0.5" in (app.state.plan_text or ""))
            await pilot.pause(0.8)  # the debounced preview of the last keystroke
            await wait_for(pilot, lambda: static_text(screen.query_one("#preview-status")).startswith("exact"))
            screen.query_one("#method").focus()
            await pilot.press("r", "ctrl+g")
            await wait_for(pilot, lambda: app.state.history and app.state.history[-1].scores is not None)
            await pilot.pause(0.2)
            log = " ".join(line.text for line in app.screen.query_one("#run-log").lines)
            for expected in ("base 50%", "ft_add 90%", "ft_reverse 80%", "task_arithmetic 65%"):
                assert expected in " ".join(log.split()), expected
            # a second run of another plan, then the history
            await pilot.press("escape")
            screen.query_one("#output").value = str(folder / "merges" / "second")
            screen.query_one("#method").focus()
            await pilot.press("r", "ctrl+g")
            await wait_for(pilot, lambda: len(app.state.history) == 2 and app.state.history[-1].scores is not None)
            await pilot.press("escape", "escape")
            await pilot.press("h")
            await pilot.pause(0.3)
            history = app.screen.query_one("#history")
            rows = {str(history.get_row_at(i)[0]): [str(c) for c in history.get_row_at(i)[1:]]
                    for i in range(history.row_count)}
            assert rows["base"][:2] == ["50%", "25%"] and rows["ft_add"][:2] == ["90%", "25%"]
            first = rows["task_arithm… (task_arithmetic)"]
            assert first[0] == "65%" and rows["second (task_arithmetic)"][0] == "75%", rows
            # retention of each source, as the exact preview said: ⟨τ_m, τᵢ⟩/‖τᵢ‖² with τ_m = τ_a + 0.5 τ_b
            tau = {n: np.concatenate([(states[n][k] - states["base"][k]).double().numpy().ravel()
                                      for k in states["base"]]) for n in ("ft_a", "ft_b")}
            merged = tau["ft_a"] + 0.5 * tau["ft_b"]
            expected = [merged @ tau[n] / (tau[n] @ tau[n]) for n in ("ft_a", "ft_b")]
            assert first[2:] == [f"{r * 100:.0f}%" for r in expected]
            # the highlighted merge's plan against the plan it started from (the file as opened)
            history.move_cursor(row=history.row_count - 2)
            await pilot.pause(0.2)
            diff = static_text(app.screen.query_one("#history-diff"))
            changed = [line for line in diff.splitlines() if line.startswith(("-", "+"))]
            assert changed == ["-    weight: 1.0", "+    weight: 0.5"]  # the file's comment is kept, not a change

    run(body)

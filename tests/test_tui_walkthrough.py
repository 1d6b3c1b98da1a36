"""The README's "Diagnosing a merge" story at 80x24, keyboard only, on a demo-like workspace whose ft_sort is
exactly −τ_add (so TIES' sign election must cancel one of them): look at the overview, build the first plan
(TIES), run it, read the diagnosis (ft_add lost to ft_sort; lower ft_sort's weight), follow the advice in the
builder, run again into another folder, see ft_add come back in the new diagnosis, and compare both merges
in the history. The keys are the only input; the assertions read the screens."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

import mergescope.demo.session as demo_session
import mergescope.tui.screens.run_screen as run_screen
from mergescope.tui.app import MergescopeApp
from mergescope.tui.session import open_session
from tui_fixtures import demo_like, run, static_text, wait_for_analysis


async def wait_for(pilot, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


async def tab_to(pilot, app, widget_id: str, limit: int = 40) -> None:
    """Tab until the widget has the focus (keys only)."""
    for _ in range(limit):
        if app.focused is not None and app.focused.id == widget_id:
            return
        await pilot.press("tab")
    raise AssertionError(f"Tab never reached #{widget_id}")


async def replace_text(pilot, app, text: str) -> None:
    await pilot.press("end", *["backspace"] * (len(app.focused.value) + 1), *text)


def total_retention(diagnosis, name: str) -> float:
    return diagnosis.total.sources[diagnosis.names.index(name)].retention


def test_diagnosing_a_merge_keyboard_only_at_80x24(tmp_path, monkeypatch):
    folder, states = demo_like(tmp_path)
    monkeypatch.chdir(tmp_path)
    scores = {"base": 0.5, "ft_add": 0.9, "ft_reverse": 0.8, "ft_sort": 0.85, "lora_sort": 0.8,
              "trap_other_base": 0.1, "trap_grown_vocab": 0.4, "ties": 0.55, "ties_lowered": 0.7}
    evaluate = lambda path: {"add": scores[Path(path).name]}  # noqa: E731
    monkeypatch.setattr(demo_session, "evaluate", evaluate)
    monkeypatch.setattr(run_screen, "evaluate", evaluate)

    async def body():
        app = MergescopeApp(open_session([str(folder)]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            # 1. the overview: names, scores, badges and the whole-model matrix on one screen
            await wait_for_analysis(app, pilot)
            await wait_for(pilot, lambda: "trap_grown_vocab" in app.state.demo_scores)
            await pilot.pause(0.3)
            overview = app.screen
            assert str(overview.query_one("#models").get_cell("ft_add", "add")) == "90%"
            assert "✗base" in str(overview.query_one("#models").get_cell("trap_other_base", "checks"))
            matrix = static_text(overview.query_one("#total-matrix"))
            row = next(line.split() for line in matrix.splitlines() if line.split()[:1] == ["ft_ad"])
            assert row[3] == "-1.00"  # cos(τ_add, τ_sort): they cancel
            # 2. the first plan: TIES of the three fine-tunes (traps and the LoRA left out), run it
            await pilot.press("p")
            builder = app.screen
            await wait_for(pilot, lambda: static_text(builder.query_one("#preview-status")).startswith("exact"))
            assert [r.reference.rsplit("/", 1)[-1] for r in builder.form.models if r.included] == [
                "ft_add", "ft_reverse", "ft_sort"]
            await pilot.press("r")
            await pilot.pause(0.2)
            assert app.focused.id == "run-output" and app.focused.value == str(folder / "merges" / "ties")
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: app.screen.phase == "done")
            # 3. its diagnosis: ft_add lost to ft_sort's sign election; the advice names ft_sort's weight
            await pilot.press("d")
            await wait_for(pilot, lambda: getattr(app.screen, "diagnosis", None) is not None)
            first = app.screen.diagnosis
            summary = static_text(app.screen.query_one("#diagnosis-text"), width=78)
            flat = " ".join(summary.split())
            assert re.search(r"ft_add keeps -?\d+% of its change .* sign election where ft_sort disagrees", flat)
            source, weight = re.search(r"lower (\w+)'s weight to ~([\d.]+)", flat).groups()
            assert source == "ft_sort" and total_retention(first, "ft_add") < 0.2
            table = app.screen.query_one("#diagnosis-table")
            assert str(table.get_row("all")[4]) == "ft_so"  # ft_add's "with": whom it lost to
            # 4. back to the builder, follow the advice on ft_sort's weight (keys only), run into a new folder
            await pilot.press("escape", "escape")
            assert type(app.screen).__name__ == "PlanScreen"
            await tab_to(pilot, app, "param-2-weight")
            await replace_text(pilot, app, weight)
            await wait_for(pilot, lambda: f"weight: {weight}" in (app.state.plan_text or ""))
            await pilot.press("escape")  # to the overview: r runs the builder's plan from there too
            await pilot.press("r")
            await pilot.pause(0.2)
            await replace_text(pilot, app, str(folder / "merges" / "ties_lowered"))
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: app.screen.phase == "done")
            await pilot.press("d")
            await wait_for(pilot, lambda: getattr(app.screen, "diagnosis", None) is not None)
            second = app.screen.diagnosis
            # ft_add wins the election now: its retention, against float64 from the merged weights
            merged = np.concatenate([_delta(Path(second.merged), states, k) for k in sorted(states["base"])])
            tau_a = np.concatenate([(states["ft_a"][k] - states["base"][k]).double().numpy().ravel()
                                    for k in sorted(states["base"])])
            expected = float(merged @ tau_a / (tau_a @ tau_a))
            assert abs(total_retention(second, "ft_add") - expected) < 1e-4
            assert total_retention(second, "ft_add") > 0.5 > total_retention(first, "ft_add")
            # 5. both merges side by side, with the plan's change
            await pilot.press("escape", "escape")
            await pilot.press("h")
            await pilot.pause(0.3)
            history = app.screen.query_one("#history")
            names = [str(history.get_row_at(i)[0]) for i in range(history.row_count)]
            assert names[-2:] == ["ties (ties)", "ties_lowered (ties)"]
            assert [str(history.get_row_at(i)[1]) for i in range(history.row_count)][-2:] == ["55%", "70%"]
            diff = static_text(app.screen.query_one("#history-diff"))
            assert any(line.startswith("+") and f"weight: {weight}" in line for line in diff.splitlines())

    run(body)


def _delta(folder: Path, states, key: str) -> np.ndarray:
    from safetensors.numpy import load_file

    merged = load_file(folder / "model.safetensors")[key].astype(np.float64)
    return (merged - states["base"][key].double().numpy()).ravel()

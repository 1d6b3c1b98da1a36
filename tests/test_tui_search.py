"""The search screen (``mergescope inspect SEARCH.db``) at 80x24: the candidates of a real search file, the best
so far and its curve against the file read here with sqlite3, re-sorting, a row written while the screen is
open, the best plan's retention against a float64 computation, and the best plan opened in the builder."""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from mergescope.tui.app import MergescopeApp
from mergescope.tui.cli.main import main
from mergescope.tui.screens.plan_screen import PlanScreen
from mergescope.tui.screens.search_screen import BestPreviewUpdated, SearchScreen
from mergescope.tui.session import open_session
from mergescope.tui.widgets.search.best_panel import BestPanel
from mergescope.tui.widgets.search.candidates_table import CandidatesTable
from test_tune import W_A, W_B, make_setup
from tui_fixtures import Posted, run, static_text


async def wait_until(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


@pytest.fixture
def search_file(tmp_path):
    folder, _, eval_cmd = make_setup(tmp_path)
    assert main(["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--vary", W_A, "--vary", W_B,
                 "--random", "5", "--seed", "3", "--device", "cpu"]) == 0
    return folder, folder / "plan.best.search.db"


def stored(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT number, point, score FROM trials ORDER BY finished, number").fetchall()


def retention(folder, weights: list[float]) -> list[float]:
    """⟨τ_m, τᵢ⟩/‖τᵢ‖² over every tensor, τ_m = Σ wᵢ τᵢ (task arithmetic, normalize false), in float64."""
    base = {k: v.astype(np.float64) for k, v in load_file(folder / "base" / "model.safetensors").items()}
    taus = [{k: load_file(folder / name / "model.safetensors")[k].astype(np.float64) - base[k] for k in base}
            for name in ("ft_a", "ft_b")]
    merged = {k: sum(w * t[k] for w, t in zip(weights, taus)) for k in base}
    return [sum(float((merged[k] * t[k]).sum()) for k in base) / sum(float((t[k] ** 2).sum()) for k in base)
            for t in taus]


def test_search_screen_shows_the_file_follows_it_and_opens_the_best_plan(search_file):
    folder, path = search_file
    rows = stored(path)
    scores = [r[2] for r in rows]
    best = max(rows, key=lambda r: (r[2], -r[0]))
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session([str(path)]), device="cpu", use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, SearchScreen) and app.screen.read is not None)
            table = app.screen.query_one(CandidatesTable)
            assert table.row_count == len(rows)
            assert table.get_row_at(0)[0] == str(best[0])  # sorted by score: the best first
            curve = app.screen.query_one(BestPanel).query_one("#best-curve").data
            assert curve == [max(scores[: i + 1]) for i in range(len(scores))]
            await pilot.press("s")
            assert [table.get_row_at(i)[0] for i in range(table.row_count)] == [str(i) for i in range(1, 6)]

            with sqlite3.connect(path) as db:  # the search writes another candidate while the screen is open
                db.execute("INSERT INTO trials SELECT 6, 1, point, plan, status, score + 1.0, seconds, node, host, "
                           "message, finished + 1 FROM trials WHERE number = ?", (best[0],))
            await wait_until(pilot, lambda: table.row_count == 6)
            assert app.screen.previewed == 6  # the new best

            def exact_preview():
                return [m for m in posted.of(BestPreviewUpdated) if m.number == 6 and m.status == "exact preview"]
            await wait_until(pilot, exact_preview, timeout=60)
            whole = [row for row in exact_preview()[-1].rows if row[0] == "all"][0]
            expected = retention(folder, json.loads(best[1]))
            assert whole[2] == pytest.approx(expected, rel=1e-4, abs=1e-6)
            status = static_text(app.screen.query_one("#best-preview-status"))
            relative = exact_preview()[-1].norm_heading == "‖τm‖/‖θ₀‖"
            assert ("% of ‖θ₀‖" in status) == relative  # the norm column's unit is said (its heading is too narrow)

            await pilot.press("b")
            await wait_until(pilot, lambda: isinstance(app.screen, PlanScreen))
            weights = [float(app.screen.query_one(f"#param-{i}-weight").value) for i in range(2)]
            assert weights == pytest.approx(json.loads(best[1]))
    run(body)

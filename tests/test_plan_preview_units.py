"""The plan preview's merged-norm column has one unit per table, named in its heading: absolute while the
analysis streams (a partial report's ‖θ₀‖ covers only the groups read so far), relative to ‖θ₀‖ once it is
complete — checked against numpy on the tensors."""

from __future__ import annotations

import threading

import numpy as np

from mergescope.analysis import run_analysis
from mergescope.merge.plan import parse_plan
from mergescope.tui.display import fmt_rel
from mergescope.tui.plan_preview import ABSOLUTE_NORM, RELATIVE_NORM, preview_rows
from mergescope.tui.session import open_session
from mergescope.tui.state import AppState

PLAN = """merge_method: task_arithmetic
base_model: base
models:
  - model: ft_a
    parameters: {weight: 1.0}
  - model: ft_b
    parameters: {weight: 0.5}
dtype: float32
"""


def final_update(state: AppState):
    *_, last = preview_rows(state, parse_plan(PLAN), threading.Event())
    return last


def merged_norms(states: dict) -> tuple[float, float]:
    """‖τ_m‖ and ‖θ₀‖ over the whole model, τ_m = τ_a + 0.5 τ_b, in float64."""
    base = states["base"]
    tau = np.concatenate([(states["ft_a"][k] - base[k]).double().numpy().ravel()
                          + 0.5 * (states["ft_b"][k] - base[k]).double().numpy().ravel() for k in base])
    theta = np.concatenate([base[k].double().numpy().ravel() for k in base])
    return float(np.linalg.norm(tau)), float(np.linalg.norm(theta))


def test_absolute_while_the_analysis_streams_relative_once_it_is_done(workspace):
    session = open_session(["base", "ft_a", "ft_b"])
    state = AppState(session, device="cpu", use_cache=False)
    merged, theta = merged_norms(workspace)
    report = run_analysis(session.base, session.models, use_cache=False, device="cpu")

    partial = {**report, "groups": report["groups"][:2],
               "total": {**report["total"], "base_norm": report["groups"][0]["base_norm"]}}
    for snapshot in ({}, partial):  # nothing yet; two groups read (the old code showed a far too large "all")
        state.report, state.analysis_done = snapshot, False
        status, names, rows, warnings, heading = final_update(state)
        assert status == "exact preview" and heading == ABSOLUTE_NORM
        assert not any(norm.endswith("%") for _, norm, _ in rows)
        assert {label: norm for label, norm, _ in rows}["all"] == f"{merged:.3g}"

    state.report, state.analysis_done = report, True
    status, names, rows, warnings, heading = final_update(state)
    assert heading == RELATIVE_NORM and all(norm.endswith("%") for _, norm, _ in rows)
    assert {label: norm for label, norm, _ in rows}["all"] == fmt_rel(merged / theta)

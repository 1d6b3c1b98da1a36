"""Parameter settings: scalars, gradients over the layers, filters, and scope precedence."""

from __future__ import annotations

import pytest

from mergescope.merge.parameters import evaluate, resolve


def test_scalars_and_coercion():
    assert evaluate(0.3, "x", 0.7) == 0.3
    assert evaluate("1e-3", "x", 0.0) == 0.001
    assert evaluate(True, "x", 0.0, bool) is True
    assert evaluate("false", "x", 0.0, bool) is False
    assert evaluate(3.0, "x", 0.0, int) == 3
    with pytest.raises(ValueError):
        evaluate(2.5, "x", 0.0, int)


@pytest.mark.parametrize(
    "values, t, expected",
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 1.0, 0.0], 0.5, 1.0),
        ([0.0, 1.0, 0.0], 0.75, 0.5),
        ([0.2, 0.4, 0.6, 0.8], 1 / 3, 0.4),
        ([0.2, 0.4, 0.6, 0.8], 0.5, 0.5),
        ([5.0], 0.9, 5.0),
    ],
)
def test_gradients_interpolate_piecewise_linearly(values, t, expected):
    # independent computation: position t·(n−1) between neighbouring anchors
    assert evaluate(values, "model.layers.3.mlp.up_proj.weight", t) == pytest.approx(expected)


def test_boolean_gradients_pick_without_interpolating():
    assert evaluate([True, False], "x", 0.4, bool) is True
    assert evaluate([True, False], "x", 1.0, bool) is False


def test_filters_first_match_wins_and_fall_through():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.5
    assert evaluate(setting, "model.norm.weight", 0.5) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0.0) is None
    assert evaluate({"filter": "*", "value": 2.0}, "anything", 0.0) == 2.0


def test_scope_precedence():
    model_scope = {"weight": [{"filter": "mlp", "value": 0.7}]}
    slice_scope = {"weight": 0.4}
    top_scope = {"weight": 0.1, "density": 0.5}
    scopes = [model_scope, slice_scope, top_scope]
    assert resolve("weight", scopes, 1.0, tensor_name="m.layers.0.mlp.w", t=0, kind=float) == 0.7
    # the model's filter does not match: the next scope applies
    assert resolve("weight", scopes, 1.0, tensor_name="m.layers.0.attn.w", t=0, kind=float) == 0.4
    assert resolve("density", scopes, 1.0, tensor_name="x", t=0, kind=float) == 0.5
    assert resolve("gamma", scopes, 0.01, tensor_name="x", t=0, kind=float) == 0.01

"""The plan builder's form ⇄ mergekit YAML: values typed as YAML, documents that load, plans that round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergescope.merge.plan import parse_plan
from mergescope.tui.plan_document import (
    ModelRow,
    default_form,
    format_field,
    from_plan,
    parse_field,
    set_method,
    to_document,
    to_yaml,
)


def rows():
    return [ModelRow("ft_a", "ft_a"), ModelRow("ft_b", "ft_b")]


def test_default_ties_form_is_a_valid_plan():
    form = default_form("ties", "base", rows())
    plan = parse_plan(to_yaml(to_document(form)))
    assert plan.merge_method == "ties" and plan.base_model == "base"
    assert [m.parameters for m in plan.models] == [{"weight": 1.0, "density": 0.5}] * 2


def test_linear_has_no_base_and_equal_weights():
    form = default_form("linear", "base", rows())
    document = to_document(form)
    assert "base_model" not in document
    assert [m["parameters"]["weight"] for m in document["models"]] == [0.5, 0.5]


def test_switching_method_keeps_shared_values():
    form = default_form("ties", "base", rows())
    form.models[0].fields["weight"] = "[0.2, 0.8]"
    set_method(form, "dare_ties", "base")
    assert form.models[0].fields["weight"] == "[0.2, 0.8]"
    set_method(form, "slerp", "base")
    assert form.options == {"t": "0.5"} and form.models[0].fields == {}


def test_switching_method_drops_unused_values_resets_options_and_says_so():
    """ties with normalize: true and densities → task_arithmetic: the density goes, normalize returns to task
    arithmetic's own default (off) instead of silently dividing by Σw, and the notes say both."""
    form = default_form("ties", "base", rows())
    form.options["normalize"] = "true"
    notes = set_method(form, "task_arithmetic", "base")
    assert notes == [
        "dropped density: task_arithmetic does not use it", "reset normalize to task_arithmetic's defaults"]
    document = to_document(form)
    assert "parameters" not in document or "normalize" not in document["parameters"]
    assert all(set(m["parameters"]) == {"weight"} for m in document["models"])
    assert parse_plan(to_yaml(document)).models[0].parameters == {"weight": 1.0}
    assert set_method(form, "task_arithmetic", "base") == []  # nothing to say when nothing changed


def test_gradients_and_filters_typed_as_yaml():
    form = default_form("task_arithmetic", "base", rows())
    form.models[1].fields["weight"] = "[{filter: mlp, value: 0.3}, {value: 0.7}]"
    plan = parse_plan(to_yaml(to_document(form)))
    assert plan.models[1].parameters["weight"] == [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]
    form.models[1].fields["weight"] = "[0.3, "
    with pytest.raises(ValueError, match="ft_b.weight"):
        to_document(form)


def test_excluded_model_left_out():
    form = default_form("ties", "base", rows())
    form.models[1].included = False
    assert [m["model"] for m in to_document(form)["models"]] == ["ft_a"]


def test_loaded_plan_round_trips():
    text = """merge_method: dare_ties
base_model: base
models:
  - model: ft_a
    parameters: {weight: [0.1, 0.9], density: 0.4}
  - model: ft_b
    parameters: {weight: 0.5, density: 0.6}
parameters: {normalize: false, lambda: 1.2}
dtype: bfloat16
tokenizer_source: base
mergescope: {seed: 7}
"""
    plan = parse_plan(text)
    again = parse_plan(to_yaml(to_document(from_plan(plan, rows()))))
    for key in ("merge_method", "base_model", "parameters", "dtype", "tokenizer_source", "options"):
        assert getattr(again, key) == getattr(plan, key), key
    assert [(m.model, m.parameters) for m in again.models] == [(m.model, m.parameters) for m in plan.models]


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-10**6, 10**6), st.booleans(),
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=5),
))
def test_field_text_round_trips(value):
    assert parse_field(format_field(value)) == value


def test_carried_comments_never_change_the_plan():
    """Whatever comments an old plan file holds, the text saved over it loads as the same document."""
    import yaml
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mergescope.tui.plan_comments import plan_file_text

    keys = st.sampled_from(["merge_method", "models", "weight", "density", "parameters", "dtype", "x: 1"])
    comment = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12).map(lambda s: "# " + s)
    document = {"merge_method": "ties", "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 1.0, "density": [0.2, 0.5]}}, {"model": "c"}],
                "parameters": {"normalize": True}}

    @settings(max_examples=80, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 8), keys, comment), max_size=8))
    def check(placed):
        old = ["merge_method: ties", "models:", "- model: a", "  parameters:", "    weight: 1.0", "dtype: x"]
        for indent, key, note in placed:
            old.append(" " * indent + (f"{key}: 1  {note}" if indent % 2 else note))
        text = plan_file_text(document, "\n".join(old))
        assert yaml.safe_load(text) == document

    check()

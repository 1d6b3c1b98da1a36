"""Plans are untrusted input: random and mutated plans end in our own error or a valid plan, nothing else."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import llama_config, llama_state, write_model
from mergescope.checkpoints import MergescopeError
from mergescope.merge.job import build_job
from mergescope.merge.methods import METHODS
from mergescope.merge.plan import MergePlan, parse_plan

scalars = (
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.just(float("nan")) | st.text(max_size=6)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["filter", "value", "model", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "chat_template", "mergescope", "model", "layer_range", "sources", "weight", "density", "t", "seed"]


def parse_or_error(text: str):
    try:
        return parse_plan(text, "fuzz.yml")
    except MergescopeError as exc:
        assert str(exc).startswith("fuzz.yml")
        return None


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6) | values | st.text(max_size=40))
def test_random_documents(document):
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    result = parse_or_error(text)
    assert result is None or isinstance(result, MergePlan)


VALID = {
    "merge_method": "ties",
    "base_model": "BASE",
    "models": [{"model": "A", "parameters": {"weight": [0.2, 1.0], "density": 0.5}},
               {"model": "B", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}],
    "parameters": {"normalize": True},
    "dtype": "float32",
}


def mutate(plan: dict, path: list, value) -> dict:
    plan = copy.deepcopy(plan)
    node = plan
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return plan


PATHS = [["merge_method"], ["base_model"], ["models"], ["models", 0], ["models", 0, "model"],
         ["models", 0, "parameters"], ["models", 0, "parameters", "weight"], ["models", 1, "parameters", "weight", 0],
         ["models", 0, "parameters", "density"], ["parameters"], ["parameters", "normalize"], ["dtype"]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    config = llama_config(layers=2)
    return {
        name: str(write_model(root / name, llama_state(config, seed=i), config))
        for i, name in enumerate(("BASE", "A", "B"))
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), value=values, method=st.sampled_from(sorted(METHODS)))
def test_mutated_plans_resolve_or_fail_cleanly(folders, path, value, method):
    plan = mutate({**VALID, "merge_method": method}, path, value)
    text = yaml.safe_dump(plan)
    for name, folder in folders.items():
        text = text.replace(f" {name}\n", f" {folder}\n")
    parsed = parse_or_error(text)
    if parsed is None:
        return
    try:
        job = build_job(parsed)
    except MergescopeError as exc:
        assert str(exc).startswith("fuzz.yml")
        return
    assert len(job.tasks) == 21


def test_the_unmutated_plan_resolves(folders):
    text = yaml.safe_dump(VALID)
    for name, folder in folders.items():
        text = text.replace(f" {name}\n", f" {folder}\n")
    job = build_job(parse_plan(text, "fuzz.yml"))
    assert len(job.tasks) == 21 and job.tasks[5].params[1]["weight"] in (0.5, 1.0)

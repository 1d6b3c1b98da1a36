"""``mergescope merge`` end to end on tiny Llamas: outputs against direct computations, files, errors."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import yaml
from safetensors.torch import load_file

from builders import llama_config, llama_state, write_lora, write_model
from mergescope.checkpoints import MergescopeError, open_checkpoint
from mergescope.merge.executor import MergeCancelled, run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import PlanError, load_plan, parse_plan
from mergescope.tui.cli.main import main


@pytest.fixture
def models(tmp_path):
    config = llama_config(layers=3)
    base = llama_state(config, seed=0)
    states = {"base": base}
    for i, name in enumerate(("ft_a", "ft_b", "ft_c"), 1):
        g = torch.Generator().manual_seed(i)
        states[name] = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = {name: write_model(tmp_path / name, state, config, tokenizer_vocab=64) for name, state in states.items()}
    return states, paths


def load_output(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def write_plan(tmp_path, plan: dict) -> str:
    path = tmp_path / "plan.yml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return str(path)


def linear_soup(paths: dict, **keys) -> dict:
    """The plan averaging ft_a and ft_b (weight 1 each), with ``keys`` added at the top level."""
    models = [{"model": str(paths[n]), "parameters": {"weight": 1.0}} for n in ("ft_a", "ft_b")]
    return {"merge_method": "linear", "models": models, **keys}


def merge(tmp_path, plan: dict, out="out", **kwargs):
    job = build_job(load_plan(write_plan(tmp_path, plan)))
    return run_merge(job, tmp_path / out, device="cpu", **kwargs)


def test_linear_with_normalised_weights(tmp_path, models):
    states, paths = models
    plan = {"merge_method": "linear", "models": [
        {"model": str(paths["ft_a"]), "parameters": {"weight": 1.0}},
        {"model": str(paths["ft_b"]), "parameters": {"weight": 3.0}},
    ], "dtype": "float32"}
    out = load_output(merge(tmp_path, plan))
    for name in states["base"]:
        expected = (1.0 * states["ft_a"][name] + 3.0 * states["ft_b"][name]) / 4.0
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7)


def test_task_arithmetic_gradient_and_filter(tmp_path, models):
    states, paths = models
    plan = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["ft_a"]), "parameters": {"weight": [0.0, 1.0]}},
            {
                "model": str(paths["ft_b"]),
                "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": -0.25}]},
            },
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    out = load_output(merge(tmp_path, plan))
    base = states["base"]
    for name in base:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = 0.0 if layer is None else layer / 2  # three layers: t = 0, 0.5, 1
        w_a = t  # gradient [0, 1]
        w_b = 0.5 if "mlp" in name else -0.25
        expected = base[name] + w_a * (states["ft_a"][name] - base[name]) + w_b * (states["ft_b"][name] - base[name])
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def test_bf16_output_and_written_files(tmp_path, models):
    states, paths = models
    plan = linear_soup(paths, out_dtype="bfloat16")
    folder = merge(tmp_path, plan)
    out = load_output(folder)
    name = "model.layers.1.mlp.up_proj.weight"
    assert out[name].dtype == torch.bfloat16
    assert torch.equal(out[name], ((states["ft_a"][name] + states["ft_b"][name]) / 2).bfloat16())
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer.json", "README.md", "mergekit_config.yml", "model.safetensors"} <= files
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"merge", "mergescope", "linear"} <= set(front["tags"])
    # the plan written back is the same plan
    assert yaml.safe_load((folder / "mergekit_config.yml").read_text()) == plan


def test_passthrough_stacks_layers(tmp_path, models):
    states, paths = models
    plan = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(paths["ft_a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(paths["ft_b"]), "layer_range": [1, 3]}]},
    ], "dtype": "float32"}
    folder = merge(tmp_path, plan)
    out = load_output(folder)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4
    suffix = "self_attn.q_proj.weight"
    sources = [("ft_a", 0), ("ft_a", 1), ("ft_b", 1), ("ft_b", 2)]
    for out_layer, (model, layer) in enumerate(sources):
        assert torch.equal(out[f"model.layers.{out_layer}.{suffix}"], states[model][f"model.layers.{layer}.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], states["ft_a"]["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], states["ft_b"]["lm_head.weight"])
    assert len(out) == 2 + 1 + 4 * 9


def test_lora_input(tmp_path, models):
    states, paths = models
    deltas = write_lora(
        tmp_path / "lora", states["base"], ["model.layers.0.self_attn.q_proj"], base_ref=str(paths["base"])
    )
    plan = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]),
            "models": [{"model": f"{paths['base']}+{tmp_path / 'lora'}", "parameters": {"weight": 0.5}}],
            "dtype": "float32"}
    out = load_output(merge(tmp_path, plan))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name], states["base"][name] + 0.5 * deltas[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(out["model.norm.weight"], states["base"]["model.norm.weight"])


def test_plan_problems_are_reported_together_with_lines(tmp_path, models):
    _, paths = models
    text = f"""merge_method: ties
models:
  - model: {paths["ft_a"]}
    parameters:
      wieght: 1.0
      density: 1.5
parameters:
  normalize: maybe
colour: blue
"""
    with pytest.raises(PlanError) as caught:
        parse_plan(text, "p.yml")
    message = str(caught.value)
    assert "p.yml:1: ties needs a base_model" in message
    assert "p.yml:5:" in message and "wieght" in message
    assert "p.yml:6:" in message and "density" in message
    assert "p.yml:8:" in message and "normalize" in message
    assert "p.yml:9:" in message and "colour" in message
    with pytest.raises(PlanError, match=r"r.yml:5: t: -0.5 is outside \[0.0, inf\]"):
        parse_plan("merge_method: slerp\nbase_model: b\nmodels: [{model: a}]\nparameters:\n  t: [0.2, -0.5]\n", "r.yml")
    with pytest.raises(PlanError, match="not known .*linear"):
        parse_plan("merge_method: avg\nmodels: [{model: x}]\n", "q.yml")
    with pytest.raises(MergescopeError, match=r"q.yml:\d+:\d+: YAML syntax error"):
        parse_plan("merge_method: linear\nmodels: [\n", "q.yml")


def test_shape_mismatch_is_refused_before_writing(tmp_path, models):
    states, paths = models
    grown = dict(states["ft_a"])
    grown["model.embed_tokens.weight"] = torch.randn(70, 16)
    write_model(tmp_path / "grown", grown, llama_config(layers=3))
    plan = {"merge_method": "linear", "models": [{"model": str(paths["ft_b"]), "parameters": {"weight": 1.0}},
                                                 {"model": str(tmp_path / "grown"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(PlanError, match="embed_tokens.weight has shape \\[70, 16\\]"):
        merge(tmp_path, plan)
    assert not (tmp_path / "out").exists()


def test_non_finite_input_is_refused_and_nothing_is_written(tmp_path, models):
    states, paths = models
    bad = dict(states["ft_a"])
    bad["model.layers.2.mlp.up_proj.weight"] = bad["model.layers.2.mlp.up_proj.weight"].clone()
    bad["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    write_model(tmp_path / "bad", bad, llama_config(layers=3))
    plan = {"merge_method": "linear", "models": [{"model": str(paths["ft_b"]), "parameters": {"weight": 1.0}},
                                                 {"model": str(tmp_path / "bad"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergescopeError, match="model.layers.2.mlp.up_proj.weight has 1 NaN/Inf"):
        merge(tmp_path, plan)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []
    folder = merge(tmp_path, plan, allow_non_finite=True)
    assert torch.isnan(load_output(folder)["model.layers.2.mlp.up_proj.weight"][0, 0])


def test_cancel_leaves_nothing(tmp_path, models):
    _, paths = models
    plan = linear_soup(paths)
    cancel = threading.Event()
    job = build_job(load_plan(write_plan(tmp_path, plan)))
    with pytest.raises(MergeCancelled):
        run_merge(job, tmp_path / "out", device="cpu", cancel=cancel, on_event=lambda e: cancel.set())
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_merge_dry_run_and_force(tmp_path, models, capsys):
    _, paths = models
    plan = write_plan(tmp_path, linear_soup(paths))
    assert main(["merge", plan, "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "30 tensors" in printed and not (tmp_path / "out").exists()
    assert main(["merge", plan, "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert main(["merge", plan, "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["merge", plan, "-o", str(tmp_path / "out"), "--device", "cpu", "--force"]) == 0
    assert main(["merge", plan, "-o", str(paths["ft_a"]), "--device", "cpu", "--force"]) == 2
    assert "input" in capsys.readouterr().err
    assert open_checkpoint(paths["ft_a"]).num_parameters > 0  # the input is untouched


def test_output_loads_in_transformers(tmp_path, models):
    transformers = pytest.importorskip("transformers")
    states, paths = models
    plan = linear_soup(paths, out_dtype="bfloat16")
    folder = merge(tmp_path, plan)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    loaded = model.state_dict()
    for name in states["base"]:
        expected = ((states["ft_a"][name] + states["ft_b"][name]) / 2).bfloat16()
        assert torch.equal(loaded[name], expected), name
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method, extra", [
    ("task_arithmetic", {}), ("linear", {}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}), ("della", {"density": 0.5, "epsilon": 0.1}),
])
def test_methods_give_the_same_bits_block_by_block(tmp_path, models, monkeypatch, method, extra):
    import mergescope.merge.tensor_merge as tensor_merge

    _, paths = models
    plan = {
        "merge_method": method,
        "out_dtype": "bfloat16",
        "parameters": {"rescale": True} if "dare" in method else {},
        "models": [{"model": str(paths[n]), "parameters": {"weight": [0.3, 0.9], **extra}} for n in ("ft_a", "ft_b")],
    }
    if method != "linear":
        plan["base_model"] = str(paths["base"])
    whole = load_output(merge(tmp_path, plan, out="whole", seed=7))
    monkeypatch.setattr(tensor_merge, "ELEMENTWISE_BLOCK", 37)  # odd blocks with ragged tails
    blocked = load_output(merge(tmp_path, plan, out="blocked", seed=7))
    assert whole.keys() == blocked.keys()
    assert all(torch.equal(whole[k], blocked[k]) for k in whole)


def test_layer_range_past_the_model_is_reported_with_its_line(tmp_path, models):
    _, paths = models
    text = f"""merge_method: passthrough
slices:
  - sources:
      - model: {paths["ft_a"]}
        layer_range: [0, 2]
  - sources:
      - model: {paths["ft_b"]}
        layer_range: [1, 5]
"""
    with pytest.raises(PlanError, match=r"p.yml:7: layer_range \[1, 5\] goes past .*ft_b's 3 layers"):
        build_job(parse_plan(text, "p.yml"))


def test_bf16_inputs_block_by_block_equal_float32_inputs(tmp_path, monkeypatch):
    """Large bf16 tensors take the two-phase path with their stored dtype: τ must still be formed in float32."""
    import mergescope.merge.tensor_merge as tensor_merge

    config = llama_config(layers=2)
    base = llama_state(config, seed=0)
    for i, name in enumerate(("base", "a", "b")):
        g = torch.Generator().manual_seed(i)
        state = base if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        write_model(tmp_path / name, {k: v.bfloat16() for k, v in state.items()}, config)
        write_model(tmp_path / f"{name}32", {k: v.bfloat16().float() for k, v in state.items()}, config)

    def plan(suffix: str) -> dict:
        return {"merge_method": "ties", "base_model": str(tmp_path / f"base{suffix}"), "dtype": "float32",
                "models": [{"model": str(tmp_path / f"{n}{suffix}"), "parameters": {"weight": 1.0, "density": 0.5}}
                           for n in ("a", "b")]}

    monkeypatch.setattr(tensor_merge, "ELEMENTWISE_BLOCK", 53)
    from_bf16 = load_output(merge(tmp_path, plan(""), out="from_bf16"))
    from_f32 = load_output(merge(tmp_path, plan("32"), out="from_f32"))
    assert all(torch.equal(from_bf16[k], from_f32[k]) for k in from_f32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_finite_check_catches_every_non_finite_value(dtype, bad):
    from types import SimpleNamespace

    from mergescope.merge.executor import _check_finite

    good = torch.randn(1000).to(dtype)
    task = SimpleNamespace(reads=[("base", "w"), ("m", "w")])
    _check_finite(task, [good, good])
    broken = good.clone()
    broken[777] = bad
    with pytest.raises(MergescopeError, match="m: tensor w has 1 NaN/Inf"):
        _check_finite(task, [good, broken])


def test_cli_merge_warns_of_another_base_and_vocabulary_before_it_starts(tmp_path, models, capsys):
    """What the headers, configs and a sample of rows show is printed before anything runs: a model of another
    initialisation (its relative change, computed here in float64, is far above the rule's 0.5) and a grown
    vocabulary (which the merge then refuses)."""
    states, paths = models
    other = llama_state(llama_config(layers=3), seed=7)
    write_model(tmp_path / "other", other, llama_config(layers=3), tokenizer_vocab=64)
    matrices = [k for k, v in states["ft_a"].items() if v.ndim == 2]
    rel = sorted(float((other[k].double() - states["ft_a"][k].double()).norm() / states["ft_a"][k].double().norm())
                 for k in matrices)
    assert rel[len(rel) // 2] > 1.0  # so any fair sample of these matrices is above 0.5
    plan = write_plan(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(paths["ft_a"]), "parameters": {"weight": 1.0}},
        {"model": str(tmp_path / "other"), "parameters": {"weight": 1.0}}]})
    assert main(["merge", plan, "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "other is probably not a fine-tune of ft_a's base" in warning
    assert err.index("warning:") < err.index("wrote")
    # a fine-tune of the same base: no warning
    assert main(["merge", write_plan(tmp_path, linear_soup(paths)), "-o", str(tmp_path / "o2"), "--dry-run"]) == 0
    assert "warning:" not in capsys.readouterr().err
    grown_config = llama_config(layers=3)
    grown_config["vocab_size"] = grown_config["vocab_size"] + 6
    grown = {k: (torch.cat([v, torch.zeros(6, v.shape[1])]) if v.shape[0] == grown_config["vocab_size"] - 6 else v)
             for k, v in states["ft_b"].items()}
    write_model(tmp_path / "grown", grown, grown_config)
    plan = write_plan(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(paths["base"]), "models": [
        {"model": str(tmp_path / "grown"), "parameters": {"weight": 1.0}}]})
    assert main(["merge", plan, "-o", str(tmp_path / "o3"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    vocab = grown_config["vocab_size"]
    assert f"warning: grown has a vocabulary of {vocab} tokens, the base {vocab - 6}" in err


def test_cli_dry_run_shows_parameter_values_whole_at_80_columns(tmp_path, models, capsys, monkeypatch):
    _, paths = models
    monkeypatch.setenv("COLUMNS", "80")
    plan = write_plan(tmp_path, {"merge_method": "ties", "base_model": str(paths["base"]), "models": [
        {"model": str(paths[name]), "parameters": {"weight": 0.75, "density": [0.125, 0.625]}}
        for name in ("ft_a", "ft_b", "ft_c")]})
    assert main(["merge", plan, "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    # 3 layers: t = 0, 0.5, 1 → density 0.125, 0.375, 0.625 (embeddings, norm, head: t = 0)
    rows = [line for line in out.splitlines() if "ft_b" in line and "0.75" in line]
    assert [row.split("│")[-2].strip() for row in rows] == ["0.125", "0.125", "0.375", "0.625", "0.125", "0.125"]
    assert "int8_mask" not in out  # ignored by every method: not shown

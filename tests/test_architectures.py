"""Every common architecture as transformers and peft write it (tests/hf_architectures.py: Llama with tied
embeddings and grouped-query attention, Qwen2 with q/k/v biases, Mistral, Gemma 2, Phi-3 with fused qkv and
gate_up, Mixtral's experts, GPT-2's Conv1D under transformer.h.N; sharded bf16 bases, PEFT LoRA adapters).

For each: ``info`` reads it, ``analyze`` streams it without compatibility warnings, every method merges it into a
folder transformers loads with no missing or unexpected weights and finite logits (tied embeddings stay tied: no
lm_head written), ``diagnose`` explains a merge of it, and the LoRA adapter's task vector as mergescope applies it
equals peft's own ``merge_and_unload`` (computed by peft, float32).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

import hf_fixtures as hf
from hf_architectures import ARCHITECTURES, write_family
from mergekit_reference import load_merged
from mergescope.analysis.report import run_analysis
from mergescope.checkpoints import open_checkpoint
from mergescope.merge.methods import METHODS

ARCHS = list(ARCHITECTURES)


def _plans(p: dict[str, str]) -> dict[str, dict]:
    """One plan per method over the base and the two fine-tunes (the LoRA joins TIES)."""
    w = {"weight": 0.6}
    wd = {"weight": 0.6, "density": 0.7}
    two = lambda params: [{"model": p["ft_a"], "parameters": params}, {"model": p["ft_b"], "parameters": params}]  # noqa: E731
    plain = [{"model": p["ft_a"]}, {"model": p["ft_b"]}]
    base = {"base_model": p["base"]}
    return {
        "linear": {"models": two(w)},
        "task_arithmetic": {**base, "models": two(w)},
        "ties": {**base, "models": [*two(wd), {"model": p["lora"], "parameters": wd}]},
        "dare_linear": {**base, "models": two(wd)},
        "dare_ties": {**base, "models": two(wd)},
        "breadcrumbs": {**base, "models": two({**wd, "gamma": 0.05})},
        "breadcrumbs_ties": {**base, "models": two({**wd, "gamma": 0.05})},
        "della": {**base, "models": two({**wd, "epsilon": 0.1})},
        "della_linear": {**base, "models": two({**wd, "epsilon": 0.1})},
        "slerp": {**base, "models": [{"model": p["ft_a"]}], "parameters": {"t": [0.2, 0.8]}},
        "nuslerp": {**base, "models": two(w)},
        "multislerp": {**base, "models": two(w)},
        "karcher": {"models": plain},
        "model_stock": {**base, "models": plain},
        "sce": {**base, "models": plain, "parameters": {"select_topk": 0.5}},
        "nearswap": {**base, "models": [{"model": p["ft_a"]}], "parameters": {"t": 0.01}},
        "ram": {**base, "models": plain},
        "ramplus_tl": {**base, "models": plain},
        "arcee_fusion": {**base, "models": [{"model": p["ft_a"]}]},
        "passthrough": {"slices": [{"sources": [{"model": p["ft_a"], "layer_range": [0, 2]}]},
                                   {"sources": [{"model": p["ft_b"], "layer_range": [1, 2]}]}]},
    }


def test_every_method_has_a_plan():
    assert set(_plans(dict.fromkeys(["base", "ft_a", "ft_b", "lora"], "x"))) == set(METHODS)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("architectures")
    return {name: write_family(arch, root / name) for name, arch in ARCHITECTURES.items()}


def cli(*argv: str) -> str:
    from mergescope.tui.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    assert rc == 0, err.getvalue()
    return out.getvalue()


def merge(plan: dict, out: Path) -> Path:
    plan_file = out.parent / f"{out.name}.yml"
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    cli("merge", str(plan_file), "-o", str(out), "--device", "cpu", "--force")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_info_reads_the_sharded_base(families, arch):
    folder = families[arch]["base"]
    info = json.loads(cli("info", str(folder), "--json"))
    config = json.loads((folder / "config.json").read_text())
    state = load_merged(folder)
    assert info["architecture"] == config["architectures"][0] and info["model_type"] == config["model_type"]
    assert (info["layers"], info["vocab_size"], info["hidden_size"]) == (2, 43, 16)
    assert info["shards"] == len(list(folder.glob("model-*.safetensors"))) > 1
    assert info["tensors"] == len(state) and info["parameters"] == sum(t.numel() for t in state.values())
    assert info["dtypes"] == {"BF16": info["parameters"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_analyze_finds_no_incompatibility(families, arch):
    """No warning (not even different_base) for fine-tunes and an adapter of the base; the whole-model ‖τ‖ of a
    fine-tune equals one computed here in float64 from the files."""
    paths = families[arch]
    base = open_checkpoint(str(paths["base"]))
    models = [open_checkpoint(str(paths[n])) for n in ("ft_a", "ft_b", "lora")]
    report = run_analysis(base, models, device="cpu", use_cache=False)
    assert report["warnings"] == []
    theta0, theta = load_merged(paths["base"]), load_merged(paths["ft_a"])
    norm = sum(float((theta[k].double() - theta0[k].double()).pow(2).sum()) for k in theta0) ** 0.5
    assert report["total"]["delta"]["ft_a"]["norm"] == pytest.approx(norm, rel=1e-5)
    assert report["total"]["delta"]["lora"]["norm"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_task_vector_equals_peft_merge_and_unload(families, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths = families[arch]
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, paths["lora"]).merge_and_unload().state_dict()
    base = open_checkpoint(str(paths["base"]))
    applied = open_checkpoint(str(paths["lora"]))
    changed = 0
    for name in applied.tensor_names:  # the exact Δ the analysis and merges use (read() rounds θ to bf16)
        if name not in merged:  # transformers 5 holds Mixtral's MoE block (experts fused) under other names
            assert name not in applied.adapter.targets and "block_sparse_moe" in name, name
            continue
        ours = applied.stored_delta(name).double()
        theirs = merged[name].double() - base.read(name).double()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
        changed += bool(theirs.abs().max() > 0)
    assert changed >= 2 * len(ARCHITECTURES[arch].lora_targets)  # every target of both layers moved


@pytest.mark.parametrize("method", list(_plans(dict.fromkeys(["base", "ft_a", "ft_b", "lora"], "x"))))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_merges_into_a_model_transformers_loads(families, arch, method, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    paths = {k: str(v) for k, v in families[arch].items()}
    out = merge({"merge_method": method, **_plans(paths)[method]}, tmp_path / "out")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape[-1] == 43 and torch.isfinite(logits).all()
    written = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            written.update(handle.keys())
    if ARCHITECTURES[arch].tied:
        assert "lm_head.weight" not in written
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert "lm_head.weight" in written
    base_names = set(json.loads((families[arch]["base"] / "model.safetensors.index.json").read_text())["weight_map"])
    if method != "passthrough":
        assert written == base_names
    else:  # layers 0, 1 of ft_a then layer 1 of ft_b; per-layer lists (Qwen2's, Gemma 2's layer_types) follow
        config = json.loads((out / "config.json").read_text())
        base_config = json.loads((families[arch]["base"] / "config.json").read_text())
        assert config.get("num_hidden_layers", config.get("n_layer")) == 3
        if "layer_types" in base_config:
            types = base_config["layer_types"]
            assert config["layer_types"] == [types[0], types[1], types[1]]


@pytest.mark.parametrize("arch", ARCHS)
def test_diagnose_explains_a_ties_merge(families, arch, tmp_path):
    """Every source is diagnosed, and the whole-model retention ⟨τ_m, τᵢ⟩/‖τᵢ‖² of the full fine-tunes equals one
    computed here in float64 from the files (read with safetensors, all shards)."""
    paths = {k: str(v) for k, v in families[arch].items()}
    out = merge({"merge_method": "ties", **_plans(paths)["ties"]}, tmp_path / "merged")
    report = json.loads(cli("diagnose", str(out), "--json", "-"))
    assert set(report["total"]["sources"]) == {"ft_a", "ft_b", "lora"}
    assert report["summary"] and report["warnings"] == []
    base, merged = load_merged(families[arch]["base"]), load_merged(out)
    for name in ("ft_a", "ft_b"):
        tuned = load_merged(families[arch][name])
        dot = sum(float(((merged[k].double() - base[k].double()) * (tuned[k].double() - base[k].double())).sum())
                  for k in base)
        norm2 = sum(float((tuned[k].double() - base[k].double()).pow(2).sum()) for k in base)
        assert report["total"]["sources"][name]["retention"] == pytest.approx(dot / norm2, rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_union_with_a_chat_fine_tune_of_each_architecture(families, arch, tmp_path):
    """A chat fine-tune of each architecture (three tokens added, embeddings resized by transformers) merges with a
    plain fine-tune under tokenizer_source: union: the chat model's row count everywhere, tied embeddings still
    tied, the added tokens tokenized as themselves, and the new tokens' rows are the chat model's (the only model
    that has them)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = hf.write_chat_fine_tune(families[arch]["base"], tmp_path / "chat", seed=5)
    paths = {k: str(v) for k, v in families[arch].items()}
    plan = {"merge_method": "ties", "base_model": paths["base"], "tokenizer_source": "union", "dtype": "float32",
            "models": [{"model": paths["ft_a"], "parameters": {"weight": 0.5, "density": 0.8}},
                       {"model": str(chat), "parameters": {"weight": 0.5, "density": 0.8}}]}
    out = merge(plan, tmp_path / "out")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat_tokenizer = AutoTokenizer.from_pretrained(chat)
    # transformers 5 rebuilds Qwen2's tokenizer with its own <|endoftext|> past the base's rows: the chat model has
    # a row for it, the base does not, so it joins the union like the chat tokens
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == len(chat_tokenizer) \
        == model.config.vocab_size
    ids = tokenizer("<|im_start|><|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) and max(ids) < len(tokenizer)
    assert torch.isfinite(model(torch.tensor([ids])).logits).all()
    written = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            written.update(handle.keys())
    assert ("lm_head.weight" in written) != ARCHITECTURES[arch].tied
    chat_model = AutoModelForCausalLM.from_pretrained(chat, dtype=torch.float32)
    new_row = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat_row = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.testing.assert_close(model.get_input_embeddings().weight[new_row].float(),
                               chat_model.get_input_embeddings().weight[chat_row], rtol=0, atol=1e-6)


def test_chat_lora_with_resized_embeddings_equals_merge_and_unload_and_merges_by_token(tmp_path):
    """A chat LoRA as peft saves it after resize_token_embeddings: modules_to_save copies of the embedding and head
    (``X.modules_to_save.weight``), the base's copies beside them (``X.original_module.weight``) and the resized
    layers themselves (``X.weight``, peft's save_embedding_layers). Applied, it equals peft's merge_and_unload;
    merged with a fine-tune under tokenizer_source: union, its new tokens arrive with its rows."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = hf.write_llama_base(tmp_path / "base")
    ft = hf.write_fine_tune(base, tmp_path / "ft", seed=1)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model.resize_token_embeddings(len(tokenizer))
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["embed_tokens", "lm_head"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    lora.save_pretrained(tmp_path / "lora")
    tokenizer.save_pretrained(tmp_path / "lora")

    resized = AutoModelForCausalLM.from_pretrained(base)
    resized.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(resized, tmp_path / "lora").merge_and_unload().state_dict()
    applied = open_checkpoint(str(tmp_path / "lora"))
    assert set(applied.tensor_names) == set(load_merged(base))
    for name in applied.tensor_names:
        torch.testing.assert_close(applied.read(name).double(), merged[name].double(), rtol=0, atol=1e-6, msg=name)

    plan = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
            "models": [{"model": str(ft), "parameters": {"weight": 0.5}},
                       {"model": str(tmp_path / "lora"), "parameters": {"weight": 0.5}}]}
    out = merge(plan, tmp_path / "out")
    state, out_tokenizer = load_merged(out), AutoTokenizer.from_pretrained(out)
    row = out_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert state["lm_head.weight"].shape[0] == len(out_tokenizer) == 45
    torch.testing.assert_close(state["lm_head.weight"][row].double(),
                               merged["lm_head.weight"][tokenizer.convert_tokens_to_ids("<|im_end|>")].double(),
                               rtol=0, atol=1e-6)

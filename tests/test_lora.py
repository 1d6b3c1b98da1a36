"""LoRA adapters: the task vector is scale · B @ A on each target weight and zero elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

from builders import llama_config, llama_state, write_lora, write_model
from mergescope.checkpoints import CheckpointError, LoraCheckpoint, open_checkpoint

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture
def base(tmp_path):
    state = llama_state(seed=0)
    return state, write_model(tmp_path / "base", state, llama_config(), tokenizer_vocab=64)


def check_adapter(checkpoint, base_state, deltas):
    assert isinstance(checkpoint, LoraCheckpoint)
    for name, base_tensor in base_state.items():
        expected = deltas.get(name, torch.zeros_like(base_tensor, dtype=torch.float32))
        stored = checkpoint.stored_delta(name)
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6)
        merged_minus_base = checkpoint.read(name, torch.float32) - base_tensor.float()
        torch.testing.assert_close(merged_minus_base, expected, rtol=1e-4, atol=1e-5)
        if name not in deltas:
            assert torch.equal(checkpoint.read(name), base_tensor)


def test_adapter_names_its_base(tmp_path, base):
    state, base_dir = base
    deltas = write_lora(tmp_path / "lora", state, TARGETS, r=4, alpha=8, base_ref=str(base_dir))
    checkpoint = open_checkpoint(tmp_path / "lora")
    assert checkpoint.base.source == str(base_dir)
    assert checkpoint.name == "lora"
    check_adapter(checkpoint, state, deltas)
    assert checkpoint.config.architecture == "LlamaForCausalLM"
    assert checkpoint.tokenizer_fingerprint == checkpoint.base.tokenizer_fingerprint


def test_explicit_base_wins_over_named_base(tmp_path, base):
    state, base_dir = base
    deltas = write_lora(tmp_path / "lora", state, TARGETS, base_ref="org/not-available-offline")
    checkpoint = open_checkpoint(tmp_path / "lora", base=open_checkpoint(base_dir))
    check_adapter(checkpoint, state, deltas)


def test_rslora_alpha_pattern_and_embedding(tmp_path, base):
    state, base_dir = base
    deltas = write_lora(
        tmp_path / "lora", state, TARGETS, r=8, alpha=16, rslora=True, base_ref=str(base_dir),
        alpha_pattern={"down_proj": 4.0}, seed=7,
    )
    check_adapter(open_checkpoint(tmp_path / "lora"), state, deltas)
    deltas = write_lora(
        tmp_path / "emb", state, [], r=2, alpha=4, base_ref=str(base_dir), embedding="model.embed_tokens"
    )
    check_adapter(open_checkpoint(tmp_path / "emb"), state, deltas)


def test_fan_in_fan_out(tmp_path):
    state = {"transformer.h.0.attn.c_attn.weight": torch.randn(8, 24), "transformer.ln_f.weight": torch.ones(8)}
    base_dir = write_model(tmp_path / "gpt2", state)
    deltas = write_lora(
        tmp_path / "lora", state, ["transformer.h.0.attn.c_attn"], fan_in_fan_out=True, base_ref=str(base_dir)
    )
    check_adapter(open_checkpoint(tmp_path / "lora"), state, deltas)


def test_modules_to_save_replace_the_base_tensor(tmp_path, base):
    state, base_dir = base
    new_head = torch.randn(70, 16)  # a grown vocabulary
    write_lora(tmp_path / "lora", state, TARGETS, base_ref=str(base_dir), replaced={"lm_head.weight": new_head})
    checkpoint = open_checkpoint(tmp_path / "lora")
    assert checkpoint.spec("lm_head.weight").shape == (70, 16)
    assert torch.equal(checkpoint.read("lm_head.weight"), new_head)
    assert checkpoint.stored_delta("lm_head.weight") is None


def test_bf16_base_keeps_its_dtype(tmp_path):
    state = llama_state(dtype=torch.bfloat16)
    base_dir = write_model(tmp_path / "base", state)
    deltas = write_lora(tmp_path / "lora", state, TARGETS, base_ref=str(base_dir))
    checkpoint = open_checkpoint(tmp_path / "lora")
    name = TARGETS[0] + ".weight"
    merged = checkpoint.read(name)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (state[name].float() + deltas[name]).bfloat16())


def test_mergekit_plus_syntax(tmp_path, base):
    state, base_dir = base
    deltas = write_lora(tmp_path / "lora", state, TARGETS, base_ref=None)
    checkpoint = open_checkpoint(f"{base_dir}+{tmp_path / 'lora'}")
    assert checkpoint.name == "base+lora"
    check_adapter(checkpoint, state, deltas)


def test_adapter_for_another_model_is_refused(tmp_path, base):
    state, base_dir = base
    write_lora(tmp_path / "lora", state, TARGETS, base_ref=str(base_dir))
    other = write_model(tmp_path / "other", llama_state(llama_config(hidden=32, heads=4, kv_heads=2)))
    with pytest.raises(CheckpointError, match="is this the adapter's base model"):
        open_checkpoint(tmp_path / "lora", base=open_checkpoint(other))


def test_adapter_without_base(tmp_path, base):
    state, _ = base
    write_lora(tmp_path / "lora", state, TARGETS, base_ref=None)
    with pytest.raises(CheckpointError, match="does not name its base"):
        open_checkpoint(tmp_path / "lora")


def test_dora_is_refused_clearly(tmp_path, base):
    state, base_dir = base
    write_lora(tmp_path / "lora", state, TARGETS, base_ref=str(base_dir))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(tmp_path / "lora")

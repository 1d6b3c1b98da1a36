"""Layer groups for Llama-, GPT-2- and BERT-style names."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from builders import bert_state, gpt2_state, llama_state
from mergescope.checkpoints import group_tensors, layer_group, open_checkpoint


@pytest.mark.parametrize(
    "name, group",
    [
        ("model.layers.12.mlp.up_proj.weight", "model.layers.12"),
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0"),
        ("model.embed_tokens.weight", "model.embed_tokens"),
        ("model.norm.weight", "model.norm"),
        ("lm_head.weight", "lm_head"),
        ("transformer.h.5.attn.c_attn.weight", "transformer.h.5"),
        ("transformer.wte.weight", "transformer.wte"),
        ("bert.encoder.layer.3.attention.self.query.weight", "bert.encoder.layer.3"),
        ("bert.embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings"),
        ("encoder.block.7.layer.0.SelfAttention.q.weight", "encoder.block.7"),
        ("weight", "weight"),
        ("model.layers.3", "model.layers.3"),
    ],
)
def test_layer_group(name, group):
    assert layer_group(name) == group


def test_llama_groups_in_model_order(tmp_path):
    state = llama_state({**__import__("builders").llama_config(), "num_hidden_layers": 12})
    save_file(state, str(tmp_path / "m.safetensors"))
    groups = open_checkpoint(tmp_path / "m.safetensors").groups()
    assert list(groups) == ["model.embed_tokens", *(f"model.layers.{i}" for i in range(12)), "model.norm", "lm_head"]
    assert len(groups["model.layers.10"]) == 9
    assert sum(map(len, groups.values())) == len(state)


def test_gpt2_groups():
    groups = group_tensors(gpt2_state(layers=11))
    assert list(groups)[:2] == ["transformer.wpe", "transformer.wte"]
    assert list(groups)[2:13] == [f"transformer.h.{i}" for i in range(11)]
    assert list(groups)[-1] == "transformer.ln_f"


def test_bert_groups():
    groups = group_tensors(bert_state(layers=3))
    assert list(groups) == [
        "bert.embeddings.LayerNorm",
        "bert.embeddings.word_embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.encoder.layer.2",
        "bert.pooler.dense",
        "cls.predictions",
    ]
    assert groups["bert.encoder.layer.1"] == [
        "bert.encoder.layer.1.attention.output.dense.bias",
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.encoder.layer.1.output.LayerNorm.weight",
    ]

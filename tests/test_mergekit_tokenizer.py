"""mergescope against mergekit 0.1.5 on merges across vocabularies: a base, a plain fine-tune and two chat
fine-tunes that added tokens and resized their embeddings, all written by transformers (tests/hf_fixtures.py).

Both tools run the same plan; the outputs must have the same vocabulary (token strings and their added-token
settings), ``vocab_size``, tensors, and embedding/head rows compared **by token string**: mergekit orders the
new tokens of a union by iterating a Python ``set`` of models (hash order, which changes between processes), so
two runs of mergekit itself may number them differently; mergescope numbers them in plan order. Every plan
computes in float32 (``dtype: float32``), where mergekit's arithmetic equals ours to rounding — the bf16 family's
too: mergekit casts the inputs to float32 before it fills missing rows with means, and mergescope keeps those
means in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hf_fixtures as hf
import mergekit_reference as mk
from mergekit_reference import load_merged, mergekit_available
from test_mergekit_compat import mergescope_merge

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.skipif(not mergekit_available(), reason="no mergekit venv: python benchmarks/mergekit_env.py"),
]

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """float32 models, and the same family in bfloat16 (names prefixed with b)."""
    paths = {}
    for prefix, dtype in (("", torch.float32), ("b", torch.bfloat16)):
        root = tmp_path_factory.mktemp(f"mk-chat{prefix}")
        base = hf.write_llama_base(root / "base", dtype=dtype)
        paths.update({
            f"{prefix}base": str(base),
            f"{prefix}ft": str(hf.write_fine_tune(base, root / "ft", seed=1)),
            f"{prefix}chat": str(hf.write_chat_fine_tune(base, root / "chat", seed=2)),
            f"{prefix}chat2": str(hf.write_chat_fine_tune(base, root / "chat2", seed=3, pad="[PAD]",
                                                          chat_template=None)),
        })
    return paths


def cases(m: dict[str, str]) -> dict[str, dict]:
    three = [{"model": m["ft"], "parameters": {"weight": 1.0, "density": 0.5}},
             {"model": m["chat"], "parameters": {"weight": 0.7, "density": 0.5}},
             {"model": m["chat2"], "parameters": {"weight": 0.5, "density": 0.7}}]
    weighted = [{"model": e["model"], "parameters": {"weight": e["parameters"]["weight"]}} for e in three]
    return {
        "ties_union": {"merge_method": "ties", "base_model": m["base"], "models": three,
                       "tokenizer_source": "union", "dtype": "float32"},
        "linear_union": {"merge_method": "linear", "models": weighted, "tokenizer_source": "union",
                         "dtype": "float32", "chat_template": "auto"},
        "task_arithmetic_union": {"merge_method": "task_arithmetic", "base_model": m["base"], "models": weighted,
                                  "tokenizer_source": "union", "dtype": "float32"},
        "linear_base": {"merge_method": "linear", "base_model": m["base"], "models": weighted,
                        "parameters": {"weight": 1.0}, "tokenizer_source": "base", "dtype": "float32"},
        "ties_model": {"merge_method": "ties", "base_model": m["base"], "models": three[:2],
                       "tokenizer_source": m["chat"], "dtype": "float32"},
        # <|im_start|> is in the base (chat) and chat2 but not ft: ft gets the base's row, not the holders' mean
        "ties_union_chat_base": {"merge_method": "ties", "base_model": m["chat"], "models": [three[0], three[2]],
                                 "tokenizer_source": "union", "dtype": "float32"},
        # bf16 inputs, float32 arithmetic (dtype: float32): the holders' mean for <|im_start|> is not rounded.
        # density 1: trims of bf16 task vectors meet magnitude ties that mergekit breaks in an unstable order
        "bf16_ties_union": {"merge_method": "ties", "base_model": m["bbase"], "tokenizer_source": "union",
                            "models": [{"model": m[f"b{k}"], "parameters": {"weight": w, "density": 1.0}}
                                       for k, w in (("ft", 1.0), ("chat", 0.7), ("chat2", 0.5))],
                            "dtype": "float32"},
        "bf16_linear_padded": {"merge_method": "linear", "dtype": "float32",
                               "models": [{"model": m["bchat"], "parameters": {"weight": 0.3}},
                                          {"model": m["bchat2"], "parameters": {"weight": 0.7}}],
                               "tokenizer": {"source": "union", "pad_to_multiple_of": 32}},
        "linear_tokens": {"merge_method": "linear", "models": weighted[:2], "dtype": "float32",
                          "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
                              "<|im_start|>": {"source": {"kind": "zero"}},
                              "<|im_end|>": {"source": {"kind": "model_token", "model": m["chat"], "token": "</s>"},
                                             "force": True},
                              "<pad>": {"source": m["chat"]}}}},
    }


@pytest.fixture(scope="module")
def outputs(models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("mk-tokenizer-out")
    plans = cases(models)
    theirs = mk.run_mergekit_batch({name: (plan, root / f"mk-{name}") for name, plan in plans.items()})
    result = {}
    for name, plan in plans.items():
        if isinstance(theirs[name], Exception):
            raise theirs[name]
        result[name] = (mergescope_merge(plan, root / f"ms-{name}"), theirs[name])
    return result


def vocabulary(folder: Path) -> tuple[dict[str, int], dict[str, dict]]:
    document = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(document["model"]["vocab"])
    added = {e["content"]: {k: v for k, v in e.items() if k != "id"} for e in document["added_tokens"]}
    vocab.update({e["content"]: e["id"] for e in document["added_tokens"]})
    return vocab, added


@pytest.mark.parametrize("name", ["ties_union", "linear_union", "task_arithmetic_union", "linear_base", "ties_model",
                                  "ties_union_chat_base", "linear_tokens", "bf16_ties_union",
                                  "bf16_linear_padded"])
def test_matches_mergekit(outputs, name):
    ours_dir, theirs_dir = outputs[name]
    (ours_vocab, ours_added), (theirs_vocab, theirs_added) = vocabulary(ours_dir), vocabulary(theirs_dir)
    assert set(ours_vocab) == set(theirs_vocab)
    assert ours_added == theirs_added
    config = {d: json.loads((d / "config.json").read_text())["vocab_size"] for d in (ours_dir, theirs_dir)}
    assert config[ours_dir] == config[theirs_dir]
    ours, theirs = load_merged(ours_dir), load_merged(theirs_dir)
    assert set(ours) == set(theirs)
    for tensor in ours:
        assert ours[tensor].shape == theirs[tensor].shape, tensor
        if tensor in VOCAB_TENSORS:
            tokens = sorted(ours_vocab, key=ours_vocab.get)
            mine = ours[tensor][[ours_vocab[t] for t in tokens]]
            other = theirs[tensor][[theirs_vocab[t] for t in tokens]]
            torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6, msg=f"{name}: {tensor} rows by token")
            torch.testing.assert_close(ours[tensor][len(tokens):], theirs[tensor][len(tokens):], rtol=1e-5,
                                       atol=1e-6, msg=f"{name}: {tensor} padding rows")
        else:
            torch.testing.assert_close(ours[tensor], theirs[tensor], rtol=1e-5, atol=1e-6, msg=f"{name}: {tensor}")


def test_chat_template_auto_matches_mergekit(outputs):
    """``chat_template: auto`` picks chat's template in both; mergekit (transformers 5) writes chat_template.jinja,
    mergescope tokenizer_config.json: transformers loads the same template from either."""
    from transformers import AutoTokenizer

    ours_dir, theirs_dir = outputs["linear_union"]
    ours, theirs = AutoTokenizer.from_pretrained(ours_dir), AutoTokenizer.from_pretrained(theirs_dir)
    assert ours.chat_template == theirs.chat_template == hf.CHAT_TEMPLATE
    messages = [{"role": "user", "content": "w1 w2"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)

"""Tiny checkpoints for tests, written with the safetensors library itself (not with mergescope's writer),
so that reading them checks mergescope against an independent implementation of the format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_config(
    vocab: int = 64, hidden: int = 16, layers: int = 2, intermediate: int = 32, heads: int = 4, kv_heads: int = 2
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def llama_state(
    config: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict with Hugging Face tensor names and random weights."""
    c = config or llama_config()
    g = torch.Generator().manual_seed(seed)
    h, v, i = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dtype)

    state = {"model.embed_tokens.weight": rnd(v, h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        state.update({
            f"{p}.self_attn.q_proj.weight": rnd(h, h),
            f"{p}.self_attn.k_proj.weight": rnd(kv, h),
            f"{p}.self_attn.v_proj.weight": rnd(kv, h),
            f"{p}.self_attn.o_proj.weight": rnd(h, h),
            f"{p}.mlp.gate_proj.weight": rnd(i, h),
            f"{p}.mlp.up_proj.weight": rnd(i, h),
            f"{p}.mlp.down_proj.weight": rnd(h, i),
            f"{p}.input_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(dtype),
            f"{p}.post_attention_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(dtype),
        })
    state["model.norm.weight"] = torch.ones(h, dtype=dtype)
    state["lm_head.weight"] = rnd(v, h)
    return state


def gpt2_state(layers: int = 2, hidden: int = 8, vocab: int = 20) -> dict[str, torch.Tensor]:
    state = {"transformer.wte.weight": torch.randn(vocab, hidden), "transformer.wpe.weight": torch.randn(16, hidden)}
    for layer in range(layers):
        p = f"transformer.h.{layer}"
        state.update({
            f"{p}.ln_1.weight": torch.ones(hidden),
            f"{p}.attn.c_attn.weight": torch.randn(hidden, 3 * hidden),
            f"{p}.attn.c_attn.bias": torch.zeros(3 * hidden),
            f"{p}.attn.c_proj.weight": torch.randn(hidden, hidden),
            f"{p}.mlp.c_fc.weight": torch.randn(hidden, 4 * hidden),
        })
    state["transformer.ln_f.weight"] = torch.ones(hidden)
    return state


def bert_state(layers: int = 2, hidden: int = 8, vocab: int = 20) -> dict[str, torch.Tensor]:
    state = {
        "bert.embeddings.word_embeddings.weight": torch.randn(vocab, hidden),
        "bert.embeddings.LayerNorm.weight": torch.ones(hidden),
    }
    for layer in range(layers):
        p = f"bert.encoder.layer.{layer}"
        state.update({
            f"{p}.attention.self.query.weight": torch.randn(hidden, hidden),
            f"{p}.attention.output.dense.bias": torch.zeros(hidden),
            f"{p}.output.LayerNorm.weight": torch.ones(hidden),
        })
    state["bert.pooler.dense.weight"] = torch.randn(hidden, hidden)
    state["cls.predictions.bias"] = torch.zeros(vocab)
    return state


def write_tokenizer(folder: Path, vocab: int = 64, extra: str = "") -> None:
    tokens = {f"t{i}{extra}": i for i in range(vocab)}
    model = {"type": "WordLevel", "vocab": tokens, "unk_token": "t0"}
    tokenizer = {"version": "1.0", "model": model, "added_tokens": []}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_model(
    folder: Path, state: dict[str, torch.Tensor], config: dict | None = None, *, tokenizer_vocab: int | None = None
) -> Path:
    """``folder/model.safetensors`` (+ config.json, + tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_vocab is not None:
        write_tokenizer(folder, tokenizer_vocab)
    return folder


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int, config: dict | None = None) -> Path:
    """``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, tensors dealt round-robin."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for k in range(shards):
        filename = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[k::shards]}
        save_file(part, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_lora(
    folder: Path,
    base_state: dict[str, torch.Tensor],
    modules: list[str],
    *,
    r: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    base_ref: str | None = None,
    seed: int = 1,
    alpha_pattern: dict | None = None,
    fan_in_fan_out: bool = False,
    embedding: str | None = None,
    replaced: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a PEFT-layout adapter and return the task vector it encodes, computed here from its definition:
    ``Δ = (α / r) · B @ A`` (``α / √r`` for rsLoRA), transposed for fan_in_fan_out and for embeddings."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for module in modules:
        out, inner = base_state[f"{module}.weight"].shape
        if fan_in_fan_out:
            out, inner = inner, out
        a = torch.randn(r, inner, generator=g)
        b = torch.randn(out, r, generator=g)
        a_alpha = alpha
        for pattern, value in (alpha_pattern or {}).items():
            if module.endswith(pattern):
                a_alpha = value
        scale = a_alpha / math.sqrt(r) if rslora else a_alpha / r
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        delta = scale * (b.double() @ a.double())
        deltas[f"{module}.weight"] = (delta.T if fan_in_fan_out else delta).float()
    if embedding is not None:
        vocab, hidden = base_state[f"{embedding}.weight"].shape
        a = torch.randn(r, vocab, generator=g)
        b = torch.randn(hidden, r, generator=g)
        tensors[f"base_model.model.{embedding}.lora_embedding_A"] = a
        tensors[f"base_model.model.{embedding}.lora_embedding_B"] = b
        deltas[f"{embedding}.weight"] = ((alpha / r) * (b.double() @ a.double())).T.float()
    for name, tensor in (replaced or {}).items():
        tensors[f"base_model.model.{name}"] = tensor
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "fan_in_fan_out": fan_in_fan_out,
        "base_model_name_or_path": base_ref,
        "alpha_pattern": alpha_pattern or {},
        "rank_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return deltas

"""Tiny models of the seven common architectures, written by ``transformers``' own ``save_pretrained`` (sharded,
bfloat16) with LoRA adapters written by ``peft`` itself: the checkpoints users actually hold.

:func:`write_family` writes, for one architecture, ``base/`` (sharded through ``max_shard_size``), two full
fine-tunes ``ft_a/`` and ``ft_b/`` (every weight moved by a small relative amount, as training does), and a
PEFT LoRA adapter ``lora/`` over the base (non-zero B, so its task vector is not zero). Tokenizers are the
offline WordLevel one of :mod:`hf_fixtures`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import hf_fixtures as hf

VOCAB = 43  # hf_fixtures.base_tokenizer()


@dataclass(frozen=True)
class Architecture:
    name: str
    config: str  # transformers config class
    kwargs: dict
    lora_targets: tuple[str, ...]
    tied: bool = False


_SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 64, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}

ARCHITECTURES = {
    a.name: a for a in [
        Architecture("llama", "LlamaConfig", {**_SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True},
                     ("q_proj", "v_proj", "down_proj"), tied=True),
        Architecture("qwen2", "Qwen2Config", {**_SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False},
                     ("q_proj", "k_proj", "gate_proj")),
        Architecture("mistral", "MistralConfig", {**_SMALL, "num_key_value_heads": 2, "sliding_window": 32},
                     ("q_proj", "o_proj", "up_proj")),
        Architecture("gemma2", "Gemma2Config", {**_SMALL, "num_key_value_heads": 2, "head_dim": 4,
                                                "sliding_window": 32, "pad_token_id": 0},
                     ("q_proj", "v_proj", "down_proj"), tied=True),
        Architecture("phi3", "Phi3Config", {**_SMALL, "num_key_value_heads": 4, "pad_token_id": 0,
                                            "tie_word_embeddings": False},
                     ("qkv_proj", "gate_up_proj", "o_proj")),
        Architecture("mixtral", "MixtralConfig", {**_SMALL, "num_key_value_heads": 2, "num_local_experts": 4,
                                                  "num_experts_per_tok": 2},
                     ("q_proj", "v_proj")),
        Architecture("gpt2", "GPT2Config", {"n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64,
                                            "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2},
                     ("c_attn", "c_fc"), tied=True),
    ]
}


def make_config(arch: Architecture):
    import transformers

    return getattr(transformers, arch.config)(**arch.kwargs)


def write_family(arch: Architecture, root: Path, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """base (sharded), ft_a, ft_b and a LoRA adapter ``lora`` of one architecture under ``root``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = hf.base_tokenizer()
    base = AutoModelForCausalLM.from_config(make_config(arch)).to(dtype)
    _randomize(base, seed=100)  # transformers initialises some weights to constants (norms, biases)
    paths = {"base": root / "base", "ft_a": root / "ft_a", "ft_b": root / "ft_b", "lora": root / "lora"}
    base.save_pretrained(paths["base"], max_shard_size="8KB")
    tokenizer.save_pretrained(paths["base"])
    for seed, name in ((1, "ft_a"), (2, "ft_b")):
        tuned = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype)
        hf._perturb(tuned, seed)
        tuned.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(arch.lora_targets),
                                            fan_in_fan_out=arch.name == "gpt2"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: a fresh adapter changes nothing
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    lora.save_pretrained(paths["lora"])
    return paths


def _randomize(model, seed: int) -> None:
    """Every parameter a random value of its own scale (norm weights near 1, biases small), so that no two
    parameters are equal by construction and every method has something to merge."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1 and ("norm" in name or "ln_" in name) and "bias" not in name:
                value = 1 + 0.1 * noise
            elif parameter.ndim == 1:
                value = 0.02 * noise
            else:
                value = noise / parameter.shape[-1] ** 0.5
            parameter.copy_(value.to(parameter.dtype))

"""Checkpoints as users have them: written by ``transformers``' own ``save_pretrained`` (never by mergescope or
raw safetensors calls), with tokenizers built offline — a tiny WordLevel ``tokenizers.Tokenizer`` wrapped in
``PreTrainedTokenizerFast`` — so a chat fine-tune can add ``<|im_start|>``, ``<|im_end|>`` and a pad token and
resize its embeddings exactly as a user's training script does.

* :func:`base_tokenizer`: 40 ordinary words plus ``<s>``, ``</s>``, ``<unk>``.
* :func:`write_llama_base`: a tiny Llama (GQA) with that tokenizer.
* :func:`write_chat_fine_tune`: the base, perturbed, with chat tokens added and the embeddings resized.
* :func:`write_fine_tune`: the base, perturbed, same vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def base_tokenizer():
    """A fast tokenizer over :data:`WORDS` (whitespace split) with bos ``<s>``, eos ``</s>``, unk ``<unk>``."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama_config(vocab: int, *, tied: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2, dtype=dtype,
    )


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    """A stand-in for training: every weight moved by Gaussian noise of ``scale`` × its tensor's RMS (a fine-tune's
    relative change is 0.001–0.05)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, parameter in sorted(model.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            rms = parameter.float().pow(2).mean().sqrt()
            parameter.add_((scale * rms * noise).to(parameter.dtype))


def write_llama_base(folder: Path, *, seed: int = 0, tied: bool = False, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = base_tokenizer()
    model = LlamaForCausalLM(llama_config(len(tokenizer), tied=tied)).to(dtype)
    _save(model, tokenizer, folder, max_shard_size)
    return folder


def _save(model, tokenizer, folder: Path, max_shard_size: str | None) -> None:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def write_fine_tune(base: Path, folder: Path, *, seed: int) -> Path:
    """The base with every weight moved by N(0, 0.02²) noise; same tokenizer."""
    model, tokenizer = _load(base)
    _perturb(model, seed)
    _save(model, tokenizer, folder, None)
    return folder


def write_chat_fine_tune(base: Path, folder: Path, *, seed: int, pad: str = "<pad>",
                         chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A chat fine-tune as users make them: ``<|im_start|>``, ``<|im_end|>`` as additional special tokens and a
    pad token added, ``resize_token_embeddings``, then trained (here: noise on every weight, new rows included)."""
    model, tokenizer = _load(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "pad_token": pad})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model.resize_token_embeddings(len(tokenizer))
    _perturb(model, seed)
    _save(model, tokenizer, folder, None)
    return folder


def write_reordered(source: Path, folder: Path, swap: tuple[str, str] = ("w0", "w1")) -> Path:
    """``source`` with two ordinary tokens' ids swapped in its tokenizer and their embedding and head rows swapped
    to match: the same model token by token, different row by row."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    document = json.loads((folder / "tokenizer.json").read_text())
    vocab = document["model"]["vocab"]
    a, b = vocab[swap[0]], vocab[swap[1]]
    vocab[swap[0]], vocab[swap[1]] = b, a
    (folder / "tokenizer.json").write_text(json.dumps(document))
    state = load_file(str(folder / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            rows = state[name].clone()
            rows[[a, b]] = rows[[b, a]]
            state[name] = rows
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder

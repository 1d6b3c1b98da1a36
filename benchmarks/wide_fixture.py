"""A Llama-3-8B-wide bf16 base and fine-tunes: real-vocabulary embeddings and head, full-size decoder layers.

    python benchmarks/wide_fixture.py [--fine-tunes 8] [--layers 2] [--vocab 128256] [--root DIR]

Shape (Llama 3 8B's widths): vocabulary 128256, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, untied
``lm_head``; ``--layers`` decoder layers (default 2). At 2 layers a model holds 1.49B parameters, 2.97 GB in
bf16: the 128256 × 4096 embeddings and head (525M entries each) and two layers of 218M. Each model is one
folder with Hugging Face Llama tensor names, a ``config.json`` and shards of at most 2 GB with an index.

The fine-tunes are ``bf16(θ₀ + τ_k)`` with τ_k = 0.01 · rms(θ₀) · (0.6 S + 0.8 U_k): S shared by all
fine-tunes, U_k private (unit-variance normal draws), so task vectors have cosines of about 0.36 and are
quantised by the bf16 rounding as real fine-tunes are (ties at a TIES threshold included).

Generated block by block (seeded per tensor, block and component, so every build is byte-identical) and
written with mergescope's row writer: memory stays near 1 GB whatever the width. 2 cores: about 30 s per
model. The folder (``bench-out/llama3-wide`` by default, git-ignored) is never committed; delete it when
done (``rm -rf bench-out/llama3-wide``): base + 8 fine-tunes take 27 GB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch

from mergescope.checkpoints import CheckpointWriter, TensorSpec

BENCH_OUT = Path(__file__).resolve().parent.parent / "bench-out"
VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 128256, 4096, 14336, 32, 8
#: rows generated at once (of 4096 entries: 32 MB of float32 per component)
BLOCK_ROWS = 2048


def default_root() -> Path:
    return BENCH_OUT / "llama3-wide"


def config(layers: int, vocab: int = VOCAB) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def tensor_shapes(layers: int, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN * KV_HEADS // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj.weight": (kv, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (kv, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def _draw(name: str, start: int, component: str, shape: tuple[int, ...]) -> torch.Tensor:
    seed = zlib.crc32(f"{name}:{start}:{component}".encode())
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rows_of(model: int, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of model ``model``'s tensor ``name`` (0 the base, k ≥ 1 fine-tune k), bf16."""
    block = (stop - start, *shape[1:])
    if len(shape) == 1:
        base = 1 + 0.1 * _draw(name, start, "base", block)
    else:
        base = _draw(name, start, "base", block).mul_(shape[-1] ** -0.5)
    if model == 0:
        return base.to(torch.bfloat16)
    scale = 0.01 * (1.0 if len(shape) == 1 else shape[-1] ** -0.5)
    tau = _draw(name, start, "shared", block).mul_(0.6).add_(_draw(name, start, f"u{model}", block), alpha=0.8)
    return base.to(torch.bfloat16).float().add_(tau.mul_(scale)).to(torch.bfloat16)


def write_model(folder: Path, model: int, layers: int, vocab: int = VOCAB) -> None:
    shapes = tensor_shapes(layers, vocab)
    specs = [TensorSpec(name, "BF16", shape) for name, shape in shapes.items()]
    with CheckpointWriter(folder, specs, max_shard_bytes=2_000_000_000) as writer:
        for name, shape in shapes.items():
            for start in range(0, shape[0], BLOCK_ROWS):
                stop = min(start + BLOCK_ROWS, shape[0])
                writer.write_rows(name, start, rows_of(model, name, shape, start, stop))
        writer.add_text("config.json", json.dumps(config(layers, vocab), indent=2) + "\n")
        writer.commit()


def model_names(fine_tunes: int) -> list[str]:
    return ["base", *(f"ft_{k}" for k in range(1, fine_tunes + 1))]


def build(root: Path, fine_tunes: int, layers: int = 2, vocab: int = VOCAB) -> dict[str, Path]:
    """Write the models of ``root`` not yet there; return every model's folder."""
    torch.set_num_threads(1)
    paths = {}
    for index, name in enumerate(model_names(fine_tunes)):
        folder = root / name
        paths[name] = folder
        if (folder / "config.json").exists():
            continue
        began = time.perf_counter()
        write_model(folder, index, layers, vocab)
        print(f"{folder}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fine-tunes", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=VOCAB, help="rows of the embeddings and head")
    parser.add_argument("--root", type=Path, default=default_root())
    args = parser.parse_args(argv)
    build(args.root, args.fine_tunes, args.layers, args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())

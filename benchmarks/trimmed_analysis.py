"""Peak RSS of ``mergescope analyze --density 0.5`` as the vocabulary grows, against the untrimmed analysis.

    python benchmarks/trimmed_analysis.py [--vocab 32000 64000] [--budget 1GB] [--root DIR]

Builds, per vocabulary size V, a bf16 base and two fine-tunes (θ₀ + 0.01·N(0, 1), rounded to bf16) holding a
V × 4096 ``model.embed_tokens.weight`` and ``lm_head.weight`` (V = 64000: 1 GB per model), then runs the CLI
``mergescope analyze BASE FT1 FT2 --density 0.5 --memory-budget B --device cpu --no-cache`` and the same
without ``--density`` (the floor: the untrimmed streaming pass) in child processes, and prints each one's
wall time and peak RSS (the child's ``ru_maxrss``) and the trimmed/untrimmed ratios. With the trim streamed
(``analysis/trim_pass.py``) the trimmed peak stays flat as V doubles; when the trim read tensors whole it
grew with V. The models go under ``bench-out/trimmed-analysis`` (git-ignored); delete them when done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

BENCH_OUT = Path(__file__).resolve().parent.parent / "bench-out" / "trimmed-analysis"
HIDDEN = 4096


def build(root: Path, vocab: int) -> list[Path]:
    """The base and two fine-tunes of vocabulary ``vocab`` under ``root`` (kept when already there)."""
    folders = [root / name for name in ("base", "ft1", "ft2")]
    if all((folder / "model.safetensors").exists() for folder in folders):
        return folders
    g = torch.Generator().manual_seed(vocab)
    base = {name: torch.randn(vocab, HIDDEN, generator=g).to(torch.bfloat16)
            for name in ("model.embed_tokens.weight", "lm_head.weight")}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": HIDDEN, "num_hidden_layers": 0, "num_attention_heads": 32, "num_key_value_heads": 8,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    for k, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        tensors = base if k == 0 else {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
                                       for n, t in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    return folders


def measure(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of ``mergescope`` run with ``args`` in a child process."""
    start = time.perf_counter()
    code = "import sys; from mergescope.tui.cli.main import main; sys.exit(main(sys.argv[1:]))"
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"mergescope {' '.join(args)} failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 64000])
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--root", type=Path, default=BENCH_OUT)
    options = parser.parse_args()
    print(f"{'vocab':>7}  {'untrimmed':>18}  {'density 0.5':>18}  ratio (time, RSS)")
    for vocab in options.vocab:
        base, *tuned = build(options.root / f"v{vocab}", vocab)
        common = ["analyze", str(base), *map(str, tuned), "--memory-budget", options.budget, "--device", "cpu",
                  "--no-cache", "--json", str(options.root / f"v{vocab}.json")]
        floor_s, floor_gb = measure(common)
        trim_s, trim_gb = measure([*common, "--density", "0.5"])
        print(f"{vocab:>7}  {floor_s:6.1f} s {floor_gb:6.2f} GB  {trim_s:6.1f} s {trim_gb:6.2f} GB  "
              f"{trim_s / floor_s:.2f}×, {trim_gb / floor_gb:.2f}×")


if __name__ == "__main__":
    main()

"""A Llama-shaped ~267M-parameter bf16 base and three bf16 fine-tunes of it, for benchmarks.

Run as a script it builds the fixture (``python benchmarks/llama_fixture.py [--scale S] [--root DIR]``);
imported, :func:`build` returns the four model folders, building them first when needed::

    from llama_fixture import build, default_root
    paths = build(default_root())          # {"base": ..., "ft_a": ..., "ft_b": ..., "ft_c": ...}

Every model is a folder with Hugging Face Llama tensor names, a ``config.json``, two shards written with
``safetensors.torch.save_file`` (metadata ``{"format": "pt"}``) and ``model.safetensors.index.json``.

Full size (``scale=1``): vocab 32000, hidden 1024, intermediate 3072, 16 layers, 16 heads, 8 KV heads,
untied ``lm_head``: 266.9M parameters, 534 MB per model. ``scale`` makes it smaller for quick runs and
tests: fewer layers and a smaller vocabulary (and, below 1/16, a narrower model), roughly ``scale`` times
the parameters.

The task vectors (fine-tune minus base) are built, per tensor, from five nearly orthogonal unit-RMS
components: ``S`` shared by all three fine-tunes (partly low-rank), ``P`` shared by ``ft_a`` and
``ft_b`` but entering ``ft_c`` with the opposite sign (a sign conflict), and one private component per
fine-tune whose rows have log-normal scales (heavy-ish tails)::

    ft_a =  0.55 S + 0.45 P + 0.70 U_a      ||tau|| / ||W|| before rounding: 0.7 %
    ft_b =  0.55 S + 0.25 P + 0.80 U_b                                       1.1 %
    ft_c =  0.35 S - 0.60 P + 0.72 U_c                                       2.0 %

giving cosines of about +0.42 (a, b), -0.08 (a, c), +0.04 (b, c). The relative size also varies per tensor
(x0.7 to x1.4: deeper layers change more, embeddings less). Every fine-tune is rounded to bf16 like a
real bf16 fine-tune, so the *stored* task vectors are quantised: a good share of elements is unchanged
(about a quarter for ft_a at full size) and the realised relative norms come out at about 0.70 %, 1.08 %
and 1.95 % at full size (cosines +0.40, -0.08, +0.04; 17 % of elements have opposite signs in ft_a and
ft_b and 36 % in ft_a and ft_c; among the elements both changed, 27 % and 54 %). Smaller scales come out
a little lower.
The realised statistics (per fine-tune relative norm, pairwise cosines, sign-conflict and unchanged
fractions) are measured while building and saved in ``<root>/fixture.json``; :func:`load_manifest`
reads them back for benchmarks that want to check an analysis against them.

Everything is seeded per tensor and per component (from the tensor's name), so the fixture is the same
on every machine and every run (the files are byte-identical between builds). Building works one
shard at a time, so it holds one shard of each of the four models (~1.1 GB at full size) plus one
tensor's float32 temporaries: peak RSS about 2.6 GB, about 25 s on 2 cores, 2.1 GB on disk. The folder
is built beside ``root`` and renamed into place, with ``fixture.json`` written last: a folder with a
``fixture.json`` for the same version and shape is complete, and :func:`build` returns it at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

#: bump when the generated contents change, so stale fixtures are rebuilt
FIXTURE_VERSION = 2
SEED = 20241125
MODELS = ("base", "ft_a", "ft_b", "ft_c")
FINETUNES = MODELS[1:]
MARKER = "fixture.json"
INDEX_NAME = "model.safetensors.index.json"
NUM_SHARDS = 2

#: the repository's benchmarks output folder (gitignored)
BENCH_OUT = Path(__file__).resolve().parent.parent / "bench-out"

#: task-vector mixture per fine-tune: coefficients of (S, P, own U) and the target relative norm
MIXTURE: dict[str, dict[str, float]] = {
    "ft_a": {"S": 0.55, "P": 0.45, "U": 0.70, "rel": 0.007},
    "ft_b": {"S": 0.55, "P": 0.25, "U": 0.80, "rel": 0.011},
    "ft_c": {"S": 0.35, "P": -0.60, "U": 0.72, "rel": 0.020},
}
SHARED_RANK = 8


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 32000
    hidden: int = 1024
    intermediate: int = 3072
    layers: int = 16
    heads: int = 16
    kv_heads: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict:
        """A ``config.json`` for ``LlamaForCausalLM`` with this shape."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": 0.02,
            "torch_dtype": "bfloat16",
        }

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor's Hugging Face name and shape, in model order."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            shapes += [
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
            ]
        shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensor_shapes())

    @property
    def num_bytes(self) -> int:
        """Bytes of tensor data per model (bf16)."""
        return 2 * self.num_parameters


def shape_for_scale(scale: float = 1.0) -> LlamaShape:
    """The fixture's shape at ``scale``: about ``scale`` times the full model's parameters.

    Layers and vocabulary shrink with ``scale``; below 1/16 (one layer) the width shrinks too, keeping
    64-wide heads and KV heads at half the heads.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    full = LlamaShape()
    if scale == 1:
        return full
    layers = max(1, round(full.layers * scale))
    vocab = max(256, 64 * round(full.vocab * scale / 64))
    width = min(1.0, math.sqrt(full.layers * scale))
    hidden = max(128, 64 * round(full.hidden * width / 64))
    heads = hidden // 64
    return LlamaShape(vocab, hidden, 3 * hidden, layers, heads, max(1, heads // 2))


def default_root(scale: float = 1.0) -> Path:
    """``bench-out/llama270m`` at full size, ``bench-out/llama270m-scale0.1`` and so on otherwise."""
    return BENCH_OUT / ("llama270m" if scale == 1 else f"llama270m-scale{scale:g}")


def model_paths(root: Path) -> dict[str, Path]:
    return {m: Path(root) / m for m in MODELS}


def load_manifest(root: Path) -> dict | None:
    """The fixture's ``fixture.json`` (shape, targets, realised task-vector statistics), or None."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(root: Path, shape: LlamaShape) -> bool:
    manifest = load_manifest(root)
    if not manifest or manifest.get("version") != FIXTURE_VERSION or manifest.get("shape") != asdict(shape):
        return False
    for path in model_paths(root).values():
        if not (path / INDEX_NAME).is_file() or not (path / "config.json").is_file():
            return False
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            return False
        if not all((path / shard).is_file() for shard in set(weight_map.values())):
            return False
    return True


# --- generation ---------------------------------------------------------------------------------------

def _generator(name: str, component: str) -> torch.Generator:
    digest = hashlib.sha256(f"{SEED}|{FIXTURE_VERSION}|{name}|{component}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _randn(shape: tuple[int, ...], name: str, component: str) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(name, component), dtype=torch.float32)


def _unit_rms(t: torch.Tensor) -> torch.Tensor:
    return t.mul_(1.0 / max(t.pow(2).mean().sqrt().item(), 1e-30))


def _row_scales(shape: tuple[int, ...], name: str, component: str, sigma: float) -> torch.Tensor:
    """Log-normal per-output-row scales (broadcastable to ``shape``); all ones for 1-D tensors."""
    if len(shape) < 2:
        return torch.ones(())
    return torch.exp(sigma * _randn((shape[0], 1), name, component))


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights: around 1, some spread
        return 1.0 + 0.1 * _randn(shape, name, "base")
    fan_in = shape[1]
    std = 0.02 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
    w = _randn(shape, name, "base").mul_(std)
    return w.mul_(_row_scales(shape, name, "base-rows", 0.25))


def _depth_factor(name: str, layers: int) -> float:
    """How much this tensor changes relative to the fine-tune's target: deeper layers more, embeddings less."""
    if "embed_tokens" in name or "lm_head" in name:
        return 0.8
    parts = name.split(".")
    if "layers" in parts:
        depth = int(parts[parts.index("layers") + 1]) / max(1, layers - 1)
        jitter = 0.9 + 0.2 * torch.rand((), generator=_generator(name, "jitter")).item()
        return (0.75 + 0.5 * depth) * jitter
    return 1.0


def _shared_component(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    dense = _unit_rms(_randn(shape, name, "S"))
    if len(shape) < 2:
        return dense
    rank = min(SHARED_RANK, *shape)
    low = _randn((shape[0], rank), name, "S-left") @ _randn((rank, shape[1]), name, "S-right")
    return _unit_rms(dense.mul_(0.8).add_(_unit_rms(low), alpha=0.6))


def generate_tensor(name: str, shape: tuple[int, ...], layers: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The base tensor and each fine-tune's tensor, all bf16, for tensor ``name`` of ``shape``."""
    w = _base_tensor(name, shape)
    base = w.to(torch.bfloat16)
    del w
    base32 = base.float()
    scale_w = base32.pow(2).mean().sqrt().item()  # RMS of the weight: tau's RMS is rel * this
    depth = _depth_factor(name, layers)
    S = _shared_component(name, shape)
    P = _unit_rms(_randn(shape, name, "P"))
    fts: dict[str, torch.Tensor] = {}
    for ft, mix in MIXTURE.items():
        U = _unit_rms(_randn(shape, name, f"U-{ft}").mul_(_row_scales(shape, name, f"U-{ft}-rows", 0.5)))
        norm = math.sqrt(mix["S"] ** 2 + mix["P"] ** 2 + mix["U"] ** 2)
        tau = U.mul_(mix["U"]).add_(S, alpha=mix["S"]).add_(P, alpha=mix["P"])
        tau.mul_(mix["rel"] * depth * scale_w / norm)
        fts[ft] = tau.add_(base32).to(torch.bfloat16)
        del tau, U
    return base, fts


class _Stats:
    """Running sums for the realised (after bf16 rounding) task-vector statistics."""

    def __init__(self) -> None:
        self.base_sq = 0.0
        self.sq = dict.fromkeys(FINETUNES, 0.0)
        self.dot = {(a, b): 0.0 for i, a in enumerate(FINETUNES) for b in FINETUNES[i + 1:]}
        self.conflicts = dict.fromkeys(self.dot, 0)
        self.both_changed = dict.fromkeys(self.dot, 0)
        self.unchanged = dict.fromkeys(FINETUNES, 0)
        self.numel = 0

    def add(self, base: torch.Tensor, fts: dict[str, torch.Tensor]) -> None:
        # bf16 differences are exact in float32; sums are accumulated in float64
        b = base.float().reshape(-1)
        self.base_sq += b.pow(2).sum(dtype=torch.float64).item()
        deltas = {ft: t.float().reshape(-1).sub_(b) for ft, t in fts.items()}
        for ft, d in deltas.items():
            self.sq[ft] += d.pow(2).sum(dtype=torch.float64).item()
            self.unchanged[ft] += int((d == 0).sum().item())
        for a, c in self.dot:
            prod = deltas[a] * deltas[c]
            self.dot[(a, c)] += prod.sum(dtype=torch.float64).item()
            self.conflicts[(a, c)] += int((prod < 0).sum().item())
            self.both_changed[(a, c)] += int(((deltas[a] != 0) & (deltas[c] != 0)).sum().item())
        self.numel += base.numel()

    def summary(self) -> dict:
        return {
            "relative_norm": {ft: math.sqrt(self.sq[ft] / self.base_sq) for ft in FINETUNES},
            "cosine": {f"{a}|{b}": v / math.sqrt(self.sq[a] * self.sq[b]) for (a, b), v in self.dot.items()},
            "sign_conflict_fraction": {f"{a}|{b}": v / self.numel for (a, b), v in self.conflicts.items()},
            # the analysis' sign_conflict: opposite signs among the elements both fine-tunes changed
            "sign_conflict_rate": {f"{a}|{b}": v / self.both_changed[(a, b)] for (a, b), v in self.conflicts.items()},
            "unchanged_fraction": {ft: v / self.numel for ft, v in self.unchanged.items()},
        }


def _split_shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive runs of tensors, balanced by bytes, ``NUM_SHARDS`` of them."""
    total = sum(math.prod(s) for _, s in shapes)
    shards: list[list] = [[] for _ in range(NUM_SHARDS)]
    done = 0
    for name, shape in shapes:
        index = min(NUM_SHARDS - 1, int(NUM_SHARDS * done / total))
        shards[index].append((name, shape))
        done += math.prod(shape)
    return [s for s in shards if s]


def build(root: Path | str | None = None, *, scale: float = 1.0, quiet: bool = False) -> dict[str, Path]:
    """Build the fixture into ``root`` unless it is already complete; return each model's folder.

    ``root`` defaults to :func:`default_root` for ``scale``. A folder holding a different or unfinished
    fixture is replaced.
    """
    shape = shape_for_scale(scale)
    root = Path(root) if root is not None else default_root(scale)
    if is_complete(root, shape):
        return model_paths(root)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"building {root}: {shape.num_parameters / 1e6:.1f}M parameters x 4 models "
        f"({4 * shape.num_bytes / 1e9:.2f} GB) ...")
    started = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        paths = model_paths(tmp)
        for path in paths.values():
            path.mkdir(parents=True)
            (path / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        shards = _split_shards(shape.tensor_shapes())
        filenames = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map: dict[str, str] = {}
        stats = _Stats()
        done_tensors = 0
        total_tensors = sum(len(s) for s in shards)
        for filename, run in zip(filenames, shards):
            state: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODELS}
            for name, tshape in run:
                base, fts = generate_tensor(name, tshape, shape.layers)
                stats.add(base, fts)
                state["base"][name] = base
                for ft, t in fts.items():
                    state[ft][name] = t
                weight_map[name] = filename
                done_tensors += 1
                if not quiet and (done_tensors % 20 == 0 or done_tensors == total_tensors):
                    say(f"  {done_tensors}/{total_tensors} tensors  {time.perf_counter() - started:.0f}s")
            for model in MODELS:
                save_file(state[model], str(paths[model] / filename), metadata={"format": "pt"})
                os.chmod(paths[model] / filename, 0o644)  # save_file leaves 0600
            del state
        index = {
            "metadata": {"total_size": shape.num_bytes},
            "weight_map": {n: weight_map[n] for n in sorted(weight_map)},
        }
        for path in paths.values():
            (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        manifest = {
            "version": FIXTURE_VERSION,
            "seed": SEED,
            "scale": scale,
            "shape": asdict(shape),
            "num_parameters": shape.num_parameters,
            "bytes_per_model": shape.num_bytes,
            "mixture": MIXTURE,
            "realised": stats.summary(),
        }
        if root.exists():
            shutil.rmtree(root)
        (tmp / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"built {root} in {time.perf_counter() - started:.1f}s")
    return model_paths(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full ~267M size (default 1)")
    parser.add_argument("--root", type=Path, default=None, help="output folder (default bench-out/llama270m[-scaleS])")
    args = parser.parse_args(argv)
    paths = build(args.root, scale=args.scale)
    root = next(iter(paths.values())).parent
    manifest = load_manifest(root) or {}
    print(f"{root}: {manifest.get('num_parameters', 0) / 1e6:.1f}M parameters per model, shape {manifest.get('shape')}")
    realised = manifest.get("realised", {})
    for key, values in realised.items():
        print(f"  {key:24s} " + "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
    for model, path in paths.items():
        print(f"  {model:5s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

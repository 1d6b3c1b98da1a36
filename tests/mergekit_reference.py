"""mergekit 0.1.5 as a reference implementation, for the compatibility suite (tests/test_mergekit_compat.py).

mergekit runs in its own venv (``REPO/.mergekit-venv``, built by ``python benchmarks/mergekit_env.py``;
``$MERGESCOPE_MERGEKIT_VENV`` overrides the place). Nothing here imports mergekit: it is run as a
program, so this module needs only torch, safetensors and PyYAML, and tests skip cleanly when the venv
is missing (:func:`mergekit_available`).

* :func:`run_mergekit` runs ``mergekit-yaml`` once, in a subprocess, with :data:`MERGEKIT_FLAGS`.
* :func:`run_mergekit_batch` runs many configs in one process (one ~4 s import of transformers and peft
  instead of one per config) by calling the same click command ``mergekit-yaml`` runs, with the same
  arguments; the suite checks that both give byte-identical weights.
* :func:`load_merged`, :func:`assert_tensors_close`: read a merged folder, compare two state dicts.
* :func:`fixture_states`, :func:`write_fixture`: a tiny Llama base and three fine-tunes of it, float32
  or bfloat16, with small, partly shared and partly conflicting task vectors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import textwrap
import zlib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from builders import llama_config, llama_state

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_VENV = Path(os.environ.get("MERGESCOPE_MERGEKIT_VENV", REPO / ".mergekit-venv"))

# Every run: arithmetic on the CPU; no tokenizer (the fixtures have none, and mergekit would otherwise
# try AutoTokenizer on the donor model and log an error); quiet. Safetensors inputs are always read
# lazily, tensor by tensor (--lazy-unpickle only concerns pickled .bin checkpoints). mergekit still
# writes config.json, README.md (model card) and mergekit_config.yml next to the weights.
MERGEKIT_FLAGS: tuple[str, ...] = ("--device", "cpu", "--no-copy-tokenizer", "--quiet")
DEFAULT_TIMEOUT = 180.0


class MergekitError(RuntimeError):
    """mergekit-yaml exited with an error (the message ends with its stderr)."""


# --------------------------------------------------------------------------------------------------
# The venv


def mergekit_exe(venv: Path = MERGEKIT_VENV) -> Path:
    return venv / "bin" / "mergekit-yaml"


def _env_module():
    spec = importlib.util.spec_from_file_location("_mergekit_env", REPO / "benchmarks" / "mergekit_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def mergekit_available(venv: Path = MERGEKIT_VENV) -> bool:
    """The mergekit venv exists, was built and smoke-tested by benchmarks/mergekit_env.py with the
    current pins (its marker file), and its interpreter still starts. Cheap: no mergekit import."""
    try:
        if not _env_module().venv_is_ready(venv):
            return False
        python = venv / "bin" / "python"
        return subprocess.run([str(python), "-c", "import sys"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # nothing from the caller's environment leaks into mergekit's
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


# --------------------------------------------------------------------------------------------------
# Running mergekit


def write_config(config: Mapping, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return path


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _config_path(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.mergekit.yml"


def run_mergekit(config: Mapping, out_dir: Path, *, extra_args: Sequence[str] = (), seed: int | None = 0,
                 timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Run ``mergekit-yaml CONFIG OUT --device cpu --no-copy-tokenizer --quiet [--random-seed S] EXTRA``.

    The config is written as YAML next to ``out_dir`` (``<out>.mergekit.yml``). Returns ``out_dir``;
    raises :class:`MergekitError` with mergekit's stderr when it fails or times out.
    """
    out_dir = Path(out_dir)
    config_file = write_config(config, _config_path(out_dir))
    args = [str(mergekit_exe()), str(config_file), str(out_dir), *MERGEKIT_FLAGS, *_seed_args(seed), *extra_args]
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_subprocess_env())
    except subprocess.TimeoutExpired as exc:
        raise MergekitError(
            f"mergekit-yaml timed out after {timeout:.0f} s: {' '.join(args)}\n{exc.stderr or ''}"
        ) from exc
    if result.returncode != 0:
        raise MergekitError(f"mergekit-yaml failed ({result.returncode}): {' '.join(args)}\n{result.stderr[-6000:]}")
    return out_dir


def _seed_args(seed: int | None) -> list[str]:
    return [] if seed is None else ["--random-seed", str(seed)]


_BATCH_DRIVER = textwrap.dedent(
    """
    import json, sys, traceback
    from mergekit.scripts.run_yaml import main
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for name, argv in jobs.items():
        try:
            main.main(args=argv, prog_name="mergekit-yaml", standalone_mode=False)
            results[name] = None
        except BaseException as exc:  # noqa: BLE001 - SystemExit included: report, go on
            results[name] = f"{type(exc).__name__}: {exc}\\n" + traceback.format_exc()[-4000:]
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def run_mergekit_batch(jobs: Mapping[str, tuple[Mapping, Path]], *, extra_args: Sequence[str] = (),
                       seed: int | None = 0, timeout: float = DEFAULT_TIMEOUT,
                       per_job_args: Mapping[str, Sequence[str]] | None = None) -> dict[str, Path | MergekitError]:
    """Run several configs in one mergekit process: ``{name: (config, out_dir)}`` -> ``{name: out_dir}``,
    or a :class:`MergekitError` for the configs mergekit rejected (the others still run).

    Each job is the mergekit-yaml click command called with exactly the arguments :func:`run_mergekit`
    passes (``main.main(args=[...], standalone_mode=False)``), so options, logging set-up and the random
    seed (reset per job) go through the same code; only the interpreter start-up is shared.
    """
    if not jobs:
        return {}
    argv = {}
    for name, (config, out_dir) in jobs.items():
        config_file = write_config(config, _config_path(Path(out_dir)))
        argv[name] = [str(config_file), str(out_dir), *MERGEKIT_FLAGS, *_seed_args(seed), *extra_args,
                      *((per_job_args or {}).get(name, ()))]
    first_out = Path(next(iter(jobs.values()))[1])
    jobs_file = first_out.parent / f".mergekit-batch-{os.getpid()}.json"
    results_file = jobs_file.with_suffix(".results.json")
    jobs_file.write_text(json.dumps(argv))
    python = MERGEKIT_VENV / "bin" / "python"
    try:
        proc = subprocess.run([str(python), "-c", _BATCH_DRIVER, str(jobs_file), str(results_file)],
                              capture_output=True, text=True, timeout=timeout, env=_subprocess_env())
        if proc.returncode != 0 or not results_file.exists():
            raise MergekitError(f"mergekit batch driver failed ({proc.returncode})\n{proc.stderr[-6000:]}")
        errors = json.loads(results_file.read_text())
    except subprocess.TimeoutExpired as exc:
        raise MergekitError(f"mergekit batch timed out after {timeout:.0f} s\n{exc.stderr or ''}") from exc
    finally:
        jobs_file.unlink(missing_ok=True)
        results_file.unlink(missing_ok=True)
    return {
        name: (Path(out_dir) if errors.get(name) is None else MergekitError(f"mergekit-yaml {name}: {errors[name]}"))
        for name, (_config, out_dir) in jobs.items()
    }


# --------------------------------------------------------------------------------------------------
# Reading and comparing outputs


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those its index names, else ``*.safetensors``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return files


def load_merged(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a merged folder (single file or shards + index), read with the safetensors library."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name in tensors:
                    raise AssertionError(f"{name} is in more than one shard of {folder}")
                tensors[name] = handle.get_tensor(name)
    index = Path(folder) / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(tensors), f"{index}: weight_map and shard contents differ"
    return tensors


def assert_tensors_close(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], *,
                         rtol: float = 1e-4, atol: float = 1e-5, scale_atol: float = 0.0, check_dtype: bool = True,
                         label: str = "") -> None:
    """Same names, shapes (and dtypes), and every element within ``atol + rtol * |theirs|``
    (plus ``scale_atol * max |theirs|`` of its tensor, for low-precision comparisons).

    On failure the message names the worst tensor (largest excess over the bound), its worst element
    (index, both values), how many elements of it are off, and the next-worst tensors.
    """
    prefix = f"{label}: " if label else ""
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing or extra:
        raise AssertionError(f"{prefix}tensor names differ: missing {missing[:10]}, unexpected {extra[:10]}")
    problems = []
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            raise AssertionError(f"{prefix}{name}: shape {tuple(a.shape)} vs mergekit's {tuple(b.shape)}")
        if check_dtype and a.dtype != b.dtype:
            raise AssertionError(f"{prefix}{name}: dtype {a.dtype} vs mergekit's {b.dtype}")
        x, y = a.double(), b.double()
        nonfinite = ~torch.isfinite(x) | ~torch.isfinite(y)
        if nonfinite.any():
            same = (x == y) | (torch.isnan(x) & torch.isnan(y))
            if not bool(same[nonfinite].all()):
                where = int((nonfinite & ~same).reshape(-1).nonzero()[0])
                raise AssertionError(f"{prefix}{name}: non-finite values differ at flat index {where}: "
                                     f"{x.reshape(-1)[where].item()} vs {y.reshape(-1)[where].item()}")
            x, y = torch.where(nonfinite, 0.0, x), torch.where(nonfinite, 0.0, y)
        bound = atol + rtol * y.abs()
        if scale_atol and y.numel():
            bound = bound + scale_atol * y.abs().max()
        excess = (x - y).abs() - bound
        if x.numel() and excess.max() > 0:
            flat = int(excess.reshape(-1).argmax())
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)) if x.ndim else ()
            ratio = float(excess.reshape(-1)[flat] / bound.reshape(-1)[flat])
            problems.append((ratio, name, index, x.reshape(-1)[flat].item(), y.reshape(-1)[flat].item(),
                             int((excess > 0).sum()), x.numel()))
    if problems:
        problems.sort(reverse=True)
        ratio, name, index, ours_v, theirs_v, bad, total = problems[0]
        others = ", ".join(f"{p[1]} ({p[5]})" for p in problems[1:6])
        raise AssertionError(
            f"{prefix}{len(problems)} tensor(s) differ beyond atol={atol:g} + rtol={rtol:g}·|x|; "
            f"worst: {name}{list(index)} "
            f"ours={ours_v!r} mergekit={theirs_v!r} (|diff|={abs(ours_v - theirs_v):.3g}, {ratio + 1:.3g}× the bound; "
            f"{bad}/{total} elements off)" + (f"; also {others}" if others else "")
        )


# --------------------------------------------------------------------------------------------------
# Fixture: a tiny Llama base and three fine-tunes

FIXTURE_CONFIG = llama_config(vocab=64, hidden=16, layers=4, intermediate=32, heads=4, kv_heads=2)
FINE_TUNES = ("ft_a", "ft_b", "ft_c")
MODELS = ("base", *FINE_TUNES)
# Task vectors per tensor, from unit-RMS components: S shared by all three, P shared by ft_a and ft_b but
# entering ft_c with the opposite sign (sign conflicts), U_x private. Times the base tensor's RMS and a
# per-fine-tune size (relative to the weights), times a depth factor (deeper layers change more).
MIX = {
    "ft_a": (0.02, {"S": 0.55, "P": 0.45, "U": 0.70}),
    "ft_b": (0.03, {"S": 0.55, "P": 0.25, "U": 0.80}),
    "ft_c": (0.05, {"S": 0.35, "P": -0.60, "U": 0.72}),
}
# Realistic quirk: ft_c froze its embeddings, so its task vector is exactly zero there.
FROZEN = {("ft_c", "model.embed_tokens.weight")}


def _depth_factor(name: str, layers: int) -> float:
    if ".layers." in name:
        return 0.7 + 0.7 * int(name.split(".layers.")[1].split(".")[0]) / max(1, layers - 1)
    return 0.5 if "embed_tokens" in name else 1.0


def fixture_states(
    dtype: torch.dtype = torch.float32, config: dict | None = None, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"base": state, "ft_a": ..., "ft_b": ..., "ft_c": ...}``, deterministic (seeded per tensor name).

    For bfloat16 the base is rounded first and each fine-tune is ``round(base + τ)``, as a bf16 fine-tune
    stores it, so small task-vector entries vanish and the stored task vectors are quantised.
    """
    config = config or FIXTURE_CONFIG
    base32 = llama_state(config, seed=seed)
    base = {name: t.to(dtype) for name, t in base32.items()}
    states = {"base": base}
    for ft in FINE_TUNES:
        states[ft] = {}
    for name, tensor in base.items():
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        comps = {c: torch.randn(tensor.shape, generator=g) for c in ("S", "P")}
        rms = float(tensor.float().pow(2).mean().sqrt())
        scale = rms * _depth_factor(name, config["num_hidden_layers"])
        for ft in FINE_TUNES:
            private = torch.randn(tensor.shape, generator=g)
            size, mix = MIX[ft]
            tau = size * scale * (mix["S"] * comps["S"] + mix["P"] * comps["P"] + mix["U"] * private)
            if (ft, name) in FROZEN:
                tau = torch.zeros_like(tau)
            states[ft][name] = (tensor.float() + tau).to(dtype)
    return states


def write_fixture(root: Path, dtype: torch.dtype = torch.float32, config: dict | None = None) -> dict[str, Path]:
    """Write ``root/{base,ft_a,ft_b,ft_c}`` (model.safetensors + config.json); return the four folders.

    No tokenizer files: mergekit needs none when run with --no-copy-tokenizer. Rewrites nothing that is
    already there (the files are deterministic)."""
    from safetensors.torch import save_file

    config = dict(config or FIXTURE_CONFIG)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    paths = {name: Path(root) / name for name in MODELS}
    if all((p / "model.safetensors").exists() and (p / "config.json").exists() for p in paths.values()):
        return paths
    for name, state in fixture_states(dtype, config).items():
        paths[name].mkdir(parents=True, exist_ok=True)
        save_file(state, str(paths[name] / "model.safetensors"), metadata={"format": "pt"})
        (paths[name] / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def write_fixtures(root: Path) -> dict[str, str]:
    """The fixture in float32 (``base``, ``ft_a``, …) and bfloat16 (``bbase``, ``bft_a``, …) under ``root``, keyed
    by the names the cases' ``$…`` placeholders use."""
    paths = {name: str(path) for name, path in write_fixture(Path(root) / "f32", torch.float32).items()}
    paths.update({f"b{name}": str(path) for name, path in write_fixture(Path(root) / "bf16", torch.bfloat16).items()})
    return paths


def tensor_names(config: dict | None = None) -> set[str]:
    return set(llama_state(config or FIXTURE_CONFIG))


def sliced_names(total_layers: int, config: dict | None = None) -> set[str]:
    """The tensor names of a Llama of ``total_layers`` layers (e.g. after a passthrough layer stack)."""
    config = dict(config or FIXTURE_CONFIG)
    config["num_hidden_layers"] = total_layers
    return tensor_names(config)


def task_vector_stats(merged: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                      tuned: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """For a one-fine-tune random-drop merge (DARE, DELLA): how ``merged - base`` relates to ``τ = tuned - base``.

    ``kept``: fraction of the nonzero task-vector entries kept (nonzero in the merge); ``residual``: worst
    over tensors of max |(merged - base) - c·τ·kept| / max |merged|, with c the tensor's least-squares
    factor (~1e-7 when each tensor's kept entries are all scaled by one factor); ``factor_min`` /
    ``factor_max``: the range of c; ``l1_ratio``: worst |log| of the L1-norm ratio merged/original (0 when
    every tensor's L1 norm is preserved); ``top_kept`` / ``bottom_kept``: kept fraction among each row's
    larger / smaller half of |τ| (DELLA keeps large entries more often, DARE does not care).
    """
    kept = total = top = top_n = bottom = bottom_n = 0
    residual = l1 = 0.0
    factors = []
    for name, b in base.items():
        tau = tuned[name].double() - b.double()
        out = merged[name].double() - b.double()
        nonzero = tau != 0
        if not nonzero.any():
            continue
        keep = (out != 0) & nonzero
        kept += int(keep.sum())
        total += int(nonzero.sum())
        if keep.any():
            t = tau * keep
            c = float((out * t).sum() / (t * t).sum())
            factors.append(c)
            residual = max(residual, float((out - c * t).abs().max() / merged[name].double().abs().max()))
            l1 = max(l1, abs(math.log(float(out.abs().sum() / tau.abs().sum()))))
        rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], -1)
        krows = keep.reshape(rows.shape)
        upper = rows.abs().argsort(dim=1).argsort(dim=1) >= rows.shape[1] // 2
        top += int((krows & upper).sum())
        top_n += int(upper.sum())
        bottom += int((krows & ~upper).sum())
        bottom_n += int((~upper).sum())
    return {"kept": kept / total, "residual": residual, "factor_min": min(factors), "factor_max": max(factors),
            "l1_ratio": l1, "top_kept": top / top_n, "bottom_kept": bottom / bottom_n}


def trim_ties(base: Mapping[str, torch.Tensor], tuned: Mapping[str, Mapping[str, torch.Tensor]],
              densities: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Per tensor, the elements where a top-k magnitude trim (TIES) has a choice to make: some fine-tune's
    |τ| there equals its k-th largest magnitude and more entries share that magnitude than places remain.

    Which of those a trim keeps is up to the sort: mergekit takes ``torch.argsort(|τ|, descending=True)[:k]``,
    an unstable sort whose order among equal values depends on the torch build and device. Only
    quantised task vectors (bf16 inputs) have such ties in practice. ``tuned``: ``{model: state}``,
    ``densities``: ``{model: density}``; k = max(1, ⌊density·n⌋), as mergekit."""
    masks = {}
    for name, b in base.items():
        mask = torch.zeros(b.shape, dtype=torch.bool)
        for model, density in densities.items():
            magnitude = (tuned[model][name].float() - b.float()).abs().reshape(-1)
            k = max(1, int(density * magnitude.numel()))
            if density >= 1 or k >= magnitude.numel():
                continue
            threshold = magnitude.sort(descending=True).values[k - 1]
            if int((magnitude >= threshold).sum()) > k:
                mask |= (magnitude == threshold).reshape(b.shape)
        masks[name] = mask
    return masks

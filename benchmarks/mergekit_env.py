"""A separate virtual environment with mergekit 0.1.5, the reference the compatibility suite compares against.

Run as a script it creates (or checks) the venv and prints how long the install took and its size::

    python benchmarks/mergekit_env.py            # -> REPO/.mergekit-venv
    python benchmarks/mergekit_env.py --force    # rebuild from scratch
    python benchmarks/mergekit_env.py --path DIR

Imported, :func:`ensure_mergekit_venv` returns the path of the venv's ``mergekit-yaml``, building the
venv first when needed::

    from mergekit_env import ensure_mergekit_venv
    exe = ensure_mergekit_venv()

The install, in order:

1. ``torch==2.13.0`` **first**, the CPU build: the ``torch-2.13.0+cpu`` wheel from this machine's disk
   (``$MERGESCOPE_TORCH_WHEEL``, ``$PIP_FIND_LINKS`` or ``/opt/wheels``), otherwise ``torch==2.13.0+cpu``
   from the PyTorch CPU index. The ``+cpu`` local version is never on PyPI, so pip cannot substitute a
   CUDA build; later steps run under a constraint pinning that exact version, so nothing replaces it.
2. ``mergekit==0.1.5`` from PyPI with ``--no-deps``: its metadata also requires ``datasets`` (with
   pyarrow and pandas), ``scipy``, ``sentencepiece`` and ``protobuf``, which ``mergekit-yaml`` never
   imports for safetensors models with no tokenizer merging; skipping them saves ~0.4 GB.
3. The runtime dependencies ``mergekit-yaml`` does import, pinned to a set known to work with
   mergekit 0.1.5 (it requires transformers 5.x, pydantic 2, accelerate >= 1.6, peft >= 0.18; peft is
   imported at start-up by ``mergekit.common``).

Then a smoke test (a linear merge of a one-layer Llama through ``mergekit-yaml``) and a marker file
recording the versions; a later call with a matching marker returns at once. The venv needs no
network after it is built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".mergekit-venv"
MARKER_NAME = ".mergescope-mergekit-ok"

TORCH_VERSION = "2.13.0"
MERGEKIT_VERSION = "0.1.5"
# What mergekit-yaml imports, at versions that install and run together with mergekit 0.1.5 on
# Python 3.11 (found by trying; the newest releases at the time). Transitive dependencies float.
RUNTIME_PINS = (
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "huggingface_hub==2.4.0",
    "pydantic==2.14.4",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "safetensors==0.8.0",
    "immutables==0.21",
    "click==8.5.1",
    "tqdm==4.70.1",
    "pyyaml",
    "typing-extensions",
)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

_SMOKE = textwrap.dedent(
    """
    import json, subprocess, sys, tempfile
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file

    assert torch.version.cuda is None, f"a CUDA build of torch was installed: {torch.__version__}"
    exe = Path(sys.argv[1])
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8, "hidden_size": 4,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    names = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4),
             "model.layers.0.self_attn.q_proj.weight": (4, 4), "model.layers.0.self_attn.k_proj.weight": (2, 4),
             "model.layers.0.self_attn.v_proj.weight": (2, 4), "model.layers.0.self_attn.o_proj.weight": (4, 4),
             "model.layers.0.mlp.gate_proj.weight": (8, 4), "model.layers.0.mlp.up_proj.weight": (8, 4),
             "model.layers.0.mlp.down_proj.weight": (4, 8), "model.layers.0.input_layernorm.weight": (4,),
             "model.layers.0.post_attention_layernorm.weight": (4,)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        states = []
        for i in range(2):
            g = torch.Generator().manual_seed(i)
            states.append({n: torch.randn(s, generator=g) for n, s in names.items()})
            (tmp / f"m{i}").mkdir()
            save_file(states[-1], str(tmp / f"m{i}" / "model.safetensors"), metadata={"format": "pt"})
            (tmp / f"m{i}" / "config.json").write_text(json.dumps(cfg))
        (tmp / "c.yml").write_text(
            f"merge_method: linear\\nmodels:\\n  - model: {tmp / 'm0'}\\n    parameters: {{weight: 1.0}}\\n"
            f"  - model: {tmp / 'm1'}\\n    parameters: {{weight: 3.0}}\\ndtype: float32\\n")
        subprocess.run([str(exe), str(tmp / "c.yml"), str(tmp / "out"), "--device", "cpu", "--no-copy-tokenizer",
                        "--quiet"], check=True)
        out = load_file(str(tmp / "out" / "model.safetensors"))
        assert set(out) == set(names), sorted(set(out) ^ set(names))
        for n in names:
            torch.testing.assert_close(out[n], 0.25 * states[0][n] + 0.75 * states[1][n])
    print("smoke test passed: torch", torch.__version__)
    """
)


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def _spec() -> dict:
    return {
        "mergekit": MERGEKIT_VERSION,
        "torch": f"{TORCH_VERSION}+cpu",
        "pins": list(RUNTIME_PINS),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def marker_path(path: Path = DEFAULT_VENV) -> Path:
    return Path(path) / MARKER_NAME


def venv_is_ready(path: Path = DEFAULT_VENV) -> bool:
    """True when ``path`` holds a venv this module built and smoke-tested with the current pins."""
    path = Path(path)
    marker = marker_path(path)
    if not (marker.is_file() and _bin(path, "mergekit-yaml").is_file() and _bin(path, "python").exists()):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(key) == value for key, value in _spec().items())


def find_torch_cpu_wheel() -> Path | None:
    """The ``torch-2.13.0+cpu`` wheel for this Python on this machine's disk, if there is one."""
    explicit = os.environ.get("MERGESCOPE_TORCH_WHEEL")
    if explicit and Path(explicit).is_file():
        return Path(explicit)
    folders = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split() if p and "://" not in p]
    folders.append(Path("/opt/wheels"))
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in folders:
        if folder.is_dir():
            for wheel in sorted(folder.glob(f"torch-{TORCH_VERSION}+cpu-{tag}-{tag}-*.whl")):
                return wheel
    return None


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _run(cmd: list[str], *, quiet: bool) -> None:
    if not quiet:
        print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout or ''}")


def ensure_mergekit_venv(path: Path = DEFAULT_VENV, *, force: bool = False, quiet: bool = True) -> Path:
    """Create the mergekit venv at ``path`` unless a working one is there; return its ``mergekit-yaml``."""
    path = Path(path).resolve()
    exe = _bin(path, "mergekit-yaml")
    if not force and venv_is_ready(path):
        return exe
    if path.exists():
        if not (path / "pyvenv.cfg").is_file() and any(path.iterdir()):
            raise RuntimeError(f"{path} exists and is not a virtual environment; not removing it")
        shutil.rmtree(path)

    start = time.perf_counter()
    # The base interpreter, so the new venv does not inherit a caller venv's site-packages.
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    _run([base_python, "-m", "venv", str(path)], quiet=quiet)
    python = str(_bin(path, "python"))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    if quiet:
        pip.append("--quiet")

    # 1. torch, CPU build, first.
    wheel = find_torch_cpu_wheel()
    if wheel is not None:
        _run([*pip, str(wheel)], quiet=quiet)
    else:
        _run([*pip, f"torch=={TORCH_VERSION}+cpu", "--extra-index-url", TORCH_CPU_INDEX], quiet=quiet)
    constraints = path / "mergescope-constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}+cpu\n")

    # 2. mergekit itself, without its optional-in-practice heavy requirements.
    _run([*pip, "--no-deps", f"mergekit=={MERGEKIT_VERSION}"], quiet=quiet)
    # 3. what mergekit-yaml imports.
    _run([*pip, "-c", str(constraints), *RUNTIME_PINS], quiet=quiet)

    # Smoke test: the CPU torch survived and mergekit-yaml merges a tiny Llama correctly.
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(_SMOKE)
    try:
        _run([python, script.name, str(exe)], quiet=quiet)
    finally:
        os.unlink(script.name)

    seconds = time.perf_counter() - start
    record = {**_spec(), "install_seconds": round(seconds, 1), "size_bytes": _dir_size(path),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch_wheel": str(wheel) if wheel else TORCH_CPU_INDEX}
    marker_path(path).write_text(json.dumps(record, indent=2) + "\n")
    return exe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_VENV, help=f"venv folder (default: {DEFAULT_VENV})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a working venv is there")
    parser.add_argument("--verbose", action="store_true", help="show pip's output")
    args = parser.parse_args(argv)

    already = not args.force and venv_is_ready(args.path)
    start = time.perf_counter()
    exe = ensure_mergekit_venv(args.path, force=args.force, quiet=not args.verbose)
    elapsed = time.perf_counter() - start
    record = json.loads(marker_path(exe.parent.parent).read_text())
    if already:
        print(f"already built ({elapsed:.2f} s to check): {exe}")
        print(f"built {record['created']} in {record['install_seconds']} s")
    else:
        print(f"built in {elapsed:.1f} s: {exe}")
    print(f"size: {_dir_size(exe.parent.parent) / 1e9:.2f} GB; torch {record['torch']}, mergekit {record['mergekit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

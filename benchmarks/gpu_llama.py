"""mergescope on the GPU against mergescope on the CPU of the same machine, in the same run.

    python benchmarks/gpu_llama.py [--scale S] [--repeats N] [--methods ties task_arithmetic dare_ties]

Builds (once) the ~267M-parameter bf16 Llama base and three fine-tunes of ``llama_fixture.py``, warms the
page cache, then times in fresh processes (best of ``--repeats``, devices alternating):

* **floors** — starting python and torch (and a CUDA context), reading every input byte once from the
  warm page cache, writing one model's bytes with ``fsync``: what any tool must at least do;
* ``mergescope merge`` of each plan of ``merge_llama.py`` with ``--device cpu`` and ``--device cuda``;
* ``mergescope analyze`` (three fine-tunes, ``--density 0.5``) with each device.

It prints wall times, the GPU/CPU ratio, the GPU time against its floor (start + read, + write for a
merge), peak RSS (the child's own ``VmHWM``), and compares the GPU merge with
the CPU merge tensor by tensor (bf16 output: within one rounding step; random methods draw other masks on
the GPU, so only their shapes are compared). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_fixture import FINETUNES, build, default_root  # noqa: E402
from merge_llama import PLANS, alternate, compare, plan_for  # noqa: E402
from read_checkpoints import _warm_cache  # noqa: E402

RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
STARTUP = {
    "cpu": "import torch; torch.zeros(1).sum()",
    "cuda": "import torch; torch.zeros(1, device='cuda').sum().item()",
}


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process.

    The peak is the child's own ``VmHWM`` (its address space's high-water mark, which starts afresh at
    ``exec``), polled every 10 ms until it exits. ``wait4``'s ``ru_maxrss`` would count this (large)
    parent too: Linux carries the pre-``exec`` high-water mark of a forked child into it.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status = Path(f"/proc/{proc.pid}/status")
    peak = 0
    while proc.poll() is None:
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
            peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    return seconds, peak


def floor_seconds(paths: list[Path]) -> float:
    """Reading every input byte once from the warm page cache."""
    started = time.perf_counter()
    _warm_cache(paths)
    return time.perf_counter() - started


def write_floor_seconds(folder: Path, nbytes: int) -> float:
    """Writing ``nbytes`` (one merged model) to ``folder`` and ``fsync``-ing it, as the checkpoint writer does."""
    block = os.urandom(1 << 20) * 64
    path = folder / "write-floor.bin"
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for offset in range(0, nbytes, len(block)):
            f.write(block[: nbytes - offset])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"], choices=sorted(PLANS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark compares --device cuda with --device cpu")

    paths = build(default_root(args.scale), scale=args.scale)
    inputs = [paths["base"], *(paths[k] for k in FINETUNES)]
    nbytes = _warm_cache(inputs)
    read_floor = min(floor_seconds(inputs) for _ in range(3))
    mergescope = shutil.which("mergescope") or str(Path(sys.executable).with_name("mergescope"))
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=default_root(args.scale).parent))
    out_bytes = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    write_floor = min(write_floor_seconds(work, out_bytes) for _ in range(2))
    startup = {
        device: min(timed([sys.executable, "-c", code])[0] for _ in range(2)) for device, code in STARTUP.items()
    }
    print(f"machine  {os.cpu_count()} CPUs, {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(f"inputs   {nbytes / 1e9:.2f} GB (bf16 base + {len(FINETUNES)} fine-tunes), warm page cache")
    print(
        f"floors   read inputs {read_floor:.2f}s, write+fsync one model {write_floor:.2f}s, "
        f"start python+torch {startup['cpu']:.2f}s (cpu) {startup['cuda']:.2f}s (cuda, with context)"
    )
    print("         a merge's floor: start + read + write; an analysis's: start + read")
    print(
        f"{'task':22s}{'cpu':>8s}{'cuda':>8s}{'cuda/cpu':>10s}{'cuda/floor':>12s}"
        f"{'RSS cpu':>10s}{'RSS cuda':>10s}  outputs"
    )
    try:
        tasks: dict[str, dict[str, list[str]]] = {}
        for method in args.methods:
            plan = work / f"{method}.yml"
            plan.write_text(yaml.safe_dump(plan_for(method, paths), sort_keys=False))
            tasks[f"merge {method}"] = {
                device: [mergescope, "merge", str(plan), "-o", str(work / f"{method}-{device}"), "--device", device,
                         "--force"]
                for device in ("cpu", "cuda")
            }
        tasks["analyze (density 0.5)"] = {
            device: [mergescope, "analyze", *map(str, inputs), "--density", "0.5", "--device", device, "--no-cache",
                     "--json", str(work / f"analysis-{device}.json")]
            for device in ("cpu", "cuda")
        }
        for label, commands in tasks.items():
            runs = alternate(commands, args.repeats, run=timed)
            best = {device: min(r) for device, r in runs.items()}
            floor = startup["cuda"] + read_floor + (write_floor if label.startswith("merge") else 0.0)
            outputs = ""
            if label.startswith("merge"):
                method = label.split()[1]
                count, worst = (
                    compare(work / f"{method}-cuda", work / f"{method}-cpu") if method not in RANDOM else (0, 0.0)
                )
                outputs = (
                    f"{count} tensors, max diff {worst:.1f} bf16 steps" if count else "random masks differ by device"
                )
            else:
                cpu_total = json.loads((work / "analysis-cpu.json").read_text())["total"]
                cuda_total = json.loads((work / "analysis-cuda.json").read_text())["total"]
                gap = max(abs(a["cosine"] - b["cosine"]) for a, b in zip(cpu_total["pairs"], cuda_total["pairs"]))
                outputs = f"max cosine difference {gap:.1e}"
            print(
                f"{label:22s}{best['cpu'][0]:7.2f}s{best['cuda'][0]:7.2f}s{best['cuda'][0] / best['cpu'][0]:9.2f}x"
                f"{best['cuda'][0] / floor:11.2f}x"
                f"{best['cpu'][1] / 1e9:8.2f}GB{best['cuda'][1] / 1e9:8.2f}GB  {outputs}"
            )
            print(json.dumps({"task": label, "runs": runs}), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
